"""The features pickle: its schema, checked on every read and write; the one reader and the one writer, and
the readers of its metadata (captioning/featurize.py writes it: the encoder, and which image each row holds).

The features pickle is the original ClipCap schema, readable by the original training code:
`{"clip_embedding": Tensor (N, D) or (N, T, D), "captions": [{"image_id", "caption", "id"?, "clip_embedding":
row}], "metadata": {...}}`, one row per distinct image. `read_features` never runs pickled code, and reads the
original's one-row-per-caption pickles as one row per image.
"""
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

from models.checkpoint_io import CheckpointError, atomic_write
from models.encoder import EncoderConfig

FEATURES_KEYS = ("clip_embedding", "captions", "metadata")


class FeaturesError(ValueError):
    """A features pickle that is missing, unsafe to load, or does not follow the schema."""


def _load_storage_from_bytes(b: bytes):
    # Plain `pickle.dump` of a tensor stores its storage as `torch.save` bytes, rebuilt by
    # `torch.storage._load_from_bytes`, which calls `torch.load` without weights_only; this is the same with it.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *args):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)) or backward_hooks or \
            any(a for a in args):
        raise pickle.UnpicklingError("a tensor with hooks or metadata, or built from something other than a storage")
    from torch._utils import _rebuild_tensor_v2
    return _rebuild_tensor_v2(storage, storage_offset, size, stride, False, None)


class _SchemaUnpickler(pickle.Unpickler):
    """Unpickles only what the features schema holds: dicts, lists, strings, numbers and plain CPU tensors."""

    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
               ("collections", "OrderedDict"): dict}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the features schema holds only "
                                         f"tensors, lists, dicts, strings and numbers")
        return self.ALLOWED[(module, name)]


def _non_finite_rows(features: torch.Tensor) -> List[int]:
    bad = []
    for start in range(0, features.shape[0], 65536):  # in chunks: no second copy of a COCO-sized tensor
        chunk = features[start:start + 65536]
        finite = torch.isfinite(chunk).reshape(chunk.shape[0], -1).all(dim=1)
        bad += (torch.nonzero(~finite).flatten() + start).tolist()
    return bad


def validate_features(data, source="features", check_finite: bool = True) -> Dict:
    """Check the schema (and, with `check_finite`, that every feature is a finite number); returns `data` with an
    empty metadata dict added where the file had none."""
    if not isinstance(data, dict):
        raise FeaturesError(f"{source}: expected a dict with {FEATURES_KEYS[:2]}, got {type(data).__name__}")
    missing = [k for k in FEATURES_KEYS[:2] if k not in data]
    unknown = [k for k in data if k not in FEATURES_KEYS]
    if missing or unknown:
        raise FeaturesError(f"{source}: " + (f"missing key(s) {missing}" if missing else f"unknown key(s) {unknown}")
                            + f"; expected {FEATURES_KEYS}")
    features, captions = data["clip_embedding"], data["captions"]
    if not isinstance(features, torch.Tensor) or features.ndim not in (2, 3) or not features.is_floating_point():
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise FeaturesError(f"{source}: 'clip_embedding' is {shape}; expected a float tensor (N, D) or (N, T, D)")
    if features.shape[0] == 0 or features.shape[-1] == 0:
        raise FeaturesError(f"{source}: 'clip_embedding' has shape {tuple(features.shape)}; expected N, D > 0")
    bad_rows = _non_finite_rows(features) if check_finite else []
    if bad_rows:
        raise FeaturesError(f"{source}: 'clip_embedding' row(s) {bad_rows[:5]}{' ...' if len(bad_rows) > 5 else ''} "
                            f"({len(bad_rows)} in all) hold nan or inf values; extract those images again")
    if not isinstance(captions, list) or not captions:
        raise FeaturesError(f"{source}: 'captions' is empty or not a list; expected a list of caption dicts")
    rows = features.shape[0]
    for i, c in enumerate(captions):
        if not isinstance(c, dict) or not isinstance(c.get("caption"), str) or "image_id" not in c:
            raise FeaturesError(f"{source}: captions[{i}]: expected a dict with 'image_id', 'caption' (str) and "
                                f"'clip_embedding' (row index)")
        row = c.get("clip_embedding")
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < rows:
            raise FeaturesError(f"{source}: captions[{i}]: 'clip_embedding' is {row!r}; expected a row index "
                                f"in [0, {rows})")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FeaturesError(f"{source}: 'metadata' is {type(metadata).__name__}; expected a dict")
    return {"clip_embedding": features, "captions": captions, "metadata": metadata}


