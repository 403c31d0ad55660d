"""Batched, resumable image feature extraction: the engine behind parse_coco.py.

Images are decoded and preprocessed in DataLoader workers and encoded in fixed batches: batch k always holds
images [k * B, (k + 1) * B) of the annotation order, whichever process runs it, so a resumed run computes exactly
what one uninterrupted run computes (bit for bit on the same machine and thread count). Each finished batch is
appended as one checksummed, fsynced record to a log file in the partial directory (`<out>.partial/`), so an
interruption (Ctrl-C, kill -9, power loss) loses at most the batch in flight; a torn last record is recognised by
its length and CRC and ignored.
"""
import functools
import json
import os
import shutil
import struct
import sys
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import MaybeToTensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize, ToTensor
from tqdm import tqdm

from captioning.choices import FEATURE_DTYPES
from captioning.data.annotations import ImageRecord
from captioning.data.images import ImageError, load_image
from captioning.runtime import FP32, Precision
from models.checkpoint_io import atomic_write

MANIFEST = "manifest.json"
LOG_SUFFIX = ".log"
RECORD = struct.Struct("<4sIQI")  # magic, header length, data length, CRC32 of header + data
MAGIC = b"TTF1"
STORAGE_DTYPES = {name: getattr(torch, name) for name in FEATURE_DTYPES}


class ExtractionError(RuntimeError):
    """A run that cannot go on: a failing image under --on_error fail, or a partial directory that does not fit."""


@dataclass
class Failure:
    index: int  # position in the annotation's image order
    path: str
    kind: str  # an ImageError's kind: missing, not_regular, unreadable, truncated, too_large, empty
    reason: str


class ToUint8Tensor:
    """PIL RGB image -> (3, H, W) uint8 tensor."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def split_transform(transform):
    """(worker transform, normalisation or None) for an encoder's preprocessing transform.

    timm's eval transforms end with ToTensor + Normalize. Workers then stop at the resized, cropped image as uint8
    and the batch is scaled and normalised on the device with the same operations: four times less data between
    processes and to the GPU, and less CPU work in the workers, which are what limits speed on a GPU.
    Other transforms run whole in the workers.
    """
    steps = list(getattr(transform, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-2], (MaybeToTensor, ToTensor)) and isinstance(steps[-1], Normalize):
        return Compose(steps[:-2] + [ToUint8Tensor()]), (tuple(steps[-1].mean), tuple(steps[-1].std))
    return transform, None


def normalize_batch(images: torch.Tensor, normalization) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float, as ToTensor + Normalize compute it per image."""
    if normalization is None:
        return images
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
                 for v in normalization)
    return images.float().div_(255).sub_(mean).div_(std)


class ImageDataset(Dataset):
    """Records -> (index, preprocessed (3, H, W) tensor or None, (kind, reason) or None).

    Without loader workers, a batch is decoded in the model's pauses, on `decode_threads` threads (PIL releases
    the GIL while decoding and resizing), so that no core idles while one decodes.
    """

    def __init__(self, records: Sequence[ImageRecord], transform, max_pixels: Optional[int] = None,
                 decode_threads: int = 1):
        self.records, self.transform, self.max_pixels = records, transform, max_pixels
        self.decode_threads = decode_threads

    def __len__(self) -> int:
        return len(self.records)

    def __getitems__(self, indices: List[int]) -> list:  # DataLoader's batched fetch
        if self.decode_threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        with ThreadPoolExecutor(min(self.decode_threads, len(indices))) as pool:
            return list(pool.map(self.__getitem__, indices))

    def __getitem__(self, index: int):
        try:
            image = load_image(self.records[index].path, self.max_pixels)
        except ImageError as e:
            return index, None, (e.kind, e.reason)
        return index, self.transform(image), None


def collate(items) -> Tuple[List[int], Optional[torch.Tensor], List[Tuple[int, str, str]]]:
    indices = [index for index, tensor, _ in items if tensor is not None]
    tensors = [tensor for _, tensor, _ in items if tensor is not None]
    errors = [(index, *error) for index, _, error in items if error is not None]
    return indices, (torch.stack(tensors) if tensors else None), errors


def set_pil_pixel_limit(max_pixels: Optional[int], worker_id: int = 0) -> None:
    """Raise PIL's own bomb limit (it refuses at twice its limit) where ours is higher; run in every worker.

    A lower limit needs nothing here: `load_image` refuses those images itself, with a clearer message.
    """
    if max_pixels and Image.MAX_IMAGE_PIXELS and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


# ------------------------------------------------------------------------------------------------- partial results

def prepare_partial(directory: Path, manifest: Dict, fresh: bool) -> bool:
    """Create or reuse the partial directory (main process only); returns whether earlier results are reused."""
    path = directory / MANIFEST
    if fresh and directory.exists():
        shutil.rmtree(directory)
    if path.is_file():
        check_manifest(directory, manifest)
        return True
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return False


def check_manifest(directory: Path, manifest: Dict) -> None:
    path = directory / MANIFEST
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExtractionError(f"{path}: unreadable ({e}); delete {directory} or pass --fresh") from e
    if saved != json.loads(json.dumps(manifest)):
        changed = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
        raise ExtractionError(f"{directory} holds partial results of a run with other inputs or settings "
                              f"(differing: {', '.join(changed)}); rerun that command to finish it, or pass "
                              f"--fresh to discard them")


class LogWriter:
    """Appends finished batches to this process's own log file, each record fsynced before the next batch."""

    def __init__(self, directory: Path, rank: int):
        self.path = directory / f"part-rank{rank}-{uuid.uuid4().hex[:8]}{LOG_SUFFIX}"
        self.file = None

    def append(self, indices: List[int], features: torch.Tensor) -> None:
        if self.file is None:
            self.file = open(self.path, "ab")
        header = json.dumps({"indices": indices, "shape": list(features.shape),
                             "dtype": str(features.dtype).replace("torch.", "")}).encode()
        data = features.contiguous().numpy().tobytes()
        self.file.write(RECORD.pack(MAGIC, len(header), len(data), zlib.crc32(data, zlib.crc32(header))))
        self.file.write(header + data)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


