"""TrainConfig: what train.py's flags become, one field per flag, under the flag's name and with its default.

train.py takes its defaults from here; the run records `to_dict()` as train_args.json and in the resume
checkpoint (a resumed run must have the same settings). A TrainConfig that exists is consistent: combinations
that cannot work are refused when it is built, before any file is read. No torch here: train.py builds its
parser from these defaults before the heavy imports.
"""
import dataclasses
import shlex
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set

from captioning.choices import json_object
from models.choices import FEATURE_TYPES, LICENSES, MAPPING_TYPES, mapper_reads

DEFAULT_DATA = "./data/coco/oscar_split_tinyvit_train.pkl"
# The fields an export decides when training starts from it (--init_from): its architecture and decoder, and,
# training from images, its encoder.
ARCHITECTURE_FLAGS = ("mapping_type", "prefix_length", "prefix_length_clip", "num_layers", "normalize_prefix", "gpt2")
ENCODER_FLAGS = ("encoder", "encoder_weights", "encoder_kwargs", "image_size", "feature_type")
SCST_BASELINES = ("mean", "greedy")


@dataclass
class TrainConfig:
    # ---- the original train.py's flags
    data: Optional[str] = None  # features pickle; DEFAULT_DATA unless training from images
    out_dir: str = "./checkpoints"
    prefix: str = "coco_prefix"
    epochs: int = 10
    save_every: int = 1
    prefix_length: int = 10
    prefix_length_clip: int = 10
    bs: int = 40  # batch size per process
    only_prefix: bool = False
    mapping_type: str = "mlp"
    num_layers: int = 8
    is_rn: bool = False  # ignored: the features pickle says what the features are
    normalize_prefix: bool = False
    # ---- optimisation, data, devices and checkpoints
    gpt2: str = "distilgpt2"
    lr: float = 2e-5
    warmup_steps: int = 5000
    weight_decay: float = 0.0
    adam_eps: float = 1e-6  # the transformers.AdamW default the original trained with
    grad_clip: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    device: Optional[str] = None
    val_data: Optional[str] = None
    val_fraction: Optional[float] = None
    init_from: Optional[str] = None
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    cache_dir: Optional[str] = None
    log_every: int = 10
    save_every_steps: int = 10000
    eval_every: int = 0
    eval_images: int = 500
    precision: str = "auto"
    threads: Optional[int] = None
    num_workers: Optional[int] = None
    # ---- end-to-end training from images
    train_encoder: bool = False
    annotations: str = "./data/coco/annotations/train_caption.json"
    annotation_format: str = "auto"
    split: Optional[str] = None
    images_root: str = "./data/coco"
    val_annotations: Optional[str] = None
    val_split: Optional[str] = None
    encoder: str = "tiny_vit_21m_224"
    encoder_weights: str = "pretrained"
    encoder_kwargs: str = "{}"  # JSON, as given (and recorded in train_args.json)
    image_size: Optional[int] = None
    feature_type: str = "pooled"
    freeze_stages: Optional[int] = None
    encoder_lr: Optional[float] = None
    augment: bool = False
    channels_last: Optional[bool] = None
    cache_images: bool = False
    # ---- CIDEr optimisation (self-critical sequence training) after cross-entropy
    scst: bool = False
    scst_samples: int = 5  # captions drawn per image and step
    scst_top_p: float = 1.0  # 1: the model's whole distribution
    scst_max_length: Optional[int] = None  # None: the longest training caption's tokens (end token included)
    scst_baseline: str = "mean"  # "mean" of the image's other samples (Luo 2020) or "greedy" (Rennie 2017)
    scst_bleu_weight: float = 0.0  # reward = CIDEr-D + this x BLEU-4
    license: str = "mit"  # named in the exports' model cards
    dataset: Optional[str] = None  # the training data's name (coco, shapes, ...), recorded in the exports
    # ---- LoRA adapters on the decoder (peft)
    lora_r: Optional[int] = None  # rank; None: no adapters
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: Optional[List[str]] = None  # None: the architecture's attention and MLP projections
    export_adapters: bool = False  # also write <export>/adapters: the adapters without the base decoder

    def __post_init__(self):
        if not self.train_encoder and self.data is None:
            self.data = DEFAULT_DATA
        self._check()

    def _check(self) -> None:
        if self.mapping_type not in MAPPING_TYPES:
            raise ValueError(f"--mapping_type must be mlp or transformer, got {self.mapping_type!r}")
        if self.feature_type not in FEATURE_TYPES:
            raise ValueError(f"--feature_type must be one of {FEATURE_TYPES}, got {self.feature_type!r}")
        if self.train_encoder and (self.data or self.val_data):
            raise ValueError("with --train_encoder the data are images: give --annotations (and --images_root, "
                             "--val_annotations), not --data/--val_data features pickles")
        if not self.train_encoder and self.val_annotations:
            raise ValueError("--val_annotations needs --train_encoder; validate features with --val_data")
        if (self.val_data or self.val_annotations) and self.val_fraction is not None:
            raise ValueError("give validation data or --val_fraction, not both")
        if self.eval_every and not self.has_validation:
            raise ValueError("--eval_every needs validation data: give --val_data or --val_fraction (with "
                             "--train_encoder: --val_annotations or --val_fraction)")
        if (self.augment or self.cache_images) and not self.train_encoder:
            raise ValueError("--augment and --cache_images apply to images: add --train_encoder")
        if self.license not in LICENSES:
            raise ValueError(f"--license must be one of {LICENSES}, got {self.license!r}")
        if self.scst:
            self._check_scst()
        self._check_lora()
        if self.augment and self.cache_images:
            raise ValueError("--cache_images keeps one fixed view per image, which --augment would not vary")
        if self.train_encoder:
            if not mapper_reads(self.mapping_type, self.feature_type):
                raise ValueError("--feature_type grid needs --mapping_type transformer")
            self.encoder_model_kwargs()

    def _check_lora(self) -> None:
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1 (the adapters' rank), got {self.lora_r}; leave it out "
                             f"to train without adapters")
        if self.lora_r is not None and self.only_prefix:
            raise ValueError("--lora_r with --only_prefix: --only_prefix freezes the whole decoder, adapters "
                             "included; give one of them")
        if self.lora_r is None and (self.lora_targets or self.export_adapters):
            raise ValueError("--lora_targets and --export_adapters need --lora_r")
        if self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_alpha must be positive and --lora_dropout in [0, 1), got {self.lora_alpha} "
                             f"and {self.lora_dropout}")

    def _check_scst(self) -> None:
        if not self.init_from:
            raise ValueError("--scst is a second stage: give the cross-entropy export to start from with "
                             "--init_from DIR (and a new --out_dir)")
        if self.scst_baseline not in SCST_BASELINES:
            raise ValueError(f"--scst_baseline must be one of {SCST_BASELINES}, got {self.scst_baseline!r}")
        if self.scst_baseline == "mean" and self.scst_samples < 2:
            raise ValueError("--scst_baseline mean compares each sample with the image's other samples: give "
                             "--scst_samples 2 or more, or --scst_baseline greedy")
        if not 0.0 < self.scst_top_p <= 1.0:
            raise ValueError(f"--scst_top_p must be in (0, 1], got {self.scst_top_p}")

    @property
    def stage(self) -> str:
        return "scst" if self.scst else "cross-entropy"

    @property
    def has_validation(self) -> bool:
        return bool(self.val_data or self.val_annotations or self.val_fraction is not None)

    @property
    def frozen_stages(self) -> int:
        """--freeze_stages, defaulting to 1 (as the original) for trained weights and 0 for random ones."""
        return self.freeze_stages if self.freeze_stages is not None else int(self.encoder_weights != "random")

    def encoder_model_kwargs(self) -> Dict:
        """--encoder_kwargs, which train_args.json records as given (text), as a dict."""
        try:
            return json_object(self.encoder_kwargs)
        except ValueError as e:
            raise ValueError(f"--encoder_kwargs: {e}") from e

    def encoder_config(self):
        """The EncoderConfig of --train_encoder's encoder (models.encoder is imported here, with torch)."""
        from models.encoder import EncoderConfig
        return EncoderConfig.from_flags(encoder=self.encoder, feature_type=self.feature_type,
                                        weights=self.encoder_weights, image_size=self.image_size,
                                        model_kwargs=self.encoder_model_kwargs())

    def changed(self, names: Sequence[str]) -> Set[str]:
        """Which of the fields `names` differ from their defaults (set by whoever built the config)."""
        defaults = self.defaults()
        return {name for name in names if getattr(self, name) != defaults[name]}

    def command_line(self) -> str:
        """The train.py command that gives this config (fields away from their defaults; what only says where
        and how often things are written is left out), as the model card records it."""
        defaults, parts = self.defaults(), ["python train.py"]
        for name, value in self.to_dict().items():
            if name in ("resume", "num_workers", "cache_dir", "log_every", "save_every_steps", "threads") or \
                    value == defaults[name] or (name == "data" and value == DEFAULT_DATA):
                continue
            if isinstance(value, bool):
                parts.append(f"--{name}" if value else f"--no-{name}")
            elif isinstance(value, list):
                parts.append(f"--{name} " + " ".join(shlex.quote(str(v)) for v in value))
            else:
                parts.append(f"--{name} {shlex.quote(str(value))}")
        return " ".join(parts)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> Dict:
        """Every field's default (`data` unresolved), for train.py's parser."""
        return {f.name: f.default for f in dataclasses.fields(cls)}
