"""evaluate.py end to end through main([...]) on small hand-made COCO and Karpathy files, and
captioning/evaluation.py through an EvaluateConfig.

The CLI runs score BLEU and CIDEr only (METEOR starts a JVM for seconds); test_metrics checks every
metric against pycocoevalcap itself."""
import dataclasses
import json
import types
from pathlib import Path

import pytest

import evaluate
from builders import FAST_METRICS, PREDICTIONS, REFERENCES, write_json
from captioning import evaluation, metrics, runtime
from captioning.data.results import read_results
from captioning.metrics import score_captions


@pytest.fixture
def coco_file(tmp_path):
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in REFERENCES]
    annotations = [{"id": 100 * i + j, "image_id": i, "caption": c} for i, refs in REFERENCES.items()
                   for j, c in enumerate(refs)]
    return write_json(tmp_path / "captions_val2014.json", {"images": images, "annotations": annotations})


def results(tmp_path, predictions, name="results.json", beams=None):
    entries = [{"image_id": k, "caption": v, **({"beams": beams[k]} if beams else {})}
               for k, v in predictions.items()]
    return write_json(tmp_path / name, entries)


def run_error(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err[err.index("evaluate.py: error: "):]


def test_scores_a_results_file_against_coco_annotations(tmp_path, coco_file, capsys):
    beams = {k: [v, "A picture of something."] for k, v in PREDICTIONS.items()}
    path = results(tmp_path, PREDICTIONS, beams=beams)
    report = evaluate.main(["--predictions", str(path), "--annotations", str(coco_file), "--original_bleu",
                            *FAST_METRICS])
    out_dir = tmp_path / "results_eval"
    saved = json.loads((out_dir / "metrics.json").read_text())
    direct = score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU", "CIDEr"))
    assert saved["metrics"] == pytest.approx(direct["metrics"]) and report["metrics"] == saved["metrics"]
    assert saved["num_images"] == 6 and saved["coverage"]["fraction"] == 1.0
    rows = {row["image_id"]: row for row in saved["per_image"]}
    assert rows[3]["caption"] == PREDICTIONS[3]
    assert rows[3]["CIDEr"] == pytest.approx(direct["per_image"][3]["CIDEr"])
    original = metrics.original_bleu(beams, REFERENCES)
    assert saved["original_bleu"]["Bleu_4"] == pytest.approx(original["Bleu_4"])
    assert rows[2]["original_Bleu_4"] == pytest.approx(original["per_image"][2])
    assert (out_dir / "scores_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"CIDEr    {direct['metrics']['CIDEr']:7.1f}" in out
    assert "Not comparable with published results:\n  original notebook BLEU-4" in out
    assert "coverage: predictions for 6 of 6 reference images (100.0%)" in out


def test_an_evaluate_config_does_what_the_cli_does(tmp_path, coco_file, capsys):
    """The flags' defaults are EvaluateConfig's, and evaluation.evaluate(config) returns and writes the report that
    main([...]) gives for the same settings."""
    defaults = vars(evaluate.build_parser().parse_args(["--predictions", "p.json", "--annotations", "a.json"]))
    assert defaults == dataclasses.asdict(evaluation.EvaluateConfig(annotations="a.json", predictions="p.json"))
    path = results(tmp_path, PREDICTIONS, beams={k: [v, "A picture of something."] for k, v in PREDICTIONS.items()})
    cli = evaluate.main(["--predictions", str(path), "--annotations", str(coco_file), "--original_bleu",
                         "--out_dir", str(tmp_path / "cli"), *FAST_METRICS])
    cli_out = capsys.readouterr().out.replace(str(tmp_path / "cli"), "OUT")
    config = evaluation.EvaluateConfig(annotations=str(coco_file), predictions=str(path), original_bleu=True,
                                       out_dir=str(tmp_path / "config"), metrics=["BLEU", "CIDEr"])
    assert evaluation.evaluate(config) == cli
    assert capsys.readouterr().out.replace(str(tmp_path / "config"), "OUT") == cli_out
    assert (tmp_path / "config" / "metrics.json").read_text() == (tmp_path / "cli" / "metrics.json").read_text()
    assert cli["num_images"] == 6 and "Bleu_4" in cli["original_bleu"]
    with pytest.raises(evaluation.EvaluationError, match="exactly one source of captions"):
        evaluation.evaluate(dataclasses.replace(config, checkpoint="ckpt"))


def test_karpathy_split_selection(tmp_path, karpathy_file, capsys):
    for split, ids in (("test", range(1, 7)), ("val", [7, 8]), ("train+restval", [9, 10, 11])):
        records, references = evaluation.load_references(karpathy_file, split)
        assert [r.image_id for r in records] == list(ids) and list(references) == list(ids)
    path = results(tmp_path, PREDICTIONS)
    report = evaluate.main(["--predictions", str(path), "--annotations", str(karpathy_file), "--split", "test",
                            "--out_dir", str(tmp_path / "out"), *FAST_METRICS])
    assert report["num_images"] == 6 and report["split"] == "test"
    assert report["metrics"] == pytest.approx(score_captions(PREDICTIONS, REFERENCES, ("BLEU", "CIDEr"))["metrics"])
    # The same predictions against the val split are for images that split does not hold.
    err = run_error(capsys, ["--predictions", str(path), "--annotations", str(karpathy_file), "--split", "val"])
    assert "6 of 6 predictions are for image ids not in the references" in err and ", split val)" in err


def test_partial_coverage_is_an_error_unless_allowed(tmp_path, coco_file, capsys):
    path = results(tmp_path, {k: PREDICTIONS[k] for k in (1, 2, 3, 4)})
    argv = ["--predictions", str(path), "--annotations", str(coco_file), *FAST_METRICS]
    err = run_error(capsys, argv)
    assert "2 reference image(s) of" in err and "e.g. [5, 6]" in err and "--allow_partial" in err
    report = evaluate.main(argv + ["--allow_partial"])
    assert report["num_images"] == 4 and report["coverage"] == {"predicted": 4, "reference_images": 6,
                                                                 "fraction": 4 / 6}
    assert "not comparable with scores on the full split" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("[{\"image_id\": 1, \"caption\": \"a\"},\n {\"image_id\": 2 \"caption\": \"b\"}]",
     "malformed JSON at line 2, column 17: Expecting ',' delimiter"),
    ({"1": "a man"}, "expected a JSON list of {\"image_id\", \"caption\"} objects"),
    ([], "the list of predictions is empty"),
    ([{"image_id": 1}], "entry 0: missing key 'caption'"),
    ([{"image_id": 1, "caption": "a"}, "b"], "entry 1: expected an object"),
    ([{"image_id": 1.5, "caption": "a"}], "entry 0: image_id 1.5 is not usable"),
    ([{"image_id": 1, "caption": 3}], "entry 0 (image_id 1): caption is int; expected a string"),
    ([{"image_id": 1, "caption": "a", "beams": "a"}], "'beams' must be a list of strings"),
    ([{"image_id": 1, "caption": "a", "captions": [1]}], "'captions' must be a list of strings"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "  "}], "entry 1 (image_id 2): empty caption"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}, {"image_id": 1, "caption": "c"}],
     "1 image id(s) have several captions, e.g. image_id 1 at entries [0, 2]"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 42, "caption": "b"}, {"image_id": "x.jpg", "caption": "c"}],
     "2 of 3 predictions are for image ids not in the references"),
])
def test_bad_predictions_files(tmp_path, coco_file, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    err = run_error(capsys, ["--predictions", str(path), "--annotations", str(coco_file), *FAST_METRICS])
    assert message in err
    if "not in the references" not in message:
        assert f"{path}: entry" in err or f"{path}: " in err


def test_string_ids_match_integer_references_and_empty_captions_can_be_allowed(tmp_path, coco_file):
    entries = [{"image_id": str(k), "caption": v} for k, v in PREDICTIONS.items()]
    entries[0]["caption"] = ""
    path = write_json(tmp_path / "r.json", entries)
    report = evaluate.main(["--predictions", str(path), "--annotations", str(coco_file), "--allow_empty",
                            *FAST_METRICS])
    assert report["per_image"][0] == {"image_id": 1, "caption": "", "Bleu_4": 0.0, "CIDEr": 0.0}


def test_other_user_errors(tmp_path, coco_file, karpathy_file, capsys, monkeypatch):
    path = results(tmp_path, PREDICTIONS)
    err = run_error(capsys, ["--predictions", str(tmp_path / "none.json"), "--annotations", str(coco_file)])
    assert "none.json: no such predictions file" in err
    err = run_error(capsys, ["--predictions", str(path), "--annotations", str(tmp_path / "none.json")])
    assert "no such annotation file" in err
    err = run_error(capsys, ["--predictions", str(path), "--annotations", str(karpathy_file), "--split", "tset"])
    assert "unknown split 'tset'" in err
    err = run_error(capsys, ["--predictions", str(path), "--annotations", str(coco_file), "--split", "test"])
    assert "has no splits" in err
    monkeypatch.setitem(__import__("sys").modules, "nltk", None)  # an import of it now fails
    err = run_error(capsys, ["--predictions", str(path), "--annotations", str(coco_file), "--original_bleu"])
    assert "nltk is not installed: `pip install nltk`" in err
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    err = run_error(capsys, ["--predictions", str(path), "--annotations", str(coco_file)])
    assert "Java was not found on PATH" in err
    assert not (tmp_path / "results_eval").exists()
    with pytest.raises(SystemExit) as exc:  # argparse: exactly one of --predictions / --checkpoint
        evaluate.main(["--annotations", str(coco_file)])
    assert exc.value.code == 2


def test_parser_defaults():
    args = evaluate.build_parser().parse_args(["--checkpoint", "ckpt", "--annotations", "a.json", "--split", "test"])
    assert args.metrics == ["BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"] and args.beam_size == 5
    assert evaluation.default_out_dir(evaluation.EvaluateConfig(**vars(args))) == Path("ckpt_eval_test")


# ---------------------------------------------------------------------------------------------- --checkpoint mode

class StubCaptioner:
    """Stands in for the Captioner: reads the image id back from the image's width."""
    loaded = []
    encoder = "an image encoder"
    precision = runtime.Precision("fp32", "auto", "auto: a stub")

    @classmethod
    def from_pretrained(cls, directory, device=None, precision="auto", quantize="none"):
        cls.loaded.append((str(directory), device, precision) + ((quantize,) if quantize != "none" else ()))
        return cls()

    def fit_max_length(self, requested):
        return requested or 67, None

    def predict(self, images, options, batch_size=32, progress=False, on_error="keep"):
        assert options.decoding == "beam" and on_error == "keep"
        out = []
        from captioning.data.images import ImageError, load_image

        for path in images:  # image files, as the real Captioner takes them; unreadable ones give an error
            try:
                width = load_image(path).size[0]
            except ImageError as e:
                out.append(types.SimpleNamespace(captions=[], error=str(e)))
                continue
            beams = [PREDICTIONS[width - 10]] + [f"beam {i}" for i in range(1, options.beam_size)]
            out.append(types.SimpleNamespace(captions=beams, error=None))
        return out


@pytest.fixture
def stub_predict(monkeypatch):
    module = types.ModuleType("captioning.inference")
    module.Captioner = StubCaptioner
    module.DecodingOptions = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(__import__("sys").modules, "captioning.inference", module)
    StubCaptioner.loaded = []


def test_checkpoint_mode_captions_the_split_then_scores(tmp_path, karpathy_file, coco_images, stub_predict):
    argv = ["--checkpoint", str(tmp_path / "run" / "latest"), "--images_root", str(coco_images), "--annotations",
            str(karpathy_file), "--split", "test", "--batch_size", "4", "--device", "cpu", "--original_bleu",
            *FAST_METRICS]
    report = evaluate.main(argv)
    assert StubCaptioner.loaded == [(str(tmp_path / "run" / "latest"), "cpu", "auto")]
    evaluate.main(argv + ["--dtype", "bf16", "--out_dir", str(tmp_path / "bf16")])  # the earlier spelling
    assert StubCaptioner.loaded[-1] == (str(tmp_path / "run" / "latest"), "cpu", "bf16")
    evaluate.main(argv + ["--quantize", "int8", "--out_dir", str(tmp_path / "int8")])
    assert StubCaptioner.loaded[-1] == (str(tmp_path / "run" / "latest"), "cpu", "auto", "int8")
    out_dir = tmp_path / "run" / "latest_eval_test"
    saved = json.loads((out_dir / "predictions.json").read_text())
    assert [e["image_id"] for e in saved] == [1, 2, 3, 4, 5, 6]
    assert saved[2]["caption"] == PREDICTIONS[3] and len(saved[2]["beams"]) == 5
    assert report["metrics"] == pytest.approx(score_captions(PREDICTIONS, REFERENCES, ("BLEU", "CIDEr"))["metrics"])
    assert report["predictions"] == str(out_dir / "predictions.json")
    # The written predictions score the same through --predictions.
    again = evaluate.main(["--predictions", str(out_dir / "predictions.json"), "--annotations", str(karpathy_file),
                           "--split", "test", *FAST_METRICS])
    assert again["metrics"] == report["metrics"]


def test_checkpoint_mode_missing_and_broken_images(tmp_path, karpathy_file, coco_images, stub_predict, capsys,
                                                   monkeypatch):
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--images_root", str(coco_images), "--annotations",
            str(karpathy_file), "--split", "test", "--out_dir", str(tmp_path / "out"), *FAST_METRICS]
    with monkeypatch.context() as m:  # no captioning when the metrics could not run afterwards
        m.setattr(metrics.shutil, "which", lambda name: None)
        assert "Java was not found" in run_error(capsys, argv)
    (coco_images / "val2014" / "COCO_val2014_000000000005.jpg").unlink()
    err = run_error(capsys, argv)
    assert "1 of 6 images are missing, e.g. " in err and "COCO_val2014_000000000005.jpg; check --images_root" in err
    assert StubCaptioner.loaded == []  # refused before loading the model
    (coco_images / "val2014" / "COCO_val2014_000000000002.jpg").write_bytes(b"not a jpeg")
    err = run_error(capsys, argv[:-3] + ["--max_images", "3", *FAST_METRICS])
    assert "1 image(s) could not be read, e.g. " in err and "COCO_val2014_000000000002.jpg" in err
    kept = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [e["image_id"] for e in kept] == [1, 3]  # the others' captions are kept
    assert f"score them with --predictions {tmp_path / 'out' / 'predictions.json'} --allow_partial" in err
    report = evaluate.main(argv + ["--allow_partial"])
    assert [row["image_id"] for row in report["per_image"]] == [1, 3, 4, 6]
    assert report["coverage"]["reference_images"] == 6 and report["num_images"] == 4
    assert len(json.loads((tmp_path / "out" / "predictions.json").read_text())) == 4


