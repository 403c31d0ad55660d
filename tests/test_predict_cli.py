"""predict.py's command line through main([...]) and through a PredictConfig (captioning/prediction.py): output
formats, messages and errors, on the tiny exports of conftest.py."""
import csv
import dataclasses
import json
import shutil

import pytest
import torch

from builders import SHORT, good_images, tiny_captioner
from captioning import prediction
from captioning.data.features import write_features
from captioning.inference import Captioner
from models import CheckpointError
from predict import main, parse_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_names_its_precision_on_stderr_only(exports, images, capsys):
    paths = [str(p) for p in good_images(images)[:1]]
    assert main(["--checkpoint", str(exports["inside"]), "--image", *paths, "--max_length", "6", "--dtype", "bf16",
                 "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith(f"{paths[0]}\t")
    lines = err.splitlines()
    assert lines[0] == "predict.py: precision bf16 (as asked)"
    assert lines[1].startswith("predict.py: warning: bf16 on this CPU runs in software")


def test_cli_prints_captions(exports, images, captioner, capsys):
    paths = [str(p) for p in good_images(images)[:2]]
    assert main(["--checkpoint", str(exports["inside"]), "--image", *paths, "--max_length", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{p}\t{c}" for p, c in zip(paths, captioner.caption(paths, **SHORT))]


def test_cli_images_dir_to_json(exports, images, captioner, tmp_path, capsys):
    out = tmp_path / "captions.json"
    rc = main(["--checkpoint", str(exports["inside"]), "--images_dir", str(images), "--out", str(out),
               "--max_length", "10", "--batch_size", "2"])
    assert rc == 1  # one image could not be captioned; every other one is in the file
    entries = json.loads(out.read_text())
    expected = {str(p): c for p, c in zip(good_images(images), captioner.caption(good_images(images), **SHORT))}
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
    captions = Captioner.from_pretrained(exports["features_only"]).caption(features, **SHORT)
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


def test_cli_refuses_an_unknown_output_format(exports, images, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(exports["inside"]), "--image", str(images / "cat.png"), "--out", "out.txt"])
    assert e.value.code == 2
    assert "error: --out out.txt: the file name must end in .json or .csv" in capsys.readouterr().err


def test_max_length_follows_the_checkpoint(tmp_path, tokenizer, capsys):
    tiny_captioner(tokenizer, n_positions=20).save_pretrained(tmp_path / "short", tokenizer)  # 16 tokens
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
