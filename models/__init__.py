"""The networks of the captioner: image encoder, mapping networks, prefix captioning model.

Importing this package has no side effects: no downloads, no device selection, no file access.
"""
from models.captioner import CaptionerConfig, ClipCaptionModel, CheckpointError
from models.encoder import EncoderConfig, ImageEncoder
from models.mapping import MLP, TransformerMapper

__all__ = [
    "CaptionerConfig",
    "CheckpointError",
    "ClipCaptionModel",
    "EncoderConfig",
    "ImageEncoder",
    "MLP",
    "TransformerMapper",
]
