import json
import re

import pytest
import torch
from conftest import FIXTURES
from transformers import AutoTokenizer, GPT2Config

import convert_checkpoint
from models.captioner import ClipCaptionModel
from models.encoder import EncoderConfig, ImageEncoder

REF = torch.load(FIXTURES / "original_reference.pt", weights_only=True)
NORMALISED_REF = torch.load(FIXTURES / "original_transformer_normalised_reference.pt", weights_only=True)
TINYVIT_REF = torch.load(FIXTURES / "official_tinyvit_tiny_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def original_gpt2_dir(tmp_path_factory, tokenizer):
    """The GPT-2 the original fixtures were made with (config only: the weights come from the checkpoint)."""
    path = tmp_path_factory.mktemp("original_gpt2")
    GPT2Config.from_dict(REF["gpt2_config"]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_convert_original_checkpoint_to_export(tmp_path, original_gpt2_dir, tokenizer, kind):
    out = tmp_path / kind
    rc = convert_checkpoint.main(["--checkpoint", str(FIXTURES / f"original_{kind}_prefix.pt"),
                                  "--out_dir", str(out), "--gpt2", str(original_gpt2_dir)])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == "original" and config["mapping_type"] == kind
    assert config["eos_token_ids"] == tokenizer.encode(".")
    assert config["encoder"]["name"] == "tiny_vit_21m_224" and config["encoder"]["preprocessing"] == "clip"
    assert not config["encoder_in_checkpoint"]
    assert config["normalize_prefix"] is (kind == "transformer")  # as the original inference notebooks
    model = ClipCaptionModel.from_pretrained(out).eval()
    ref, suffix = (NORMALISED_REF, "_normalised") if kind == "transformer" else (REF, "")
    with torch.no_grad():
        prefix = model.prefix_embeddings(ref["features"])
        torch.testing.assert_close(prefix, ref[f"prefix_{kind}{suffix}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ref["tokens"], ref["features"]), ref[f"logits_{kind}{suffix}"], atol=1e-5,
                                   rtol=0)
    assert AutoTokenizer.from_pretrained(str(out)).encode("A red dog.") == tokenizer.encode("A red dog.")


@pytest.mark.parametrize("flag, normalised", [("--no-normalize_prefix", False), ("--normalize_prefix", True)])
def test_convert_transformer_checkpoint_normalisation_flag(tmp_path, original_gpt2_dir, capsys, flag, normalised):
    out = tmp_path / "t"
    assert convert_checkpoint.main(["--checkpoint", str(FIXTURES / "original_transformer_prefix.pt"),
                                    "--out_dir", str(out), "--gpt2", str(original_gpt2_dir), flag]) == 0
    assert f"features are {'' if normalised else 'not '}L2-normalised before the mapper (given)" in \
        capsys.readouterr().out
    model = ClipCaptionModel.from_pretrained(out).eval()
    expected = NORMALISED_REF["prefix_transformer_normalised"] if normalised else REF["prefix_transformer"]
    with torch.no_grad():
        torch.testing.assert_close(model.prefix_embeddings(REF["features"]), expected, atol=1e-5, rtol=0)


def test_conversion_says_how_features_are_normalised(tmp_path, original_gpt2_dir, capsys):
    for kind in ("transformer", "mlp"):
        convert_checkpoint.main(["--checkpoint", str(FIXTURES / f"original_{kind}_prefix.pt"),
                                 "--out_dir", str(tmp_path / kind), "--gpt2", str(original_gpt2_dir)])
    out = capsys.readouterr().out
    assert ("features are L2-normalised before the mapper (as the original transformer inference did; "
            "--no-normalize_prefix to decode otherwise)") in out
    assert ("features are not L2-normalised before the mapper (as the original mlp inference did; "
            "--normalize_prefix to decode otherwise)") in out


def test_convert_embeds_an_encoder_weights_file(tmp_path, original_gpt2_dir, capsys):
    """A weights file given with --encoder_weights is embedded: the export captions images without the file,
    with exactly its weights; a file that does not fit the encoder is refused before anything is written."""
    torch.manual_seed(0)
    source = ImageEncoder(EncoderConfig(name="tiny_vit_21m_224", weights="random"))  # 576-d, as the checkpoint
    weights = {k: v.clone() for k, v in source.model.state_dict().items()}
    torch.save(weights, tmp_path / "encoder.pth")
    out = tmp_path / "embedded"
    assert convert_checkpoint.main(["--checkpoint", str(FIXTURES / "original_mlp_prefix.pt"), "--out_dir", str(out),
                                    "--gpt2", str(original_gpt2_dir), "--encoder", "tiny_vit_21m_224",
                                    "--encoder_weights", str(tmp_path / "encoder.pth")]) == 0
    (tmp_path / "encoder.pth").unlink()  # the export must not need it
    model = ClipCaptionModel.from_pretrained(out)
    assert model.config.encoder_in_checkpoint and model.encoder is not None
    loaded = model.encoder.model.state_dict()
    assert sorted(loaded) == sorted(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
    with torch.no_grad():  # and the mapper is still the checkpoint's
        torch.testing.assert_close(model.eval().prefix_embeddings(REF["features"]), REF["prefix_mlp"], atol=1e-5,
                                   rtol=0)

    # the official fixture is a custom-size TinyViT: a mismatched encoder is refused, naming the keys
    rc = convert_checkpoint.main(["--checkpoint", str(FIXTURES / "original_mlp_prefix.pt"), "--out_dir",
                                  str(tmp_path / "x"), "--gpt2", str(original_gpt2_dir), "--encoder",
                                  "tiny_vit_5m_224", "--encoder_weights", str(FIXTURES / "official_tinyvit_tiny.pth")])
    assert rc == 1 and not (tmp_path / "x").exists()
    assert re.search(r"error: .*official_tinyvit_tiny.pth: (weights do not match the model|key '.*' has shape)",
                     capsys.readouterr().err)


def test_convert_official_tinyvit(tmp_path, capsys, monkeypatch):
    out = tmp_path / "tinyvit"
    kwargs = {k: v for k, v in TINYVIT_REF["config"].items() if k != "num_classes"}
    original_init = ImageEncoder.__init__

    def tiny_init(self, config, load_weights=True):  # the fixture is a custom-size TinyViT
        config.model_kwargs = kwargs
        original_init(self, config, load_weights)

    monkeypatch.setattr(ImageEncoder, "__init__", tiny_init)
    assert convert_checkpoint.main(["--tinyvit", str(FIXTURES / "official_tinyvit_tiny.pth"),
                                    "--encoder", "tiny_vit_5m_224", "--out_dir", str(out)]) == 0
    assert "64-d pooled features" in capsys.readouterr().out
    encoder = ImageEncoder.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(TINYVIT_REF["x"]), TINYVIT_REF["features"], atol=1e-5, rtol=0)


def test_convert_reports_errors_without_traceback(tmp_path, capsys, original_gpt2_dir):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = convert_checkpoint.main(["--checkpoint", str(bad), "--out_dir", str(tmp_path / "out"),
                                  "--gpt2", str(original_gpt2_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and "bad.pt: not a readable torch checkpoint" in err and not (tmp_path / "out").exists()
    rc = convert_checkpoint.main(["--checkpoint", str(FIXTURES / "original_mlp_prefix.pt"), "--prefix_length", "9",
                                  "--out_dir", str(tmp_path / "out"), "--gpt2", str(original_gpt2_dir)])
    assert rc == 1 and "prefix_length=9 was given but the weights have prefix_length=4" in capsys.readouterr().err
