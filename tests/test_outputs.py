"""Output locations are checked before the work, and results survive a write that fails at the end.

Tests run as root, where permissions do not stop writes: an unwritable place is simulated by raising OSError."""
import json
import tempfile
from pathlib import Path

import pytest
import torch

import evaluate
import parse_coco
import predict
import train
from builders import FAST_METRICS, FIXTURES, parse_coco_args, tiny_captioner, train_args
from captioning import featurize, inference, outputs
from captioning.data.features import read_features, write_features
from captioning.outputs import OutputError, check_output_dir, check_output_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def features_export(tmp_path, tokenizer):
    tiny_captioner(tokenizer).save_pretrained(tmp_path / "export", tokenizer)
    write_features(tmp_path / "f.pkl", torch.randn(3, 96), [{"image_id": i, "caption": "x", "clip_embedding": i}
                                                            for i in range(3)])
    return ["--checkpoint", str(tmp_path / "export"), "--features", str(tmp_path / "f.pkl"), "--beam_size", "2",
            "--max_length", "5"]


def refuse_writes_in(monkeypatch, place):
    """Writes under `place` fail as on a read-only disk."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(place)):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_checks_name_the_flag_and_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "o.json").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*o.json: is a directory; give a file name"):
        check_output_file(tmp_path / "o.json", "--out")
    with pytest.raises(OutputError, match=r"--out .*file/sub/o.json: .*file is a file, so nothing can be written"):
        check_output_file(tmp_path / "file" / "sub" / "o.json", "--out")
    with pytest.raises(OutputError, match=r"--out_dir .*file: exists and is not a directory"):
        check_output_dir(tmp_path / "file", "--out_dir")
    assert check_output_file(tmp_path / "new" / "deeper" / "o.json", "--out") == tmp_path / "new" / "deeper" / "o.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputError, match=rf"--out_dir {tmp_path / 'run'}: cannot write in {tmp_path} "
                                          rf"\(Permission denied\)"):
        check_output_dir(tmp_path / "run", "--out_dir")


def test_predict_refuses_a_bad_out_before_captioning(tmp_path, features_export, monkeypatch, capsys):
    (tmp_path / "o.json").mkdir()
    monkeypatch.setattr(inference.Captioner, "from_pretrained", lambda *a, **k: pytest.fail("captioned anyway"))
    assert predict.main(features_export + ["--out", str(tmp_path / "o.json")]) == 2
    assert f"predict.py: error: --out {tmp_path / 'o.json'}: is a directory" in capsys.readouterr().err


def test_predict_saves_the_captions_elsewhere_when_the_final_write_fails(tmp_path, features_export, monkeypatch,
                                                                         capsys):
    out = tmp_path / "results" / "o.json"
    out.parent.mkdir()
    refuse_writes_in(monkeypatch, out.parent)  # the place became read-only during the run
    assert predict.main(features_export + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    message = next(line for line in err.splitlines() if "could not be written" in line)
    assert message.startswith(f"predict.py: error: --out {out} could not be written (Permission denied); the "
                              f"results were saved to ")
    rescued = Path(message.rsplit("saved to ", 1)[1].removesuffix(" instead"))
    assert rescued.parent == Path(tempfile.gettempdir())  # beside the file was read-only too
    assert [e["image_id"] for e in json.loads(rescued.read_text())] == [0, 1, 2]
    rescued.unlink()
    assert list(out.parent.iterdir()) == []  # nothing half-written where the file was meant to go


def test_evaluate_refuses_a_file_as_out_dir_before_captioning(tmp_path, export, karpathy_file,
                                                              coco_images, capsys):
    (tmp_path / "scores").write_text("not a directory")
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(export), "--images_root", str(coco_images), "--annotations",
                       str(karpathy_file), "--split", "test", "--out_dir", str(tmp_path / "scores"), *FAST_METRICS])
    err = capsys.readouterr().err
    assert f"evaluate.py: error: --out_dir {tmp_path / 'scores'}: exists and is not a directory" in err
    assert "captioning" not in err  # refused before the work


def test_evaluate_rescues_predictions_and_scores(tmp_path, export, karpathy_file, coco_images,
                                                 monkeypatch, capsys):
    out_dir = tmp_path / "scores"
    out_dir.mkdir()
    refuse_writes_in(monkeypatch, out_dir)
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(export), "--images_root", str(coco_images), "--annotations",
                       str(karpathy_file), "--split", "test", "--out_dir", str(out_dir), "--beam_size", "2",
                       "--max_length", "5", *FAST_METRICS])
    message = next(line for line in capsys.readouterr().err.splitlines() if "could not be written" in line)
    rescued = Path(message.rsplit("saved to ", 1)[1].removesuffix(" instead"))
    assert [e["image_id"] for e in json.loads(rescued.read_text())] == [1, 2, 3, 4, 5, 6]
    rescued.unlink()
    assert list(out_dir.iterdir()) == []


def test_parse_coco_and_train_refuse_bad_outputs_before_work(tmp_path, tree, gpt2_dir):
    (tmp_path / "f.pkl").mkdir()
    with pytest.raises(OutputError, match=r"--out_path .*f.pkl: is a directory"):
        parse_coco.main(parse_coco_args(tree, tmp_path / "f.pkl"))
    assert not list(tmp_path.glob("f.pkl.*"))  # no partial results begun
    (tmp_path / "run").write_text("a file")
    with pytest.raises(OutputError, match=r"--out_dir .*run: exists and is not a directory"):
        train.main(train_args(None, tmp_path / "run", gpt2_dir, "--data", tmp_path / "missing.pkl"))


def test_parse_coco_rescues_the_pickle_when_the_final_write_fails(tmp_path, tree, monkeypatch,
                                                                 capsys):
    out = tmp_path / "out" / "f.pkl"
    real = featurize.write_features

    def full_disk(path, *args, **kwargs):
        if path == out:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(featurize, "write_features", full_disk)
    with pytest.raises(OutputError, match=r"--out_path .*f.pkl could not be written \(No space left on device\); "
                                          r"the results were saved to .*f.rescued-\d+.pkl instead") as e:
        parse_coco.main(parse_coco_args(tree, out))
    rescued = Path(str(e.value).rsplit("saved to ", 1)[1].removesuffix(" instead"))
    assert rescued.parent == out.parent and not out.exists()
    monkeypatch.setattr(featurize, "write_features", real)
    parse_coco.main(parse_coco_args(tree, tmp_path / "whole.pkl"))  # the same run, written where it should be
    kept, whole = read_features(rescued), read_features(tmp_path / "whole.pkl")
    assert torch.equal(kept["clip_embedding"], whole["clip_embedding"]) and kept["captions"] == whole["captions"]


def test_an_export_never_replaces_a_file(tmp_path, capsys):
    import convert_checkpoint
    import shapes_data
    from models.checkpoint_io import atomic_directory

    precious = tmp_path / "notes.txt"
    precious.write_text("a user's file")
    with pytest.raises(NotADirectoryError, match="notes.txt exists and is not a directory; nothing was written"):
        with atomic_directory(precious) as tmp:
            (tmp / "config.json").write_text("{}")
    assert convert_checkpoint.main(["--checkpoint", str(FIXTURES / "original_mlp_prefix.pt"), "--out_dir",
                                    str(precious)]) == 1
    assert f"--out_dir {precious}: exists and is not a directory" in capsys.readouterr().err
    assert shapes_data.main(["--out_dir", str(precious), "--num_train", "2", "--num_test", "1"]) == 2
    assert f"shapes_data.py: error: --out_dir {precious}: exists and is not a directory" in capsys.readouterr().err
    assert precious.read_text() == "a user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
