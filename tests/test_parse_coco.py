"""parse_coco.py end to end on a small generated COCO-style tree, with a tiny timm encoder at 48 px."""
import csv
import json
from pathlib import Path

import pytest
import torch

import parse_coco
from builders import BAD, GOOD, coco_name, kill_after_batches, parse_coco_args, run_two_ranks
from captioning import extraction, runtime
from captioning.data.annotations import AnnotationError, read_annotations
from captioning.data.features import read_features
from captioning.data.images import load_image
from captioning.extraction import ExtractionError
from captioning.featurize import ExtractionConfig, extract_features
from models.encoder import EncoderConfig, ImageEncoder


def direct_features(tree, records):
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights=str(tree / "encoder.pth"), image_size=48)).eval()
    with torch.inference_mode():
        return torch.cat([encoder(encoder.preprocess(load_image(r.path))[None]) for r in records])


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """One uninterrupted run (batch size 4), the baseline other runs are compared with."""
    out = tmp_path_factory.mktemp("ref") / "features.pkl"
    parse_coco.main(parse_coco_args(tree, out, "--batch_size", "4"))
    return out


def test_rows_captions_and_features(tree, reference, capsys):
    data = read_features(reference)
    auto = runtime.resolve_precision("auto", "cpu", training=False)  # fp32: tests run as on an AVX2 CPU
    assert {k: data["metadata"][k] for k in auto.record()} == auto.record() and auto.name == "fp32"
    records = read_annotations(tree / "clean.json", images_root=tree)
    good = [r for r in records if r.image_id <= GOOD]
    assert data["clip_embedding"].shape == (GOOD, 96) and data["clip_embedding"].dtype == torch.float32
    torch.testing.assert_close(data["clip_embedding"], direct_features(tree, good), atol=1e-5, rtol=0)
    # One row per distinct image in first-appearance order; each caption points at its image's row.
    expected = [{"image_id": r.image_id, "id": cid, "caption": c, "clip_embedding": row}
                for row, r in enumerate(good) for c, cid in zip(r.captions, r.caption_ids)]
    assert data["captions"] == expected and len(expected) == sum(3 + i % 3 for i in range(1, GOOD + 1))
    meta = data["metadata"]
    assert meta["num_images"] == GOOD and meta["num_captions"] == len(expected) and meta["feature_dim"] == 96
    assert meta["file_names"][:3] == [coco_name(1), coco_name(2), coco_name(3)]  # train2014, val2014 lookups
    assert meta["file_names"][4] == coco_name(5) and coco_name(5).startswith("train2017/")
    assert meta["num_failed_images"] == 4 and meta["num_skipped_captions"] == sum(3 + i % 3 for i in BAD)
    assert meta["num_skipped_annotation_entries"] == 2
    assert meta["encoder_name"] == "test_resnet" and meta["preprocessing"]["input_size"] == [3, 48, 48]
    assert meta["encoder"]["resolved_name"] == "test_resnet.r160_in1k"  # the tag timm picked for the bare name
    assert not Path(f"{reference}.partial").exists()


def test_bad_images_are_reported_with_their_reason(tree, reference):
    lines = reference.with_suffix(".errors.log").read_text().splitlines()
    annotations = tree / "train_caption.json"
    assert lines[:2] == [f"{annotations}\tannotation\tentry 10: missing 'image_id' (or a file name: file_name, "
                         f"filename, image, path)",
                         f"{annotations}\tannotation\tentry 11: empty or missing caption (' '); expected a "
                         f"non-empty string"]
    lines = lines[2:]
    assert [line.split("\t")[1] for line in lines] == list(BAD.values())
    assert [line.split("\t")[0] for line in lines] == [str(tree / coco_name(i)) for i in BAD]
    assert "file not found" in lines[0] and "image file is truncated" in lines[1]
    assert "decompression bomb" in lines[3] and lines[3].endswith(f"captions_skipped={3 + 16 % 3}")


def test_on_error_fail_stops_and_skip_prints(tree, tmp_path, capsys):
    with pytest.raises(AnnotationError, match=r"train_caption.json: entry 10: missing 'image_id'"):
        parse_coco.main(parse_coco_args(tree, tmp_path / "f.pkl", "--on_error", "fail"))
    with pytest.raises(ExtractionError, match=rf"{coco_name(13)}: file not found \(image_id 13\)"):
        parse_coco.main(parse_coco_args(tree, tmp_path / "f.pkl", "--on_error", "fail", "--batch_size", "16",
                                        annotations="clean.json"))
    assert not (tmp_path / "f.pkl").exists()
    parse_coco.main(parse_coco_args(tree, tmp_path / "f.pkl", "--batch_size", "16"))
    err = capsys.readouterr().err
    assert f"skipping {tree / 'train_caption.json'}: entry 11: empty or missing caption" in err
    assert "2 bad annotation entries skipped" in err
    assert f"skipping {tree / coco_name(15)}: unreadable" in err
    assert "4 image(s) left out (missing: 1, too_large: 1, truncated: 1, unreadable: 1), 16 caption(s) skipped" in err


