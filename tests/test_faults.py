"""Nothing lost under faults: file names that are not UTF-8, two runs into one directory, a full disk while
training writes, entries that are no regular files, and the leftovers of an interrupted write."""
import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import parse_coco
import predict
import train
from builders import ROOT, make_pickle, train_args, weights
from captioning.data.annotations import read_annotations
from captioning.data.images import ImageError, load_image
from captioning.data.results import read_results
from captioning.data.text import existing_path, from_csv_cell, to_csv_cell
from captioning.training import state as state_module
from captioning.training.lock import LOCK_NAME, RunDirectoryBusy, RunLock
from captioning.training.state import TrainingError, load_state
from models.captioner import ClipCaptionModel
from models.encoder import EncoderConfig, ImageEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

LATIN1_NAME = os.fsdecode(b"latin1_\xe9.png")  # as Python lists a Latin-1 name: \xe9 is a surrogate escape


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_pickle(tmp_path_factory.mktemp("data") / "train.pkl")


def odd_names_folder(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for name in (LATIN1_NAME, "=HYPERLINK(1).png", "plain.png"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    return folder


# ---- file names ---------------------------------------------------------------------------------------------

def test_csv_cells_round_trip_and_never_start_a_formula():
    for text in ("=1+1", "+cmd", "-x.png", "@SUM(A1)", "\tx", "'=x", "''+y", "'plain", "plain", "a=b", ""):
        cell = to_csv_cell(text)
        assert from_csv_cell(cell) == text
        assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r")
    assert to_csv_cell(LATIN1_NAME) == "latin1_\\xe9.png"


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_names_that_are_not_utf8_are_written_escaped_and_read_back(exports, tmp_path, suffix, monkeypatch):
    folder = odd_names_folder(tmp_path / "images")
    out = tmp_path / f"captions{suffix}"
    monkeypatch.chdir(folder)  # file names as they are listed, with no folder before them
    status = predict.main(["--checkpoint", str(exports["inside"]), "--images_dir", ".", "--out", str(out),
                           "--decoding", "greedy", "--max_length", "6", "--device", "cpu"])
    assert status == 0 and out.read_bytes().decode("utf-8")  # UTF-8 text throughout
    predictions = read_results(out)
    names = sorted(p.file_name for p in predictions)
    assert names == ["=HYPERLINK(1).png", "latin1_\\xe9.png", "plain.png"]
    assert sorted(p.image_id for p in predictions) == names  # ids too: the file names, as text
    assert existing_path(folder / "latin1_\\xe9.png") == folder / LATIN1_NAME  # the text names the real file
    if suffix == ".csv":
        cells = [row[0] for row in csv.reader(out.open(encoding="utf-8"))]
        assert "'=HYPERLINK(1).png" in cells and "=HYPERLINK(1).png" not in cells


def test_annotations_find_files_named_as_the_project_writes_them(tmp_path):
    folder = odd_names_folder(tmp_path)
    (tmp_path / "captions.csv").write_text("file_name,caption\nlatin1_\\xe9.png,a cat\n'=HYPERLINK(1).png,a dog\n",
                                           encoding="utf-8")
    records = read_annotations(tmp_path / "captions.csv", images_root=folder)
    assert [r.path for r in records] == [folder / LATIN1_NAME, folder / "=HYPERLINK(1).png"]
    assert all(load_image(r.path).size == (32, 32) for r in records)


# ---- entries that are no regular files ------------------------------------------------------------------

def fifo_and_loop(folder: Path):
    os.mkfifo(folder / "pipe.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    return folder / "pipe.png", folder / "loop.png"


def test_a_fifo_and_a_symlink_loop_are_not_regular_files_not_missing(tmp_path, exports, capsys):
    pipe, loop_ = fifo_and_loop(tmp_path)
    for path, what in ((pipe, "a FIFO (named pipe)"), (loop_, "a symlink loop")):
        with pytest.raises(ImageError) as caught:
            load_image(path)
        assert caught.value.kind == "not_regular" and caught.value.reason == f"not a regular file: {what}"
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "absent.png")
    status = predict.main(["--checkpoint", str(exports["inside"]), "--images_dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1 and f"{pipe}: not a regular file: a FIFO" in err and f"{loop_}: not a regular file" in err


def test_parse_coco_counts_them_as_not_regular(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "good.png")
    fifo_and_loop(tmp_path)
    annotations = [{"image_id": i, "file_name": name, "caption": "a shape"}
                   for i, name in enumerate(("good.png", "pipe.png", "loop.png"))]
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32))
    torch.save(encoder.model.state_dict(), tmp_path / "encoder.pth")
    summary = parse_coco.main(["--encoder", "test_resnet", "--encoder_weights", str(tmp_path / "encoder.pth"),
                               "--image_size", "32", "--annotations", str(tmp_path / "captions.json"),
                               "--images_root", str(tmp_path), "--out_path", str(tmp_path / "f.pkl"),
                               "--device", "cpu", "--num_workers", "0"])
    assert summary["num_images"] == 1 and summary["num_failed_images"] == 2
    log = (tmp_path / "f.errors.log").read_text().splitlines()
    assert [line.split("\t")[1:3] for line in log] == [["not_regular", "not a regular file: a FIFO (named pipe)"],
                                                        ["not_regular", "not a regular file: a symlink loop"]]


def test_parse_coco_removes_what_an_interrupted_final_write_left(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "captions.json").write_text(json.dumps([{"image_id": 1, "file_name": "good.png", "caption": "a"}]))
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".f.pkl.x8k2j1.tmp"  # as atomic_write names its temporary file
    stale.write_bytes(b"")
    (out / ".unrelated.tmp").write_bytes(b"kept")
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32))
    torch.save(encoder.model.state_dict(), tmp_path / "encoder.pth")
    parse_coco.main(["--encoder", "test_resnet", "--encoder_weights", str(tmp_path / "encoder.pth"),
                     "--image_size", "32", "--annotations", str(tmp_path / "captions.json"),
                     "--images_root", str(tmp_path), "--out_path", str(out / "f.pkl"), "--device", "cpu",
                     "--num_workers", "0"])
    assert not stale.exists() and (out / ".unrelated.tmp").exists() and (out / "f.pkl").is_file()
    assert f"removed {stale}, left by an interrupted write" in capsys.readouterr().err


