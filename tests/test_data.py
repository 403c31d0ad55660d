"""captioning.data: annotation readers, image loading and the features pickle."""
import csv
import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.data.annotations import AnnotationError, ImageRecord, read_annotations
from captioning.data.features import FeaturesError, read_features, write_features
from captioning.data.images import ImageError, load_image


@pytest.fixture
def coco_root(tmp_path):
    """Image files found only through COCO naming: id 1 in train2014, 2 in val2014, 3 in train2017."""
    root = tmp_path / "coco"
    for name in ["train2014/COCO_train2014_000000000001.jpg", "val2014/COCO_val2014_000000000002.jpg",
                 "train2017/000000000003.jpg", "val2014/custom.jpg"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / name)
    return root


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------- annotation files

def test_list_format_groups_captions_and_uses_coco_naming(tmp_path, coco_root):
    entries = [{"image_id": 2, "id": 10, "caption": "b one"}, {"image_id": 1, "id": 11, "caption": "a one"},
               {"image_id": "2", "id": 12, "caption": "b two"}, {"image_id": 3, "id": 13, "caption": "c one"},
               {"image_id": 9, "caption": "nowhere"}]
    records = read_annotations(write_json(tmp_path / "train_caption.json", entries), images_root=coco_root)
    assert [r.image_id for r in records] == [2, 1, 3, 9]
    assert records[0] == ImageRecord(2, coco_root / "val2014/COCO_val2014_000000000002.jpg", ["b one", "b two"],
                                     "val2014/COCO_val2014_000000000002.jpg", [10, 12])
    assert records[1].file_name == "train2014/COCO_train2014_000000000001.jpg"
    assert records[2].path == coco_root / "train2017/000000000003.jpg"
    # No file exists: the first COCO name, so that the missing file is reported under it later.
    assert records[3].file_name == "train2014/COCO_train2014_000000000009.jpg" and records[3].caption_ids == [None]


def test_list_format_with_file_names_is_a_user_folder(tmp_path):
    entries = [{"file_name": "cat.png", "caption": "a cat"}, {"file_name": "dog.png", "caption": "a dog"},
               {"file_name": "cat.png", "caption": "the cat"}]
    records = read_annotations(write_json(tmp_path / "caps.json", entries), images_root=tmp_path / "pics")
    assert [(r.image_id, r.path, r.captions) for r in records] == [
        ("cat.png", tmp_path / "pics/cat.png", ["a cat", "the cat"]), ("dog.png", tmp_path / "pics/dog.png", ["a dog"])]


def test_coco_captions_file_uses_file_name(tmp_path, coco_root):
    data = {"images": [{"id": 7, "file_name": "val2014/custom.jpg"}, {"id": 1}, {"id": 5, "file_name": "x.jpg"}],
            "annotations": [{"image_id": 1, "id": 100, "caption": "first"},
                            {"image_id": 7, "id": 101, "caption": "second"},
                            {"image_id": 7, "id": 102, "caption": "third"}]}
    records = read_annotations(write_json(tmp_path / "captions_val2014.json", data), images_root=coco_root)
    assert [(r.image_id, r.file_name, r.captions, r.caption_ids) for r in records] == [
        (7, "val2014/custom.jpg", ["second", "third"], [101, 102]),
        (1, "train2014/COCO_train2014_000000000001.jpg", ["first"], [100]),
        (5, "x.jpg", [], [])]  # an image without captions stays: it can still be captioned


def karpathy(tmp_path):
    def image(i, split):
        return {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
                "sentences": [{"raw": f"image {i} caption {j}", "sentid": 10 * i + j} for j in range(2)]}
    data = {"dataset": "coco", "images": [image(1, "train"), image(2, "restval"), image(3, "val"),
                                          image(4, "test"), image(5, "train")]}
    return write_json(tmp_path / "dataset_coco.json", data)


@pytest.mark.parametrize("split, ids", [("train", [1, 5]), ("train+restval", [1, 2, 5]), ("val", [3]),
                                        ("test", [4]), ("restval", [2]), (None, [1, 2, 3, 4, 5])])
def test_karpathy_splits(tmp_path, split, ids):
    records = read_annotations(karpathy(tmp_path), split=split, images_root=tmp_path)
    assert [r.image_id for r in records] == ids
    first = records[0]
    assert first.file_name == f"val2014/COCO_val2014_{ids[0]:012d}.jpg" and first.path == tmp_path / first.file_name
    assert first.captions == [f"image {ids[0]} caption 0", f"image {ids[0]} caption 1"]
    assert first.caption_ids == [10 * ids[0], 10 * ids[0] + 1]


