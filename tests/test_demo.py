import json

import demo


def test_demo_runs_the_whole_pipeline_on_a_tiny_dataset(tmp_path, capsys):
    out = tmp_path / "demo"
    result = demo.main(["--out_dir", str(out), "--num_train", "24", "--num_val", "4", "--num_test", "6",
                        "--epochs", "1", "--bs", "16", "--beam_size", "2"])
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith("RESULT colour_acc=")
    predictions = json.loads((out / "test_predictions.json").read_text())
    assert len(predictions) == 6 and all(isinstance(p["caption"], str) for p in predictions)
    assert set(result["accuracy"]) == {"colour", "shape", "position"}
    assert all(0.0 <= v <= 100.0 for v in result["accuracy"].values())
    assert result["baseline_cider"] >= 0 and (out / "test_captions.png").stat().st_size > 0
    assert (out / "eval" / "metrics.json").exists() and (out / "run" / "demo_latest" / "config.json").exists()


def test_demo_rejects_a_folder_without_the_coco_files(tmp_path):
    import pytest

    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="captions_train.json is missing"):
        demo.main(["--data", str(tmp_path), "--out_dir", str(tmp_path / "out")])
