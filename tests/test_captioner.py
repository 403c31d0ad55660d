import json

import pytest
import torch
from transformers import GPT2Config

from builders import FIXTURES, tiny_captioner_on
from models.captioner import ClipCaptionModel
from models.checkpoint_io import CheckpointError
from models.encoder import EncoderConfig, ImageEncoder
from models.original import from_original_state_dict

REF = torch.load(FIXTURES / "original_reference.pt", weights_only=True)


def batch(tokenizer, captions, pad_to=None):
    ids = [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in captions]
    width = pad_to or max(map(len, ids))
    tokens = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return tokens, mask


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_original_checkpoint_reproduces_reference(kind):
    state = torch.load(FIXTURES / f"original_{kind}_prefix.pt", weights_only=True)
    assert any(k.endswith("attn.masked_bias") for k in state)  # the legacy buffers are really there
    # Without normalisation: the original's training forward (its transformer inference normalised; see
    # test_convert_checkpoint for that default)
    model = from_original_state_dict(state, GPT2Config.from_dict(REF["gpt2_config"]),
                                                      normalize_prefix=False).eval()
    assert model.config.mapping_type == kind
    with torch.no_grad():
        prefix = model.prefix_embeddings(REF["features"])
        logits = model(REF["tokens"], REF["features"])
    torch.testing.assert_close(prefix, REF[f"prefix_{kind}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, REF[f"logits_{kind}"], atol=1e-5, rtol=0)


def test_original_import_infers_sizes_and_rejects_mismatches():
    config = GPT2Config.from_dict(REF["gpt2_config"])
    state = torch.load(FIXTURES / "original_transformer_prefix.pt", weights_only=True)
    model = from_original_state_dict(state, config)
    c = model.config
    assert (c.prefix_length, c.prefix_length_clip, c.num_layers, c.prefix_size) == (10, 10, 2, 576)
    with pytest.raises(CheckpointError, match=r"prefix_length=40 was given but the weights have prefix_length=10 "
                                              r"\(clip_project.prefix_const"):
        from_original_state_dict(state, config, prefix_length=40)
    with pytest.raises(CheckpointError, match=r"mapping_type=mlp was given"):
        from_original_state_dict(state, config, mapping_type="mlp")
    deeper = GPT2Config.from_dict({**REF["gpt2_config"], "n_layer": 6})
    with pytest.raises(CheckpointError, match=r"2 GPT-2 layers .* n_layer=6"):
        from_original_state_dict(state, deeper)
    wider = GPT2Config.from_dict({**REF["gpt2_config"], "vocab_size": 50257})
    with pytest.raises(CheckpointError, match=r"'gpt.transformer.wte.weight' has shape \(1000, 64\)"):
        from_original_state_dict(state, wider)
    with pytest.raises(CheckpointError, match="not a ClipCap state dict"):
        from_original_state_dict({"weight": torch.zeros(1)}, config)


def test_parameter_counts_follow_the_original_mapper_sizes(gpt2_dir, tokenizer):
    mlp = tiny_captioner_on(gpt2_dir, tokenizer, mapping_type="mlp")
    n = 32 * 4  # n_embd * prefix_length
    assert sum(p.numel() for p in mlp.clip_project.parameters()) == 16 * (n // 2) + n // 2 + (n // 2) * n + n


def test_loss_is_invariant_to_padding_and_trains_token_zero(gpt2_dir, tokenizer):
    model = tiny_captioner_on(gpt2_dir, tokenizer).eval()
    features = torch.randn(2, 16)
    tokens, mask = batch(tokenizer, ["A red dog on a street.", "A cat."])
    padded, padded_mask = batch(tokenizer, ["A red dog on a street.", "A cat."], pad_to=tokens.shape[1] + 9)
    garbage = padded.clone()
    garbage[padded_mask == 0] = 7  # what sits in padded positions must not matter
    with torch.no_grad():
        base = model.loss(tokens, features, mask)
        assert torch.allclose(base, model.loss(padded, features, padded_mask), atol=1e-6)
        assert torch.allclose(base, model.loss(garbage, features, padded_mask), atol=1e-6)
        # token 0 is a real token (in GPT-2, "!"): a caption of zeros has a loss, it is not ignored
        zeros = torch.zeros(1, 3, dtype=torch.long)
        assert model.loss(zeros, features[:1], torch.ones_like(zeros)) > 0
        # equals a plain cross-entropy over the caption positions of the full logits
        logits = model(tokens, features)[:, model.prefix_length - 1:-1]
        expected = torch.nn.functional.cross_entropy(logits[mask == 1], tokens[mask == 1])
    torch.testing.assert_close(base, expected, atol=1e-5, rtol=1e-5)


def test_only_prefix_trains_the_mapper_only(gpt2_dir, tokenizer):
    model = tiny_captioner_on(gpt2_dir, tokenizer, only_prefix=True)
    model.train()
    assert not model.gpt.training and model.clip_project.training
    decoder_before = {k: v.clone() for k, v in model.gpt.state_dict().items()}
    mapper_before = {k: v.clone() for k, v in model.clip_project.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens, mask = batch(tokenizer, ["A red dog on a street.", "A cat."])
    model.loss(tokens, torch.randn(2, 16), mask).backward()
    assert all(p.grad is None for p in model.gpt.parameters())
    optimizer.step()
    assert all(torch.equal(v, decoder_before[k]) for k, v in model.gpt.state_dict().items())
    assert any(not torch.equal(v, mapper_before[k]) for k, v in model.clip_project.state_dict().items())


@pytest.mark.parametrize("kw", [dict(mapping_type="mlp", normalize_prefix=True),
                                dict(mapping_type="transformer"),
                                dict(feature_type="grid", num_grid_tokens=5)])
def test_save_load_round_trip_gives_identical_logits(tmp_path, gpt2_dir, tokenizer, kw):
    model = tiny_captioner_on(gpt2_dir, tokenizer, **kw).eval()
    model.save_pretrained(tmp_path / "export", tokenizer=tokenizer)
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"config.json", "model.safetensors",
                                                                   "tokenizer.json"}
    loaded = ClipCaptionModel.from_pretrained(tmp_path / "export").eval()
    assert loaded.config == model.config
    features = torch.randn(3, 5, 16) if kw.get("feature_type") == "grid" else torch.randn(3, 16)
    tokens, _ = batch(tokenizer, ["A red dog.", "A cat on a table.", "Blue bus"])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, features), model(tokens, features))
    assert loaded.gpt.lm_head.weight is loaded.gpt.transformer.wte.weight


def test_export_without_decoder_reloads_decoder_from_its_source(tmp_path, gpt2_dir, tokenizer):
    model = tiny_captioner_on(gpt2_dir, tokenizer, only_prefix=True).eval()
    model.save_pretrained(tmp_path / "small", tokenizer=tokenizer, include_decoder=False)
    loaded = ClipCaptionModel.from_pretrained(tmp_path / "small").eval()
    tokens, _ = batch(tokenizer, ["A red dog."])
    features = torch.randn(1, 16)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, features), model(tokens, features))


