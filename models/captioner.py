"""The prefix captioning model: image feature -> mapping network -> prefix embeddings -> causal LM -> caption.

Exports are directories: `config.json` (everything needed to rebuild the model without a download),
`model.safetensors` (decoder included by default) and the tokenizer files. Loading is strict.
"""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

from models.checkpoint_io import CheckpointError, atomic_directory, load_state_dict_strict, save_safetensors
from models.choices import MAPPING_TYPES, mapper_reads
from models.decoders import build_decoder, decoder_config, embedding_width, hidden_states, load_decoder, \
    output_embeddings_key
from models.encoder import EncoderConfig, ImageEncoder
from models.hub import resolve_export
from models.lora import LoraSettings, add_adapters, is_adapter_key, merged_state
from models.mapping import MLP, TransformerMapper
from models.model_card import CARD_FILE, render_model_card
from models.quantize import is_quantized

MODEL_TYPE = "clip_caption_model"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_DIR = "adapters"  # an export's adapters-only export (train.py --export_adapters)
# 2 added `training` (what the model was trained on); 3: the decoder may be any causal LM, its config naming its
# model_type. Versions 1 and 2 (GPT-2 decoders) still load.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


@dataclass
class CaptionerConfig:
    mapping_type: str = "mlp"  # "mlp" | "transformer"
    prefix_length: int = 10  # decoder input embeddings the mapper produces
    prefix_length_clip: int = 10  # transformer mapper: tokens projected from a pooled feature
    num_layers: int = 8  # transformer mapper depth
    prefix_size: int = 576  # feature dimension D
    feature_type: str = "pooled"  # "pooled" (B, D) or "grid" (B, T, D)
    num_grid_tokens: Optional[int] = None  # T, for grid features
    mlp_sizes: Optional[List[int]] = None  # MLP layer sizes; None: the original (D, P*C/2, P*C)
    normalize_prefix: bool = False  # L2-normalise features before the mapper, in training and inference alike
    only_prefix: bool = False  # the decoder was frozen during training
    gpt2: str = "distilgpt2"  # hub name or directory the decoder (any causal LM) came from
    decoder: Optional[Dict] = None  # the decoder's config.to_dict(), model_type included: rebuilds it offline
    decoder_in_checkpoint: bool = True  # model.safetensors holds the decoder weights
    eos_token_ids: List[int] = field(default_factory=list)  # a caption ends at any of these (the learned one first)
    encoder: Optional[Dict] = None  # EncoderConfig.to_dict(): encoder name, weights source, preprocessing
    encoder_in_checkpoint: bool = False  # model.safetensors holds the encoder weights (end-to-end training)
    lora: Optional[Dict] = None  # LoraSettings.to_dict(): adapters on the decoder (merged: already in its weights)
    source: str = "tinytiny"  # "original" for checkpoints imported from the original code
    # What the model was trained on and how (train.py fills it): data, kind (features or images), dataset
    # ("shapes" for the synthetic shapes dataset), number of captions, stage, command and license.
    training: Optional[Dict] = None

    def __post_init__(self):
        if self.mapping_type not in MAPPING_TYPES:
            raise ValueError(f"mapping_type must be 'mlp' or 'transformer', got {self.mapping_type!r}")
        if self.feature_type == "grid" and (not mapper_reads(self.mapping_type, "grid") or not self.num_grid_tokens):
            raise ValueError("grid features need mapping_type 'transformer' and num_grid_tokens")

    def to_dict(self) -> Dict:
        return dict(model_type=MODEL_TYPE, format_version=FORMAT_VERSION, **dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Dict, source="config") -> "CaptionerConfig":
        d = dict(d)
        if d.pop("model_type", None) != MODEL_TYPE:
            raise CheckpointError(f"{source}: not a captioner config (model_type must be {MODEL_TYPE!r})")
        version = d.pop("format_version", None)
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"{source}: format_version {version!r}, this code reads {READABLE_VERSIONS}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{source}: unknown config keys {unknown}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from e


def build_mapper(config: CaptionerConfig, n_embd: int) -> nn.Module:
    """The mapping network from features to `prefix_length` embeddings of width `n_embd` (the decoder's)."""
    if config.mapping_type == "mlp":
        sizes = config.mlp_sizes or [config.prefix_size, n_embd * config.prefix_length // 2,
                                     n_embd * config.prefix_length]
        return MLP(tuple(sizes))
    grid_tokens = config.num_grid_tokens if config.feature_type == "grid" else None
    return TransformerMapper(config.prefix_size, n_embd, config.prefix_length, config.prefix_length_clip,
                             config.num_layers, grid_tokens=grid_tokens)