def test_batch_sizes_and_workers_agree(tree, reference, tmp_path):
    parse_coco.main(parse_coco_args(tree, tmp_path / "b1.pkl", "--batch_size", "1"))
    parse_coco.main(parse_coco_args(tree, tmp_path / "b8.pkl", "--batch_size", "8", "--num_workers", "2"))
    ref = read_features(reference)
    for name in ("b1.pkl", "b8.pkl"):
        data = read_features(tmp_path / name)
        torch.testing.assert_close(data["clip_embedding"], ref["clip_embedding"], atol=1e-5, rtol=1e-5)
        assert data["captions"] == ref["captions"]


def assert_same_file(path, reference):
    """Equal content, bit for bit. (The files' bytes differ: a pickled tensor embeds its storage's address.)"""
    data, ref = read_features(path), read_features(reference)
    assert torch.equal(data["clip_embedding"], ref["clip_embedding"])
    assert data["captions"] == ref["captions"] and data["metadata"] == ref["metadata"]


def interrupted_run(tree, out, monkeypatch, batches: int) -> None:
    """A run (batches of 4) stopped by Ctrl-C while the batch after `batches` finished ones is in flight."""
    original, calls = extraction.LogWriter.append, []

    def append(self, indices, features):
        calls.append(indices)
        if len(calls) > batches:
            raise KeyboardInterrupt
        original(self, indices, features)
    monkeypatch.setattr(extraction.LogWriter, "append", append)
    with pytest.raises(KeyboardInterrupt):
        parse_coco.main(parse_coco_args(tree, out, "--batch_size", "4"))
    monkeypatch.undo()


def test_resume_after_interrupt_and_torn_write(tree, reference, tmp_path, monkeypatch):
    out = tmp_path / "f.pkl"
    interrupted_run(tree, out, monkeypatch, 2)
    logs = list(Path(f"{out}.partial").glob("*.log"))
    assert not out.exists() and len(logs) == 1
    with open(logs[0], "ab") as f:  # power loss in the middle of writing the third record
        f.write(b"TTF1" + b"\x00" * 9)
    assert extraction.done_indices(Path(f"{out}.partial")) == set(range(8))
    parse_coco.main(parse_coco_args(tree, out, "--batch_size", "4"))
    assert_same_file(out, reference)


def test_resume_refuses_other_settings_unless_fresh(tree, reference, tmp_path, monkeypatch):
    out = tmp_path / "f.pkl"
    interrupted_run(tree, out, monkeypatch, 1)
    with pytest.raises(ExtractionError, match=r"partial results of a run with other inputs or settings "
                                              r"\(differing: dtype\); rerun that command"):
        parse_coco.main(parse_coco_args(tree, out, "--batch_size", "4", "--dtype", "float16"))
    parse_coco.main(parse_coco_args(tree, out, "--batch_size", "4", "--dtype", "float16", "--fresh"))
    data = read_features(out)
    assert data["clip_embedding"].dtype == torch.float16 and data["metadata"]["dtype"] == "float16"
    torch.testing.assert_close(data["clip_embedding"].float(), read_features(reference)["clip_embedding"],
                               atol=1e-2, rtol=1e-3)


def test_random_weights_come_from_a_recorded_seed_and_a_resume_checks_them(tree, tmp_path, monkeypatch):
    def random_args(out, *extra):
        argv = parse_coco_args(tree, out, "--batch_size", "4", *extra)
        argv[argv.index("--encoder_weights") + 1] = "random"
        return argv

    parse_coco.main(random_args(tmp_path / "whole.pkl"))
    whole = read_features(tmp_path / "whole.pkl")
    torch.manual_seed(0)  # the recorded seed draws the same weights, whose fingerprint the metadata holds
    config = ExtractionConfig(**vars(parse_coco.build_parser().parse_args(random_args(tmp_path / "whole.pkl"))))
    drawn = ImageEncoder(config.encoder_config())
    assert whole["metadata"]["seed"] == 0
    assert whole["metadata"]["encoder"]["weights_sha256"] == drawn.weights_fingerprint()
    out = tmp_path / "f.pkl"
    original, calls = extraction.LogWriter.append, []

    def append(self, indices, features):
        calls.append(indices)
        if len(calls) > 1:
            raise KeyboardInterrupt
        original(self, indices, features)

    monkeypatch.setattr(extraction.LogWriter, "append", append)
    with pytest.raises(KeyboardInterrupt):
        parse_coco.main(random_args(out))
    monkeypatch.undo()
    with pytest.raises(ExtractionError, match=r"other inputs or settings \(differing: encoder, seed\)"):
        parse_coco.main(random_args(out, "--seed", "1"))  # other random weights: never mixed with the first
    parse_coco.main(random_args(out))  # the same seed: the same encoder, the partial results are reused
    assert torch.equal(read_features(out)["clip_embedding"], whole["clip_embedding"])


