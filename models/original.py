"""Checkpoints of the original ClipCap / Tini-Tiny code: their weight names onto ours, in one place.

`original_filter_fn` is the mapping, as timm keeps one per foreign checkpoint format (`checkpoint_filter_fn`):
the state dict without the buffers current transformers rejects, and the model's sizes read from its shapes.
`from_original_state_dict` builds the captioner from it (convert_checkpoint.py's first conversion).
"""
import re
from typing import Dict, Tuple, Union

import torch
from transformers import GPT2Config

from models.captioner import CaptionerConfig, ClipCaptionModel
from models.checkpoint_io import CheckpointError, load_state_dict_strict
from models.encoder import EncoderConfig, ImageEncoder

# Whether the original inference L2-normalised the image feature before the mapper: both transformer inference
# notebooks (ClipCap's and Tini-Tiny's) divide it by its norm, the MLP notebook does not. The original trained
# without normalising either way, so a converted checkpoint decodes as its notebook did.
ORIGINAL_INFERENCE_NORMALISES = {"transformer": True, "mlp": False}
# transformers 4.x wrote the causal-mask buffers into state dicts; current versions reject them.
LEGACY_GPT2_BUFFER = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
ORIGINAL_SIZE_KEYS = {
    "mapping_type": "clip_project.prefix_const (transformer) or clip_project.model.* (MLP)",
    "prefix_length": "clip_project.prefix_const rows, or the MLP's output size / n_embd",
    "prefix_length_clip": "clip_project.linear.weight rows / n_embd",
    "num_layers": "clip_project.transformer.layers.*",
    "prefix_size": "the mapper's input columns",
}


def infer_original_sizes(state_dict: Dict[str, torch.Tensor], source) -> Dict:
    if not any(k.startswith("gpt.") for k in state_dict) or not any(k.startswith("clip_project.")
                                                                       for k in state_dict):
        raise CheckpointError(f"{source}: not a ClipCap state dict (expected keys gpt.* and clip_project.*)")
    if "gpt.transformer.wte.weight" not in state_dict:
        raise CheckpointError(f"{source}: key 'gpt.transformer.wte.weight' is missing")
    n_embd = state_dict["gpt.transformer.wte.weight"].shape[1]
    if "clip_project.prefix_const" in state_dict:
        layers = {int(m[1]) for k in state_dict if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))}
        linear = state_dict.get("clip_project.linear.weight")
        if linear is None:
            raise CheckpointError(f"{source}: key 'clip_project.linear.weight' is missing")
        return dict(mapping_type="transformer", prefix_length=state_dict["clip_project.prefix_const"].shape[0],
                    prefix_length_clip=linear.shape[0] // n_embd, num_layers=len(layers),
                    prefix_size=linear.shape[1])
    weights = sorted((int(m[1]), v) for k, v in state_dict.items()
                     if (m := re.match(r"clip_project\.model\.(\d+)\.weight$", k)))
    if not weights:
        raise CheckpointError(f"{source}: neither clip_project.prefix_const (transformer mapper) nor "
                              f"clip_project.model.0.weight (MLP mapper) is present")
    sizes = [weights[0][1].shape[1]] + [w.shape[0] for _, w in weights]
    if sizes[-1] % n_embd:
        raise CheckpointError(f"{source}: the MLP's output size {sizes[-1]} is not a multiple of n_embd {n_embd}")
    prefix_length = sizes[-1] // n_embd
    standard = [sizes[0], n_embd * prefix_length // 2, n_embd * prefix_length]
    return dict(mapping_type="mlp", prefix_length=prefix_length, prefix_size=sizes[0],
                mlp_sizes=None if sizes == standard else sizes)


def check_decoder_shapes(state_dict: Dict[str, torch.Tensor], config: GPT2Config, source) -> None:
    expected = {
        "gpt.transformer.wte.weight": (config.vocab_size, config.n_embd),
        "gpt.transformer.wpe.weight": (config.n_positions, config.n_embd),
    }
    for key, shape in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state_dict[key].shape)} but the GPT-2 "
                                  f"config expects {shape}; pass the matching --gpt2 config")
    layers = {int(m[1]) for k in state_dict if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.", k))}
    if len(layers) != config.n_layer:
        raise CheckpointError(f"{source}: the weights hold {len(layers)} GPT-2 layers (gpt.transformer.h.*) but "
                              f"the GPT-2 config has n_layer={config.n_layer}; pass the matching --gpt2 config")


def original_filter_fn(state_dict: Dict[str, torch.Tensor], decoder_config: GPT2Config,
                       source="state dict") -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(the state dict as our model loads it, the sizes its shapes give): the causal-mask buffers of
    transformers 4.x dropped, the mapper's kind and sizes inferred, the decoder's shapes checked against
    `decoder_config`; a state dict of another kind is a CheckpointError naming `source`."""
    state_dict = {k: v for k, v in state_dict.items() if not LEGACY_GPT2_BUFFER.match(k)}
    sizes = infer_original_sizes(state_dict, source)
    check_decoder_shapes(state_dict, decoder_config, source)
    return state_dict, sizes


def from_original_state_dict(state_dict: Dict[str, torch.Tensor], decoder_config: GPT2Config,
                             source="state dict", encoder: Union[ImageEncoder, EncoderConfig, None] = None,
                             **sizes) -> ClipCaptionModel:
    """Import a state dict saved by the original ClipCap / Tini-Tiny `train.py`.

    Sizes (`mapping_type`, `prefix_length`, `prefix_length_clip`, `num_layers`, `prefix_size`) are
    inferred from tensor shapes; any given in `sizes` must agree. `decoder_config` gives the GPT-2
    hyperparameters shapes cannot tell (number of heads); its shapes are checked against the weights.
    Other `sizes` keys (`normalize_prefix`, `eos_token_ids`, `gpt2`) go into the config; `normalize_prefix`
    left out (or None) is what the original inference did for the mapper kind (ORIGINAL_INFERENCE_NORMALISES).
    `encoder` is the encoder the features came from: a module to hold (its weights are exported), or only its
    config.
    """
    state_dict, inferred = original_filter_fn(state_dict, decoder_config, source)
    for key, value in sizes.items():
        if key in inferred and value is not None and value != inferred[key]:
            raise CheckpointError(f"{source}: {key}={value} was given but the weights have {key}="
                                  f"{inferred[key]} ({ORIGINAL_SIZE_KEYS[key]})")
    extra = {k: v for k, v in sizes.items() if k not in inferred and v is not None}
    extra.setdefault("normalize_prefix", ORIGINAL_INFERENCE_NORMALISES[inferred["mapping_type"]])
    config = CaptionerConfig(**inferred, source="original", decoder=decoder_config.to_dict(), **extra)
    if isinstance(encoder, EncoderConfig):
        config.encoder = encoder.to_dict()
    model = ClipCaptionModel(config)
    load_state_dict_strict(model, state_dict, source)
    if isinstance(encoder, ImageEncoder):
        model.attach_encoder(encoder)
    return model
