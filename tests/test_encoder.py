import dataclasses
import re

import numpy as np
import pytest
import timm
import torch
from conftest import FIXTURES
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN
from timm.models import get_pretrained_cfg

from captioning.data.images import to_rgb
from models.checkpoint_io import CheckpointError
from models.encoder import CLIP_MODEL_TYPES, EncoderConfig, ImageEncoder, data_config_for, official_tinyvit_filter_fn

REF = torch.load(FIXTURES / "official_tinyvit_tiny_reference.pt", weights_only=True)
OFFICIAL = FIXTURES / "official_tinyvit_tiny.pth"
TINY_KWARGS = {k: v for k, v in REF["config"].items() if k != "num_classes"}


def tiny_config(**kw):
    base = dict(name="tiny_vit_5m_224", model_kwargs=TINY_KWARGS, image_size=64, weights="random")
    return EncoderConfig(**{**base, **kw})


def test_official_tinyvit_reproduces_reference_features_and_logits():
    model = timm.create_model("tiny_vit_5m_224", pretrained=False, **REF["config"]).eval()
    state = torch.load(OFFICIAL, weights_only=True)["model"]
    model.load_state_dict(official_tinyvit_filter_fn(state), strict=True)
    with torch.no_grad():
        logits = model(REF["x"])
        features = model.forward_head(model.forward_features(REF["x"]), pre_logits=True)
    torch.testing.assert_close(logits, REF["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(features, REF["features"], atol=1e-5, rtol=0)


def test_encoder_loads_official_file_without_classifier():
    encoder = ImageEncoder(tiny_config(weights=str(OFFICIAL))).eval()
    assert encoder.model.num_classes == 0 and encoder.feature_dim == 64
    with torch.no_grad():
        torch.testing.assert_close(encoder(REF["x"]), REF["features"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,dim", [("tiny_vit_5m_224", 320), ("tiny_vit_11m_224", 448),
                                      ("tiny_vit_21m_224", 576)])
def test_tinyvit_sizes_pooled_and_grid(name, dim):
    pooled = ImageEncoder(EncoderConfig(name=name, weights="random")).eval()
    grid = ImageEncoder(EncoderConfig(name=name, weights="random", feature_type="grid")).eval()
    grid.load_state_dict(pooled.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        p, g = pooled(x), grid(x)
    assert pooled.feature_dim == dim and p.shape == (2, dim)
    assert grid.num_tokens == 49 and g.shape == (2, 49, dim)
    assert torch.isfinite(p).all() and torch.isfinite(g).all()
    # pooled = layer norm of the grid's mean: the two feature types come from the same network
    mean = g.mean(1)
    expected = pooled.model.head.norm(mean[:, :, None, None]).flatten(1)
    torch.testing.assert_close(p, expected, atol=1e-4, rtol=1e-4)


def test_backward_reaches_every_trainable_weight_and_no_frozen_one():
    encoder = ImageEncoder(tiny_config())
    encoder.freeze_stages(1)
    encoder(torch.randn(2, 3, 64, 64)).pow(2).sum().backward()
    trainable = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
    frozen = {n: p.grad for n, p in encoder.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in trainable.values()), \
        [n for n, g in trainable.items() if g is None or not g.abs().sum() > 0]
    assert all(g is None for g in frozen.values())


def test_freeze_stages_1_freezes_what_the_original_froze():
    """The original froze `patch_embed` and `layers[0]` of the official layout, whose downsampling timm holds as
    `stages.1.downsample`: the frozen names are exactly those, through the key mapping."""
    encoder = ImageEncoder(tiny_config())
    encoder.freeze_stages(1)
    official = torch.load(OFFICIAL, weights_only=True)["model"]
    parameters = {n for n, _ in encoder.model.named_parameters()}
    mapped = official_tinyvit_filter_fn({k: v for k, v in official.items() if k.startswith(("patch_embed.",
                                                                                             "layers.0."))})
    frozen_by_original = set(mapped) & parameters
    assert any(n.startswith("stages.1.downsample.") for n in frozen_by_original)
    assert {n for n, p in encoder.model.named_parameters() if not p.requires_grad} == frozen_by_original
    trainable_by_original = set(official_tinyvit_filter_fn(official)) & parameters - frozen_by_original
    assert {n for n, p in encoder.model.named_parameters() if p.requires_grad} == trainable_by_original
    encoder.train()
    assert not encoder.model.patch_embed.conv1.bn.training and encoder.model.stages[1].training
    before = encoder.model.patch_embed.conv1.bn.running_mean.clone()
    encoder(torch.randn(2, 3, 64, 64) * 5)
    torch.testing.assert_close(encoder.model.patch_embed.conv1.bn.running_mean, before)


def test_freeze_all():
    encoder = ImageEncoder(tiny_config())
    encoder.freeze()
    encoder.train()
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.model.training


def test_preprocessing_from_timm_data_config_and_clip_option():
    timm_enc = ImageEncoder(EncoderConfig(name="test_resnet", weights="random"))
    assert timm_enc.config.data_config["mean"] == [0.5, 0.5, 0.5]
    assert timm_enc.preprocess(Image.new("RGB", (300, 200))).shape == (3, 160, 160)
    clip_enc = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", preprocessing="clip"))
    dc = clip_enc.config.data_config
    # CLIP's resize, crop and normalisation at the model's own input size
    assert dc["input_size"] == [3, 160, 160] and dc["crop_pct"] == 1.0 and dc["interpolation"] == "bicubic"
    assert dc["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # shorter side to 160 then a centre crop: a white stripe in the middle survives, the borders are cut
    img = np.zeros((224, 448, 3), dtype=np.uint8)
    img[:, 200:248] = 255
    x = clip_enc.preprocess(Image.fromarray(img))
    assert x.shape == (3, 160, 160) and x[:, :, 80].min() > 1.0 and x[:, :, 0].max() < -1.0
    assert clip_enc.config.resolved_name == "test_resnet.r160_in1k"


@pytest.mark.parametrize("clip_model_type", sorted(CLIP_MODEL_TYPES))
def test_clip_towers_keep_the_input_size_of_their_pretrained_config(clip_model_type):
    config = EncoderConfig.for_clip_model_type(clip_model_type, weights="random")
    pretrained_cfg = get_pretrained_cfg(config.name).to_dict()
    data_config = data_config_for(config, pretrained_cfg)
    assert data_config["input_size"] == list(pretrained_cfg["input_size"])
    assert (data_config["mean"], data_config["crop_pct"]) == (list(OPENAI_CLIP_MEAN), 1.0)
    if pretrained_cfg["input_size"][-1] != 224:  # a fixed input size cannot be changed
        with pytest.raises(ValueError, match=rf"{config.name} has a fixed input size of 288x288 \(timm's "
                                             rf"pretrained config\); an image size of 224 is not possible"):
            data_config_for(dataclasses.replace(config, image_size=224), pretrained_cfg)


def test_rn50x4_encodes_at_288():
    encoder = ImageEncoder(EncoderConfig.for_clip_model_type("RN50x4", weights="random")).eval()
    assert encoder.config.data_config["input_size"] == [3, 288, 288]
    assert encoder.preprocess(Image.new("RGB", (500, 400))).shape == (3, 288, 288)
    assert encoder.config.resolved_name == "resnet50x4_clip.openai"


def test_encoder_names_take_a_timm_tag_and_record_the_resolved_one():
    bare = ImageEncoder(tiny_config())
    assert bare.config.resolved_name == "tiny_vit_5m_224.dist_in22k"  # what timm picks for the bare name
    tagged = ImageEncoder(tiny_config(name="tiny_vit_5m_224.dist_in22k_ft_in1k"))
    assert tagged.config.resolved_name == "tiny_vit_5m_224.dist_in22k_ft_in1k"
    with pytest.raises(ValueError, match=r"encoder 'tiny_vit_5m_224.in1k_nope': timm has no pretrained tag "
                                         r"'in1k_nope' for tiny_vit_5m_224; its tags are \['dist_in22k', "
                                         r"'dist_in22k_ft_in1k', 'in1k'\]"):
        ImageEncoder(tiny_config(name="tiny_vit_5m_224.in1k_nope"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_to_rgb_converts_every_mode_and_the_encoder_takes_only_rgb(mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    img = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32))
    assert encoder.preprocess(out).shape == (3, 32, 32)
    with pytest.raises(ValueError, match=f"the encoder takes 8-bit RGB images, got mode '{re.escape(mode)}'"):
        encoder.preprocess(img)


def test_encoder_export_round_trip(tmp_path):
    encoder = ImageEncoder(tiny_config(weights=str(OFFICIAL))).eval()
    encoder.save_pretrained(tmp_path / "enc")
    loaded = ImageEncoder.from_pretrained(tmp_path / "enc").eval()
    assert loaded.config == encoder.config
    with torch.no_grad():
        assert torch.equal(loaded(REF["x"]), encoder(REF["x"]))


def test_weights_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        ImageEncoder(tiny_config(weights=str(tmp_path / "missing.pth")))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(OFFICIAL.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ImageEncoder(tiny_config(weights=str(truncated)))
    whole_model = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), whole_model)
    with pytest.raises(CheckpointError, match=r"state_dict\(\)"):
        ImageEncoder(tiny_config(weights=str(whole_model)))
    wider = ImageEncoder(tiny_config(model_kwargs={**TINY_KWARGS, "embed_dims": [24, 32, 48, 64]}))
    torch.save({"model": wider.model.state_dict()}, tmp_path / "wider.pth")
    with pytest.raises(CheckpointError, match=r"key 'patch_embed\.conv1\.conv\.weight' has shape \(12, 3, 3, 3\) "
                                              r"but the model expects \(8, 3, 3, 3\)"):
        ImageEncoder(tiny_config(weights=str(tmp_path / "wider.pth")))
    deeper = ImageEncoder(tiny_config(model_kwargs={**TINY_KWARGS, "depths": [2, 1, 2, 1]}))
    torch.save(deeper.model.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"deeper\.pth: weights do not match the model: \d+ unexpected key"):
        ImageEncoder(tiny_config(weights=str(tmp_path / "deeper.pth")))


def test_folded_batch_norms_give_the_official_features_and_forbid_training_and_saving(tmp_path):
    encoder = ImageEncoder(tiny_config(weights=str(OFFICIAL))).eval()
    assert encoder.fold_batch_norms() == 18  # every ConvNorm of the tiny TinyViT: stem, MBConvs, merges
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    with torch.no_grad():
        torch.testing.assert_close(encoder(REF["x"]), REF["features"], atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="folded for inference; it cannot be trained"):
        encoder.train()
    with pytest.raises(RuntimeError, match="folded for inference; save the original encoder"):
        encoder.save_pretrained(tmp_path / "folded")
    with pytest.raises(RuntimeError, match=r"fold_batch_norms\(\) is for an encoder in eval mode"):
        ImageEncoder(tiny_config()).fold_batch_norms()