class ClipCaptionModel(nn.Module):
    """Mapper (`clip_project`) + decoder (`gpt`, any causal LM; a GPT-2 in the original, whose names are kept so
    that its state dicts map one to one); optionally the image encoder (`encoder`) for end-to-end training."""

    def __init__(self, config: CaptionerConfig, gpt: Optional[PreTrainedModel] = None,
                 encoder: Optional[ImageEncoder] = None):
        super().__init__()
        if gpt is None:
            if config.decoder is None:
                raise ValueError("config.decoder is empty: pass a decoder or use ClipCaptionModel.create")
            gpt = build_decoder(decoder_config(config.decoder))
        self.gpt = gpt
        self.config = dataclasses.replace(config, decoder=gpt.config.to_dict())
        self.lora = LoraSettings.from_dict(config.lora) if config.lora else None
        if self.adapted:
            add_adapters(gpt, self.lora)
        self.prefix_length = config.prefix_length
        self.clip_project = build_mapper(config, embedding_width(gpt))
        self.encoder = None
        if encoder is not None:
            self.attach_encoder(encoder)
        if config.only_prefix:
            self.freeze_decoder()

    @property
    def adapted(self) -> bool:
        """The decoder holds LoRA adapters apart from its frozen weights."""
        return self.lora is not None and not self.lora.merged

    def add_lora(self, settings: LoraSettings) -> None:
        """Adapters on a decoder that holds none (a new run, or an export whose adapters were merged)."""
        if self.adapted:
            raise ValueError("the decoder already holds LoRA adapters; they are trained on")
        self.lora = settings
        self.config.lora = settings.to_dict()
        add_adapters(self.gpt, settings)

    def attach_encoder(self, encoder: ImageEncoder) -> None:
        """Hold the image encoder, so that exports carry its weights and preprocessing."""
        self.encoder = encoder
        self.config.encoder = encoder.config.to_dict()
        self.config.encoder_in_checkpoint = True

    @classmethod
    def create(cls, config: CaptionerConfig, encoder: Optional[ImageEncoder] = None) -> "ClipCaptionModel":
        """A new model whose decoder starts from `config.gpt2` (hub name or local directory)."""
        return cls(config, gpt=load_decoder(config.gpt2), encoder=encoder)

    def freeze_decoder(self) -> None:
        """`only_prefix`: no decoder gradients are computed or stored, and the decoder stays in eval mode."""
        self.config.only_prefix = True
        self.gpt.requires_grad_(False)
        self.gpt.eval()

    def train(self, mode: bool = True) -> "ClipCaptionModel":
        super().train(mode)
        if self.config.only_prefix:
            self.gpt.eval()
        return self

    def prefix_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, D) or (B, T, D) -> prefix embeddings (B, prefix_length, C)."""
        if self.config.normalize_prefix:
            features = features / features.norm(p=2, dim=-1, keepdim=True)
        # An int8 MLP mapper (models/quantize.py) holds no float parameters; its layers take fp32.
        features = features.to(next(self.clip_project.parameters(), torch.empty(0)).dtype)
        prefix = self.clip_project(features)
        return prefix.reshape(features.shape[0], self.prefix_length, -1)

    def features_from(self, prefix: Optional[torch.Tensor] = None,
                      images: Optional[torch.Tensor] = None) -> torch.Tensor:
        if images is None:
            return prefix
        if self.encoder is None:
            raise ValueError("this model holds no image encoder; pass precomputed features")
        return self.encoder(images)

    def embed(self, tokens: torch.Tensor, prefix=None, images=None) -> torch.Tensor:
        prefix_emb = self.prefix_embeddings(self.features_from(prefix, images))
        token_emb = self.token_embeddings(tokens)
        return torch.cat((prefix_emb.to(token_emb.dtype), token_emb), dim=1)  # (B, P + T, C)

    def forward(self, tokens: torch.Tensor, prefix: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over the prefix and caption positions, (B, P + T, V), as the original forward."""
        attention_mask = None
        if mask is not None:
            ones = torch.ones(tokens.shape[0], self.prefix_length, dtype=mask.dtype, device=mask.device)
            attention_mask = torch.cat((ones, mask), dim=1)
        return self.gpt(inputs_embeds=self.embed(tokens, prefix, images), attention_mask=attention_mask).logits

    def loss(self, tokens: torch.Tensor, prefix: Optional[torch.Tensor] = None,
             mask: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cross-entropy over the caption tokens; padded positions (mask 0) get label -100.

        Captions are right-padded, and with causal attention a padded position can only influence later
        (padded) positions, so no attention mask is needed and the fused causal attention kernel applies.
        The vocabulary projection runs only at labelled positions, not at the prefix or the padding.
        """
        labels = tokens if mask is None else tokens.masked_fill(mask == 0, -100)
        keep = labels != -100
        logits = self.caption_logits(tokens, keep, self.embed(tokens, prefix, images))
        return F.cross_entropy(logits.float(), labels[keep])

    def caption_logits(self, tokens: torch.Tensor, keep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (N, V) predicting the caption tokens where `keep` (B, T) is true, from the
        prefix-and-caption embeddings (B, P + T, C); the vocabulary projection runs at those positions only."""
        hidden = hidden_states(self.gpt, inputs_embeds=embeds)
        hidden = hidden[:, self.prefix_length - 1:-1]  # position i predicts caption token i
        return self.gpt.get_output_embeddings()(hidden[keep])

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's input embeddings of token ids (B, T) -> (B, T, C)."""
        return self.gpt.get_input_embeddings()(tokens)

    # ---- export directories -------------------------------------------------------------------------------

    def frozen_base_keys(self) -> List[str]:
        """A LoRA run's frozen decoder weights: resume checkpoints leave them out (they load from the source)."""
        if not self.adapted:
            return []
        return [k for k in self.state_dict() if k.startswith("gpt.") and not is_adapter_key(k)]

    def checkpoint_state(self) -> Dict[str, torch.Tensor]:
        """The weights a resume checkpoint holds: all but `frozen_base_keys`."""
        frozen = set(self.frozen_base_keys())
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def _tied_keys(self) -> List[str]:
        key = output_embeddings_key(self.gpt)
        return [f"gpt.{key}"] if key else []

    def save_pretrained(self, directory, tokenizer=None, include_decoder: bool = True,
                        adapters_only: bool = False, with_adapters: bool = False) -> None:
        """Write `config.json`, `model.safetensors`, the tokenizer and the model card (README.md) atomically into
        `directory`. LoRA adapters are merged into the decoder's weights, unless `adapters_only`: then they are
        written without the decoder's weights, which load from the base decoder `config.gpt2`. `with_adapters`
        also writes that adapters-only export into `directory/adapters`."""
        if is_quantized(self):
            raise ValueError("this model holds int8 layers, which exports do not store: int8 weights are made at "
                             "load (Captioner.from_pretrained(..., quantize='int8')); save the fp32 model")
        if (adapters_only or with_adapters) and not self.adapted:
            raise ValueError("this model's decoder holds no LoRA adapters to write apart")
        with atomic_directory(directory) as tmp:
            self._write_export(tmp, tokenizer, include_decoder, adapters_only)
            if with_adapters:
                self._write_export(tmp / ADAPTERS_DIR, tokenizer, False, adapters_only=True)

    def _write_export(self, folder: Path, tokenizer, include_decoder: bool, adapters_only: bool) -> None:
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("gpt.")}
        config = dataclasses.replace(self.config, decoder_in_checkpoint=include_decoder and not adapters_only)
        if adapters_only:
            state.update((k, v) for k, v in self.state_dict().items() if k.startswith("gpt.") and is_adapter_key(k))
        elif include_decoder and self.adapted:
            state.update((f"gpt.{k}", v) for k, v in merged_state(self.gpt).items())
            config.lora = dataclasses.replace(self.lora, merged=True).to_dict()
        elif include_decoder:
            state.update((k, v) for k, v in self.state_dict().items() if k.startswith("gpt."))
        skip = set(self._tied_keys())
        state = {k: v.detach().contiguous() for k, v in state.items() if k not in skip}
        folder.mkdir(exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        save_safetensors(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        (folder / CARD_FILE).write_text(render_model_card(config.to_dict()), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory, device=None) -> "ClipCaptionModel":
        """Rebuild from `config.json` alone, then load `model.safetensors` strictly. `directory` may also be a
        Hugging Face Hub repository id, `user/name[@revision]` (models/hub.py)."""
        directory = resolve_export(directory)
        config = read_config(directory)
        gpt = None if config.decoder_in_checkpoint else load_decoder(config.gpt2)
        encoder = None
        if config.encoder_in_checkpoint:
            encoder = ImageEncoder(EncoderConfig.from_dict(config.encoder), load_weights=False)
        model = cls(config, gpt=gpt, encoder=encoder)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
        try:
            with safe_open(str(weights), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for truncated or garbled files
            raise CheckpointError(f"{weights}: not a readable safetensors file (corrupt or truncated?): {e}") from e
        optional = set(model._tied_keys())
        if not config.decoder_in_checkpoint:  # the base decoder's weights come from its source; adapters do not
            base = {k: v for k, v in model.state_dict().items() if k.startswith("gpt.") and not is_adapter_key(k)}
            optional |= set(base)
            state.update((k, v) for k, v in base.items() if k not in state)
        load_state_dict_strict(model, state, weights, optional_missing=optional)
        return model.to(device) if device is not None else model


def read_config(directory: Path) -> CaptionerConfig:
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file, but an export directory (config.json + model.safetensors) is expected; "
            f"convert a checkpoint of the original code with `python convert_checkpoint.py --checkpoint "
            f"{directory} --out_dir DIR`")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: {CONFIG_FILE} is missing: not an export directory written by "
                              f"train.py or convert_checkpoint.py")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return CaptionerConfig.from_dict(raw, source=path)
