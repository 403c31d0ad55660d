"""Image encoder: any timm model (TinyViT-21M by default) turning images into one feature vector or a grid.

Preprocessing facts (input size, resize, crop, mean/std) come from the model's timm data config and are stored
in `EncoderConfig.data_config`, so whoever stores features records exactly how images were prepared.
"""
import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, create_transform, resolve_data_config
from timm.models import group_modules
from timm.models.tiny_vit import TinyVit
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.checkpoint_io import (CheckpointError, atomic_directory, hash_tensor, load_state_dict_file,
                                  load_state_dict_strict, save_safetensors)
from models.choices import CLIP_MODEL_TYPES, FEATURE_TYPES  # noqa: F401 (re-exported)

ENCODER_CONFIG_FILE = "config.json"
ENCODER_WEIGHTS_FILE = "model.safetensors"


@dataclass
class EncoderConfig:
    name: str = "tiny_vit_21m_224"
    # "pooled": the pooled, normed pre-logits vector (B, D); "grid": the last feature map as tokens (B, T, D).
    feature_type: str = "pooled"
    # "pre_logits" drops the classifier; "head" keeps it, for CLIP towers whose head is the image projection.
    pooled_output: str = "pre_logits"
    # "timm": the model's own data config; "clip": the original scripts' CLIP preprocessing.
    preprocessing: str = "timm"
    image_size: Optional[int] = None  # overrides the data config's input size (never a fixed one)
    # Where the weights came from: "pretrained" (timm hub/cache), "random", or a file path.
    weights: str = "pretrained"
    model_kwargs: Dict = field(default_factory=dict)  # extra timm.create_model arguments
    data_config: Optional[Dict] = None  # filled in when the encoder is built
    # The timm `architecture.tag` that `name` resolved to when the encoder was built (a bare name picks timm's
    # default tag, e.g. tiny_vit_21m_224 -> tiny_vit_21m_224.dist_in22k): the pretrained weights and the data
    # config come from it.
    resolved_name: Optional[str] = None
    # SHA-256 of the weights the encoder was built with (`weights_fingerprint`), whatever their source: a file
    # found at the recorded path later must hold the same weights, or the features would silently differ from
    # those the model was trained on.
    weights_sha256: Optional[str] = None

    def __post_init__(self):
        if self.feature_type not in FEATURE_TYPES:
            raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {self.feature_type!r}")
        if self.pooled_output not in ("pre_logits", "head"):
            raise ValueError(f"pooled_output must be 'pre_logits' or 'head', got {self.pooled_output!r}")
        if self.preprocessing not in ("timm", "clip"):
            raise ValueError(f"preprocessing must be 'timm' or 'clip', got {self.preprocessing!r}")

    @classmethod
    def for_clip_model_type(cls, clip_model_type: str, **kwargs) -> "EncoderConfig":
        """The original scripts' `--clip_model_type` choices: 'tinyvit' or an OpenAI CLIP name."""
        if clip_model_type.lower() == "tinyvit":
            return cls(name="tiny_vit_21m_224", **kwargs)
        if clip_model_type not in CLIP_MODEL_TYPES:
            raise ValueError(f"unknown clip_model_type {clip_model_type!r}; expected 'tinyvit' or one of "
                             f"{sorted(CLIP_MODEL_TYPES)}")
        return cls(name=CLIP_MODEL_TYPES[clip_model_type], pooled_output="head", preprocessing="clip", **kwargs)

    @classmethod
    def from_flags(cls, encoder: Optional[str] = None, clip_model_type: str = "tinyvit",
                   preprocessing: Optional[str] = None, **kwargs) -> "EncoderConfig":
        """The scripts' encoder flags: a timm `encoder` name overrides `clip_model_type`; `preprocessing` (None:
        the model's own) and the other fields as given. Every script turns its flags into a config here."""
        config = cls(name=encoder, **kwargs) if encoder else cls.for_clip_model_type(clip_model_type, **kwargs)
        return dataclasses.replace(config, preprocessing=preprocessing) if preprocessing else config

    def to_dict(self) -> Dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as config.json holds them

    @classmethod
    def from_dict(cls, d: Dict) -> "EncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"encoder config has unknown keys {unknown}")
        return cls(**d)


