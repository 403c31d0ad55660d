"""Webdataset shards as img2dataset writes them, through parse_coco.py, train.py --train_encoder and evaluate.py
--checkpoint: each gives over the shards what it gives over the same images in a folder."""
import json
import tarfile

import numpy as np
import pytest
import torch

import evaluate
import parse_coco
import train
from builders import (FAST_METRICS, add_member, image_bytes, kill_after_batches, make_coco_tree, run_two_ranks,
                      train_args, weights, write_shards)
from captioning.data.annotations import AnnotationError, read_annotations
from captioning.data.features import read_features
from captioning.data.shards import ShardMember

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """10 images in 3 shards (4, 4, 2), and the same images in a folder with a COCO captions file."""
    root = tmp_path_factory.mktemp("shards")
    make_coco_tree(root / "tree")  # for its encoder file
    return root, write_shards(root)


def extraction_args(root, annotations, out, *extra):
    tree = root / "tree"
    return ["--encoder", "test_resnet", "--encoder_weights", str(tree / "encoder.pth"), "--image_size", "48",
            "--annotations", str(annotations), "--images_root", str(root / "folder"), "--out_path", str(out),
            "--device", "cpu", "--num_workers", "0", "--threads", "1", "--batch_size", "3", *extra]


@pytest.fixture(scope="module")
def from_folder(dataset, tmp_path_factory):
    root, _ = dataset
    out = tmp_path_factory.mktemp("folder") / "features.pkl"
    parse_coco.main(extraction_args(root, root / "captions.json", out))
    return read_features(out)


def assert_same_features(data, reference):
    assert torch.equal(data["clip_embedding"], reference["clip_embedding"])
    # the same entries, but for the caption ids that a COCO file has and shards have not
    assert data["captions"] == [{k: v for k, v in c.items() if k != "id"} for c in reference["captions"]]
    assert data["metadata"]["image_ids"] == reference["metadata"]["image_ids"]


def test_shards_give_the_features_of_the_same_images_in_a_folder(dataset, from_folder, tmp_path):
    root, shards = dataset
    parse_coco.main(extraction_args(root, f"{root}/{{00000..00002}}.tar", tmp_path / "shards.pkl"))
    data = read_features(tmp_path / "shards.pkl")
    assert_same_features(data, from_folder)
    assert data["metadata"]["image_ids"] == [int(f"{i // 4:05d}{i:04d}") for i in range(10)]
    assert data["metadata"]["file_names"][0] == "00000.tar/000000000.jpg"


def test_every_way_of_naming_shards_gives_the_same_records(dataset, tmp_path):
    root, shards = dataset
    (tmp_path / "list.txt").write_text("".join(f"{p.relative_to(root)}\n" for p in shards))
    (tmp_path / "list.txt").replace(root / "list.txt")
    ways = {"pattern": f"{root}/{{00000..00002}}.tar", "directory": str(root), "list": str(root / "list.txt")}
    records = {name: read_annotations(spec, fmt="webdataset" if name == "list" else "auto")
               for name, spec in ways.items()}
    single = [r for shard in shards for r in read_annotations(str(shard))]
    for name, got in records.items():
        assert [(r.image_id, r.captions, str(r.path)) for r in got] == \
            [(r.image_id, r.captions, str(r.path)) for r in single], name
    assert isinstance(single[0].path, ShardMember) and str(single[0].path) == f"{shards[0]}:000000000.jpg"
    with pytest.raises(AnnotationError, match=r"1 of 4 shard\(s\) are missing, e.g. .*00003.tar"):
        read_annotations(f"{root}/{{00000..00003}}.tar")
    with pytest.raises(AnnotationError, match=r"webdataset shards have no splits"):
        read_annotations(str(shards[0]), split="train")


