"""train.py --init_from: fine-tune an export (train.py's or convert_checkpoint.py's) instead of a new model.

The export decides the architecture and how features enter the mapper: its mapping type, prefix sizes, mapper
depth, decoder and `normalize_prefix` replace the flags' defaults, so a converted transformer checkpoint keeps
dividing features by their norm, as it decodes. A flag given with another value than the export's is an error
rather than silently ignored; the features must be of the kind and size the export's mapper takes.
"""
import json
from pathlib import Path
from typing import Dict, Optional, Set

from transformers import AutoTokenizer

from captioning.training.config import ARCHITECTURE_FLAGS, ENCODER_FLAGS, TrainConfig
from models.captioner import ClipCaptionModel, read_config
from models.decoders import decoder_config
from models.lora import lora_settings

ENCODER_IDENTITY = ("name", "feature_type", "pooled_output", "preprocessing")


def adopt_export_config(config: TrainConfig, given: Set[str]) -> TrainConfig:
    """`config` with the architecture fields of its --init_from export (recorded as such in train_args.json);
    a field in `given` (set on the command line) must agree with the export. With --train_encoder the export's
    encoder is trained on: the encoder flags are its, and giving one is an error."""
    export = read_config(Path(config.init_from))
    for name in ARCHITECTURE_FLAGS:
        given_value, kept = getattr(config, name), getattr(export, name)
        if name in given and given_value != kept:
            raise ValueError(f"--{name} {given_value} conflicts with --init_from {config.init_from}, whose config "
                             f"has {name}={kept!r}: fine-tuning keeps the export's architecture (leave --{name} out)")
    changes = {name: getattr(export, name) for name in ARCHITECTURE_FLAGS}
    if config.train_encoder:
        if not export.encoder_in_checkpoint:
            raise ValueError(f"--init_from {config.init_from} holds no encoder weights (it was trained on features): "
                             f"--train_encoder needs an export trained end to end; leave --train_encoder out to "
                             f"fine-tune on features")
        encoder = export.encoder
        kept = dict(encoder=encoder["name"], encoder_weights=encoder["weights"], image_size=encoder["image_size"],
                    feature_type=encoder["feature_type"], encoder_kwargs=json.dumps(encoder["model_kwargs"]))
        for name in ENCODER_FLAGS:
            value = getattr(config, name)
            same = json.loads(value) == encoder["model_kwargs"] if name == "encoder_kwargs" else value == kept[name]
            if name in given and not same:
                raise ValueError(f"--{name} {value}: with --init_from and --train_encoder the export's encoder is "
                                 f"trained on, as its config records it ({name}={kept[name]!r}); leave it out")
        changes.update(kept)
    return config.replace(**changes)


def load_tokenizer(config: TrainConfig):
    """The export's own tokenizer where it holds one (as predict.py loads it), else its decoder's."""
    directory = Path(config.init_from)
    if not (directory / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(config.gpt2)
    # The decoder's config, not the export's config.json, which transformers does not know
    decoder = decoder_config(read_config(directory).decoder, directory)
    return AutoTokenizer.from_pretrained(str(directory), config=decoder)


def model_from_export(config: TrainConfig, model: ClipCaptionModel, inputs, eos_token_id: int) -> ClipCaptionModel:
    """The --init_from export's model (loaded once: with --train_encoder its encoder also prepared the images),
    checked against the training features, with --only_prefix applied."""
    c = model.config
    wanted = (c.feature_type, c.prefix_size, c.num_grid_tokens if c.feature_type == "grid" else None)
    got = (inputs.feature_type, inputs.prefix_size, inputs.num_grid_tokens)
    if wanted != got:
        raise ValueError(f"{config.data or config.annotations} holds {got[0]} features of dimension {got[1]}"
                         + (f" ({got[2]} tokens)" if got[2] else "") + f", but the mapper of --init_from "
                         f"{config.init_from} takes {wanted[0]} features of dimension {wanted[1]}"
                         + (f" ({wanted[2]} tokens)" if wanted[2] else ""))
    differs = _encoder_difference(c.encoder, inputs.encoder_config)
    if differs:
        raise ValueError(f"{config.data} was made by another encoder than --init_from {config.init_from} records "
                         f"({differs}); fine-tune on features of the encoder it was trained on")
    c.encoder = inputs.encoder_config or c.encoder
    c.source = "tinytiny"  # the exports written from here on are this code's training
    if eos_token_id not in c.eos_token_ids:  # training ends every caption with it
        c.eos_token_ids = [*c.eos_token_ids, eos_token_id]
    settings = lora_settings(config, model.gpt.config.model_type)
    if model.adapted and settings and (settings.r, settings.targets) != (model.lora.r, model.lora.targets):
        raise ValueError(f"--init_from {config.init_from} holds LoRA adapters of rank {model.lora.r} on "
                         f"{model.lora.targets}, which are trained on; leave --lora_r and --lora_targets out or "
                         f"give the same")
    if settings and not model.adapted:  # new adapters on the export's decoder (its own merged in)
        model.add_lora(settings)
    if config.only_prefix:
        model.freeze_decoder()
    elif model.adapted:
        c.only_prefix = False
        model.gpt.train()
    else:
        c.only_prefix = False
        model.gpt.requires_grad_(True)
        model.gpt.train()
    if config.train_encoder:  # trained on as cross-entropy trains it: the stem and first stages frozen
        model.encoder.requires_grad_(True)
        model.encoder.freeze_stages(config.frozen_stages)
    return model


def _encoder_difference(recorded: Optional[Dict], features: Optional[Dict]) -> str:
    if not recorded or not features:
        return ""
    keys = [k for k in ENCODER_IDENTITY if recorded.get(k) != features.get(k)]
    return ", ".join(f"{k} {features.get(k)!r} against {recorded.get(k)!r}" for k in keys)
