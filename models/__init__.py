"""The networks of the captioner: image encoder, mapping networks, prefix captioning model.

Importing this package has no side effects: no downloads, no device selection, no file access.
"""
import importlib

# Imported on first use (PEP 562), so that `models.choices` loads without torch.
_EXPORTS = {
    "CaptionerConfig": "models.captioner",
    "CheckpointError": "models.captioner",
    "ClipCaptionModel": "models.captioner",
    "EncoderConfig": "models.encoder",
    "ImageEncoder": "models.encoder",
    "MLP": "models.mapping",
    "TransformerMapper": "models.mapping",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
