"""Training data: caption tokens (cached on disk), torch Datasets, dynamic padding, a resumable sampler.

Memory matters at COCO scale (about 590k captions, 120k images): the tokens of every caption live in one flat
int32 array with an offsets array, never as 590k small tensors or lists, so a dataset costs a few bytes per
token and DataLoader workers share it without copy-on-write churn.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm

from captioning.data.store import captions_digest
from models.checkpoint_io import atomic_write

TOKEN_CACHE_VERSION = 2  # 2: captions cut to MAX_CAPTION_TOKENS
# More tokens than any decoder here holds after its prefix (fit_decoder cuts to what it holds): the bound that
# keeps one enormous caption (a corrupt annotation) from costing gigabytes while it is tokenized.
MAX_CAPTION_TOKENS = 8192


# ---- captions and their images ----------------------------------------------------------------------------

@dataclass
class CaptionTable:
    """Captions and where their image lives: row `image_index[i]` of the features (or of the image list)."""
    captions: List[str]
    image_index: np.ndarray  # (num_captions,) int64

    def __len__(self) -> int:
        return len(self.captions)


def caption_table_from_features(data: dict, source) -> CaptionTable:
    """The caption table of a features pickle as `captioning.data.features.read_features` returns it (schema and row
    indices already checked there); a caption that is only whitespace is an error naming its index."""
    captions = [entry["caption"].strip() for entry in data["captions"]]
    empty = [i for i, c in enumerate(captions) if not c]
    if empty:
        raise ValueError(f"{source}: captions[{empty[0]}]['caption'] is empty ({len(empty)} empty caption(s) "
                         f"in all); every caption needs text to train on")
    index = np.fromiter((entry["clip_embedding"] for entry in data["captions"]), dtype=np.int64,
                        count=len(captions))
    return CaptionTable(captions, index)


# ---- tokens ------------------------------------------------------------------------------------------------

@dataclass
class CaptionTokens:
    """Token ids of every caption, each ending with the end-of-text token, in one flat array."""
    flat: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (num_captions + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int, max_tokens: Optional[int] = None) -> torch.Tensor:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if max_tokens is not None:
            end = min(end, start + max_tokens)
        return torch.from_numpy(self.flat[start:end].astype(np.int64))

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> "CaptionTokens":
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sequences], out=offsets[1:])
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the tokenizer's full definition and its end token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(spec.encode())
    digest.update(f"|{type(tokenizer).__name__}|eos={tokenizer.eos_token_id}".encode())
    return digest.hexdigest()


def captions_fingerprint(captions: Sequence[str]) -> str:
    """A digest of the captions in order; a features store's captions carry theirs (`sha256`), computed when it was
    written, so that no process reads every caption's text for it."""
    recorded = getattr(captions, "sha256", None)
    return recorded if recorded is not None else captions_digest(captions)


def caption_char_limit(tokenizer, max_tokens: int = MAX_CAPTION_TOKENS) -> int:
    """Characters that hold more than `max_tokens` tokens of any text: no token covers more characters than the
    longest entry of the vocabulary (its bytes, for byte-level vocabularies), so a longer caption keeps only the
    tokens of its first this-many characters, and memory stays bounded whatever the caption's size."""
    return max_tokens * max(len(token) for token in tokenizer.get_vocab())


def tokenize_captions(captions: Sequence[str], tokenizer, chunk: int = 8192, progress: bool = True,
                      max_tokens: int = MAX_CAPTION_TOKENS) -> CaptionTokens:
    """Each caption's ids (at most `max_tokens`, from its first `caption_char_limit` characters) followed by the
    end-of-text token (the original never appended one); a caption that was cut keeps the end token too, and
    fit_decoder cuts it to what the decoder holds."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no end-of-text (eos) token")
    limit = caption_char_limit(tokenizer, max_tokens)
    flats, lengths = [], []
    for start in tqdm(range(0, len(captions), chunk), desc="tokenizing captions", unit="chunk",
                      disable=not progress or len(captions) <= chunk):
        texts = [c[:limit] for c in captions[start:start + chunk]]  # before tokenizing: memory bounded
        part = CaptionTokens.from_sequences([s[:max_tokens] + [eos] for s in tokenizer(
            texts, add_special_tokens=False)["input_ids"]])
        flats.append(part.flat)  # chunk by chunk into arrays: Python lists of ints cost far more memory
        lengths.append(part.lengths)
    offsets = np.zeros(len(captions) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths) if lengths else [], out=offsets[1:])
    return CaptionTokens(np.concatenate(flats) if flats else np.zeros(0, np.int32), offsets)


def token_cache_key(captions: Sequence[str], tokenizer) -> str:
    spec = f"v{TOKEN_CACHE_VERSION}|{tokenizer_fingerprint(tokenizer)}|{captions_fingerprint(captions)}|{len(captions)}"
    return hashlib.sha256(spec.encode()).hexdigest()


def load_token_cache(path: Path, key: str) -> Optional[CaptionTokens]:
    """The cached tokens, or None when the file is absent, unreadable or made for other captions/tokenizer."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            tokens = CaptionTokens(z["flat"], z["offsets"])
    except (OSError, ValueError, KeyError):
        return None
    if tokens.offsets[0] != 0 or tokens.offsets[-1] != len(tokens.flat) or np.any(tokens.lengths <= 0):
        return None
    return tokens


