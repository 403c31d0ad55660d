"""train.py --init_from: fine-tuning an export keeps its architecture and the feature normalisation it decodes with."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config

import convert_checkpoint
import train
from builders import FIXTURES, make_images, make_pickle
from models.captioner import ClipCaptionModel

pytestmark = pytest.mark.usefixtures("one_thread")

REF = torch.load(FIXTURES / "original_reference.pt", weights_only=True)
NORMALISED_REF = torch.load(FIXTURES / "original_transformer_normalised_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer):
    """The original transformer and MLP checkpoints, converted with the defaults."""
    root = tmp_path_factory.mktemp("converted")
    GPT2Config.from_dict(REF["gpt2_config"]).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    for kind in ("transformer", "mlp"):
        assert convert_checkpoint.main(["--checkpoint", str(FIXTURES / f"original_{kind}_prefix.pt"), "--out_dir",
                                        str(root / kind), "--gpt2", str(root / "gpt2")]) == 0
    return root


def scaled_pickle(path, source, scale):
    with open(source, "rb") as f:
        data = pickle.load(f)
    data["clip_embedding"] = data["clip_embedding"] * scale
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def fine_tune(export, data, out_dir, *extra):
    return train.main(["--init_from", str(export), "--data", str(data), "--out_dir", str(out_dir), "--epochs", "1",
                       "--bs", "8", "--warmup_steps", "0", "--log_every", "1", "--device", "cpu", *map(str, extra)])


def test_fine_tuning_a_converted_transformer_checkpoint_keeps_its_normalisation(tmp_path, converted):
    data = make_pickle(tmp_path / "f.pkl", n_images=8, dim=576, metadata=False)
    fine_tune(converted / "transformer", data, tmp_path / "frozen", "--lr", 0)  # weights stay the original's
    export = tmp_path / "frozen" / "coco_prefix-000"
    config = json.loads((export / "config.json").read_text())
    assert (config["mapping_type"], config["prefix_length"], config["num_layers"], config["normalize_prefix"]) == \
        ("transformer", 10, 2, True)
    args = json.loads((tmp_path / "frozen" / "train_args.json").read_text())
    assert (args["mapping_type"], args["normalize_prefix"], args["prefix_length"]) == ("transformer", True, 10)
    with torch.no_grad():
        prefix = ClipCaptionModel.from_pretrained(export).eval().prefix_embeddings(NORMALISED_REF["features"])
    torch.testing.assert_close(prefix, NORMALISED_REF["prefix_transformer_normalised"], atol=1e-5, rtol=0)

    # Training normalises too: features 100 times larger train exactly the same weights.
    fine_tune(converted / "transformer", data, tmp_path / "a", "--lr", 1e-3)
    fine_tune(converted / "transformer", scaled_pickle(tmp_path / "big.pkl", data, 100.0), tmp_path / "b",
              "--lr", 1e-3)
    a, b = (load_file(str(tmp_path / run / "coco_prefix-000" / "model.safetensors")) for run in ("a", "b"))
    original = load_file(str(converted / "transformer" / "model.safetensors"))
    assert not torch.equal(a["clip_project.prefix_const"], original["clip_project.prefix_const"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_init_from_refuses_flags_and_features_that_do_not_fit_the_export(tmp_path, converted):
    data = make_pickle(tmp_path / "f.pkl", n_images=8, dim=576, metadata=False)
    with pytest.raises(ValueError, match=r"--mapping_type mlp conflicts with --init_from .*transformer, whose config "
                                         r"has mapping_type='transformer'"):
        fine_tune(converted / "transformer", data, tmp_path / "x", "--mapping_type", "mlp")
    with pytest.raises(ValueError, match=r"--normalize_prefix True conflicts with --init_from .*mlp, whose config "
                                         r"has normalize_prefix=False"):
        fine_tune(converted / "mlp", data, tmp_path / "y", "--normalize_prefix")
    small = make_pickle(tmp_path / "small.pkl", n_images=8, dim=16, metadata=False)
    with pytest.raises(ValueError, match=r"small.pkl holds pooled features of dimension 16, but the mapper of "
                                         r"--init_from .*transformer takes pooled features of dimension 576"):
        fine_tune(converted / "transformer", small, tmp_path / "z")
    # training the encoder on needs an export that holds one; a converted checkpoint refers to TinyViT only
    annotations = make_images(tmp_path)
    with pytest.raises(ValueError, match=r"--init_from .*transformer holds no encoder weights \(it was trained on "
                                         r"features\): --train_encoder needs an export trained end to end"):
        train.main(["--init_from", str(converted / "transformer"), "--train_encoder", "--annotations",
                    str(annotations), "--images_root", str(tmp_path), "--out_dir", str(tmp_path / "w"),
                    "--device", "cpu"])
