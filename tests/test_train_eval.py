"""train.py --eval_every: caption metrics in train_log.jsonl and the best export by CIDEr kept as best/."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from builders import ROOT, make_pickle, train_args
from captioning.data.features import read_features
from captioning.training import evaluation
from captioning.training.datasets import FeatureCaptionDataset, caption_table_from_features
from captioning.metrics import score_captions
from models.decoding import DecodingOptions
from predict import Captioner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # No encoder metadata: the export then captions features alone and loads without timm weights.
    root = tmp_path_factory.mktemp("data")
    return (make_pickle(root / "train.pkl", n_images=8, metadata=False),
            make_pickle(root / "val.pkl", n_images=6, seed=1, metadata=False))


def eval_records(out_dir):
    lines = (out_dir / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_cider" in r]


def test_eval_every_logs_metrics_and_keeps_the_best_export(tmp_path, data, gpt2_dir, capsys):
    train_pkl, val_pkl = data
    train.main(train_args(train_pkl, tmp_path, gpt2_dir, "--epochs", 2, "--val_data", val_pkl,
                          "--eval_every", 1, "--eval_images", 4))
    records = eval_records(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1]
    # each epoch's scores are those of its export, captioned and scored again here
    raw = read_features(val_pkl)
    references = {i: [c["caption"] for c in raw["captions"] if c["clip_embedding"] == i] for i in range(4)}
    for record in records:
        captioner = Captioner.from_pretrained(tmp_path / f"coco_prefix-{record['epoch']:03d}")
        options = DecodingOptions(beam_size=evaluation.BEAM_SIZE, max_length=captioner.fit_max_length(None)[0])
        results = captioner.predict([raw["clip_embedding"][i].float() for i in range(4)], options)
        scores = score_captions({i: r.caption for i, r in enumerate(results)}, references,
                                metrics=("BLEU", "CIDEr"))["metrics"]
        assert record["eval_images"] == 4
        assert (record["eval_cider"], record["eval_bleu4"]) == pytest.approx((scores["CIDEr"], scores["Bleu_4"]))
    info = json.loads((tmp_path / "best" / "eval.json").read_text())
    assert info["cider"] == max(r["eval_cider"] for r in records)
    assert info["source"] in ("coco_prefix-000", "coco_prefix-001")
    captioner = Captioner.from_pretrained(tmp_path / "best")
    assert isinstance(captioner.caption(torch.randn(16), beam_size=2, max_length=5), str)
    assert "CIDEr" in capsys.readouterr().out


def test_eval_images_are_the_first_distinct_images_with_all_their_captions(data):
    raw = read_features(data[1])
    table = caption_table_from_features(raw, data[1])
    val = FeatureCaptionDataset(raw["clip_embedding"], table, None, np.arange(len(table)))
    images = evaluation.select_eval_images(val, 2)
    assert images.ids == [0, 1]
    assert images.references == {i: [c for c, j in zip(table.captions, table.image_index) if j == i] for i in (0, 1)}
    assert torch.equal(images.items[1], raw["clip_embedding"][1].float())


def test_resume_keeps_a_better_best(tmp_path, data, gpt2_dir):
    train_pkl, val_pkl = data
    common = ["--val_data", val_pkl, "--eval_every", 1, "--eval_images", 4]
    train.main(train_args(train_pkl, tmp_path, gpt2_dir, "--epochs", 1, *common))
    best = tmp_path / "best" / "eval.json"
    best.write_text(json.dumps(dict(json.loads(best.read_text()), cider=1e9)))  # unbeatable
    train.main(train_args(train_pkl, tmp_path, gpt2_dir, "--epochs", 2, "--resume", "latest", *common))
    assert [r["epoch"] for r in eval_records(tmp_path)] == [0, 1]
    assert json.loads(best.read_text())["cider"] == 1e9


def test_eval_every_without_validation_data_is_an_error(tmp_path, data, gpt2_dir):
    with pytest.raises(ValueError, match="--eval_every needs validation data: give --val_data or --val_fraction"):
        train.main(train_args(data[0], tmp_path, gpt2_dir, "--eval_every", 1))
    assert not (tmp_path / "train_log.jsonl").exists()


def test_two_processes_evaluate_once_without_deadlock(tmp_path, data, gpt2_dir):
    flags = train_args(data[0], tmp_path, gpt2_dir, "--bs", 2, "--epochs", 2, "--val_fraction", 0.25,
                       "--eval_every", 1, "--eval_images", 4)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), *flags], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("validation images") == 2  # rank 0 alone, once per epoch
    assert [(r["epoch"], r["eval_images"]) for r in eval_records(tmp_path)] == [(0, 2), (1, 2)]
    assert (tmp_path / "best" / "eval.json").is_file()
