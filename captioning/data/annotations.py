"""Annotation files -> `ImageRecord`s: every format read in one place.

Annotation formats (`read_annotations(..., fmt=...)`, "auto" detects them):
- "list": a JSON list of caption entries, such as the original `train_caption.json`
  (`[{"image_id": 391895, "id": 770337, "caption": "..."}, ...]`) or a user's own list; an entry may name its
  image with `file_name` (also `filename`, `image`, `path`) instead of, or besides, `image_id`.
- "coco": an official COCO `captions_*.json` (`images[]` with `id` and `file_name`, `annotations[]`).
- "karpathy": Karpathy's `dataset_coco.json` (`images[]` with `filepath`, `filename`, `cocoid`, `split`,
  `sentences[].raw`); `split` picks "train", "val", "test", "restval" or a `+` joined set ("train+restval").
- "csv": a CSV file with a file name column and a caption column (a header row is optional).
- "webdataset": tar shards as img2dataset writes them (captioning/data/shards.py); their images stay in the tars.

An image's path is `images_root / file_name` when the annotation names the file; otherwise it follows COCO's
naming: `train2014/COCO_train2014_{id:012d}.jpg`, then `val2014/COCO_val2014_...`, then the 2017 names
`train2017/{id:012d}.jpg` and `val2017/{id:012d}.jpg`, the first that exists. A file name with `\\xNN` escapes, as
the project writes names that are not valid UTF-8 (captioning/data/text.py), names the file with those bytes.

Image ids are matched as `image_id_key` says, in every reader (annotations and predictions alike): an integer is
itself; a string of digits is that integer, so "391895", "0391895" and 391895 are one image (and "0007" is image
7); any other string is an id as it is, compared exactly.
"""
import contextlib
import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

from captioning.choices import ANNOTATION_FORMATS
from captioning.data import shards
from captioning.data.records import AnnotationError, ImageRecord, image_id_key  # noqa: F401 (re-exported)
from captioning.data.text import existing_path, from_csv_cell, printable_name

KARPATHY_SPLITS = ("train", "val", "test", "restval")
FILE_KEYS = ("file_name", "filename", "image", "path")
CSV_CAPTION_COLUMNS = ("caption", "captions", "text", "sentence")
CSV_COLUMNS = (*FILE_KEYS, "image_id", *CSV_CAPTION_COLUMNS)


def coco_image_candidates(image_id: int) -> List[str]:
    """COCO's file names for an image id, in lookup order (2014 train, 2014 val, 2017 train, 2017 val)."""
    return [f"train2014/COCO_train2014_{image_id:012d}.jpg", f"val2014/COCO_val2014_{image_id:012d}.jpg",
            f"train2017/{image_id:012d}.jpg", f"val2017/{image_id:012d}.jpg"]


# COCO's file names: COCO_val2014_000000391895.jpg (2014) and 000000391895.jpg (2017), twelve digits either way.
COCO_FILE_NAME = re.compile(r"(?:COCO_[a-z]+\d{4}_)?(\d{12})")


def image_id_from_name(path) -> object:
    """COCO's `image_id` for a COCO file name (`COCO_val2014_000000391895.jpg` -> 391895), else the file name
    itself (as UTF-8 text: captioning/data/text.py): a number taken from any other name could give two files one id
    (`gray16.png`, `rgb16.png`)."""
    match = COCO_FILE_NAME.fullmatch(Path(path).stem)
    return int(match[1]) if match else printable_name(Path(path).name)


class _Records:
    """Groups captions by image, keeping the images in order of first appearance."""

    def __init__(self, source: Path, images_root, errors: Optional[list] = None):
        self.source, self.root, self.errors = source, Path(images_root), errors
        self.by_key: Dict = {}

    @contextlib.contextmanager
    def entry(self):
        """Around one entry: its error is raised, or collected (the entry skipped) when errors is a list."""
        try:
            yield
        except AnnotationError as e:
            if self.errors is None:
                raise
            self.errors.append(e)

    def add(self, where: str, image_id, file_name, caption, caption_id=None) -> None:
        if not isinstance(caption, str) or not caption.strip():
            raise AnnotationError(f"{self.source}: {where}: empty or missing caption ({caption!r}); expected a "
                                  f"non-empty string")
        self.image(where, image_id, file_name).captions.append(caption)
        self.by_key[self._key(image_id, file_name)].caption_ids.append(caption_id)

    def image(self, where: str, image_id, file_name) -> ImageRecord:
        key = self._key(image_id, file_name)
        record = self.by_key.get(key)
        if record is None:
            record = self.by_key[key] = self._new(where, image_id, file_name)
        elif file_name is not None and file_name != record.file_name:
            raise AnnotationError(f"{self.source}: {where}: image {image_id!r} is named {file_name!r} here but "
                                  f"{record.file_name!r} before; expected one file per image_id")
        return record

    @staticmethod
    def _key(image_id, file_name):
        return ("id", image_id) if image_id is not None else ("file", file_name)

    def _new(self, where: str, image_id, file_name) -> ImageRecord:
        if file_name is not None and not Path(file_name).is_absolute() and \
                os.path.normpath(file_name).split(os.sep)[0] == os.pardir:
            raise AnnotationError(f"{self.source}: {where}: file name {file_name!r} climbs out of the images root "
                                  f"{self.root}; relative names must stay inside it (absolute paths are allowed)")
        if file_name is None:
            if not isinstance(image_id, int):
                raise AnnotationError(f"{self.source}: {where}: image_id {image_id!r} is not a number and the entry "
                                      f"names no file; expected a numeric COCO image_id or a file_name")
            candidates = coco_image_candidates(image_id)
            file_name = next((c for c in candidates if (self.root / c).is_file()), candidates[0])
        return ImageRecord(image_id if image_id is not None else file_name, existing_path(self.root / file_name), [],
                           file_name)