def test_csv_with_and_without_header(tmp_path):
    with open(tmp_path / "with_header.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "caption"], ["a.jpg", "one, with a comma"], ["b.jpg", "two"],
                                 ["a.jpg", "three"]])
    (tmp_path / "plain.csv").write_text("a.jpg,one\nb.jpg,two\n")
    records = read_annotations(tmp_path / "with_header.csv", images_root=tmp_path)
    assert [(r.image_id, r.captions) for r in records] == [("a.jpg", ["one, with a comma", "three"]),
                                                           ("b.jpg", ["two"])]
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"")  # a first row naming an existing image is data
    plain = read_annotations(tmp_path / "plain.csv", images_root=tmp_path / "img")
    assert [(r.path, r.captions) for r in plain] == [(tmp_path / "img/a.jpg", ["one"]),
                                                     (tmp_path / "img/b.jpg", ["two"])]
    (tmp_path / "bom.csv").write_bytes("\ufefffile_name,caption\na.jpg,caf\u00e9\n".encode("utf-8"))
    assert read_annotations(tmp_path / "bom.csv", images_root=tmp_path / "img")[0].captions == ["caf\u00e9"]


@pytest.mark.parametrize("header, problem", [
    ("name,text_en", "unknown column name(s) ['name', 'text_en']"),
    ("file_name,license", "unknown column name(s) ['license']"),
    ("file_name,image_id", "no caption column"),
    ("caption", "no file name column"),
])
def test_a_csv_header_must_name_known_columns(tmp_path, header, problem):
    (tmp_path / "a.csv").write_text(f"{header}\na.jpg,a dog\n")
    with pytest.raises(AnnotationError) as e:
        read_annotations(tmp_path / "a.csv", images_root=tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'a.csv'}: line 1: ") and problem in str(e.value)
    assert ("header columns are a file name (file_name, filename, image, path) or image_id, and a caption "
            "(caption, captions, text, sentence)") in str(e.value)


@pytest.mark.parametrize("name", ["a.csv", "a.json"])
def test_a_file_that_is_not_utf8_is_an_error_naming_the_line(tmp_path, name):
    text = "file_name,caption\na.jpg,un caf\u00e9\n" if name.endswith(".csv") else \
        '[{"image_id": 1,\n "caption": "un caf\u00e9"}]'
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(AnnotationError, match=rf"{name}: line 2: not UTF-8 text \(invalid continuation byte at "
                                              rf"byte \d+\); save the file as UTF-8"):
        read_annotations(tmp_path / name, images_root=tmp_path)
    with pytest.raises(AnnotationError, match=r": is a directory; expected an annotation file"):
        read_annotations(tmp_path, images_root=tmp_path)


