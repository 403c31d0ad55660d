"""What train.py feeds the model: datasets built from a features pickle or from images and their annotations.

Files are read through `captioning.data` (one reader per format); this module turns them into training and
validation datasets, records where the features came from (the encoder config the export must carry) and
fingerprints the data so a resume checkpoint is never continued on other data.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from captioning.data.annotations import read_annotations
from captioning.data.features import metadata_encoder, read_features, same_encoder
from captioning.data.images import load_image
from captioning.data.shards import image_exists
from captioning.data.store import FeaturesStore, is_store
from captioning.training.config import TrainConfig
from captioning.training.datasets import (CaptionTable, FeatureCaptionDataset, ImageCaptionDataset, cached_tokens,
                                          caption_table_from_features, captions_fingerprint, default_cache_dir,
                                          split_by_image)
from models.choices import mapper_reads
from models.decoders import position_limit
from models.encoder import ImageEncoder


@dataclass
class TrainingInputs:
    train: FeatureCaptionDataset
    val: Optional[FeatureCaptionDataset]
    prefix_size: int  # feature dimension D
    feature_type: str  # "pooled" or "grid"
    num_grid_tokens: Optional[int]
    fingerprint: Dict  # stored in resume checkpoints
    encoder_config: Optional[Dict] = None  # how the features were made (features mode)
    encoder: Optional[ImageEncoder] = None  # the encoder to train (end-to-end mode)

    def fit_decoder(self, gpt_config, prefix_length: int, dist) -> None:
        """Check the token ids against the decoder's vocabulary and cut captions that would run past its
        positions (prefix + caption within its position limit); a cut caption keeps no end token, as it did not
        end."""
        limit = position_limit(gpt_config)
        max_tokens = limit - prefix_length
        if max_tokens < 2:
            raise ValueError(f"--prefix_length {prefix_length} leaves no room for captions in the decoder's "
                             f"{limit} positions")
        for name, dataset in (("training", self.train), ("validation", self.val)):
            if dataset is None:
                continue
            top = int(dataset.tokens.flat.max())
            if top >= gpt_config.vocab_size:
                raise ValueError(f"the tokenizer produced id {top} but the decoder's vocabulary has "
                                 f"{gpt_config.vocab_size} entries: --gpt2 must name a matching tokenizer and model")
            dataset.max_tokens = max_tokens
            cut = int((dataset.tokens.lengths[dataset.caption_ids] > max_tokens).sum())
            if cut:
                dist.print(f"note: {cut} {name} caption(s) longer than {max_tokens} tokens are cut to fit the "
                           f"decoder's {limit} positions")


# ---- features pickle ---------------------------------------------------------------------------------------

def token_cache_dirs(config: TrainConfig) -> List[Path]:
    """Where caption tokens are cached: --cache_dir (default: the user's cache directory), else the run's
    --out_dir; never beside the data, whose folder may be read-only or shared."""
    return [Path(config.cache_dir) if config.cache_dir else default_cache_dir(), Path(config.out_dir)]


class StoreCaptions(Sequence[str]):
    """A store's captions as training reads them (stripped), each read from the mapped text column when asked for:
    no process holds every caption's text. `sha256` is their fingerprint, recorded when the store was written."""

    def __init__(self, store: FeaturesStore):
        self.column, self.sha256 = store.captions, store.captions_sha256

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i):
        return [c.strip() for c in self.column[i]] if isinstance(i, slice) else self.column[i].strip()


def load_features(path, tokenizer, cache_dirs: List[Path], log):
    """Features, metadata, caption table and caption tokens of a features pickle, or of a store (its features and
    caption rows stay memory-mapped, shared by the processes of a node)."""
    if is_store(path):
        store = FeaturesStore(path)
        features, metadata = store.features, store.metadata
        table = CaptionTable(StoreCaptions(store), store.caption_rows)
    else:
        data = read_features(path)
        table = caption_table_from_features(data, path)
        features, metadata = data["clip_embedding"], data["metadata"]
        del data  # the caption dicts: about half the memory of a COCO pickle
    tokens = cached_tokens(table.captions, tokenizer, cache_dirs, Path(path).name, log)
    return features, metadata, table, tokens