def _image_id(value, where: str, source: Path):
    """The entry's image_id key, or None when it has none; an unusable one is an error."""
    if value is None:
        return None
    key = image_id_key(value)
    if key is None:
        raise AnnotationError(f"{source}: {where}: image_id {value!r} is not usable; expected an integer or a "
                              f"string")
    return key


def _file_name(entry: Dict, where: str, source: Path) -> Optional[str]:
    for key in FILE_KEYS:
        if entry.get(key) is not None:
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise AnnotationError(f"{source}: {where}: {key!r} is {entry[key]!r}; expected a file name")
            return entry[key]
    return None


def _read_list(data: list, records: _Records) -> None:
    for i, entry in enumerate(data):
        with records.entry():
            where = f"entry {i}"
            if not isinstance(entry, dict):
                raise AnnotationError(f"{records.source}: {where}: expected an object with image_id and caption, "
                                      f"got {type(entry).__name__}")
            image_id, file_name = _image_id(entry.get("image_id"), where, records.source), \
                _file_name(entry, where, records.source)
            if image_id is None and file_name is None:
                raise AnnotationError(f"{records.source}: {where}: missing 'image_id' (or a file name: "
                                      f"{', '.join(FILE_KEYS)})")
            if "caption" not in entry:
                raise AnnotationError(f"{records.source}: {where}: missing 'caption'")
            records.add(where, image_id, file_name, entry["caption"], entry.get("id"))


def _read_coco(data: dict, records: _Records) -> None:
    images = {}
    for i, entry in enumerate(data["images"]):
        with records.entry():
            where = f"images[{i}]"
            image_id = _image_id(entry.get("id") if isinstance(entry, dict) else None, where, records.source)
            if image_id is None:
                raise AnnotationError(f"{records.source}: {where}: missing 'id'; expected a COCO image entry")
            if image_id in images:
                raise AnnotationError(f"{records.source}: {where}: image id {image_id!r} appears twice")
            images[image_id] = records.image(where, image_id, _file_name(entry, where, records.source))
    for i, entry in enumerate(data.get("annotations", [])):
        with records.entry():
            where = f"annotations[{i}]"
            image_id = _image_id(entry.get("image_id") if isinstance(entry, dict) else None, where, records.source)
            if image_id is None:
                raise AnnotationError(f"{records.source}: {where}: missing 'image_id'")
            if image_id not in images:
                raise AnnotationError(f"{records.source}: {where}: image_id {image_id!r} is not in images[]")
            records.add(where, image_id, images[image_id].file_name, entry.get("caption"), entry.get("id"))


def parse_split(split: str) -> List[str]:
    """'train+restval' -> ['train', 'restval'], checking each name."""
    parts = [s.strip() for s in str(split).split("+")]
    unknown = [s for s in parts if s not in KARPATHY_SPLITS]
    if unknown:
        raise AnnotationError(f"unknown split {unknown[0]!r} in {split!r}; expected one of {KARPATHY_SPLITS} "
                              f"or several joined by '+', e.g. 'train+restval'")
    return parts


def _read_karpathy(data: dict, records: _Records, split: Optional[str]) -> None:
    try:
        wanted = set(parse_split(split)) if split is not None else None
    except AnnotationError as e:
        raise AnnotationError(f"{records.source}: {e}") from None
    for i, entry in enumerate(data["images"]):
        with records.entry():
            _karpathy_image(records, f"images[{i}]", entry, wanted)


def _karpathy_image(records: _Records, where: str, entry, wanted: Optional[set]) -> None:
    if not isinstance(entry, dict) or "filename" not in entry or "sentences" not in entry:
        raise AnnotationError(f"{records.source}: {where}: expected a Karpathy image entry with 'filename' "
                              f"and 'sentences'")
    if entry.get("split") not in KARPATHY_SPLITS:
        raise AnnotationError(f"{records.source}: {where}: split is {entry.get('split')!r}; expected one "
                              f"of {KARPATHY_SPLITS}")
    if wanted is not None and entry["split"] not in wanted:
        return
    file_name = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
    image_id = _image_id(entry.get("cocoid"), where, records.source)
    records.image(where, image_id, file_name)
    for j, sentence in enumerate(entry["sentences"]):
        with records.entry():
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            records.add(f"{where}.sentences[{j}]", image_id, file_name, raw,
                        sentence.get("sentid") if isinstance(sentence, dict) else None)


