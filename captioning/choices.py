"""The choices the scripts' flags offer, importable without torch: flags are parsed and checked, and `--help`
printed, before the seconds that importing torch, timm and transformers takes."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# --amp none, --dtype float32, torch's names: each means one of PRECISIONS.
PRECISION_ALIASES = {"none": "fp32", "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                     "half": "fp16"}
ANNOTATION_FORMATS = ("auto", "list", "coco", "karpathy", "csv")
FEATURE_DTYPES = ("float16", "float32")  # how a features pickle may store its features


def normalize_precision(value: str) -> str:
    """One of PRECISIONS, from it or from an alias; ValueError names the accepted spellings."""
    name = PRECISION_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {value!r}: expected one of {', '.join(PRECISIONS)} (or "
                         f"{', '.join(sorted(PRECISION_ALIASES))})")
    return name
