"""The features store: the features pickle's content in a directory of memory-mapped files, which every process
of a node shares through the page cache instead of holding its own copy (`parse_coco.py --out_format mmap`).

```
store.json            format, counts, shape and dtype, a digest of the captions, the pickle's metadata (without
                      its per-row lists), each file's size; written last, so a store without it is unfinished
features.npy          (N, D) or (N, T, D) float16/float32, one row per image, read with numpy's mmap (no copy)
caption_rows.npy      (C,) int64: the feature row of each caption
captions.bin, captions.idx.npy      the captions' UTF-8 text and (C + 1) int64 byte offsets: a text column
image_ids.bin, image_ids.idx.npy    each row's image id, as JSON (`391895` or `"k0"`)
caption_ids.bin, caption_ids.idx.npy        each caption's id in its source, as JSON (`null` where none)
file_names.bin, file_names.idx.npy          each row's image file, where the metadata recorded them
```

numpy's `.npy` rather than Arrow or safetensors: it maps the tensor with no dependency and no copy, and a text
column of bytes plus offsets is all the captions need; a process reads a caption's text only when it tokenizes it
(once, then the token cache serves), so no process holds every caption's text.
"""
import hashlib
import json
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from captioning.data.features import FeaturesError, validate_features
from models.checkpoint_io import atomic_directory

STORE_FILE = "store.json"
STORE_FORMAT = "tinytiny-features-store"
STORE_VERSION = 1
HEADER_KEYS = ("num_rows", "num_captions", "shape", "dtype", "captions_sha256", "files")
ROW_LISTS = ("image_ids", "file_names")  # metadata lists of one entry per row: columns of their own
NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


def is_store(path) -> bool:
    """Whether `path` is a features store (a directory holding store.json) rather than a pickle."""
    return (Path(path) / STORE_FILE).is_file()


# ---- text columns ----------------------------------------------------------------------------------------

def write_text_column(directory: Path, name: str, texts: Iterable[str]) -> None:
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    (directory / f"{name}.bin").write_bytes(b"".join(encoded))
    np.save(directory / f"{name}.idx.npy", offsets)


class TextColumn(Sequence[str]):
    """A column of texts read from its memory-mapped bytes on access: `column[i]`, slices, len, iteration."""

    def __init__(self, directory: Path, name: str, count: int):
        self.path = directory / f"{name}.bin"
        self.offsets = _load(directory / f"{name}.idx.npy", (count + 1,), np.int64)
        self.data = _map_bytes(self.path)
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0) or self.offsets[-1] != len(self.data):
            raise FeaturesError(f"{self.path}: its offsets ({name}.idx.npy) do not fit its {len(self.data):,} "
                                f"bytes; the store is inconsistent")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + len(self) if int(i) < 0 else int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: index out of range")
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return bytes(self.data[start:end]).decode("utf-8")