def default_cache_dir() -> Path:
    """Where caches derived from a dataset go by default: $TINYTINY_CACHE, else $XDG_CACHE_HOME/tinytiny-captioner,
    else ~/.cache/tinytiny-captioner. Never the dataset's own folder, which may be read-only or shared."""
    if os.environ.get("TINYTINY_CACHE"):
        return Path(os.environ["TINYTINY_CACHE"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "tinytiny-captioner"


def cached_tokens(captions: Sequence[str], tokenizer, cache_dirs: Sequence[Path], stem: str,
                  log: Callable[[str], None] = print) -> CaptionTokens:
    """Tokens of `captions`, from a cache file keyed by the tokenizer and the caption texts.

    The key is in the file name and inside the file, so a cache made with another tokenizer or for other
    captions is never reused. The cache is read from any of `cache_dirs` and goes in the first one that accepts a
    write.
    """
    key = token_cache_key(captions, tokenizer)
    name = f"{stem}.tokens-{key[:16]}.npz"
    for directory in cache_dirs:
        tokens = load_token_cache(Path(directory) / name, key)
        if tokens is not None and len(tokens) == len(captions):
            log(f"caption tokens: {Path(directory) / name} (cached)")
            return tokens
    tokens = tokenize_captions(captions, tokenizer)
    for directory in cache_dirs:
        path = Path(directory) / name
        try:
            with atomic_write(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), flat=tokens.flat, offsets=tokens.offsets)
        except OSError as e:
            log(f"note: cannot write the token cache {path} ({e.strerror}); trying the next place")
            continue
        log(f"caption tokens: {len(tokens)} captions tokenized, cached in {path}")
        break
    return tokens


# ---- datasets ----------------------------------------------------------------------------------------------

class FeatureCaptionDataset(Dataset):
    """(tokens, feature) pairs for the captions `caption_ids`, from precomputed features."""

    def __init__(self, features: torch.Tensor, table: CaptionTable, tokens: CaptionTokens,
                 caption_ids: np.ndarray, max_tokens: Optional[int] = None):
        self.features = features
        self.image_index = table.image_index
        self.captions = table.captions  # reference texts for caption metrics (a reference, not a copy)
        self.tokens = tokens
        self.caption_ids = np.asarray(caption_ids, dtype=np.int64)
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.caption_ids)

    def token_lengths(self) -> np.ndarray:
        lengths = self.tokens.lengths[self.caption_ids]
        return lengths if self.max_tokens is None else np.minimum(lengths, self.max_tokens)

    def __getitem__(self, i: int):
        c = self.caption_ids[i]
        return self.tokens.get(c, self.max_tokens), self.features[self.image_index[c]].float()


class ImageCaptionDataset(FeatureCaptionDataset):
    """(tokens, preprocessed image) pairs, for end-to-end training of the encoder.

    Images come either from `cache` (a (num_images, 3, H, W) tensor preprocessed once) or are loaded and
    transformed on the fly. With `augment`, each sample's random crop is drawn from a generator seeded by
    (seed, epoch, caption), so a resumed run sees the same augmented images an uninterrupted run sees.
    """

    def __init__(self, paths: Sequence, table: CaptionTable, tokens: CaptionTokens, caption_ids: np.ndarray,
                 transform: Callable, load_image: Callable, max_tokens: Optional[int] = None,
                 cache: Optional[torch.Tensor] = None, augment: Optional[Callable] = None, seed: int = 0):
        super().__init__(cache, table, tokens, caption_ids, max_tokens)
        self.paths = list(paths)
        self.transform = transform
        self.load_image = load_image
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image(self, row: int, caption: int) -> torch.Tensor:
        if self.augment is not None:  # each caption of an image gets its own crop
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, caption)) & 0x7FFF_FFFF_FFFF_FFFF)
                return self.augment(self.load_image(self.paths[row]))
        if self.features is not None:
            return self.features[row].float()
        return self.transform(self.load_image(self.paths[row]))

    def __getitem__(self, i: int):
        c = self.caption_ids[i]
        return self.tokens.get(c, self.max_tokens), self.image(int(self.image_index[c]), int(c))


class CaptionCollator:
    """Pads a batch to its longest caption (dynamic padding); `mask` is 1 on caption tokens, 0 on padding.

    The padding value never reaches the loss (label -100) and, with causal attention, cannot influence
    the caption positions, so any id works.
    """

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, batch):
        tokens_list, inputs = zip(*batch)
        lengths = [len(t) for t in tokens_list]
        tokens = torch.full((len(batch), max(lengths)), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, t in enumerate(tokens_list):
            tokens[i, : len(t)] = t
            mask[i, : len(t)] = 1
        return {"tokens": tokens, "mask": mask, "inputs": torch.stack(inputs), "num_tokens": sum(lengths)}


# ---- sampling ----------------------------------------------------------------------------------------------

class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way through.

    An epoch's order is a permutation drawn from (seed, epoch) alone. Process r of W takes positions r, r+W,
    r+2W, ... so after k batches of size b the processes together have used exactly the first k*b*W positions:
    `set_epoch(epoch, start)` skips that many and a resumed run sees what an uninterrupted one would.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def __len__(self) -> int:
        return max(0, len(self.dataset) - self.start) // self.num_replicas

    def __iter__(self):
        order = self.order()[self.start:]
        order = order[: len(order) // self.num_replicas * self.num_replicas]
        return iter(order[self.rank:: self.num_replicas].tolist())


def split_by_image(table: CaptionTable, fraction: float, seed: int):
    """Caption ids for training and validation, holding out whole images so no image is in both."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    images = np.unique(table.image_index)
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(fraction * len(images))))
    if n_val >= len(images):
        raise ValueError(f"--val_fraction {fraction} of {len(images)} images leaves no image for training")
    held_out = np.isin(table.image_index, rng.permutation(images)[:n_val])
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def validation_shard(lengths: np.ndarray, rank: int, world_size: int) -> List[int]:
    """This process's share of the validation set, sorted by caption length so batches carry little padding."""
    order = np.argsort(lengths, kind="stable")
    return order[rank::world_size].tolist()