def test_export_holds_the_encoder_for_end_to_end_models(tmp_path, gpt2_dir, tokenizer):
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32))
    model = tiny_captioner_on(gpt2_dir, tokenizer, encoder, mapping_type="mlp", prefix_length=2).eval()
    model.save_pretrained(tmp_path / "e2e", tokenizer=tokenizer)
    loaded = ClipCaptionModel.from_pretrained(tmp_path / "e2e").eval()
    assert loaded.config.encoder_in_checkpoint and loaded.config.encoder["data_config"]["input_size"] == [3, 32, 32]
    images = torch.randn(2, 3, 32, 32)
    tokens, _ = batch(tokenizer, ["A red dog.", "A cat."])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, images=images), model(tokens, images=images))


def test_checkpoint_errors_are_clear(tmp_path, gpt2_dir, tokenizer):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        ClipCaptionModel.from_pretrained(tmp_path / "nowhere")
    original = FIXTURES / "original_mlp_prefix.pt"
    with pytest.raises(CheckpointError, match="is a file.*convert_checkpoint.py"):
        ClipCaptionModel.from_pretrained(original)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ClipCaptionModel.from_pretrained(tmp_path / "empty")

    model = tiny_captioner_on(gpt2_dir, tokenizer)
    export = tmp_path / "export"
    model.save_pretrained(export, tokenizer=tokenizer)
    weights = export / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        ClipCaptionModel.from_pretrained(export)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        ClipCaptionModel.from_pretrained(export)
    weights.write_bytes(good)

    config_path = export / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prefix_length": 6}))
    with pytest.raises(CheckpointError, match=r"key 'clip_project.prefix_const' has shape \(4, 32\) but the model "
                                              r"expects \(6, 32\)"):
        ClipCaptionModel.from_pretrained(export)
    config_path.write_text(json.dumps({**config, "model_type": "image_encoder"}))
    with pytest.raises(CheckpointError, match="not a captioner config"):
        ClipCaptionModel.from_pretrained(export)
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        ClipCaptionModel.from_pretrained(export)


def test_failed_save_keeps_the_previous_export(tmp_path, gpt2_dir, tokenizer, monkeypatch):
    model = tiny_captioner_on(gpt2_dir, tokenizer)
    export = tmp_path / "export"
    model.save_pretrained(export, tokenizer=tokenizer)
    before = (export / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("models.captioner.save_safetensors", broken_save)
    with torch.no_grad():
        model.clip_project.prefix_const.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(export, tokenizer=tokenizer)
    assert (export / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left behind
