"""Low-rank adapters (LoRA) on the decoder, through peft: the base decoder stays frozen and unchanged, the adapters
learn with the mapper.

The adapters are injected into the decoder in place (`peft.inject_adapter_in_model`), so the decoder keeps its
class and its interface (models/decoders.py) and the captioner's state-dict names stay `gpt.` + the decoder's
own. An export merges them into the decoder's weights by default, giving a plain decoder that loads with nothing
new; an adapters-only export holds the adapters and names the base decoder.
"""
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from models.checkpoint_io import CheckpointError, hash_tensor

ADAPTER = "default"  # peft's adapter name; one adapter per decoder
# Attention and MLP projections of each architecture: the targets of --lora_targets by default.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj: the attention's output and the MLP's
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


@dataclass
class LoraSettings:
    r: int
    alpha: float
    dropout: float = 0.0
    targets: List[str] = field(default_factory=list)
    merged: bool = False  # the export's decoder weights include the adapters, which are then not separate

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict, source="config") -> "LoraSettings":
        try:
            return cls(**d)
        except TypeError as e:
            raise CheckpointError(f"{source}: invalid lora settings {d}: {e}") from e


def default_targets(model_type: str) -> List[str]:
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA targets for a {model_type!r} decoder; name its attention and MLP "
                         f"projections with --lora_targets")
    return list(DEFAULT_TARGETS[model_type])


def add_adapters(decoder: nn.Module, settings: LoraSettings) -> None:
    """Inject LoRA adapters into `decoder`'s target modules and freeze everything else of the decoder."""
    from peft import LoraConfig, inject_adapter_in_model

    found = {name.rsplit(".", 1)[-1] for name, _ in decoder.named_modules()}
    unknown = [t for t in settings.targets if t not in found]
    if unknown:
        raise ValueError(f"--lora_targets {unknown}: the {decoder.config.model_type} decoder has no module of that "
                         f"name; its linear layers are named {sorted(linear_names(decoder))}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none",
                        fan_in_fan_out=decoder.config.model_type == "gpt2")  # GPT-2's Conv1D stores W transposed
    inject_adapter_in_model(config, decoder, adapter_name=ADAPTER)
    for name, parameter in decoder.named_parameters():
        parameter.requires_grad_(is_adapter_key(name))


def linear_names(decoder: nn.Module) -> set:
    return {name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"}


def is_adapter_key(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def merged_state(decoder: nn.Module) -> Dict[str, torch.Tensor]:
    """The decoder's state dict with each adapter added into its base weight (peft's `get_delta_weight`) under
    the base layer's own name: the state dict of a plain decoder, as if never adapted."""
    from peft.tuners.lora import LoraLayer

    state = {}
    adapted = {name: module for name, module in decoder.named_modules() if isinstance(module, LoraLayer)}
    for name, tensor in decoder.state_dict().items():
        if is_adapter_key(name):
            continue
        owner, _, leaf = name.rpartition(".")
        layer = owner.removesuffix(".base_layer")
        if owner.endswith(".base_layer") and layer in adapted:
            name = f"{layer}.{leaf}"
            if leaf == "weight":
                tensor = tensor + adapted[layer].get_delta_weight(ADAPTER).to(tensor.dtype)
        state[name] = tensor.detach()
    return state


def base_fingerprint(decoder: nn.Module) -> str:
    """A digest of the frozen base weights: a resumed LoRA run checks that its base decoder is the same."""
    digest = hashlib.sha256()
    for name, tensor in sorted(decoder.state_dict().items()):
        if not is_adapter_key(name):
            digest.update(name.encode())
            hash_tensor(digest, tensor)
    return digest.hexdigest()[:16]


def lora_settings(config, model_type: str) -> Optional[LoraSettings]:
    """The adapters train.py's `config` (a TrainConfig) asks for on a `model_type` decoder, or None."""
    if config.lora_r is None:
        return None
    return LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        targets=list(config.lora_targets or default_targets(model_type)))