def test_each_kind_of_bad_sample_is_logged_by_shard_and_key(dataset, tmp_path):
    root, shards = dataset
    good = image_bytes(0, np.random.default_rng(1))
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for key, members in [("k0", {"jpg": good, "txt": b"A good one."}),
                             ("k1", {"jpg": b"not an image", "txt": b"An unreadable one."}),
                             ("k2", {"jpg": good[:len(good) // 2], "txt": b"A truncated one."}),
                             ("k3", {"jpg": good}),
                             ("k4", {"txt": b"No image."})]:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
        add_member(tar, "README", b"a stray file")
    cut = tmp_path / "cut.tar"
    with tarfile.open(cut, "w") as tar:
        for key in ("c0", "c1"):
            add_member(tar, f"{key}.jpg", good)
            add_member(tar, f"{key}.txt", b"Cut short.")
    cut.write_bytes(cut.read_bytes()[:3 * 512 + len(good) + 700])  # inside c1's image
    (tmp_path / "list.txt").write_text("bad.tar\ncut.tar\n")
    out = tmp_path / "f.pkl"
    summary = parse_coco.main(extraction_args(root, tmp_path / "list.txt", out, "--annotation_format",
                                              "webdataset"))
    log = (tmp_path / "f.errors.log").read_text()
    assert f"{bad}:k1.jpg\tunreadable" in log and f"{bad}:k2.jpg\ttruncated" in log
    assert f"{bad}: sample 'k3': no caption" in log and f"{bad}: sample 'k4': no image member" in log
    assert f"{bad}: stray member 'README'" in log and f"{cut}: truncated or corrupt tar after" in log
    data = read_features(out)
    assert [c["image_id"] for c in data["captions"]] == ["k0", "c0"]
    assert summary["num_failed_images"] == 2 and summary["num_skipped_annotation_entries"] == 4
    assert data["metadata"]["num_failed_images"] == 2 and data["metadata"]["num_skipped_annotation_entries"] == 4
    with pytest.raises(AnnotationError, match=r"bad.tar: stray member 'README'"):
        parse_coco.main(extraction_args(root, tmp_path / "list.txt", tmp_path / "g.pkl", "--annotation_format",
                                        "webdataset", "--on_error", "fail"))


def test_two_processes_and_a_killed_run_give_the_uninterrupted_result(dataset, from_folder, tmp_path):
    root, _ = dataset
    spec = f"{root}/{{00000..00002}}.tar"
    reports = run_two_ranks(extraction_args(root, spec, tmp_path / "two.pkl"))
    assert reports == {0: [[0, 1, 2], [6, 7, 8]], 1: [[3, 4, 5], [9]]}
    assert_same_features(read_features(tmp_path / "two.pkl"), from_folder)
    argv = extraction_args(root, spec, tmp_path / "killed.pkl")
    kill_after_batches(argv, 2, tmp_path / "log.txt")
    assert not (tmp_path / "killed.pkl").exists()
    parse_coco.main(argv)
    assert_same_features(read_features(tmp_path / "killed.pkl"), from_folder)


def test_training_and_evaluation_over_shards_equal_those_over_the_folder(dataset, gpt2_dir, tmp_path):
    root, _ = dataset
    encoder = ["--train_encoder", "--encoder", "test_resnet", "--encoder_weights", "random", "--image_size", 32,
               "--num_workers", 0, "--max_steps", 2]
    train.main(train_args(None, tmp_path / "folder", gpt2_dir, *encoder, "--annotations", root / "captions.json",
                          "--images_root", root / "folder"))
    train.main(train_args(None, tmp_path / "shards", gpt2_dir, *encoder, "--annotations",
                          f"{root}/{{00000..00002}}.tar"))
    a, b = weights(tmp_path / "folder" / "coco_prefix_latest"), weights(tmp_path / "shards" / "coco_prefix_latest")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reports = {}
    for name, flags in (("folder", ["--annotations", root / "captions.json", "--images_root", root / "folder"]),
                        ("shards", ["--annotations", root])):
        reports[name] = evaluate.main(["--checkpoint", str(tmp_path / name / "coco_prefix_latest"), "--max_length",
                                       "6", "--device", "cpu", "--out_dir", str(tmp_path / f"eval_{name}"),
                                       *map(str, flags), *FAST_METRICS])
    assert reports["shards"]["metrics"] == reports["folder"]["metrics"] and reports["shards"]["num_images"] == 10
    rows = [json.loads((tmp_path / f"eval_{name}" / "metrics.json").read_text())["per_image"] for name in reports]
    assert rows[0] == rows[1] and len(rows[0]) == 10