def test_predict_py_captions_list_is_read_as_the_beams(tmp_path):
    path = write_json(tmp_path / "p.json", [{"image_id": 1, "caption": "a", "file_name": "1.jpg",
                                             "captions": ["a", "b"], "scores": [-0.1, -0.2]},
                                            {"image_id": 2, "caption": "c", "beams": ["c", "d"], "captions": ["x"]}])
    assert [p.beams for p in read_results(path)] == [["a", "b"], ["c", "d"]]


def test_coverage_reads_100_percent_only_when_nothing_is_missing():
    assert evaluation.coverage_percent(4999, 5000) == "99.98%"
    assert evaluation.coverage_percent(5000, 5000) == "100.0%"
    assert evaluation.coverage_percent(1, 100_000) == "0.001%"
    assert evaluation.coverage_percent(0, 5000) == "0.0%" and evaluation.coverage_percent(2, 3) == "66.7%"


def test_predict_py_csv_scores_as_its_json(tmp_path, coco_file):
    from captioning.inference import CaptionResult
    from captioning.prediction import write_csv
    from captioning.prediction import write_json as write_predictions
    results = [CaptionResult(f"{k}.jpg", [v, "-other"], [-0.1, -0.2]) for k, v in PREDICTIONS.items()]
    results.append(CaptionResult("broken.jpg", [], [], error="broken.jpg: unreadable"))
    ids = [*PREDICTIONS, "broken.jpg"]
    write_csv(tmp_path / "p.csv", results, ids, 2)
    write_predictions(tmp_path / "p.json", results, ids, 2)
    from_csv, from_json = read_results(tmp_path / "p.csv"), read_results(tmp_path / "p.json")
    assert [(p.image_id, p.caption, p.beams, p.file_name) for p in from_csv] == \
        [(p.image_id, p.caption, p.beams, p.file_name) for p in from_json]
    assert from_csv[0].beams == [PREDICTIONS[1], "-other"]  # a caption that began with "-" comes back as it was
    reports = [evaluate.main(["--predictions", str(tmp_path / name), "--annotations", str(coco_file),
                              "--out_dir", str(tmp_path / name.replace(".", "_")), *FAST_METRICS])
               for name in ("p.csv", "p.json")]
    assert reports[0]["metrics"] == reports[1]["metrics"]
