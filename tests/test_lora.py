"""LoRA adapters on the decoder (train.py --lora_r, peft): on tiny random GPT-2 and LLaMA decoders, what learns and
what stays, resume, merged and adapters-only exports, CIDEr optimisation on top, and the flags' errors."""
import json
import shutil

import pytest
import torch

import predict
import train
from builders import make_pickle, resume_equals_uninterrupted, train_args, weights
from captioning.inference import Captioner
from captioning.training.state import load_state
from models.captioner import ADAPTERS_DIR, CaptionerConfig, ClipCaptionModel
from models.decoders import load_decoder
from models.lora import LoraSettings, default_targets, is_adapter_key

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_pickle(tmp_path_factory.mktemp("data") / "train.pkl", n_images=6, per_image=2, metadata=False)


def lora_model(source, r=4):
    torch.manual_seed(0)
    model_type = load_decoder(str(source)).config.model_type
    settings = LoraSettings(r=r, alpha=8.0, targets=default_targets(model_type))
    return ClipCaptionModel.create(CaptionerConfig(mapping_type="mlp", prefix_length=2, prefix_size=16,
                                                   gpt2=str(source), eos_token_ids=[0], lora=settings.to_dict()))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_only_the_adapters_and_the_mapper_learn(decoder_dirs, model_type):
    model = lora_model(decoder_dirs[model_type]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("clip_project.") or is_adapter_key(n) for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(1, 100, (4, 6))
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(tokens, torch.randn(4, 16)).backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if k.startswith("clip_project.") or ".lora_" in k}
    assert any(".lora_B." in k for k in changed)  # B starts at zero: the adapters did move the decoder


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_merged_and_adapters_only_exports_caption_as_the_trained_model(tmp_path, decoder_dirs, features,
                                                                       model_type):
    source = shutil.copytree(decoder_dirs[model_type], tmp_path / "decoder")
    train.main(train_args(features, tmp_path / "run", source, "--max_steps", 3, "--lora_r", 4, "--lr", 1e-2,
                          "--export_adapters"))
    export = tmp_path / "run" / "coco_prefix_latest"
    state = load_state(tmp_path / "run" / "coco_prefix_resume.pt")["model"]
    assert any(".lora_A." in k for k in state) and not any(".base_layer." in k for k in state)
    merged = ClipCaptionModel.from_pretrained(export).eval()
    assert merged.config.lora["merged"] and not merged.adapted
    assert not any(is_adapter_key(k) for k in weights(export))
    adapters = ClipCaptionModel.from_pretrained(export / ADAPTERS_DIR).eval()  # the base loads from --gpt2
    assert adapters.adapted and all(k.startswith("clip_project.") or ".lora_" in k
                                    for k in weights(export / ADAPTERS_DIR))
    features_batch = torch.randn(5, 16)
    tokens = torch.randint(1, 100, (5, 7))
    with torch.no_grad():
        assert torch.allclose(merged(tokens, features_batch), adapters(tokens, features_batch), atol=1e-5)
    tokenizer = Captioner.from_pretrained(export).tokenizer
    captions = [Captioner(m, tokenizer).caption(list(features_batch), beam_size=3, max_length=8)
                for m in (merged, adapters)]
    assert captions[0] == captions[1]
    out = tmp_path / "captions.json"
    assert predict.main(["--checkpoint", str(export), "--features", str(features), "--out", str(out),
                         "--beam_size", "2", "--max_length", "6"]) == 0
    assert len(json.loads(out.read_text())) == 6


def test_resume_with_adapters_equals_an_uninterrupted_run(tmp_path, decoder_dirs, features, monkeypatch):
    resume_equals_uninterrupted(tmp_path, monkeypatch, lambda out: train_args(
        features, out, decoder_dirs["llama"], "--max_steps", 4, "--bs", 2, "--save_every_steps", 2, "--lora_r", 4))


def test_cider_optimisation_on_a_lora_export_and_on_its_adapters(tmp_path, decoder_dirs, features):
    train.main(train_args(features, tmp_path / "xe", decoder_dirs["gpt2"], "--max_steps", 2, "--lora_r", 4,
                          "--export_adapters"))
    export = tmp_path / "xe" / "coco_prefix_latest"
    scst = ["--scst", "--scst_max_length", 6, "--max_steps", 1]
    train.main(train_args(features, tmp_path / "new", decoder_dirs["gpt2"], *scst, "--init_from", export,
                          "--lora_r", 2))
    on_top = ClipCaptionModel.from_pretrained(tmp_path / "new" / "coco_prefix_latest")
    assert on_top.config.lora["r"] == 2 and on_top.config.lora["merged"]
    train.main(train_args(features, tmp_path / "more", decoder_dirs["gpt2"], *scst, "--init_from",
                          export / ADAPTERS_DIR))
    continued = ClipCaptionModel.from_pretrained(tmp_path / "more" / "coco_prefix_latest")
    assert continued.config.lora["r"] == 4 and continued.config.training["stage"] == "scst"


def test_bad_combinations_are_errors_naming_the_flag(tmp_path, decoder_dirs, features, capsys):
    with pytest.raises(SystemExit):
        train.main(train_args(features, tmp_path / "a", decoder_dirs["gpt2"], "--lora_r", 0))
    assert "argument --lora_r: " in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--lora_r with --only_prefix: --only_prefix freezes the whole decoder"):
        train.main(train_args(features, tmp_path / "b", decoder_dirs["gpt2"], "--lora_r", 4, "--only_prefix"))
    with pytest.raises(ValueError, match=r"--lora_targets \['q_proj'\]: the gpt2 decoder has no module of that "
                                         r"name; its linear layers are named \[.*'c_attn'"):
        train.main(train_args(features, tmp_path / "c", decoder_dirs["gpt2"], "--lora_r", 4, "--lora_targets",
                              "q_proj"))
    with pytest.raises(ValueError, match=r"--lora_targets and --export_adapters need --lora_r"):
        train.main(train_args(features, tmp_path / "d", decoder_dirs["gpt2"], "--export_adapters"))
    assert not any((tmp_path / name / "coco_prefix_latest").exists() for name in "abcd")