def read_utf8(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 (a byte-order mark is fine) is an error naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise AnnotationError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start}); save the file "
                              f"as UTF-8") from None


def _csv_header(path: Path, records: _Records, line: int, row: List[str]):
    """(file, image_id, caption) column indices when `row` is a header, None when it is data: a first row is a
    header when none of its fields names an existing image file. A header's columns must all be known names."""
    if any(field.strip() and (records.root / field.strip()).is_file() for field in row):
        return None
    header = [c.strip().lower() for c in row]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    caption_col = next((header.index(k) for k in CSV_CAPTION_COLUMNS if k in header), None)
    file_col = next((header.index(k) for k in FILE_KEYS if k in header), None)
    id_col = header.index("image_id") if "image_id" in header else None
    if unknown or caption_col is None or (file_col is None and id_col is None):
        problem = (f"unknown column name(s) {unknown}" if unknown else "no caption column" if caption_col is None
                   else "no file name column")
        raise AnnotationError(f"{path}: line {line}: {row} is read as a header, since none of its fields names an "
                              f"image file under {records.root}, and it has {problem}; header columns are a file "
                              f"name ({', '.join(FILE_KEYS)}) or image_id, and a caption "
                              f"({', '.join(CSV_CAPTION_COLUMNS)})")
    return file_col, id_col, caption_col


def _read_csv(path: Path, records: _Records) -> None:
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""))
    rows = [(reader.line_num, [from_csv_cell(cell) for cell in row]) for row in reader if row]
    if not rows:
        raise AnnotationError(f"{path}: empty CSV file; expected rows of file name, caption")
    columns = _csv_header(path, records, *rows[0])
    if columns is not None:
        file_col, id_col, caption_col = columns
        rows = rows[1:]
    else:
        file_col, id_col, caption_col = 0, None, 1
    for line, row in rows:
        with records.entry():
            where = f"line {line}"
            if len(row) <= max(c for c in (file_col, id_col, caption_col) if c is not None):
                raise AnnotationError(f"{path}: {where}: {len(row)} column(s); expected file name, caption")
            file_name = row[file_col].strip() if file_col is not None and row[file_col].strip() else None
            image_id = _image_id(row[id_col] if id_col is not None and row[id_col].strip() else None, where, path)
            if file_name is None and image_id is None:
                raise AnnotationError(f"{path}: {where}: empty file name; expected the image's file name")
            records.add(where, image_id, file_name, row[caption_col])


def _load_json(path: Path):
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def _detect_format(path: Path, data) -> str:
    if isinstance(data, list):
        return "list"
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = data["images"][0] if data["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy"
        return "coco"
    raise AnnotationError(f"{path}: unrecognised annotation file; expected a JSON list of caption entries, a COCO "
                          f"captions file (images, annotations) or Karpathy's dataset_coco.json (images[].sentences)")


def read_annotations(path, split: Optional[str] = None, images_root="./data/coco", fmt: str = "auto",
                     errors: Optional[list] = None) -> List[ImageRecord]:
    """Read an annotation file into one `ImageRecord` per image, in order of first appearance.

    `split` selects Karpathy splits ("train", "val", "test", "restval", "train+restval"); it is an error for
    the other formats, which have no splits. Relative file names are resolved against `images_root`.
    A bad entry (no image_id, an empty caption, ...) raises `AnnotationError`; when `errors` is a list, the
    entry is skipped instead and its error appended. Problems with the file as a whole always raise.
    """
    if fmt not in ANNOTATION_FORMATS:
        raise AnnotationError(f"unknown annotation format {fmt!r}; expected one of {ANNOTATION_FORMATS}")
    if fmt == "webdataset" or (fmt == "auto" and shards.looks_like_shards(str(path))):
        if split is not None:
            raise AnnotationError(f"{path}: split={split!r} given, but webdataset shards have no splits; name the "
                                  f"split's shards instead")
        return shards.read_shards(str(path), errors)
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: " + ("is a directory; expected an annotation file" if path.is_dir()
                                             else "no such annotation file"))
    if fmt == "auto" and path.suffix.lower() == ".csv":
        fmt = "csv"
    records = _Records(path, images_root, errors)
    data = None if fmt == "csv" else _load_json(path)
    if fmt == "auto":
        fmt = _detect_format(path, data)
    if split is not None and fmt != "karpathy":
        raise AnnotationError(f"{path}: split={split!r} given, but this {fmt!r} file has no splits; splits "
                              f"apply to Karpathy's dataset_coco.json")
    if fmt == "csv":
        _read_csv(path, records)
        return list(records.by_key.values())
    expected = list if fmt == "list" else dict
    if not isinstance(data, expected) or (expected is dict and not isinstance(data.get("images"), list)):
        raise AnnotationError(f"{path}: does not look like a {fmt!r} annotation file")
    if fmt == "karpathy":
        _read_karpathy(data, records, split)
    elif fmt == "coco":
        _read_coco(data, records)
    else:
        _read_list(data, records)
    return list(records.by_key.values())