def _map_bytes(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FeaturesError(f"{path}: missing; the store is incomplete")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _load(path: Path, shape, dtype) -> np.ndarray:
    """A memory-mapped .npy of the expected shape and dtype, or an error naming the file."""
    if not path.is_file():
        raise FeaturesError(f"{path}: missing; the store is incomplete")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FeaturesError(f"{path}: not a readable .npy file (truncated?): {e}") from e
    if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise FeaturesError(f"{path}: holds {array.dtype} {tuple(array.shape)}, but store.json says "
                            f"{np.dtype(dtype)} {tuple(shape)}; the store is inconsistent")
    return array


def captions_digest(captions: Iterable[str]) -> str:
    """The digest `captioning.training.datasets.captions_fingerprint` gives the same captions."""
    digest, first = hashlib.sha256(), True
    for caption in captions:
        digest.update(caption.encode() if first else b"\0" + caption.encode())
        first = False
    return digest.hexdigest()


# ---- write and read ----------------------------------------------------------------------------------------

def write_store(path, features: torch.Tensor, captions: List[Dict], metadata: Optional[Dict] = None) -> None:
    """Write the store atomically (a temporary directory, then a rename), after checking it against the
    features schema."""
    features = features.detach().to("cpu").contiguous()
    data = validate_features({"clip_embedding": features, "captions": captions, "metadata": metadata or {}}, path,
                             check_finite=False)
    if features.dtype not in NUMPY_DTYPES:
        raise FeaturesError(f"{path}: features of dtype {features.dtype}; a store holds float16 or float32")
    empty = next((i for i, c in enumerate(captions) if not c["caption"].strip()), None)
    if empty is not None:
        raise FeaturesError(f"{path}: captions[{empty}]['caption'] is empty; every caption needs text to train on")
    metadata = dict(data["metadata"])
    rows = features.shape[0]
    row_ids: List = [None] * rows
    for c in captions:
        row_ids[c["clip_embedding"]] = c["image_id"]
    if any(i is None for i in row_ids):
        raise FeaturesError(f"{path}: feature row {row_ids.index(None)} has no caption; a store row is an image "
                            f"with captions")
    with atomic_directory(path) as tmp:
        np.save(tmp / "features.npy", features.numpy())
        np.save(tmp / "caption_rows.npy", np.array([c["clip_embedding"] for c in captions], dtype=np.int64))
        write_text_column(tmp, "captions", (c["caption"] for c in captions))
        write_text_column(tmp, "image_ids", (json.dumps(i) for i in row_ids))
        write_text_column(tmp, "caption_ids", (json.dumps(c.get("id")) for c in captions))
        row_lists = [k for k in ROW_LISTS if isinstance(metadata.get(k), list) and len(metadata[k]) == rows]
        names = metadata.pop("file_names") if "file_names" in row_lists else None
        if "image_ids" in row_lists:
            metadata.pop("image_ids")  # the image_ids column holds them
        if names is not None:
            write_text_column(tmp, "file_names", map(str, names))
        header = {"format": STORE_FORMAT, "format_version": STORE_VERSION, "num_rows": rows,
                  "num_captions": len(captions), "shape": list(features.shape),
                  "dtype": str(features.dtype).replace("torch.", ""), "row_lists": row_lists,
                  "captions_sha256": captions_digest(c["caption"].strip() for c in captions), "metadata": metadata,
                  "files": {}}
        header["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / STORE_FILE).write_text(json.dumps(header, indent=1))


class FeaturesStore:
    """An opened store: `features` (a tensor over the mapped file), `caption_rows`, the text columns, `metadata`
    (with its per-row lists rebuilt on demand by `as_features_dict`)."""

    def __init__(self, path):
        self.path = Path(path)
        header_path = self.path / STORE_FILE
        if not header_path.is_file():
            raise FeaturesError(f"{self.path}: {STORE_FILE} is missing: not a features store, or one whose writing "
                                f"did not finish")
        try:
            self.header = json.loads(header_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FeaturesError(f"{header_path}: not valid JSON: {e}") from e
        h = self.header
        if not isinstance(h, dict) or h.get("format") != STORE_FORMAT or h.get("format_version") != STORE_VERSION:
            found = (h.get("format"), h.get("format_version")) if isinstance(h, dict) else type(h).__name__
            raise FeaturesError(f"{header_path}: format {found}; this code reads {STORE_FORMAT!r} version "
                                f"{STORE_VERSION}")
        missing = [k for k in HEADER_KEYS if k not in h]
        if missing:
            raise FeaturesError(f"{header_path}: missing key(s) {missing}; expected {list(HEADER_KEYS)}")
        for name, size in h["files"].items():
            file = self.path / name
            if not file.is_file() or file.stat().st_size != size:
                actual = file.stat().st_size if file.is_file() else "missing"
                raise FeaturesError(f"{file}: {actual if actual == 'missing' else f'{actual:,} bytes'}, but "
                                    f"{STORE_FILE} records {size:,} bytes; the store is truncated or changed")
        rows, count = h["num_rows"], h["num_captions"]
        self.num_rows, self.num_captions, self.metadata = rows, count, dict(h.get("metadata", {}))
        self.feature_array = _load(self.path / "features.npy", h["shape"], h["dtype"])
        with warnings.catch_warnings():  # read-only by design: nothing writes into a store
            warnings.simplefilter("ignore", UserWarning)
            self.features = torch.from_numpy(self.feature_array)  # a view of the mapping, not a copy
        self.caption_rows = _load(self.path / "caption_rows.npy", (count,), np.int64)
        if count and (int(self.caption_rows.min()) < 0 or int(self.caption_rows.max()) >= rows):
            raise FeaturesError(f"{self.path / 'caption_rows.npy'}: a caption's row lies outside the {rows:,} "
                                f"feature rows; the store is inconsistent")
        self.captions = TextColumn(self.path, "captions", count)
        self.caption_ids = TextColumn(self.path, "caption_ids", count)
        self.image_ids = TextColumn(self.path, "image_ids", rows)
        self.row_lists = h.get("row_lists", [])
        self.file_names = TextColumn(self.path, "file_names", rows) if "file_names" in self.row_lists else None

    @property
    def captions_sha256(self) -> str:
        return self.header["captions_sha256"]

    def as_features_dict(self) -> Dict:
        """The pickle's dict (`read_features`' result): caption dicts, features, metadata with its row lists."""
        image_ids = [json.loads(i) for i in self.image_ids]
        captions = []
        for caption, row, caption_id in zip(self.captions, self.caption_rows.tolist(), self.caption_ids):
            entry = {"image_id": image_ids[row]}
            caption_id = json.loads(caption_id)
            if caption_id is not None:
                entry["id"] = caption_id
            entry.update(caption=caption, clip_embedding=row)
            captions.append(entry)
        metadata = dict(self.metadata)
        if "image_ids" in self.row_lists:
            metadata["image_ids"] = image_ids
        if self.file_names is not None:
            metadata["file_names"] = list(self.file_names)
        return {"clip_embedding": self.features, "captions": captions, "metadata": metadata}


def read_store(path) -> Dict:
    """The store as `read_features` returns a pickle (for predict.py and the converter)."""
    return FeaturesStore(path).as_features_dict()
