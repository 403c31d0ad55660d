"""predict.py's library side: the Captioner API on tiny exports (encoder inside, encoder from a file, features
only), its inputs, decoding options, precision and errors. The CLI is tested in test_predict_cli.py."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from builders import SHORT, good_images, tiny_captioner
from captioning.data.annotations import image_id_from_name
from captioning.data.images import ImageError, load_image, to_rgb
from captioning.inference import Captioner, DecodingOptions
from models import CheckpointError, EncoderConfig, ImageEncoder
from models.decoding import beam_search

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paths_pil_arrays_and_features_give_the_same_captions(captioner, images):
    png = images / "000000000007.png"
    pil = Image.open(png)
    expected = captioner.caption(str(png), **SHORT)
    assert isinstance(expected, str) and expected
    assert captioner.caption(png, **SHORT) == expected
    assert captioner.caption(pil, **SHORT) == expected
    assert captioner.caption(np.asarray(pil), **SHORT) == expected
    assert captioner.caption(np.asarray(pil) / 255.0, **SHORT) == expected  # float images in [0, 1]
    with torch.no_grad():
        features = captioner.encoder(captioner.encoder.preprocess(to_rgb(pil))[None])[0]
    assert captioner.caption(features, **SHORT) == expected
    assert captioner.caption([features, str(png)], **SHORT) == [expected, expected]


def test_image_tensors_are_images_and_features_remain_features(captioner, images):
    png = images / "000000000007.png"
    rgb = np.asarray(to_rgb(Image.open(png)))  # (H, W, 3) uint8
    expected = captioner.caption(rgb, **SHORT)
    hwc = torch.from_numpy(rgb)
    chw = hwc.permute(2, 0, 1).float() / 255  # torchvision's layout and range
    assert captioner.caption(hwc, **SHORT) == expected and captioner.caption(chw, **SHORT) == expected
    assert captioner.caption(torch.stack([chw, chw]), **SHORT) == [expected, expected]
    assert captioner.caption([hwc, str(png), chw.to(torch.bfloat16)], **SHORT)[:2] == [expected, expected]
    with torch.no_grad():
        features = captioner.encoder(captioner.encoder.preprocess(to_rgb(Image.open(png)))[None])[0]
    assert captioner.caption(features, **SHORT) == expected  # features by their dtype and shape
    with pytest.raises(ImageError, match=r"<array 0>: a float image array must hold finite values in \[0, 1\]"):
        captioner.caption(chw * 255, **SHORT)
    with pytest.raises(ImageError, match=r"unsupported image array dtype int64"):
        captioner.caption(hwc.long(), **SHORT)


def test_captions_follow_the_recorded_preprocessing_and_normalisation(captioner, images):
    image = Image.open(images / "cat.png")
    model = captioner.model
    with torch.no_grad():
        features = captioner.encoder(captioner.encoder.preprocess(to_rgb(image))[None])
        assert abs(float(features.norm()) - 1.0) > 0.1  # so normalising does change the prefix
        features = features / features.norm(dim=-1, keepdim=True)  # normalize_prefix=True in the config
        prefix = model.clip_project(features).view(1, 4, -1)
        decoded = beam_search(model.gpt, prefix, model.config.eos_token_ids, 5, 10)
    expected = [s.strip() for s in captioner.tokenizer.batch_decode(decoded.sequences()[0], skip_special_tokens=True)]
    result = captioner.predict([image], DecodingOptions(**SHORT))[0]
    assert result.captions == expected and len(result.captions) == 5
    assert result.scores == pytest.approx(decoded.scores[0].tolist())
    assert result.scores == sorted(result.scores, reverse=True)
    assert captioner.caption(features[0] * 10, **SHORT) == result.caption  # the scale of features is normalised away


def test_batches_give_the_same_captions_as_one_image_at_a_time(captioner, images):
    paths = good_images(images) * 2
    for options in (DecodingOptions(beam_size=3, **SHORT), DecodingOptions(decoding="greedy", **SHORT),
                    DecodingOptions(decoding="nucleus", num_captions=2, seed=5, **SHORT)):
        one = captioner.predict(paths, options, batch_size=1)
        batched = captioner.predict(paths, options, batch_size=4)
        assert [r.captions for r in batched] == [r.captions for r in one]
        assert [r.scores for r in batched] == [pytest.approx(r.scores, abs=1e-5) for r in one]


def test_nucleus_captions(captioner, images):
    paths = good_images(images)
    samples = captioner.caption(paths, decoding="nucleus", num_captions=3, seed=1, top_p=0.95, **SHORT)
    assert [len(s) for s in samples] == [3, 3, 3]
    assert captioner.caption(paths, decoding="nucleus", num_captions=3, seed=1, top_p=0.95, **SHORT) == samples
    assert captioner.caption(paths, decoding="nucleus", num_captions=3, seed=2, top_p=0.95, **SHORT) != samples
    greedy = captioner.caption(paths, decoding="greedy", **SHORT)
    assert captioner.caption(paths, decoding="nucleus", top_p=1e-6, seed=0, **SHORT) == greedy


def test_an_unreadable_image_gets_its_error_and_the_batch_goes_on(captioner, images):
    paths = [images / "cat.png", images / "broken.jpg", images / "missing.png", images / "000000000007.png"]
    results = captioner.predict(paths, DecodingOptions(**SHORT), batch_size=4)
    assert [r.error is None for r in results] == [True, False, False, True]
    assert str(images / "broken.jpg") in results[1].error and "unreadable" in results[1].error
    assert "file not found" in results[2].error and results[2].captions == []
    assert results[3].caption == captioner.caption(paths[3], **SHORT)
    with pytest.raises(ImageError, match="broken.jpg"):
        captioner.caption(paths, **SHORT)


def test_encoder_weights_recorded_as_a_file(exports, captioner, images, tmp_path):
    paths = good_images(images)
    assert Captioner.from_pretrained(exports["from_file"]).caption(paths, **SHORT) == captioner.caption(paths, **SHORT)
    moved_dir = tmp_path / "moved"
    shutil.copytree(exports["from_file"], moved_dir)
    config = json.loads((moved_dir / "config.json").read_text())
    config["encoder"]["weights"] = str(tmp_path / "gone.safetensors")
    (moved_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gone.safetensors: no such checkpoint file.*--encoder_weights"):
        Captioner.from_pretrained(moved_dir)
    moved = Captioner.from_pretrained(moved_dir, encoder_weights=exports["weights"])
    assert moved.caption(paths, **SHORT) == captioner.caption(paths, **SHORT)


def test_a_checkpoint_without_encoder_takes_features_only(exports, images):
    captioner = Captioner.from_pretrained(exports["features_only"])
    assert captioner.encoder is None
    features = torch.randn(2, 96)
    batch = captioner.caption(features, **SHORT)
    assert batch == [captioner.caption(features[0], **SHORT), captioner.caption(features[1], **SHORT)]
    with torch.no_grad():  # the same prefix through the decoding module directly
        prefix = captioner.model.prefix_embeddings(features)
        direct = beam_search(captioner.model.gpt, prefix, captioner.eos_token_ids, max_length=SHORT["max_length"])
    assert batch == [" ".join(t.split()) for t in captioner.tokenizer.batch_decode(
        [s[0] for s in direct.sequences()], skip_special_tokens=True)]
    with pytest.raises(ValueError, match=r"records no image encoder.*torch tensors of shape \(96,\)"):
        captioner.caption(images / "cat.png")
    with pytest.raises(ValueError, match=r"features of shape \(64,\), the model expects \(96,\)"):
        captioner.caption([torch.randn(64)])
    with pytest.raises(CheckpointError, match="records no image encoder"):
        Captioner.from_pretrained(exports["features_only"], encoder_weights=exports["weights"])


@pytest.mark.parametrize("weights, message", [
    ("random", "randomly initialised test_resnet whose weights were not saved"),
    ("pretrained", "cannot load the image encoder the checkpoint records: encoder 'test_resnet': cannot load its "
                   "pretrained weights from the Hugging Face Hub or its cache"),  # offline: no hub
])
def test_encoder_weights_that_cannot_be_had_are_a_clear_error(exports, tmp_path, monkeypatch, weights, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(exports["from_file"], tmp_path / weights)
    config = json.loads((tmp_path / weights / "config.json").read_text())
    config["encoder"]["weights"] = weights
    (tmp_path / weights / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        Captioner.from_pretrained(tmp_path / weights)


def test_grid_features(tokenizer, images, tmp_path):
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_vit", feature_type="grid", weights="random", image_size=32))
    model = tiny_captioner(tokenizer, encoder, n_layer=1, feature_type="grid", num_grid_tokens=encoder.num_tokens)
    model.save_pretrained(tmp_path / "grid", tokenizer)
    captioner = Captioner.from_pretrained(tmp_path / "grid")
    image = Image.open(images / "cat.png")
    with torch.no_grad():
        grid = captioner.encoder(captioner.encoder.preprocess(to_rgb(image))[None])[0]  # (T, D): one image
    assert grid.shape == (encoder.num_tokens, encoder.feature_dim)
    assert captioner.caption(grid, **SHORT) == captioner.caption(image, **SHORT)
    assert len(captioner.caption(torch.stack([grid, grid]), **SHORT)) == 2
    image_tensor = torch.from_numpy(np.asarray(to_rgb(image)))  # uint8 (H, W, 3): an image, not features
    assert captioner.caption(image_tensor, **SHORT) == captioner.caption(image, **SHORT)


@pytest.fixture(scope="module")
def confident_export(tmp_path_factory, tokenizer, images):
    """An export trained to give two images their own caption, so that every next token wins by a wide margin:
    bf16's rounding (about 3 significant digits) cannot change which one. Returns the export, the images and their
    captions."""
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    model = tiny_captioner(tokenizer, encoder)
    paths = [images / "COCO_val2014_000000000042.jpg", images / "cat.png"]
    targets = ["A red dog on a street.", "A blue cat in a field."]  # "." is a stop token of the model
    with torch.no_grad():
        features = encoder(torch.stack([encoder.preprocess(load_image(p)) for p in paths]))
    ids = [tokenizer(t).input_ids for t in targets]
    width = max(map(len, ids))
    tokens = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    optimizer = torch.optim.Adam([p for name, p in model.named_parameters() if not name.startswith("encoder.")],
                                 lr=3e-3)
    model.train()
    for _ in range(150):  # about a second; the loss ends near 0.01
        loss = model.loss(tokens, prefix=features, mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("confident") / "export"
    model.eval().save_pretrained(path, tokenizer)
    return path, paths, targets


def test_bf16_gives_the_fp32_captions(confident_export):
    path, paths, targets = confident_export
    fp32 = Captioner.from_pretrained(path)
    bf16 = Captioner.from_pretrained(path, dtype="bf16")  # the earlier keyword
    assert bf16.model.gpt.lm_head.weight.dtype == next(bf16.encoder.parameters()).dtype == torch.bfloat16
    assert (bf16.precision.name, bf16.precision.requested) == ("bf16", "bf16")
    assert Captioner.from_pretrained(path, precision=torch.bfloat16).precision.name == "bf16"
    for options in (DecodingOptions(decoding="greedy", max_length=12), DecodingOptions(beam_size=3, max_length=12)):
        expected, results = fp32.predict(paths, options), bf16.predict(paths, options)
        assert [r.caption for r in expected] == targets  # the training took: the margins are wide
        assert [r.caption for r in results] == targets
        # the mean log-probability per token of the best caption (about -0.01): bf16 moves it by about 1e-4
        assert [r.scores[0] for r in results] == pytest.approx([r.scores[0] for r in expected], abs=0.01)


def test_auto_precision_follows_the_cpu_rule(exports):
    captioner = Captioner.from_pretrained(exports["inside"], device="cpu")  # tests run as on an AVX2 CPU
    assert (captioner.precision.name, captioner.precision.requested) == ("fp32", "auto")
    assert captioner.model.gpt.lm_head.weight.dtype == torch.float32


def test_decoding_options_are_checked():
    with pytest.raises(ValueError, match="num_captions 6 exceeds beam_size 5"):
        DecodingOptions(num_captions=6)
    with pytest.raises(ValueError, match="decoding must be one of"):
        DecodingOptions(decoding="topk")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        DecodingOptions(decoding="nucleus", top_p=0.0)


def test_image_ids_come_from_coco_file_names_only():
    assert image_id_from_name("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert image_id_from_name("000000000007.png") == 7
    assert image_id_from_name("cat.png") == "cat.png"
    # a number in any other name is no id: two files would share one, or the wrong number be taken
    assert (image_id_from_name("gray16.png"), image_id_from_name("rgb16.png")) == ("gray16.png", "rgb16.png")
    assert image_id_from_name("2513260012_03d33305cf.jpg") == "2513260012_03d33305cf.jpg"  # Flickr8k


def test_a_replaced_encoder_weights_file_is_refused(tokenizer, images, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "encoder.pth"
    torch.save(ImageEncoder(EncoderConfig(name="test_resnet", weights="random")).model.state_dict(), weights)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights=str(weights), image_size=32)).eval()
    assert encoder.config.weights_sha256 == encoder.weights_fingerprint()
    tiny_captioner(tokenizer, encoder_config=encoder.config.to_dict()).save_pretrained(tmp_path / "e", tokenizer)
    paths = good_images(images)
    expected = Captioner.from_pretrained(tmp_path / "e").caption(paths, **SHORT)
    encoder.save_pretrained(tmp_path / "encoder_export")  # the same weights, as safetensors with a config
    torch.manual_seed(1)
    torch.save(ImageEncoder(EncoderConfig(name="test_resnet", weights="random")).model.state_dict(), weights)
    with pytest.raises(CheckpointError, match=r"encoder.pth: these encoder weights \(SHA-256 [0-9a-f]{16}\.\.\.\) are "
                                              r"not the ones recorded"):
        Captioner.from_pretrained(tmp_path / "e")
    moved = Captioner.from_pretrained(tmp_path / "e", encoder_weights=tmp_path / "encoder_export")
    assert moved.caption(paths, **SHORT) == expected


def test_the_api_refuses_inputs_that_are_no_image_and_fits_its_defaults(tokenizer, tmp_path):
    captioner = Captioner(tiny_captioner(tokenizer, n_positions=20), tokenizer)  # 16 caption tokens at most
    features = torch.randn(2, 96)
    result = captioner.predict(features, beam_size=2)  # the default max_length (67) is cut to what fits: 16
    assert captioner.fit_max_length(None)[0] == 16
    explicit = captioner.predict(features, beam_size=2, max_length=16)
    assert [(r.captions, r.scores, r.error) for r in result] == [(r.captions, r.scores, None) for r in explicit]
    with pytest.raises(ValueError, match="exceeds the decoder's 20 positions"):
        captioner.predict(features, max_length=67)  # an explicit length that does not fit
    with pytest.raises(ValueError, match=r"<features 0>: the features hold nan or inf values"):
        captioner.predict(torch.full((1, 96), float("nan")))
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    with_encoder = Captioner(tiny_captioner(tokenizer, encoder), tokenizer)
    results = with_encoder.predict([None, np.full((8, 8, 3), np.nan, dtype=np.float32), str(tmp_path)],
                                   max_length=5)
    assert [r.error for r in results] == [
        "<array 0>: expected an image path, a PIL image, a numpy array, an image tensor or a features tensor, got "
        "NoneType",
        "<array 1>: a float image array must hold finite values in [0, 1] (as scikit-image's); convert it to uint8",
        f"{tmp_path}: is a directory, not an image file"]


def test_prefetching_the_next_batch_gives_the_same_results(captioner, images):
    """Where the device leaves cores free (a GPU), the next batch's images are decoded while this one is captioned;
    the results, errors included, equal those of decoding between batches."""
    paths = [str(p) for p in sorted(images.iterdir())]
    assert captioner.prefetch_images is False  # a CPU: the model needs every core
    between = captioner.predict(paths, batch_size=2, max_length=6, on_error="keep")
    captioner.prefetch_images = True
    try:
        ahead = captioner.predict(paths, batch_size=2, max_length=6, on_error="keep")
    finally:
        captioner.prefetch_images = False
    assert [(r.source, r.captions, r.error) for r in ahead] == [(r.source, r.captions, r.error) for r in between]
    assert any(r.error for r in between) and any(r.captions for r in between)