def test_resume_after_kill_9(tree, tmp_path):
    out = tmp_path / "f.pkl"
    argv = parse_coco_args(tree, out, "--batch_size", "4", "--num_workers", "1")
    reference = tmp_path / "uninterrupted.pkl"  # the same flags, so the same thread budget
    parse_coco.main(parse_coco_args(tree, reference, "--batch_size", "4", "--num_workers", "1"))
    kill_after_batches(argv, 2, tmp_path / "log.txt")
    assert not out.exists() and extraction.done_indices(Path(f"{out}.partial")) == set(range(8))
    parse_coco.main(argv)
    assert_same_file(out, reference)


def test_two_process_gloo_run_equals_one_process(tree, reference, tmp_path):
    out = tmp_path / "f.pkl"
    reports = run_two_ranks(parse_coco_args(tree, out, "--batch_size", "4"))
    # Each process encodes every other fixed batch of 4.
    assert reports == {0: [[0, 1, 2, 3], [8, 9, 10, 11]], 1: [[4, 5, 6, 7], [12, 13, 14, 15]]}
    data, ref = read_features(out), read_features(reference)
    torch.testing.assert_close(data["clip_embedding"], ref["clip_embedding"], atol=1e-5, rtol=1e-5)
    assert data["captions"] == ref["captions"] and data["metadata"] == ref["metadata"]