def build_feature_inputs(config: TrainConfig, tokenizer, dist) -> TrainingInputs:
    cache_dirs = token_cache_dirs(config)
    features, metadata, table, tokens = load_features(config.data, tokenizer, cache_dirs, dist.print)
    train_ids, val = np.arange(len(table)), None
    if config.val_data:
        v_features, v_metadata, v_table, v_tokens = load_features(config.val_data, tokenizer, cache_dirs,
                                                                   dist.print)
        if v_features.shape[1:] != features.shape[1:]:
            raise ValueError(f"{config.val_data}: features of shape {tuple(v_features.shape[1:])} per image, but "
                             f"{config.data} has {tuple(features.shape[1:])}")
        if not same_encoder(v_metadata.get("encoder"), metadata.get("encoder")):
            raise ValueError(f"{config.val_data} was made by another encoder than {config.data} (metadata['encoder'])")
        val = FeatureCaptionDataset(v_features, v_table, v_tokens, np.arange(len(v_table)))
    elif config.val_fraction is not None:
        train_ids, val_ids = split_by_image(table, config.val_fraction, config.seed)
        val = FeatureCaptionDataset(features, table, tokens, val_ids)
    grid = features.ndim == 3
    if not mapper_reads(config.mapping_type, "grid" if grid else "pooled"):
        raise ValueError(f"{config.data} holds grid features {tuple(features.shape)}; they need --mapping_type "
                         f"transformer")
    return TrainingInputs(
        train=FeatureCaptionDataset(features, table, tokens, train_ids), val=val, prefix_size=features.shape[-1],
        feature_type="grid" if grid else "pooled", num_grid_tokens=features.shape[1] if grid else None,
        fingerprint={"captions": captions_fingerprint(table.captions), "num_captions": len(table),
                     "features": list(features.shape)},
        encoder_config=metadata_encoder(metadata, features, config.data))


# ---- images, end to end ------------------------------------------------------------------------------------

def load_annotations(path, split, config: TrainConfig) -> Tuple[CaptionTable, List]:
    records = read_annotations(path, split=split, images_root=config.images_root, fmt=config.annotation_format)
    if not records:
        raise ValueError(f"{path}: no images with captions" + (f" in split {split!r}" if split else ""))
    missing = [str(r.path) for r in records if not image_exists(r.path)]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(records)} images are missing under --images_root "
                         f"{config.images_root}, e.g. {missing[:3]}")
    captions = [c.strip() for r in records for c in r.captions]
    index = np.fromiter((j for j, r in enumerate(records) for _ in r.captions), dtype=np.int64, count=len(captions))
    return CaptionTable(captions, index), [r.path for r in records]  # files, or images inside shards


def trainable_encoder(config: TrainConfig) -> ImageEncoder:
    """A new encoder to train, from the flags, its first --freeze_stages frozen."""
    encoder = ImageEncoder(config.encoder_config())
    encoder.freeze_stages(config.frozen_stages)
    return encoder


def augmentation(data_config: Dict):
    """A light random resized crop; no flips, since captions name left and right."""
    size = tuple(data_config["input_size"][1:])
    return T.Compose([T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1),
                                          interpolation=str_to_interp_mode(data_config["interpolation"])),
                      T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])


class _ImageFiles(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_image(self.paths[i]))


def preprocess_all(paths: List[str], transform, workers: int, show: bool) -> torch.Tensor:
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=64, num_workers=workers,
                        generator=torch.Generator())  # leaves the global RNG, hence initialisation, as it was
    return torch.cat([b for b in tqdm(loader, desc="preprocessing images", unit="batch", disable=not show)])


def build_image_inputs(config: TrainConfig, tokenizer, dist, cache_workers: int = 0,
                       encoder: Optional[ImageEncoder] = None) -> TrainingInputs:
    """Images and captions of --annotations (and --val_annotations), prepared for `encoder` (the --init_from
    export's; default: a new one from the flags); with --cache_images every image is preprocessed once, by
    `cache_workers` loader processes."""
    table, paths = load_annotations(config.annotations, config.split, config)
    tokens = cached_tokens(table.captions, tokenizer, token_cache_dirs(config),
                           Path(config.annotations).name + (f".{config.split}" if config.split else ""), dist.print)
    encoder = encoder if encoder is not None else trainable_encoder(config)
    transform = encoder.transform
    augment = augmentation(encoder.config.data_config) if config.augment else None

    def dataset(tab, tok, ids, image_paths):
        cache = preprocess_all(image_paths, transform, cache_workers, dist.is_main) if config.cache_images else None
        return ImageCaptionDataset(image_paths, tab, tok, ids, transform, load_image, cache=cache, augment=augment,
                                   seed=config.seed)

    train_ids, val = np.arange(len(table)), None
    if config.val_annotations:
        v_table, v_paths = load_annotations(config.val_annotations, config.val_split, config)
        v_name = Path(config.val_annotations).name + (f".{config.val_split}" if config.val_split else "")
        v_tokens = cached_tokens(v_table.captions, tokenizer, token_cache_dirs(config), v_name, dist.print)
        val = dataset(v_table, v_tokens, np.arange(len(v_table)), v_paths)
        val.augment = None
    train = dataset(table, tokens, train_ids, paths)
    if config.val_fraction is not None:
        train.caption_ids, val_ids = split_by_image(table, config.val_fraction, config.seed)
        val = ImageCaptionDataset(paths, table, tokens, val_ids, transform, load_image, cache=train.features)
    grid = config.feature_type == "grid"
    return TrainingInputs(
        train=train, val=val, prefix_size=encoder.feature_dim, feature_type=config.feature_type,
        num_grid_tokens=encoder.num_tokens if grid else None, encoder=encoder,
        fingerprint={"captions": captions_fingerprint(table.captions), "num_captions": len(table),
                     "images": hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()})
