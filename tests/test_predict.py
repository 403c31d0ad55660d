"""predict.py: the Captioner API on tiny exports (encoder inside, encoder from a file, features only), and the
CLI's output formats and errors (captioning/prediction.py, through main([...]) and through a PredictConfig)."""
import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from captioning import prediction
from captioning.data.features import write_features
from captioning.data.images import ImageError, load_image
from captioning.inference import Captioner, DecodingOptions
from captioning.data.annotations import image_id_from_name
from models import CaptionerConfig, CheckpointError, ClipCaptionModel, EncoderConfig, ImageEncoder
from models.decoding import beam_search
from predict import main, parse_args

FAST = dict(max_length=10)  # tiny random models rarely stop early; short captions keep the tests fast


pytestmark = pytest.mark.usefixtures("one_thread")



def tiny_captioner_model(tokenizer, encoder=None, encoder_dict=None, n_positions=128) -> ClipCaptionModel:
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=n_positions, vocab_size=len(tokenizer),
                                     initializer_range=0.2, bos_token_id=eos, eos_token_id=eos))
    config = CaptionerConfig(mapping_type="transformer", prefix_length=4, prefix_length_clip=4, num_layers=1,
                             prefix_size=96, normalize_prefix=True, encoder=encoder_dict,
                             eos_token_ids=[eos, tokenizer.convert_tokens_to_ids(".")])
    return ClipCaptionModel(config, gpt=gpt, encoder=encoder)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """Three exports of the same weights: encoder inside, encoder recorded as a weights file, no encoder."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    inside = tiny_captioner_model(tokenizer, encoder=encoder)
    inside.save_pretrained(root / "inside", tokenizer)
    weights = root / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(weights))
    recorded = dataclasses.replace(encoder.config, weights=str(weights)).to_dict()
    from_file = tiny_captioner_model(tokenizer, encoder_dict=recorded)
    from_file.load_state_dict({k: v for k, v in inside.state_dict().items() if not k.startswith("encoder.")})
    from_file.save_pretrained(root / "from_file", tokenizer)
    tiny_captioner_model(tokenizer).save_pretrained(root / "features_only", tokenizer)
    return dict(inside=root / "inside", from_file=root / "from_file", features_only=root / "features_only",
                weights=weights, root=root)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An images folder: RGB JPEG and grayscale PNG with COCO-like numbers, an RGBA PNG without a number,
    a broken JPEG and a text file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "COCO_val2014_000000000042.jpg")
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8)).save(folder / "000000000007.png")
    Image.fromarray(rng.integers(0, 255, (30, 44, 4), dtype=np.uint8)).save(folder / "cat.png")
    (folder / "broken.jpg").write_bytes(b"this is not a picture")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def captioner(exports):
    return Captioner.from_pretrained(exports["inside"])


def good_images(images):
    return [images / "COCO_val2014_000000000042.jpg", images / "000000000007.png", images / "cat.png"]


def test_paths_pil_arrays_and_features_give_the_same_captions(captioner, images):
    png = images / "000000000007.png"
    pil = Image.open(png)
    expected = captioner.caption(str(png), **FAST)
    assert isinstance(expected, str) and expected
    assert captioner.caption(png, **FAST) == expected
    assert captioner.caption(pil, **FAST) == expected
    assert captioner.caption(np.asarray(pil), **FAST) == expected
    assert captioner.caption(np.asarray(pil) / 255.0, **FAST) == expected  # float images in [0, 1]
    with torch.no_grad():
        features = captioner.encoder(captioner.encoder.preprocess(pil)[None])[0]
    assert captioner.caption(features, **FAST) == expected
    assert captioner.caption([features, str(png)], **FAST) == [expected, expected]


def test_captions_follow_the_recorded_preprocessing_and_normalisation(captioner, images):
    image = Image.open(images / "cat.png")
    model = captioner.model
    with torch.no_grad():
        features = captioner.encoder(captioner.encoder.preprocess(image)[None])
        assert abs(float(features.norm()) - 1.0) > 0.1  # so normalising does change the prefix
        features = features / features.norm(dim=-1, keepdim=True)  # normalize_prefix=True in the config
        prefix = model.clip_project(features).view(1, 4, -1)
        decoded = beam_search(model.gpt, prefix, model.config.eos_token_ids, 5, 10)
    expected = [s.strip() for s in captioner.tokenizer.batch_decode(decoded.sequences()[0], skip_special_tokens=True)]
    result = captioner.predict([image], DecodingOptions(**FAST))[0]
    assert result.captions == expected and len(result.captions) == 5
    assert result.scores == pytest.approx(decoded.scores[0].tolist())
    assert result.scores == sorted(result.scores, reverse=True)
    assert captioner.caption(features[0] * 10, **FAST) == result.caption  # the scale of features is normalised away


def test_batches_give_the_same_captions_as_one_image_at_a_time(captioner, images):
    paths = good_images(images) * 2
    for options in (DecodingOptions(beam_size=3, **FAST), DecodingOptions(decoding="greedy", **FAST),
                    DecodingOptions(decoding="nucleus", num_captions=2, seed=5, **FAST)):
        one = captioner.predict(paths, options, batch_size=1)
        batched = captioner.predict(paths, options, batch_size=4)
        assert [r.captions for r in batched] == [r.captions for r in one]
        assert [r.scores for r in batched] == [pytest.approx(r.scores, abs=1e-5) for r in one]


def test_nucleus_captions(captioner, images):
    paths = good_images(images)
    samples = captioner.caption(paths, decoding="nucleus", num_captions=3, seed=1, top_p=0.95, **FAST)
    assert [len(s) for s in samples] == [3, 3, 3]
    assert captioner.caption(paths, decoding="nucleus", num_captions=3, seed=1, top_p=0.95, **FAST) == samples
    assert captioner.caption(paths, decoding="nucleus", num_captions=3, seed=2, top_p=0.95, **FAST) != samples
    greedy = captioner.caption(paths, decoding="greedy", **FAST)
    assert captioner.caption(paths, decoding="nucleus", top_p=1e-6, seed=0, **FAST) == greedy


def test_an_unreadable_image_gets_its_error_and_the_batch_goes_on(captioner, images):
    paths = [images / "cat.png", images / "broken.jpg", images / "missing.png", images / "000000000007.png"]
    results = captioner.predict(paths, DecodingOptions(**FAST), batch_size=4)
    assert [r.error is None for r in results] == [True, False, False, True]
    assert str(images / "broken.jpg") in results[1].error and "unreadable" in results[1].error
    assert "file not found" in results[2].error and results[2].captions == []
    assert results[3].caption == captioner.caption(paths[3], **FAST)
    with pytest.raises(ImageError, match="broken.jpg"):
        captioner.caption(paths, **FAST)


def test_encoder_weights_recorded_as_a_file(exports, captioner, images, tmp_path):
    paths = good_images(images)
    assert Captioner.from_pretrained(exports["from_file"]).caption(paths, **FAST) == captioner.caption(paths, **FAST)
    moved_dir = tmp_path / "moved"
    shutil.copytree(exports["from_file"], moved_dir)
    config = json.loads((moved_dir / "config.json").read_text())
    config["encoder"]["weights"] = str(tmp_path / "gone.safetensors")
    (moved_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gone.safetensors: no such checkpoint file.*--encoder_weights"):
        Captioner.from_pretrained(moved_dir)
    moved = Captioner.from_pretrained(moved_dir, encoder_weights=exports["weights"])
    assert moved.caption(paths, **FAST) == captioner.caption(paths, **FAST)


def test_a_checkpoint_without_encoder_takes_features_only(exports, images):
    captioner = Captioner.from_pretrained(exports["features_only"])
    assert captioner.encoder is None
    assert len(captioner.caption(torch.randn(2, 96), **FAST)) == 2
    with pytest.raises(ValueError, match=r"records no image encoder.*torch tensors of shape \(96,\)"):
        captioner.caption(images / "cat.png")
    with pytest.raises(ValueError, match=r"features of shape \(64,\), the model expects \(96,\)"):
        captioner.caption([torch.randn(64)])
    with pytest.raises(CheckpointError, match="records no image encoder"):
        Captioner.from_pretrained(exports["features_only"], encoder_weights=exports["weights"])


@pytest.mark.parametrize("weights, message", [
    ("random", "randomly initialised test_resnet whose weights were not saved"),
    ("pretrained", "cannot load the pretrained weights of image encoder 'test_resnet'"),  # offline: no hub
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
    eos = tokenizer.eos_token_id
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=len(tokenizer), initializer_range=0.2,
                                     bos_token_id=eos, eos_token_id=eos))
    config = CaptionerConfig(mapping_type="transformer", prefix_length=4, num_layers=1, feature_type="grid",
                             num_grid_tokens=encoder.num_tokens, prefix_size=encoder.feature_dim, eos_token_ids=[eos])
    ClipCaptionModel(config, gpt=gpt, encoder=encoder).save_pretrained(tmp_path / "grid", tokenizer)
    captioner = Captioner.from_pretrained(tmp_path / "grid")
    image = Image.open(images / "cat.png")
    with torch.no_grad():
        grid = captioner.encoder(captioner.encoder.preprocess(image)[None])[0]  # (T, D): one image
    assert grid.shape == (encoder.num_tokens, encoder.feature_dim)
    assert captioner.caption(grid, **FAST) == captioner.caption(image, **FAST)
    assert len(captioner.caption(torch.stack([grid, grid]), **FAST)) == 2


@pytest.fixture(scope="module")
def confident_export(tmp_path_factory, tokenizer, images):
    """An export trained to give two images their own caption, so that every next token wins by a wide margin:
    bf16's rounding (about 3 significant digits) cannot change which one. Returns the export, the images and their
    captions."""
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    model = tiny_captioner_model(tokenizer, encoder=encoder)
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


def test_cli_names_its_precision_on_stderr_only(exports, images, capsys):
    paths = [str(p) for p in good_images(images)[:1]]
    assert main(["--checkpoint", str(exports["inside"]), "--image", *paths, "--max_length", "6", "--dtype", "bf16",
                 "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith(f"{paths[0]}\t")
    lines = err.splitlines()
    assert lines[0] == "predict.py: precision bf16 (as asked)"
    assert lines[1].startswith("predict.py: warning: bf16 on this CPU runs in software")


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


# ---- CLI -------------------------------------------------------------------------------------------------------

def test_cli_prints_captions(exports, images, captioner, capsys):
    paths = [str(p) for p in good_images(images)[:2]]
    assert main(["--checkpoint", str(exports["inside"]), "--image", *paths, "--max_length", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{p}\t{c}" for p, c in zip(paths, captioner.caption(paths, **FAST))]


def test_cli_images_dir_to_json(exports, images, captioner, tmp_path, capsys):
    out = tmp_path / "captions.json"
    rc = main(["--checkpoint", str(exports["inside"]), "--images_dir", str(images), "--out", str(out),
               "--max_length", "10", "--batch_size", "2"])
    assert rc == 1  # one image could not be captioned; every other one is in the file
    entries = json.loads(out.read_text())
    expected = {str(p): c for p, c in zip(good_images(images), captioner.caption(good_images(images), **FAST))}
    assert [e["image_id"] for e in entries] == [7, 42, "cat.png"]
    assert {e["file_name"]: e["caption"] for e in entries} == expected
    err = capsys.readouterr().err
    assert "broken.jpg: unreadable" in err and "1 of 4 images could not be captioned" in err
    assert "notes.txt" in err  # not an image: reported, not silently skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.json"]  # no temp file left behind


def test_a_predict_config_does_what_the_cli_does(exports, images, tmp_path, capsys):
    """The flags' defaults are PredictConfig's, and prediction.predict(config) writes the file, messages and exit
    status that main([...]) gives for the same settings."""
    defaults = vars(parse_args(["--checkpoint", "c", "--image", "a.jpg"]))
    assert defaults == dataclasses.asdict(prediction.PredictConfig(checkpoint="c", image=["a.jpg"]))
    runs = {}
    for name in ("cli", "config"):
        out = tmp_path / f"{name}.json"
        if name == "cli":
            rc = main(["--checkpoint", str(exports["inside"]), "--images_dir", str(images), "--out", str(out),
                       "--num_captions", "2", "--max_length", "10", "--batch_size", "2"])
        else:
            rc = prediction.predict(prediction.PredictConfig(checkpoint=str(exports["inside"]),
                                                             images_dir=str(images), out=str(out), num_captions=2,
                                                             max_length=10, batch_size=2))
        messages = [line.replace(str(out), "OUT") for line in capsys.readouterr().err.splitlines()
                    if line.startswith(("predict.py:", "wrote"))]  # not the progress bar, whose timings vary
        runs[name] = rc, json.loads(out.read_text()), messages
    assert runs["config"] == runs["cli"]
    rc, entries, messages = runs["cli"]
    assert rc == 1 and len(entries) == 3 and all(len(e["captions"]) == 2 for e in entries)
    assert "wrote 3 captioned images to OUT" in messages


def test_cli_csv_with_several_captions(exports, images, tmp_path):
    out = tmp_path / "captions.csv"
    assert main(["--checkpoint", str(exports["inside"]), "--images_dir", str(images), "--out", str(out),
                 "--num_captions", "2", "--max_length", "10"]) == 1
    rows = list(csv.DictReader(out.open()))
    assert [(r["image_id"], r["rank"]) for r in rows] == [("7", "1"), ("7", "2"), ("42", "1"), ("42", "2"),
                                                          ("broken.jpg", ""), ("cat.png", "1"), ("cat.png", "2")]
    assert "unreadable" in rows[4]["error"] and all(r["caption"] for i, r in enumerate(rows) if i != 4)
    assert float(rows[0]["score"]) >= float(rows[1]["score"])


def test_cli_nucleus_is_reproducible_across_batch_sizes(exports, images, tmp_path):
    outputs = []
    for batch_size in ("1", "3"):
        out = tmp_path / f"nucleus{batch_size}.json"
        main(["--checkpoint", str(exports["inside"]), "--images_dir", str(images), "--out", str(out),
              "--decoding", "nucleus", "--num_captions", "3", "--seed", "4", "--batch_size", batch_size,
              "--max_length", "10"])
        outputs.append(json.loads(out.read_text()))
    assert outputs[0] == outputs[1]
    assert all(len(e["captions"]) == 3 and e["caption"] == e["captions"][0] for e in outputs[0])


def test_cli_captions_a_features_pickle(exports, tmp_path):
    features = torch.randn(2, 96)
    write_features(tmp_path / "f.pkl", features, [{"image_id": 11, "caption": "a", "clip_embedding": 0},
                                                  {"image_id": 11, "caption": "b", "clip_embedding": 0},
                                                  {"image_id": 12, "caption": "c", "clip_embedding": 1}])
    out = tmp_path / "f.json"
    assert main(["--checkpoint", str(exports["features_only"]), "--features", str(tmp_path / "f.pkl"),
                 "--out", str(out), "--max_length", "10"]) == 0
    captions = Captioner.from_pretrained(exports["features_only"]).caption(features, **FAST)
    assert [(e["image_id"], e["caption"]) for e in json.loads(out.read_text())] == list(zip([11, 12], captions))


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such checkpoint directory"),
    ("file", "is a file, but an export directory"),
    ("wrong_kind", "not a captioner config"),
    ("wrong_sizes", "has shape"),
    ("no_weights", "model.safetensors is missing"),
])
def test_cli_bad_checkpoints_are_clear_errors(exports, images, tmp_path, capsys, damage, message):
    checkpoint = tmp_path / "ckpt"
    if damage == "file":
        checkpoint.write_bytes(b"weights")
    elif damage != "missing":
        shutil.copytree(exports["inside"], checkpoint)
        config = json.loads((checkpoint / "config.json").read_text())
        if damage == "wrong_kind":
            config["model_type"] = "gpt2"
        elif damage == "wrong_sizes":
            config["prefix_length"] = 6
        else:
            (checkpoint / "model.safetensors").unlink()
        (checkpoint / "config.json").write_text(json.dumps(config))
    assert main(["--checkpoint", str(checkpoint), "--image", str(images / "cat.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("predict.py: error:") and message in err


def test_cli_refuses_a_missing_cuda_device(exports, images, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("cuda", "'cuda', but CUDA is not available here"),
                            ("tpu", "unknown device 'tpu'; expected cpu, cuda, cuda:N or mps")):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(exports["inside"]), "--image", str(images / "cat.png"), "--device", device])
        assert e.value.code == 2 and f"error: argument --device: {message}" in capsys.readouterr().err


def test_cli_refuses_an_unknown_output_format(exports, images):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(exports["inside"]), "--image", str(images / "cat.png"), "--out", "out.txt"])
    assert e.value.code == 2


def test_max_length_follows_the_checkpoint(tmp_path, tokenizer, capsys):
    tiny_captioner_model(tokenizer, n_positions=20).save_pretrained(tmp_path / "short", tokenizer)  # 16 tokens
    write_features(tmp_path / "f.pkl", torch.randn(2, 96), [{"image_id": i, "caption": "x", "clip_embedding": i}
                                                            for i in range(2)])
    common = ["--checkpoint", str(tmp_path / "short"), "--features", str(tmp_path / "f.pkl"), "--beam_size", "2"]
    assert main(common) == 0
    out, err = capsys.readouterr()
    assert ("predict.py: note: captions of at most 16 tokens instead of 67: the decoder has 20 positions, 4 of "
            "them for the prefix") in err
    assert len(out.splitlines()) == 2 and all("\t" in line for line in out.splitlines())  # captions only
    assert main(common + ["--max_length", "17"]) == 2
    assert ("predict.py: error: --max_length 17 does not fit this checkpoint: the decoder has 20 positions, 4 of "
            "them for the prefix, so a caption holds 1 to 16 tokens") in capsys.readouterr().err


def test_an_export_without_its_tokenizer_is_refused(exports, tmp_path, capsys):
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(exports["features_only"], broken)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (broken / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"no_tokenizer: the tokenizer files are missing \(tokenizer.json, or "
                                              r"vocab.json and merges.txt\)"):
        Captioner.from_pretrained(broken)
    write_features(tmp_path / "f.pkl", torch.randn(1, 96), [{"image_id": 1, "caption": "x", "clip_embedding": 0}])
    assert main(["--checkpoint", str(broken), "--features", str(tmp_path / "f.pkl")]) == 2
    assert "the tokenizer files are missing" in capsys.readouterr().err


def test_a_replaced_encoder_weights_file_is_refused(tokenizer, images, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "encoder.pth"
    torch.save(ImageEncoder(EncoderConfig(name="test_resnet", weights="random")).model.state_dict(), weights)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights=str(weights), image_size=32)).eval()
    assert encoder.config.weights_sha256 == encoder.weights_fingerprint()
    tiny_captioner_model(tokenizer, encoder_dict=encoder.config.to_dict()).save_pretrained(tmp_path / "e", tokenizer)
    paths = good_images(images)
    expected = Captioner.from_pretrained(tmp_path / "e").caption(paths, **FAST)
    encoder.save_pretrained(tmp_path / "encoder_export")  # the same weights, as safetensors with a config
    torch.manual_seed(1)
    torch.save(ImageEncoder(EncoderConfig(name="test_resnet", weights="random")).model.state_dict(), weights)
    with pytest.raises(CheckpointError, match=r"encoder.pth: these encoder weights \(SHA-256 [0-9a-f]{16}\.\.\.\) are "
                                              r"not the ones recorded"):
        Captioner.from_pretrained(tmp_path / "e")
    moved = Captioner.from_pretrained(tmp_path / "e", encoder_weights=tmp_path / "encoder_export")
    assert moved.caption(paths, **FAST) == expected


def test_features_predictions_name_the_pickles_images(exports, tmp_path, capsys):
    write_features(tmp_path / "f.pkl", torch.randn(2, 96), [{"image_id": 5, "caption": "x", "clip_embedding": 0},
                                                            {"image_id": 9, "caption": "y", "clip_embedding": 1}],
                   {"file_names": ["train2014/a.jpg", "train2014/b.jpg"]})
    out = tmp_path / "p.json"
    assert main(["--checkpoint", str(exports["features_only"]), "--features", str(tmp_path / "f.pkl"), "--out",
                 str(out), "--max_length", "5"]) == 0
    assert [(e["image_id"], e["file_name"]) for e in json.loads(out.read_text())] == [(5, "train2014/a.jpg"),
                                                                                      (9, "train2014/b.jpg")]


def test_a_directory_given_as_an_image_says_so(exports, images, capsys):
    assert main(["--checkpoint", str(exports["inside"]), "--image", str(images)]) == 2
    assert f"predict.py: error: --image {images}: is a directory; caption a folder's images with --images_dir" in \
        capsys.readouterr().err


def test_the_api_refuses_inputs_that_are_no_image_and_fits_its_defaults(tokenizer, tmp_path):
    captioner = Captioner(tiny_captioner_model(tokenizer, n_positions=20), tokenizer)  # 16 caption tokens at most
    features = torch.randn(2, 96)
    result = captioner.predict(features, beam_size=2)  # the default max_length (67) is cut to what fits: 16
    assert len(result) == 2 and all(isinstance(r.caption, str) and r.error is None for r in result)
    with pytest.raises(ValueError, match="exceeds the decoder's 20 positions"):
        captioner.predict(features, max_length=67)  # an explicit length that does not fit
    with pytest.raises(ValueError, match=r"<features 0>: the features hold nan or inf values"):
        captioner.predict(torch.full((1, 96), float("nan")))
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    with_encoder = Captioner(tiny_captioner_model(tokenizer, encoder=encoder), tokenizer)
    results = with_encoder.predict([None, np.full((8, 8, 3), np.nan, dtype=np.float32), str(tmp_path)],
                                   max_length=5)
    assert [r.error for r in results] == [
        "<array 0>: expected an image path, a PIL image, a numpy array or a features tensor, got NoneType",
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
