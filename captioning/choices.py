"""The choices the scripts' flags offer and the parsers of their values, importable without torch: flags are
parsed and checked, and `--help` printed, before the seconds that importing torch, timm and transformers takes."""

import json

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "int8")  # --quantize: int8 decoder and mapper weights on a CPU (models/quantize.py)
# --amp none, --dtype float32, torch's names: each means one of PRECISIONS.
PRECISION_ALIASES = {"none": "fp32", "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                     "half": "fp16"}
ANNOTATION_FORMATS = ("auto", "list", "coco", "karpathy", "csv", "webdataset")
FEATURE_DTYPES = ("float16", "float32")  # how a features pickle may store its features
ALL_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")  # the COCO caption metrics evaluate.py computes


def json_object(text: str) -> dict:
    """A JSON object given as text (`--encoder_kwargs '{"drop_path_rate": 0}'`), or a ValueError saying why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg}): {text!r}") from e
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object such as '{{\"drop_path_rate\": 0}}', got {text!r}")
    return value


def normalize_precision(value: str) -> str:
    """One of PRECISIONS, from it or from an alias; ValueError names the accepted spellings."""
    name = PRECISION_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {value!r}: expected one of {', '.join(PRECISIONS)} (or "
                         f"{', '.join(sorted(PRECISION_ALIASES))})")
    return name
