"""The two conversions convert_checkpoint.py makes: a captioner saved by the original code -> an export directory
(`convert_captioner`), and an official TinyViT release file -> a timm-format encoder export (`convert_tinyvit`).

The mapping of the original's weight names onto ours is models/original.py's; this module builds the parts around
it (the tokenizer, the decoder's config, the encoder) and writes the export.
"""
from transformers import AutoTokenizer, GPT2Config

from captioning.configs import ConvertConfig
from models.captioner import ClipCaptionModel
from models.checkpoint_io import CheckpointError, load_state_dict_file
from models.encoder import EncoderConfig, ImageEncoder
from models.original import from_original_state_dict


def encoder_config(config: ConvertConfig, weights: str, default_preprocessing: str) -> EncoderConfig:
    return EncoderConfig.from_flags(encoder=config.encoder, clip_model_type=config.clip_model_type, weights=weights,
                                    feature_type=config.feature_type,
                                    preprocessing=config.preprocessing or default_preprocessing)


def convert_captioner(config: ConvertConfig) -> ClipCaptionModel:
    """`config.checkpoint` (a state dict of the original train.py) -> an export in `config.out_dir`; captions end
    at ".", as the original decoded them."""
    tokenizer = AutoTokenizer.from_pretrained(config.gpt2)
    stop = tokenizer.encode(".")
    if len(stop) != 1:
        raise CheckpointError(f"the tokenizer of {config.gpt2} does not encode '.' as one token; original "
                              f"checkpoints are decoded until '.'")
    enc_config = encoder_config(config, config.encoder_weights, "clip")
    # A weights file is embedded in the export; 'pretrained' stays a reference that timm resolves at inference.
    encoder = ImageEncoder(enc_config) if enc_config.weights not in ("pretrained", "random") else enc_config
    model = from_original_state_dict(
        load_state_dict_file(config.checkpoint), GPT2Config.from_pretrained(config.gpt2), source=config.checkpoint,
        encoder=encoder, mapping_type=config.mapping_type, prefix_length=config.prefix_length,
        prefix_length_clip=config.prefix_length_clip, num_layers=config.num_layers,
        normalize_prefix=config.normalize_prefix, eos_token_ids=stop, gpt2=config.gpt2)
    model.save_pretrained(config.out_dir, tokenizer=tokenizer)
    return model


def convert_tinyvit(config: ConvertConfig) -> ImageEncoder:
    """`config.tinyvit` (an official TinyViT release file) -> an encoder export in `config.out_dir`."""
    encoder = ImageEncoder(encoder_config(config, config.tinyvit, "timm"))
    encoder.save_pretrained(config.out_dir)
    return encoder
