"""Every export carries a model card (README.md) with the Hub's metadata header, what it was trained on and how,
and its scores once measured; configs of format version 1 (before `training` was recorded) still load."""
import json

import pytest
from huggingface_hub import ModelCard

import evaluate
import train
from builders import FAST_METRICS, make_pickle, train_args
from captioning.data import shapes
from models import ClipCaptionModel
from models.checkpoint_io import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_training_export_has_a_complete_card(tmp_path, gpt2_dir):
    data = make_pickle(tmp_path / "train.pkl", n_images=8)
    train.main(train_args(data, tmp_path / "run", gpt2_dir, "--max_steps", 1, "--license", "apache-2.0"))
    export = tmp_path / "run" / "coco_prefix_latest"
    card = ModelCard.load(export / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag, card.data.license) == \
        ("tini-tiny-captioner", "image-to-text", "apache-2.0")
    training = json.loads((export / "config.json").read_text())["training"]
    assert training["data"] == str(data) and training["kind"] == "features" and training["num_captions"] == 24
    assert training["stage"] == "cross-entropy" and training["license"] == "apache-2.0"
    assert training["command"].startswith(f"python train.py --data {data} --out_dir {tmp_path / 'run'} ")
    assert "--license apache-2.0" in training["command"] and "--log_every" not in training["command"]
    assert training["command"] in card.text and str(data) in card.text and "## Evaluation" not in card.text
    assert ClipCaptionModel.from_pretrained(export).config.training == training


def test_the_shapes_dataset_is_recorded_and_evaluation_adds_scores(tmp_path, gpt2_dir, export, karpathy_file,
                                                                   coco_images):
    data = shapes.generate(tmp_path / "shapes", num_train=8, num_val=0, num_test=0, seed=1, size=32)
    train.main(train_args(None, tmp_path / "run", gpt2_dir, "--train_encoder", "--annotations",
                          data / "captions_train.json", "--images_root", data, "--encoder", "test_resnet",
                          "--encoder_weights", "random", "--image_size", 32, "--max_steps", 1, "--dataset",
                          "shapes"))
    config = json.loads((tmp_path / "run" / "coco_prefix_latest" / "config.json").read_text())
    assert config["training"]["dataset"] == "shapes" and config["training"]["kind"] == "images"
    report = evaluate.main(["--checkpoint", str(export), "--images_root", str(coco_images), "--annotations",
                            str(karpathy_file), "--split", "test", "--max_length", "8", "--device", "cpu",
                            *FAST_METRICS])
    text = (export / "README.md").read_text()
    assert "## Evaluation" in text and f"| CIDEr | {report['metrics']['CIDEr']:.2f} |" in text
    assert f"| BLEU-4 | {report['metrics']['Bleu_4']:.2f} |" in text and "(split test)" in text
    assert ModelCard.load(export / "README.md").data.pipeline_tag == "image-to-text"


def test_format_version_1_configs_still_load(tmp_path, exports):
    v1 = tmp_path / "v1"
    v1.mkdir()
    for f in exports["inside"].iterdir():
        (v1 / f.name).write_bytes(f.read_bytes())
    config = json.loads((v1 / "config.json").read_text())
    assert config.pop("format_version") == 3 and "training" in config
    del config["training"]
    (v1 / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    assert ClipCaptionModel.from_pretrained(v1).config.training is None
    config["format_version"] = 4
    (v1 / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"format_version 4, this code reads \(1, 2, 3\)"):
        ClipCaptionModel.from_pretrained(v1)