# ---- one run at a time in a directory -------------------------------------------------------------------

def test_a_second_run_into_a_held_directory_is_refused(tmp_path, features, gpt2_dir):
    out = tmp_path / "run"
    lock = RunLock(out)
    assert lock.acquire() is None
    try:
        with pytest.raises(RunDirectoryBusy, match=rf"--out_dir {out} is in use by another train.py run "
                                                   rf"\(process {os.getpid()} on "):
            train.main(train_args(features, out, gpt2_dir, "--max_steps", 1))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing was written
        proc = subprocess.run([sys.executable, "train.py", *train_args(features, out, gpt2_dir, "--max_steps", 1)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --out_dir {out} is in use by another "
                                                               f"train.py run (process {os.getpid()}")
    finally:
        lock.release()
    train.main(train_args(features, out, gpt2_dir, "--max_steps", 1))
    assert not (out / LOCK_NAME).exists()  # released at exit


def test_the_lock_of_a_run_that_died_is_taken_over(tmp_path, features, gpt2_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    train.main(train_args(features, out, gpt2_dir, "--max_steps", 1))
    assert (f"note: took over {out / LOCK_NAME}, left by a run that ended without releasing it (process 999999 on "
            f"elsewhere, started yesterday)") in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()


# ---- a full disk while training writes ------------------------------------------------------------------

def no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def at_step_4(obj) -> bool:
    """Whether torch.save is writing the resume checkpoint of step 4."""
    return isinstance(obj, dict) and obj.get("step") == 4 and "optimizer" in obj


def test_a_full_disk_at_an_export_keeps_the_resume_point_and_resume_writes_the_export(
        tmp_path, features, gpt2_dir, monkeypatch):
    common = ["--max_steps", 4, "--save_every_steps", 2]
    train.main(train_args(features, tmp_path / "whole", gpt2_dir, *common))
    real_save, calls = ClipCaptionModel.save_pretrained, []

    def full_disk_at_step_4(self, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            raise no_space(Path(directory) / "model.safetensors")
        return real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ClipCaptionModel, "save_pretrained", full_disk_at_step_4)
    out = tmp_path / "full"
    with pytest.raises(TrainingError, match=rf"at step 4: the export {out / 'coco_prefix_latest'} could not be "
                                            rf"written \(No space left on device\); the resume checkpoint "):
        train.main(train_args(features, out, gpt2_dir, *common))
    monkeypatch.setattr(ClipCaptionModel, "save_pretrained", real_save)
    assert load_state(out / "coco_prefix_resume.pt")["step"] == 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    train.main(train_args(features, out, gpt2_dir, *common, "--resume", "latest"))
    a, b = weights(tmp_path / "whole" / "coco_prefix_latest"), weights(out / "coco_prefix_latest")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_at_the_resume_checkpoint_keeps_the_last_one_and_rescues_the_new_one(
        tmp_path, features, gpt2_dir, monkeypatch):
    common = ["--max_steps", 4, "--save_every_steps", 2]
    train.main(train_args(features, tmp_path / "whole", gpt2_dir, *common))
    out = tmp_path / "full"
    real_save = torch.save

    def full_disk_in(disk: Path):
        def save(obj, f):
            if at_step_4(obj) and Path(getattr(f, "name", f)).parent == disk:  # as torch reports a failed write
                try:
                    raise no_space(f.name)
                except OSError:  # raised while handling it, as torch does: the OSError is its __context__
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
            return real_save(obj, f)
        return save

    monkeypatch.setattr(state_module.torch, "save", full_disk_in(out))
    with pytest.raises(TrainingError) as caught:
        train.main(train_args(features, out, gpt2_dir, *common))
    message = str(caught.value)
    assert message.startswith(f"at step 4: the resume checkpoint {out / 'coco_prefix_resume.pt'} could not be "
                              f"written (No space left on device); the results were saved to ")
    rescued = Path(message.split("; continue with --resume ")[1].split(" (or move it to ")[0])
    assert message.endswith(f" (or move it to {out / 'coco_prefix_resume.pt'} once there is room, then --resume "
                            f"latest)")
    assert load_state(rescued)["step"] == 4 and load_state(out / "coco_prefix_resume.pt")["step"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(state_module.torch, "save", full_disk_in(Path("/nowhere")))
    train.main(train_args(features, out, gpt2_dir, *common, "--resume", str(rescued)))
    a, b = weights(tmp_path / "whole" / "coco_prefix_latest"), weights(out / "coco_prefix_latest")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rescued.unlink()


def test_a_full_disk_everywhere_says_which_resume_point_survives(tmp_path, features, gpt2_dir, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f):
        if at_step_4(obj):
            raise no_space(getattr(f, "name", f))
        return real_save(obj, f)

    monkeypatch.setattr(state_module.torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=rf"nor in .*; the last resume point is intact: "
                                            rf"{out / 'coco_prefix_resume.pt'} \(step 2\)"):
        train.main(train_args(features, out, gpt2_dir, "--max_steps", 4, "--save_every_steps", 2))