@pytest.mark.parametrize("content, message", [
    ([{"caption": "no id"}], "entry 0: missing 'image_id'"),
    ([{"image_id": 1, "caption": "ok"}, {"image_id": 1, "caption": "  "}], "entry 1: empty or missing caption ('  ')"),
    ([{"image_id": 1}], "entry 0: missing 'caption'"),
    ([{"image_id": 1, "caption": 3}], "entry 0: empty or missing caption (3)"),
    ([{"image_id": "abc", "caption": "x"}], "entry 0: image_id 'abc' is not a number and the entry names no file"),
    ([{"image_id": True, "caption": "x"}], "entry 0: image_id True is not usable"),
    (["text"], "entry 0: expected an object with image_id and caption, got str"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "x"}]},
     "annotations[0]: image_id 2 is not in images[]"),
    ({"images": [{"id": 1}, {"id": 1}]}, "images[1]: image id 1 appears twice"),
    ({"foo": 1}, "unrecognised annotation file"),
])
def test_bad_annotations_name_the_entry(tmp_path, content, message):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(AnnotationError) as e:
        read_annotations(path, images_root=tmp_path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_bad_entries_can_be_collected_and_skipped(tmp_path, coco_root):
    entries = [{"image_id": 1, "caption": "kept"}, {"caption": "no id"}, {"image_id": 2, "caption": ""},
               {"image_id": 2, "caption": "also kept"}]
    errors = []
    records = read_annotations(write_json(tmp_path / "a.json", entries), images_root=coco_root, errors=errors)
    assert [(r.image_id, r.captions) for r in records] == [(1, ["kept"]), (2, ["also kept"])]
    assert [str(e).split(": ", 1)[1] for e in errors] == [
        "entry 1: missing 'image_id' (or a file name: file_name, filename, image, path)",
        "entry 2: empty or missing caption (''); expected a non-empty string"]
    (tmp_path / "b.csv").write_text("file_name,caption\na.jpg,one\nb.jpg\n,three\n")
    errors = []
    assert [r.captions for r in read_annotations(tmp_path / "b.csv", errors=errors)] == [["one"]]
    assert [str(e).split(": ", 1)[1] for e in errors] == [
        "line 3: 1 column(s); expected file name, caption",
        "line 4: empty file name; expected the image's file name"]


def test_malformed_json_unknown_split_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1,\n  "caption": "x"')
    with pytest.raises(AnnotationError, match=r"bad.json: malformed JSON at line 2, column 17: Expecting .,."):
        read_annotations(bad)
    with pytest.raises(AnnotationError, match=r"dataset_coco.json: unknown split 'training' in 'training'"):
        read_annotations(karpathy(tmp_path), split="training")
    listed = write_json(tmp_path / "list.json", [{"image_id": 1, "caption": "x"}])
    with pytest.raises(AnnotationError, match=r"split='train' given, but this 'list' file has no splits"):
        read_annotations(listed, split="train")
    with pytest.raises(AnnotationError, match=r"nope.json: no such annotation file"):
        read_annotations(tmp_path / "nope.json")
    (tmp_path / "short.csv").write_text("file_name,caption\na.jpg\n")
    with pytest.raises(AnnotationError, match=r"short.csv: line 2: 1 column\(s\); expected file name, caption"):
        read_annotations(tmp_path / "short.csv")


# ---------------------------------------------------------------------------------------------------------- images

def bomb_png(path: Path, width=100_000, height=100_000) -> Path:
    """A tiny PNG whose header claims a huge size, as a decompression bomb does."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        "gray.jpg": Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L"),
        "cmyk.jpg": Image.new("CMYK", (30, 20), (0, 255, 255, 0)),
        "rgba.png": Image.new("RGBA", (30, 20), (255, 0, 0, 0)),
        "palette.png": Image.new("RGB", (30, 20), (0, 0, 255)).convert("P"),
        "sixteen.png": Image.fromarray(np.linspace(0, 65535, 600, dtype=np.uint16).reshape(20, 30)),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    loaded = {name: load_image(tmp_path / name) for name in images}
    assert all(im.mode == "RGB" and im.size == (30, 20) for im in loaded.values())
    assert loaded["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert loaded["palette.png"].getpixel((0, 0)) == (0, 0, 255)
    assert loaded["cmyk.jpg"].getpixel((5, 5))[0] > 200  # cyan-free, magenta+yellow: red
    sixteen = np.asarray(loaded["sixteen.png"])[..., 0]
    assert sixteen.min() == 0 and sixteen.max() == 255


def test_load_image_refuses_bad_files(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    cases = {"truncated.jpg": "truncated", "text.jpg": "unreadable", "missing.jpg": "missing"}
    for name, kind in cases.items():
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name)
        assert e.value.kind == kind and str(e.value).startswith(f"{tmp_path / name}: ")
    with pytest.raises(ImageError, match="decompression bomb") as e:
        load_image(bomb_png(tmp_path / "bomb.png"))
    assert e.value.kind == "too_large"
    with pytest.raises(ImageError, match=r"decompression bomb: 64x64 = 4,096 pixels exceeds the limit of 1,000"):
        load_image(tmp_path / "full.jpg", max_pixels=1000)
    assert pickle.loads(pickle.dumps(e.value)).kind == "too_large"


# ------------------------------------------------------------------------------------------------- features pickle

def captions_for(rows):
    return [{"image_id": r, "id": i, "caption": f"caption {i}", "clip_embedding": r} for i, r in enumerate(rows)]


@pytest.mark.parametrize("shape, dtype", [((3, 8), torch.float32), ((3, 4, 8), torch.float16)])
def test_features_round_trip(tmp_path, shape, dtype):
    features = torch.randn(*shape).to(dtype)
    write_features(tmp_path / "f.pkl", features, captions_for([0, 0, 2, 1]), {"encoder": "x", "dims": [1, 2]})
    data = read_features(tmp_path / "f.pkl")
    assert torch.equal(data["clip_embedding"], features) and data["clip_embedding"].dtype == dtype
    assert data["captions"] == captions_for([0, 0, 2, 1]) and data["metadata"] == {"encoder": "x", "dims": [1, 2]}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    with open(tmp_path / "f.pkl", "rb") as f:  # the original training code reads it with plain pickle
        assert torch.equal(pickle.load(f)["clip_embedding"], features)


def test_original_plain_pickle_and_torch_save_load(tmp_path):
    embeddings = torch.cat([torch.randn(1, 6) for _ in range(3)], dim=0)  # as the original script built it
    with open(tmp_path / "orig.pkl", "wb") as f:
        pickle.dump({"clip_embedding": embeddings, "captions": captions_for([0, 1, 2])}, f)
    data = read_features(tmp_path / "orig.pkl")
    assert torch.equal(data["clip_embedding"], embeddings) and data["metadata"] == {}
    torch.save({"clip_embedding": embeddings, "captions": captions_for([2])}, tmp_path / "saved.pt")
    assert read_features(tmp_path / "saved.pt")["captions"] == captions_for([2])


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


class EvilStorage:
    """Pickles as `torch.storage._load_from_bytes(bytes)`, the bytes being a torch.save of a code-running object."""

    def __init__(self, marker):
        buf = io.BytesIO()
        torch.save(Evil(marker), buf)
        self.payload = buf.getvalue()

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.payload,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("make", [Evil, EvilStorage])
def test_malicious_pickle_is_refused_without_running(tmp_path, make):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"clip_embedding": make(marker), "captions": captions_for([0])}, f)
    with pytest.raises(FeaturesError, match=r"evil.pkl: unsafe or corrupt features file"):
        read_features(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("data, message", [
    ({"clip_embedding": torch.zeros(2, 4), "captions": captions_for([0, 5])},
     r"captions\[1\]: 'clip_embedding' is 5; expected a row index in \[0, 2\)"),
    ({"clip_embedding": torch.zeros(2, 4), "captions": []}, "'captions' is empty"),
    ({"clip_embedding": torch.zeros(4), "captions": captions_for([0])}, r"'clip_embedding' is \(4,\); expected"),
    ({"clip_embedding": torch.zeros(0, 4), "captions": captions_for([0])}, r"has shape \(0, 4\); expected N, D > 0"),
    ({"clip_embedding": torch.zeros(2, 4), "captions": [{"caption": "x", "clip_embedding": 0}]},
     r"captions\[0\]: expected a dict with 'image_id'"),
    ({"clip_embedding": torch.zeros(2, 4)}, r"missing key\(s\) \['captions'\]"),
    ({"clip_embedding": torch.zeros(2, 4), "captions": captions_for([0]), "extra": 1}, r"unknown key\(s\) \['extra'\]"),
])
def test_schema_errors(tmp_path, data, message):
    with open(tmp_path / "f.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(FeaturesError, match=message):
        read_features(tmp_path / "f.pkl")


def test_corrupt_and_missing_features_files(tmp_path):
    write_features(tmp_path / "f.pkl", torch.zeros(2, 3), captions_for([0, 1]))
    data = (tmp_path / "f.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(FeaturesError, match=r"cut.pkl: (not a readable features pickle|unsafe or corrupt)"):
        read_features(tmp_path / "cut.pkl")
    with pytest.raises(FeaturesError, match=r"none.pkl: no such features file"):
        read_features(tmp_path / "none.pkl")
    with pytest.raises(FeaturesError, match=r"metadata must be plain JSON-like data"):
        write_features(tmp_path / "g.pkl", torch.zeros(2, 3), captions_for([0]), {"s": {1, 2}})
    assert not (tmp_path / "g.pkl").exists()


def test_relative_file_names_may_not_climb_out_of_the_images_root(tmp_path):
    path = write_json(tmp_path / "a.json", [{"file_name": "../../etc/passwd", "caption": "x"}])
    with pytest.raises(AnnotationError, match=r"entry 0: file name '../../etc/passwd' climbs out of the images root"):
        read_annotations(path, images_root=tmp_path / "images")
    inside = write_json(tmp_path / "b.json", [{"file_name": "sub/../a.jpg", "caption": "x"},
                                              {"file_name": str(tmp_path / "elsewhere.jpg"), "caption": "y"}])
    records = read_annotations(inside, images_root=tmp_path / "images")  # absolute paths: the user's own choice
    assert [r.path for r in records] == [tmp_path / "images" / "sub/../a.jpg", tmp_path / "elsewhere.jpg"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    from models.checkpoint_io import atomic_directory, atomic_write

    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "g.txt").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode


@pytest.mark.parametrize("beams_key", ["beams", "captions"])
def test_results_file_round_trip(tmp_path, beams_key):
    from captioning.data.results import Prediction, read_results, write_results

    predictions = [Prediction(391895, "a dog", ["a dog", "a cat"], "val2014/x.jpg", [-0.5, -0.75]),
                   Prediction("photo.png", "a café", [])]
    write_results(tmp_path / "r.json", predictions, beams_key=beams_key)
    entries = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert entries[0] == {"image_id": 391895, "caption": "a dog", "file_name": "val2014/x.jpg",
                          beams_key: ["a dog", "a cat"], "scores": [-0.5, -0.75]}
    assert entries[1] == {"image_id": "photo.png", "caption": "a café"}
    back = read_results(tmp_path / "r.json")
    assert [(p.image_id, p.caption, p.beams, p.file_name) for p in back] == [
        (391895, "a dog", ["a dog", "a cat"], "val2014/x.jpg"), ("photo.png", "a café", [], None)]