_reported = set()


def _report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        print(message, file=sys.stderr)


def read_log(path: Path, load_data: bool = True):
    """Yield (indices, features or None) for each intact record; stops at a torn or corrupt one, saying so."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            start = f.tell()
            raw = f.read(RECORD.size)
            magic, header_len, data_len, crc = RECORD.unpack(raw) if len(raw) == RECORD.size else (b"", 0, 0, 0)
            if magic != MAGIC or start + RECORD.size + header_len + data_len > size:
                _report_once(f"{path}: incomplete record at byte {start} (an interrupted write); it will be "
                             f"recomputed")
                return
            header_bytes, data = f.read(header_len), f.read(data_len)
            if zlib.crc32(data, zlib.crc32(header_bytes)) != crc:
                _report_once(f"{path}: record at byte {start} fails its checksum; it and the rest of this file "
                             f"will be recomputed")
                return
            header = json.loads(header_bytes)
            features = None
            if load_data:
                features = torch.frombuffer(bytearray(data), dtype=STORAGE_DTYPES[header["dtype"]])
                features = features.reshape(header["shape"])
            yield header["indices"], features


def log_files(directory: Path) -> List[Path]:
    return sorted(directory.glob(f"*{LOG_SUFFIX}")) if directory.is_dir() else []


def done_indices(directory: Path) -> set:
    """Images whose features are already in the partial directory."""
    return {i for path in log_files(directory) for indices, _ in read_log(path, load_data=False) for i in indices}


def assemble(directory: Path, indices: Sequence[int]) -> torch.Tensor:
    """Features of `indices`, in that order, from the partial directory's logs (the first copy of each wins)."""
    row_of = {index: row for row, index in enumerate(indices)}
    features = filled = None
    for path in log_files(directory):
        for batch_indices, batch in read_log(path):
            if features is None:
                features = torch.empty(len(indices), *batch.shape[1:], dtype=batch.dtype)
                filled = torch.zeros(len(indices), dtype=torch.bool)
            if batch.shape[1:] != features.shape[1:] or batch.dtype != features.dtype:
                raise ExtractionError(f"{path}: features of shape {tuple(batch.shape[1:])} ({batch.dtype}) among "
                                      f"features of shape {tuple(features.shape[1:])} ({features.dtype})")
            rows = torch.tensor([row_of.get(index, -1) for index in batch_indices])
            keep = rows >= 0
            keep[keep.clone()] = ~filled[rows[keep]]
            features[rows[keep]], filled[rows[keep]] = batch[keep], True
    missing = len(indices) if filled is None else int((~filled).sum())
    if missing:
        raise ExtractionError(f"{directory}: features of {missing} image(s) are missing; rerun to compute them")
    return features


# -------------------------------------------------------------------------------------------------------- encoding

def plan_batches(num_images: int, batch_size: int, done: set, rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """This process's share of the fixed batches, without the images already done."""
    batches = [[i for i in range(start, min(start + batch_size, num_images)) if i not in done]
               for start in range(0, num_images, batch_size)]
    return [b for b in batches if b][rank::world_size]


def extract(records: Sequence[ImageRecord], encoder, directory: Path, batches: List[List[int]], *,
            device: torch.device, precision: Precision = FP32, dtype: str = "float32",
            num_workers: int = 0, decode_threads: int = 1,
            channels_last: bool = False, on_error: str = "skip", max_pixels: Optional[int] = None,
            rank: int = 0, show_progress: bool = True) -> List[Failure]:
    """Encode `batches` (lists of indices into `records`), appending finished batches to this process's log.

    `precision` is the encoder's autocast. Images are decoded by `num_workers` loader processes beside the
    encoder or, without workers, between batches on `decode_threads` threads. Returns the images that could not
    be read; with `on_error="fail"` the first one raises instead.
    """
    set_pil_pixel_limit(max_pixels)
    transform, normalization = split_transform(encoder.transform)
    dataset = ImageDataset(records, transform, max_pixels, decode_threads=1 if num_workers else decode_threads)
    loader = DataLoader(dataset, batch_sampler=batches,
                        num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        worker_init_fn=functools.partial(set_pil_pixel_limit, max_pixels))
    writer, failures = LogWriter(directory, rank), []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", desc=f"encoding (rank {rank})" if rank else "encoding",
               disable=not show_progress, dynamic_ncols=True)
    try:
        with torch.inference_mode(), precision.autocast(device):
            for indices, images, errors in loader:
                for index, kind, reason in errors:
                    failure = Failure(index, str(records[index].path), kind, reason)
                    if on_error == "fail":
                        raise ExtractionError(f"{failure.path}: {reason} (image_id {records[index].image_id}); "
                                              f"pass --on_error skip to leave such images out")
                    failures.append(failure)
                    tqdm.write(f"skipping {failure.path}: {reason}", file=sys.stderr)
                if images is not None:
                    images = normalize_batch(images.to(device, non_blocking=True), normalization)
                    images = images.contiguous(memory_format=memory_format)
                    features = encoder(images).float()
                    if not torch.isfinite(features).all():
                        raise ExtractionError(f"non-finite features for {records[indices[0]].path} and the rest of "
                                              f"its batch; try --precision fp32")
                    writer.append(indices, features.to(STORAGE_DTYPES[dtype]).cpu())
                bar.update(len(indices) + len(errors))
    finally:
        bar.close()
        writer.close()
    return failures
