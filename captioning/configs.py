"""What each script's flags become: one dataclass per script, one field per flag under the flag's name, and every
default written here once. Each script's parser takes its defaults from its dataclass (`defaults`), and the library
call takes the dataclass. No torch here, so that a script's `--help` answers before the heavy imports.

train.py's TrainConfig, the largest, lives in captioning/training/config.py under the same rule.
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from captioning.choices import ALL_METRICS, FEATURE_DTYPES
from models.choices import DEFAULT_BEAM_SIZE, DEFAULT_TOP_P

# Images per encoder call: on a CPU small batches stay in cache, and 4 ran faster than 8 (docs/benchmarks.md).
EXTRACTION_BATCH_SIZES = {"cuda": 128, "cpu": 4}
OUT_FORMATS = ("pickle", "mmap")  # parse_coco.py --out_format
DEMO_RUN = "./runs/demo"  # where make demo writes, and where app.py looks for its export
DEMO_EXPORT = f"{DEMO_RUN}/run/demo_latest"
DEMO_DECODER_TYPES = ("gpt2", "llama", "qwen2", "gpt_neox")  # demo.py --decoder_type: captioning/demo/recipe.py


def extraction_batch_size(batch_size: Optional[int], device_type: str) -> int:
    """`batch_size`, or EXTRACTION_BATCH_SIZES of the device type (a CPU's for other devices)."""
    return batch_size or EXTRACTION_BATCH_SIZES.get(device_type, EXTRACTION_BATCH_SIZES["cpu"])


def defaults(config_class) -> Dict:
    """Every field's default, for a parser's `set_defaults`; a field without one is a required flag."""
    out = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@dataclass
class ExtractionConfig:
    """parse_coco.py: one extraction run."""
    clip_model_type: str = "tinyvit"
    encoder: Optional[str] = None  # a timm NAME or NAME.TAG; overrides clip_model_type
    encoder_weights: str = "pretrained"  # "pretrained", "random", or a checkpoint file
    encoder_kwargs: Dict = field(default_factory=dict)  # extra timm.create_model arguments
    feature_type: str = "pooled"
    image_size: Optional[int] = None  # None: the model's own
    annotations: str = "./data/coco/annotations/train_caption.json"
    annotation_format: str = "auto"
    split: Optional[str] = None  # Karpathy split(s), joined by '+'
    images_root: str = "./data/coco"
    out_path: Optional[Path] = None  # None: ./data/coco/oscar_split_<encoder or clip_model_type>_train.pkl (.store)
    out_format: str = "pickle"  # "pickle" (the original's) or "mmap": a memory-mapped store (captioning/data/store.py)
    convert: Optional[str] = None  # a features pickle or store to write in out_format at out_path, encoding nothing
    batch_size: Optional[int] = None  # None: EXTRACTION_BATCH_SIZES of the device type
    threads: Optional[int] = None
    num_workers: Optional[int] = None
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float32"  # the stored features' dtype
    channels_last: bool = True
    on_error: str = "skip"  # unusable images: "skip" (report and leave out) or "fail"
    error_log: Optional[Path] = None  # None: <out_path>.errors.log
    max_image_pixels: Optional[int] = None  # None: PIL's limit
    fresh: bool = False  # discard partial results of an earlier interrupted run
    seed: int = 0  # of the encoder's weights with encoder_weights="random"

    def __post_init__(self):
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {self.on_error!r}")
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {FEATURE_DTYPES}, got {self.dtype!r}")
        if self.out_format not in OUT_FORMATS:
            raise ValueError(f"out_format must be one of {OUT_FORMATS}, got {self.out_format!r}")
        tag = (self.encoder or self.clip_model_type).replace("/", "_")
        suffix = ".pkl" if self.out_format == "pickle" else ".store"
        self.out_path = Path(self.out_path or f"./data/coco/oscar_split_{tag}_train{suffix}")
        self.error_log = Path(self.error_log or self.out_path.with_suffix(".errors.log"))

    def encoder_config(self):
        """The models.encoder.EncoderConfig these settings name: --encoder wins over --clip_model_type."""
        from models.encoder import EncoderConfig  # timm and torch: only once the run starts
        return EncoderConfig.from_flags(encoder=self.encoder, clip_model_type=self.clip_model_type,
                                        feature_type=self.feature_type, weights=self.encoder_weights,
                                        image_size=self.image_size, model_kwargs=self.encoder_kwargs)


@dataclass
class PredictConfig:
    """predict.py: exactly one of `image`, `images_dir` and `features`."""
    checkpoint: str
    image: Optional[List[str]] = None
    images_dir: Optional[str] = None
    features: Optional[str] = None
    out: Optional[str] = None  # .json (COCO results format) or .csv; None prints the captions
    decoding: str = "beam"
    beam_size: int = DEFAULT_BEAM_SIZE
    max_length: Optional[int] = None  # None: the original's 67, or what the checkpoint's decoder holds
    top_p: float = DEFAULT_TOP_P
    temperature: float = 1.0
    num_captions: int = 1
    seed: Optional[int] = None
    batch_size: int = 32
    device: Optional[str] = None  # None: captioning.runtime.default_device()
    precision: str = "auto"
    threads: Optional[int] = None
    encoder_weights: Optional[str] = None
    quantize: str = "none"  # QUANTIZATIONS; int8 runs on a CPU


@dataclass
class EvaluateConfig:
    """evaluate.py: exactly one of `predictions` and `checkpoint`; the fields from `beam_size` on apply to
    `checkpoint` only."""
    annotations: str
    predictions: Optional[str] = None  # a COCO results file, or predict.py's CSV
    checkpoint: Optional[str] = None  # an export directory: caption the split with it, then score
    split: Optional[str] = None  # Karpathy split of dataset_coco.json
    images_root: str = "./data/coco"
    out_dir: Optional[str] = None  # None: <predictions>_eval or <checkpoint>_eval_<split>
    metrics: List[str] = field(default_factory=lambda: list(ALL_METRICS))
    allow_partial: bool = False
    allow_empty: bool = False
    original_bleu: bool = False
    beam_size: int = DEFAULT_BEAM_SIZE
    max_length: Optional[int] = None  # None: the original's 67, or what the checkpoint's decoder holds
    batch_size: int = 16
    max_images: Optional[int] = None
    device: Optional[str] = None  # None: captioning.runtime.default_device()
    precision: str = "auto"
    threads: Optional[int] = None
    quantize: str = "none"  # QUANTIZATIONS; int8 runs on a CPU


@dataclass
class DemoConfig:
    """demo.py: the recipe's knobs (its fixed parts are captioning/demo/recipe.py's constants)."""
    data: Optional[str] = None  # a dataset folder; None: generate the shapes dataset into <out_dir>/shapes
    out_dir: str = DEMO_RUN
    num_train: int = 2000
    num_val: int = 100
    num_test: int = 300
    seed: int = 0
    image_size: int = 48  # of the generated images and of the encoder's input
    steps: int = 936  # cross-entropy steps, rounded to whole epochs
    # the budget under --lora_r: adapters over a random GPT-2 missed the shapes in 936 steps (docs/demo.md)
    lora_steps: int = 1560
    epochs: Optional[int] = None  # overrides steps
    bs: int = 64
    lr: float = 2e-3
    encoder_lr: float = 1e-2
    precision: str = "auto"
    threads: Optional[int] = None
    beam_size: int = 3
    device: str = "cpu"
    decoder_type: str = "gpt2"  # the demo decoder's architecture: DEMO_DECODER_TYPES
    lora_r: Optional[int] = None  # LoRA adapters of this rank on the decoder instead of training its weights
    scst: bool = False  # CIDEr optimisation after cross-entropy
    # CIDEr optimisation starts from the whole cross-entropy recipe; the greedy baseline (captioning/demo/recipe.py) and
    # this learning rate did best on the either-order dataset (docs/experiments.md).
    scst_steps: int = 90
    scst_lr: float = 1e-3
    scst_samples: int = 5


@dataclass
class ShapesConfig:
    """shapes_data.py: the synthetic shapes dataset, the same images and captions for the same seed."""
    out_dir: str = "./data/shapes"
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 300
    image_size: int = 64
    seed: int = 0
    either_order: bool = False  # captions may name either of two shapes first
    reverse_fraction: float = 0.0  # share of two-shape captions naming the shapes in reverse order

    def __post_init__(self):
        if not 0.0 <= self.reverse_fraction <= 1.0:
            raise ValueError(f"reverse_fraction must be in [0, 1], got {self.reverse_fraction}")
        if self.reverse_fraction and self.either_order:
            raise ValueError("give --either_order or --reverse_fraction, not both: --either_order is about 0.5")


@dataclass
class AppConfig:
    """app.py: the web page and where it serves."""
    checkpoint: str = DEMO_EXPORT
    host: str = "127.0.0.1"  # this machine only
    port: int = 7860
    share: bool = False  # a public Gradio link
    device: Optional[str] = None  # None: captioning.runtime.default_device()
    precision: str = "auto"
    quantize: str = "none"  # QUANTIZATIONS; int8 runs on a CPU
    max_file_mb: float = 10.0  # uploads above this are refused by the server
    examples: int = 6


@dataclass
class ConvertConfig:
    """convert_checkpoint.py: exactly one of `checkpoint` (an original captioner) and `tinyvit` (an official
    TinyViT file); the mapper fields are inferred from the weights when None and checked when given."""
    out_dir: str
    checkpoint: Optional[str] = None
    tinyvit: Optional[str] = None
    gpt2: str = "distilgpt2"
    mapping_type: Optional[str] = None
    prefix_length: Optional[int] = None
    prefix_length_clip: Optional[int] = None
    num_layers: Optional[int] = None
    normalize_prefix: Optional[bool] = None  # None: as the original inference did for the mapper kind
    clip_model_type: str = "tinyvit"
    encoder: Optional[str] = None  # a timm name; overrides clip_model_type
    encoder_weights: str = "pretrained"  # a file is embedded in the export
    preprocessing: Optional[str] = None  # None: clip for a captioner, as the original scripts; timm for TinyViT
    feature_type: str = "pooled"

    def __post_init__(self):
        if (self.checkpoint is None) == (self.tinyvit is None):
            raise ValueError("give exactly one of checkpoint (an original captioner) and tinyvit (an official "
                             "TinyViT file)")
