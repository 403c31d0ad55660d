"""The memory-mapped features store (parse_coco.py --out_format mmap): equal to the pickle row for row, read by
train.py and predict.py as the pickle is, converted both ways, and refused with the file named when broken."""
import json
import shutil

import numpy as np
import pytest
import torch

import parse_coco
import predict
import train
from builders import (log_records, make_coco_tree, make_pickle, parse_coco_args, resume_equals_uninterrupted,
                      run_two_ranks, tiny_captioner, train_args)
from captioning.data.features import FeaturesError, read_features
from captioning.data.store import STORE_FILE, FeaturesStore, is_store, read_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """parse_coco.py over the generated COCO tree (bad images and entries included), as a pickle and as a store."""
    root = tmp_path_factory.mktemp("store")
    tree = make_coco_tree(root / "tree")
    parse_coco.main(parse_coco_args(tree, root / "f.pkl", "--threads", "1"))
    parse_coco.main(parse_coco_args(tree, root / "f.store", "--threads", "1", "--out_format", "mmap"))
    return root


def assert_equal_data(a, b):
    assert torch.equal(a["clip_embedding"], b["clip_embedding"]) and a["clip_embedding"].dtype == \
        b["clip_embedding"].dtype
    assert a["captions"] == b["captions"] and a["metadata"] == b["metadata"]


def test_the_store_holds_what_the_pickle_holds_and_converts_both_ways(extracted):
    pickle_data, store = read_features(extracted / "f.pkl"), extracted / "f.store"
    assert is_store(store) and not is_store(extracted / "f.pkl")
    assert_equal_data(read_store(store), pickle_data)
    parse_coco.main(["--convert", str(extracted / "f.pkl"), "--out_format", "mmap", "--out_path",
                     str(extracted / "converted.store")])
    parse_coco.main(["--convert", str(extracted / "converted.store"), "--out_path", str(extracted / "back.pkl")])
    assert_equal_data(read_store(extracted / "converted.store"), pickle_data)
    assert_equal_data(read_features(extracted / "back.pkl"), pickle_data)
    opened = FeaturesStore(store)
    # the features and caption rows are the mapped files themselves (read-only), not copies in this process
    assert isinstance(opened.caption_rows, np.memmap) and isinstance(opened.feature_array, np.memmap)
    assert opened.features.data_ptr() == opened.feature_array.ctypes.data
    assert opened.captions[1] == pickle_data["captions"][1]["caption"] and len(opened.captions) == \
        len(pickle_data["captions"])
    assert opened.captions[-1] == pickle_data["captions"][-1]["caption"]
    with pytest.raises(IndexError):
        opened.captions[len(opened.captions)]


def test_training_on_the_store_gives_the_pickles_losses_and_resumes_bitwise(tmp_path, gpt2_dir, monkeypatch):
    data = make_pickle(tmp_path / "train.pkl", n_images=8, per_image=3)
    parse_coco.main(["--convert", str(data), "--out_format", "mmap", "--out_path", str(tmp_path / "train.store")])
    common = ["--epochs", 2, "--bs", 4, "--val_fraction", 0.25]
    for name, source in (("pickle", data), ("store", tmp_path / "train.store")):
        train.main(train_args(source, tmp_path / name, gpt2_dir, *common))
    losses = [[r.get("loss"), r.get("val_loss")] for name in ("pickle", "store") for r in log_records(tmp_path / name)]
    half = len(losses) // 2
    assert losses[:half] == losses[half:] and half > 4
    resume_equals_uninterrupted(tmp_path / "resume", monkeypatch, lambda out: train_args(
        tmp_path / "train.store", out, gpt2_dir, "--max_steps", 4, "--bs", 2, "--save_every_steps", 2))


def test_predict_features_on_the_store_gives_the_pickles_captions(extracted, tmp_path, tokenizer):
    encoder = read_features(extracted / "f.pkl")["metadata"]["encoder"]
    tiny_captioner(tokenizer, prefix_size=96, encoder_config=encoder).save_pretrained(tmp_path / "export", tokenizer)
    results = []
    for name in ("f.pkl", "f.store"):
        out = tmp_path / f"{name}.json"
        assert predict.main(["--checkpoint", str(tmp_path / "export"), "--features", str(extracted / name),
                             "--out", str(out), "--beam_size", "2", "--max_length", "6",
                             "--encoder_weights", str(extracted / "tree" / "encoder.pth")]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] and len(results[0]) == read_features(extracted / "f.pkl")["clip_embedding"].shape[0]


def test_a_truncated_or_inconsistent_store_is_an_error_naming_the_file(extracted, tmp_path, gpt2_dir):
    broken = shutil.copytree(extracted / "f.store", tmp_path / "truncated.store")
    (broken / "features.npy").write_bytes((broken / "features.npy").read_bytes()[:-100])
    with pytest.raises(FeaturesError, match=r"truncated.store/features.npy: [\d,]+ bytes, but store.json records"):
        FeaturesStore(broken)
    with pytest.raises(FeaturesError, match=r"truncated.store/features.npy: [\d,]+ bytes, but store.json records"):
        train.main(train_args(broken, tmp_path / "run", gpt2_dir, "--max_steps", 1))
    missing = shutil.copytree(extracted / "f.store", tmp_path / "missing.store")
    (missing / "captions.bin").unlink()
    with pytest.raises(FeaturesError, match=r"missing.store/captions.bin: missing, but store.json records"):
        FeaturesStore(missing)
    other = shutil.copytree(extracted / "f.store", tmp_path / "other.store")
    header = json.loads((other / STORE_FILE).read_text())
    header["num_captions"] -= 1  # rows and captions disagree
    (other / STORE_FILE).write_text(json.dumps(header))
    with pytest.raises(FeaturesError, match=r"other.store/caption_rows.npy: holds int64 \(\d+,\), but store.json "
                                            r"says int64 \(\d+,\); the store is inconsistent"):
        FeaturesStore(other)
    del header["files"]
    (other / STORE_FILE).write_text(json.dumps(header))
    with pytest.raises(FeaturesError, match=r"other.store/store.json: missing key\(s\) \['files'\]"):
        FeaturesStore(other)
    unfinished = tmp_path / "unfinished.store"
    shutil.copytree(extracted / "f.store", unfinished)
    (unfinished / STORE_FILE).unlink()
    with pytest.raises(ValueError, match=r"--data .*unfinished.store: is a directory; expected a features pickle "
                                         r"or store \(store.json is missing\)"):
        train.main(train_args(unfinished, tmp_path / "run2", gpt2_dir, "--max_steps", 1))


def test_two_processes_extract_into_the_store_one_process_writes(extracted, tmp_path):
    tree = extracted / "tree"
    run_two_ranks(parse_coco_args(tree, tmp_path / "two.store", "--threads", "1", "--out_format", "mmap"))
    assert_equal_data(read_store(tmp_path / "two.store"), read_store(extracted / "f.store"))