def read_features(path) -> Dict:
    """Load a features pickle without running pickled code: `{"clip_embedding", "captions", "metadata"}`.

    Reads this project's files, the original ClipCap pickles (plain `pickle.dump` of CPU tensors) and
    `torch.save` files of the same schema.
    """
    path = Path(path)
    if not path.is_file():
        raise FeaturesError(f"{path}: no such features file")
    try:
        if zipfile.is_zipfile(path):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                data = _SchemaUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise FeaturesError(f"{path}: unsafe or corrupt features file: {e}") from e
    except (EOFError, OSError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise FeaturesError(f"{path}: not a readable features pickle (corrupt or truncated?): "
                            f"{e.__class__.__name__}: {e}") from e
    return one_row_per_image(validate_features(data, path), path)


# Rows holding the same image must agree to this fraction of the row's largest magnitude: the original script
# encoded the same file once per caption, which gives equal rows (up to GPU rounding); rows that differ more
# mean that two different images share an image_id.
SAME_IMAGE_TOLERANCE = 1e-2


def one_row_per_image(data: Dict, source="features") -> Dict:
    """`data` with one feature row per distinct `image_id`, every caption pointing at its image's row.

    The original parse_coco.py wrote one row per caption (the same image encoded five times); an image is its
    `image_id`, so such rows are merged here, once, for everything that reads features: the training split holds
    out images rather than captions, evaluation sees all of an image's captions, and predictions are one per
    image. Rows that share an image_id but hold different features are an error naming both captions.
    """
    captions, features = data["captions"], data["clip_embedding"]
    first_row: Dict = {}  # image_id -> the row of its first caption
    for i, c in enumerate(captions):
        try:
            first_row.setdefault(c["image_id"], c["clip_embedding"])
        except TypeError as e:
            raise FeaturesError(f"{source}: captions[{i}]['image_id'] is {c['image_id']!r}; expected a number or "
                                f"a string") from e
    rows = torch.tensor([c["clip_embedding"] for c in captions])
    firsts = torch.tensor([first_row[c["image_id"]] for c in captions])
    if torch.equal(rows, firsts) and len(set(first_row.values())) == len(first_row):
        return data  # already one row per image
    # Otherwise rows repeat an image, or one row serves several image_ids (each then gets its own copy).
    repeated = torch.nonzero(rows != firsts).flatten()
    for start in range(0, len(repeated), 65536):  # in chunks: a COCO pickle repeats about 470k rows
        chunk = repeated[start:start + 65536]
        a, b = features[rows[chunk]].float(), features[firsts[chunk]].float()
        dims = tuple(range(1, a.ndim))
        bad = (a - b).abs().amax(dim=dims) > SAME_IMAGE_TOLERANCE * b.abs().amax(dim=dims).clamp_min(1e-12)
        if bad.any():
            i = int(chunk[bad.nonzero()[0, 0]])
            j = next(k for k, c in enumerate(captions) if c["image_id"] == captions[i]["image_id"])
            raise FeaturesError(
                f"{source}: captions[{j}] and captions[{i}] have the same image_id {captions[i]['image_id']!r} but "
                f"their 'clip_embedding' rows ({int(firsts[i])} and {int(rows[i])}) hold different features; "
                f"an image_id must name one image")
    images = list(first_row)
    new_row = {image_id: n for n, image_id in enumerate(images)}
    merged = [{**c, "clip_embedding": new_row[c["image_id"]]} for c in captions]
    if len(repeated):
        print(f"note: {source} repeats images: {features.shape[0]:,} feature rows for {len(images):,} "
              f"images (one row per caption, as the original parse_coco.py wrote them); they are read as one row "
              f"per image. parse_coco.py stores each image once (one row per image_id).", file=sys.stderr)
    kept = torch.tensor([first_row[image_id] for image_id in images])
    return {**data, "clip_embedding": features[kept], "captions": merged}


def write_features(path, features: torch.Tensor, captions: List[Dict], metadata: Optional[Dict] = None) -> None:
    """Write the features pickle atomically (temp file + rename), after checking it against the schema."""
    # A clone: pickling a view would store its whole base storage.
    features = features.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    # Written even with non-finite rows, which reading names: the hours of extraction are not thrown away.
    data = validate_features({"clip_embedding": features, "captions": captions, "metadata": metadata or {}}, path,
                             check_finite=False)
    try:
        json.dumps(data["metadata"])
    except TypeError as e:
        raise FeaturesError(f"{path}: metadata must be plain JSON-like data (the reader accepts nothing else): "
                            f"{e}") from e
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=4)


# ---- the metadata ------------------------------------------------------------------------------------------

def metadata_encoder(metadata: Dict, features: torch.Tensor, source) -> Optional[Dict]:
    """The pickle's `metadata["encoder"]` (an EncoderConfig dict), checked against the features it made."""
    raw = metadata.get("encoder")
    if raw is None:
        return None
    try:
        config = EncoderConfig.from_dict(raw)
    except (CheckpointError, TypeError, ValueError) as e:
        raise FeaturesError(f"{source}: metadata['encoder'] is not an encoder config: {e}") from e
    kind = "grid" if features.ndim == 3 else "pooled"
    if config.feature_type != kind:
        raise FeaturesError(f"{source}: metadata says feature_type {config.feature_type!r} but 'clip_embedding' has "
                         f"shape {tuple(features.shape)} ({kind} features)")
    return config.to_dict()


def same_encoder(a: Optional[Dict], b: Optional[Dict]) -> bool:
    """Whether two metadata encoder configs describe one encoder; the resolved timm tag and the weights'
    fingerprint are compared only when both record them (files written before they were recorded lack them)."""
    if a and b:
        later = [k for k in ("resolved_name", "weights_sha256") if a.get(k) is None or b.get(k) is None]
        a, b = ({k: v for k, v in d.items() if k not in later} for d in (a, b))
    return a == b


def metadata_file_names(metadata: Dict, num_rows: int) -> Optional[List[str]]:
    """The file name of each row's image, where the metadata records one per row (parse_coco.py's does)."""
    names = metadata.get("file_names")
    return [str(n) for n in names] if isinstance(names, list) and len(names) == num_rows else None
