"""The choices the networks offer, importable without torch (flags are checked before torch is imported):
decoding methods and their limits, mapper and feature types, and the original scripts' CLIP encoders."""

DECODINGS = ("beam", "greedy", "nucleus")
DEFAULT_MAX_LENGTH = 67  # most tokens per caption, stop token included: the original's entry_length
DEFAULT_BEAM_SIZE = 5  # the original's beam_size
DEFAULT_TOP_P = 0.8  # nucleus sampling's probability mass: the original generate2's top_p
# Logits divided by less than 0.01 overflow to inf in fp16 and bf16 (nan after the softmax); above 100 every token
# is about equally likely.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0

# Licenses an export's model card may name (the Hub's identifiers); train.py --license picks one.
LICENSES = ("mit", "apache-2.0", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "other")
MAPPING_TYPES = ("mlp", "transformer")
FEATURE_TYPES = ("pooled", "grid")


def mapper_reads(mapping_type: str, feature_type: str) -> bool:
    """The one rule between the two: grid features are a sequence of tokens, which only the transformer mapper
    reads; both read pooled vectors."""
    return feature_type != "grid" or mapping_type == "transformer"

# The original scripts' OpenAI CLIP encoders, as timm image towers; their feature is the projected embedding.
CLIP_MODEL_TYPES = {
    "ViT-B/32": "vit_base_patch32_clip_224.openai",
    "RN50": "resnet50_clip.openai",
    "RN101": "resnet101_clip.openai",
    "RN50x4": "resnet50x4_clip.openai",
}