def create_timm_model(name: str, pretrained: bool, kwargs: Dict) -> nn.Module:
    """`timm.create_model`, taking `NAME` (timm's default tag) or `NAME.TAG`; a tag timm does not know is an error
    listing the ones it does."""
    architecture, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"encoder {name!r}: timm has no model of that name" +
                         (f"; the closest it knows: {', '.join(close)}" if close else "; see timm.list_models()"))
    if tag:
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(architecture + ".*")]
        if tag not in tags:
            raise ValueError(f"encoder {name!r}: timm has no pretrained tag {tag!r} for {architecture}; its tags "
                             f"are {tags}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an argument the model's constructor does not take
        raise ValueError(f"encoder {name!r}: timm cannot build it with these arguments (--encoder_kwargs): "
                         f"{e}") from e
    except Exception as e:  # fetching pretrained weights: hub, network and cache errors come in many classes
        if not pretrained:
            raise
        raise CheckpointError(f"encoder {name!r}: cannot load its pretrained weights from the Hugging Face Hub or "
                              f"its cache ({e.__class__.__name__}: {e}); download them once, or pass "
                              f"--encoder_weights with a weights file") from e


def data_config_for(config: EncoderConfig, pretrained_cfg: Dict, dynamic_size: bool = False) -> Dict:
    """The preprocessing of an encoder: timm's data config of its pretrained tag, with the original scripts'
    CLIP resize, crop and normalisation for `preprocessing="clip"` and `config.image_size` if given.

    The input size is always the model's own unless `image_size` says otherwise, and for a model whose
    pretrained config fixes its input size (CLIP's ResNets with an attention pool: RN50x4 is 288x288) another
    size is an error rather than features of resampled position embeddings, unless the model was built to
    take any size (`dynamic_size`: timm's `dynamic_img_size`, or `img_size` in its kwargs).
    """
    data_config = dict(resolve_data_config({}, pretrained_cfg=dict(pretrained_cfg)))
    if config.preprocessing == "clip":
        # CLIP's preprocess: shorter side resized to the input size (bicubic), centre crop, CLIP mean/std.
        data_config.update(interpolation="bicubic", crop_pct=1.0, crop_mode="center", mean=OPENAI_CLIP_MEAN,
                           std=OPENAI_CLIP_STD)
    if config.image_size:
        native = tuple(data_config["input_size"])
        wanted = (3, config.image_size, config.image_size)
        dynamic_size = dynamic_size or "img_size" in config.model_kwargs
        if wanted != native and pretrained_cfg.get("fixed_input_size") and not dynamic_size:
            raise ValueError(f"{config.name} has a fixed input size of {native[1]}x{native[2]} (timm's pretrained "
                             f"config); an image size of {config.image_size} is not possible with it")
        data_config["input_size"] = wanted
    return json.loads(json.dumps(data_config))


def official_tinyvit_filter_fn(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an official TinyViT release state dict onto timm's TinyVit names.

    The official model names its stages `layers.N` (timm: `stages.N`) and keeps each stage's downsampling at the
    end of stage N (timm: start of stage N+1); its conv-BN convolutions are `.c` (timm: `.conv`), its patch
    embedding `patch_embed.seq.0/.2` (timm: `patch_embed.conv1/.conv2`), its head `norm_head`/`head`
    (timm: `head.norm`/`head.fc`); its `attention_bias_idxs` buffers are rebuilt by timm and dropped here.
    """
    out = {}
    for k, v in state_dict.items():
        if k.endswith("attention_bias_idxs"):
            continue
        k = re.sub(r"^patch_embed\.seq\.0\.", "patch_embed.conv1.", k)
        k = re.sub(r"^patch_embed\.seq\.2\.", "patch_embed.conv2.", k)
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.", k)
        k = re.sub(r"^layers\.", "stages.", k)
        k = re.sub(r"\.c\.(weight|bias)$", r".conv.\1", k)
        k = re.sub(r"^norm_head\.", "head.norm.", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out


def is_official_tinyvit(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("layers.", "patch_embed.seq.", "norm_head.")) for k in state_dict)


class ImageEncoder(nn.Module):
    """A timm model giving `pooled` (B, D) or `grid` (B, T, D) features, with its preprocessing attached.

    `load_weights=True` loads `config.weights` ("pretrained", "random" or a file); `False` leaves the
    initialisation for a caller that loads a state dict strictly right after (exports do).
    """

    def __init__(self, config: EncoderConfig, load_weights: bool = True):
        super().__init__()
        self._folded = False  # see fold_batch_norms
        pretrained = load_weights and config.weights == "pretrained"
        kwargs = dict(config.model_kwargs)
        if config.pooled_output == "pre_logits":
            kwargs["num_classes"] = 0
        self.model = create_timm_model(config.name, pretrained, kwargs)
        if load_weights:
            from_file = config.weights not in ("pretrained", "random")
            if from_file:
                self.load_weights_file(config.weights)
            digest = self.weights_fingerprint()
            if from_file and config.weights_sha256 and digest != config.weights_sha256:
                raise CheckpointError(
                    f"{config.weights}: these encoder weights (SHA-256 {digest[:16]}...) are not the ones recorded "
                    f"({config.weights_sha256[:16]}...): the file at that path was replaced since the features "
                    f"were made; pass the original weights")
            config = dataclasses.replace(config, weights_sha256=digest)
        if config.data_config is None:  # a new encoder: its preprocessing and tag as timm resolves them now
            pretrained_cfg = self.model.pretrained_cfg
            config = dataclasses.replace(
                config, data_config=data_config_for(config, pretrained_cfg,
                                                    getattr(self.model, "dynamic_img_size", False)),
                resolved_name=f"{pretrained_cfg['architecture']}.{pretrained_cfg['tag']}")
        self.config = config
        self.transform = create_transform(**self.config.data_config, is_training=False)
        self._frozen_modules: List[str] = []
        self._num_tokens: Optional[int] = None

    def load_weights_file(self, path) -> None:
        """Load a timm-format or official TinyViT state dict strictly; the classifier is dropped by name
        when this encoder has none (22k checkpoints carry a 21,841-class head)."""
        state_dict = load_state_dict_file(path)
        if is_official_tinyvit(state_dict):
            state_dict = official_tinyvit_filter_fn(state_dict)
        classifier = self.model.pretrained_cfg.get("classifier", "head.fc")
        if self.model.num_classes == 0 and isinstance(classifier, str):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(classifier + ".")}
        load_state_dict_strict(self.model, state_dict, path)

    def weights_fingerprint(self) -> str:
        """SHA-256 over the weights' names and bytes, whatever file format they came in."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            hash_tensor(digest, tensor)
        return digest.hexdigest()

    @property
    def feature_dim(self) -> int:
        if self.config.feature_type == "grid":
            return self.model.num_features
        if self.config.pooled_output == "head":
            return self.model.num_classes
        return getattr(self.model, "head_hidden_size", self.model.num_features)

    @property
    def num_tokens(self) -> int:
        """Grid tokens per image at the configured input size (1 for pooled features)."""
        if self.config.feature_type == "pooled":
            return 1
        if self._num_tokens is None:
            was_training = self.training
            self.eval()
            param = next(self.model.parameters())
            with torch.no_grad():
                x = torch.zeros(1, *self.config.data_config["input_size"], device=param.device, dtype=param.dtype)
                self._num_tokens = self(x).shape[1]
            self.train(was_training)
        return self._num_tokens

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An 8-bit RGB PIL image -> a normalised (3, H, W) tensor. Other modes are refused rather than guessed
        at: captioning.data.images (load_image, to_rgb) decides how they become RGB."""
        if image.mode != "RGB":
            raise ValueError(f"the encoder takes 8-bit RGB images, got mode {image.mode!r}; convert it with "
                             f"captioning.data.images.to_rgb")
        return self.transform(image)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(images)
        if self.config.feature_type == "grid":
            return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x  # (B, C, H, W) -> (B, H*W, C)
        if self.config.pooled_output == "head":
            return self.model.forward_head(x)
        return self.model.forward_head(x, pre_logits=True)  # (B, D)

    def freeze(self) -> None:
        """Freeze every weight (no gradients, BatchNorm statistics fixed)."""
        self.freeze_stages(None)

    def freeze_stages(self, num_stages: Optional[int]) -> None:
        """Freeze the stem and the first `num_stages` stages (None: everything; 0: nothing).

        The original encoder froze its patch embedding and first stage (`patch_embed`, `layers[0]`):
        `freeze_stages(1)`. Stages come from the model's timm group matcher, so this works for any timm model.
        A TinyViT stage of the official layout ends with the downsampling that timm puts at the start of the
        next stage (official `layers.N.downsample` is timm's `stages.N+1.downsample`), so that block is frozen
        with its stage, as the original froze it.
        """
        if num_stages is None:
            names = [""]
        elif num_stages <= 0:
            names = []
        else:
            groups = group_modules(self.model, self.model.group_matcher(coarse=True))
            names = [name for gid in sorted(groups)[: num_stages + 1] for name in groups[gid]]
            stages = getattr(self.model, "stages", [])
            if isinstance(self.model, TinyVit) and num_stages < len(stages) and \
                    isinstance(getattr(stages[num_stages], "downsample", None), nn.Module):
                names.append(f"stages.{num_stages}.downsample")
        for name in names:
            self.model.get_submodule(name).requires_grad_(False)
        self._frozen_modules = names
        self.train(self.training)

    def fold_batch_norms(self) -> int:
        """For inference: fold each BatchNorm2d into the convolution before it, wherever a block holds just the
        two (timm's ConvNorm in TinyViT and LeViT, ResNet's downsampling), with torch's `fuse_conv_bn_eval`.
        The normalisation then costs nothing (TinyViT-21M has 27 such passes).
        Features change only by rounding. A folded encoder stays in eval mode and is never saved, since its
        weights no longer have timm's names. Returns how many were folded."""
        if self.training:
            raise RuntimeError("fold_batch_norms() is for an encoder in eval mode (inference only)")
        folded = 0
        for module in self.model.modules():
            children = list(module.named_children())
            if isinstance(module, nn.Sequential) and len(children) == 2 and \
                    isinstance(children[0][1], nn.Conv2d) and isinstance(children[1][1], nn.BatchNorm2d):
                (conv_name, conv), (bn_name, bn) = children
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
        self._folded = self._folded or folded > 0
        return folded

    def train(self, mode: bool = True) -> "ImageEncoder":
        if mode and self._folded:
            raise RuntimeError("this encoder's BatchNorms were folded for inference; it cannot be trained")
        super().train(mode)
        for name in self._frozen_modules:  # frozen parts keep their BatchNorm statistics and no dropout
            self.model.get_submodule(name).eval()
        return self

    def save_pretrained(self, directory) -> None:
        """An encoder export: `config.json` + `model.safetensors` (timm names)."""
        if self._folded:
            raise RuntimeError("this encoder's BatchNorms were folded for inference; save the original encoder")
        with atomic_directory(directory) as tmp:
            (tmp / ENCODER_CONFIG_FILE).write_text(json.dumps(
                {"model_type": "image_encoder", "encoder": self.config.to_dict()}, indent=2))
            save_safetensors({k: v.contiguous() for k, v in self.model.state_dict().items()},
                             tmp / ENCODER_WEIGHTS_FILE, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory) -> "ImageEncoder":
        directory = Path(directory)
        config_path = directory / ENCODER_CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{directory}: not an encoder export ({ENCODER_CONFIG_FILE} missing)")
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
        if saved.get("model_type") != "image_encoder":
            raise CheckpointError(f"{config_path}: model_type is {saved.get('model_type')!r}, "
                                  f"expected 'image_encoder'")
        encoder = cls(EncoderConfig.from_dict(saved["encoder"]), load_weights=False)
        weights = directory / ENCODER_WEIGHTS_FILE
        load_state_dict_strict(encoder.model, load_state_dict_file(weights), weights)
        return encoder