def test_other_annotation_formats(tree, tmp_path):
    coco = {"images": [{"id": 3, "file_name": coco_name(3)}, {"id": 1, "file_name": coco_name(1)}],
            "annotations": [{"image_id": 1, "id": 9, "caption": "one"}, {"image_id": 3, "id": 8, "caption": "three"}]}
    (tree / "captions_val.json").write_text(json.dumps(coco))
    images = [{"filepath": coco_name(i).split("/")[0], "filename": coco_name(i).split("/")[1], "cocoid": i,
               "split": split, "sentences": [{"raw": f"karpathy {i}", "sentid": i}]}
              for i, split in [(1, "train"), (2, "val"), (4, "restval"), (5, "test")]]
    (tree / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    with open(tree / "mine.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "caption"], [coco_name(2), "my two"], [coco_name(6), "my six"]])
    parse_coco.main(parse_coco_args(tree, tmp_path / "coco.pkl", annotations="captions_val.json"))
    parse_coco.main(parse_coco_args(tree, tmp_path / "k.pkl", "--split", "train+restval",
                                    annotations="dataset_coco.json"))
    parse_coco.main(parse_coco_args(tree, tmp_path / "csv.pkl", annotations="mine.csv"))
    results = {name: read_features(tmp_path / f"{name}.pkl") for name in ("coco", "k", "csv")}
    assert [c["caption"] for c in results["coco"]["captions"]] == ["three", "one"]
    assert [c["image_id"] for c in results["k"]["captions"]] == [1, 4]
    assert results["csv"]["captions"] == [{"image_id": coco_name(2), "caption": "my two", "clip_embedding": 0},
                                          {"image_id": coco_name(6), "caption": "my six", "clip_embedding": 1}]
    by_name = dict(zip(results["coco"]["metadata"]["file_names"], results["coco"]["clip_embedding"]))
    csv_rows = dict(zip(results["csv"]["metadata"]["file_names"], results["csv"]["clip_embedding"]))
    k_rows = dict(zip(results["k"]["metadata"]["file_names"], results["k"]["clip_embedding"]))
    torch.testing.assert_close(by_name[coco_name(1)], k_rows[coco_name(1)], atol=1e-5, rtol=0)
    assert set(csv_rows) == {coco_name(2), coco_name(6)}


def test_grid_features_and_bad_annotations(tree, tmp_path):
    torch.manual_seed(0)
    ImageEncoder(EncoderConfig(name="test_vit", weights="random", image_size=32)).save_pretrained(tmp_path / "vit")
    (tmp_path / "one.csv").write_text(f"{coco_name(1)},a caption\n{coco_name(2)},another\n")
    parse_coco.main(["--encoder", "test_vit", "--encoder_weights", str(tmp_path / "vit/model.safetensors"),
                     "--image_size", "32", "--feature_type", "grid", "--annotations", str(tmp_path / "one.csv"),
                     "--images_root", str(tree), "--out_path", str(tmp_path / "grid.pkl"), "--device", "cpu",
                     "--num_workers", "0"])
    data = read_features(tmp_path / "grid.pkl")
    assert data["clip_embedding"].shape == (2, 5, 64) and data["metadata"]["num_tokens"] == 5  # 2x2 patches + cls
    (tmp_path / "bad.json").write_text('[{"image_id": 1, "caption": "x"},\n{"caption": "y"]')
    with pytest.raises(AnnotationError, match=r"bad.json: malformed JSON at line 2, column 16: Expecting .,."):
        parse_coco.main(parse_coco_args(tree, tmp_path / "x.pkl", annotations="../" + tmp_path.name + "/bad.json"))
    assert not (tmp_path / "x.pkl").exists()


def test_pixel_limit_flag_and_nothing_readable(tree, tmp_path):
    (tmp_path / "two.csv").write_text(f"{coco_name(1)},a caption\n{coco_name(2)},another\n")
    with pytest.raises(ExtractionError, match=r"none of the 2 images could be read; see .*two.errors.log"):
        parse_coco.main(parse_coco_args(tree, tmp_path / "two.pkl", "--max_image_pixels", "1000",
                                        annotations="../" + tmp_path.name + "/two.csv"))
    lines = (tmp_path / "two.errors.log").read_text().splitlines()
    assert len(lines) == 2 and all("exceeds the limit of 1,000" in line for line in lines)


def config_from_flags(argv):
    """What parse_coco.main hands the library for these flags."""
    return ExtractionConfig(**vars(parse_coco.build_parser().parse_args(argv)))


def test_default_output_paths():
    assert config_from_flags([]).out_path == Path("data/coco/oscar_split_tinyvit_train.pkl")
    config = config_from_flags(["--clip_model_type", "ViT-B/32"])
    assert config.out_path == Path("data/coco/oscar_split_ViT-B_32_train.pkl")
    assert config.error_log == Path("data/coco/oscar_split_ViT-B_32_train.errors.log")
    assert config_from_flags(["--encoder", "convnext_atto"]).out_path.name == "oscar_split_convnext_atto_train.pkl"


def test_the_configs_defaults_are_the_flags():
    assert ExtractionConfig() == config_from_flags([])
    assert ExtractionConfig(encoder="convnext_atto").encoder_config() == \
        config_from_flags(["--encoder", "convnext_atto"]).encoder_config()


def test_a_config_built_in_code_writes_what_the_script_writes(tree, reference, tmp_path):
    out = tmp_path / "library.pkl"
    config = ExtractionConfig(encoder="test_resnet", encoder_weights=str(tree / "encoder.pth"), image_size=48,
                              annotations=str(tree / "train_caption.json"), images_root=str(tree), out_path=out,
                              device="cpu", num_workers=0, batch_size=4)
    summary = extract_features(config)
    assert summary["out_path"] == out and summary["num_images"] == GOOD
    assert out.with_suffix(".errors.log").read_text() == reference.with_suffix(".errors.log").read_text()
    assert_same_file(out, reference)


@pytest.mark.parametrize("preprocessing", ["timm", "clip"])
def test_split_preprocessing_equals_the_encoders(tree, preprocessing):
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=40,
                                         preprocessing=preprocessing))
    transform, normalization = extraction.split_transform(encoder.transform)
    assert normalization is not None
    images = [load_image(tree / coco_name(i)) for i in (1, 4, 11)]  # RGB, CMYK, 16-bit sources
    batch = torch.stack([transform(image) for image in images])
    assert batch.dtype == torch.uint8
    assert torch.equal(extraction.normalize_batch(batch, normalization),
                       torch.stack([encoder.preprocess(image) for image in images]))


def test_a_run_that_reads_no_image_leaves_only_its_error_log(tree, tmp_path):
    (tmp_path / "missing.json").write_text(json.dumps([{"image_id": 99999, "caption": "a dog"}]))
    out = tmp_path / "out" / "f.pkl"
    argv = parse_coco_args(tree, out)
    argv[argv.index("--annotations") + 1] = str(tmp_path / "missing.json")
    with pytest.raises(ExtractionError, match="none of the 1 images could be read"):
        parse_coco.main(argv)
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.errors.log"]  # no .partial folder, no temp file
