"""Score captions with the standard COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE).

    python evaluate.py --predictions results.json --annotations captions_val2014.json
    python evaluate.py --predictions results.json --annotations dataset_coco.json --split test
    python evaluate.py --checkpoint DIR --images_root ./data/coco --annotations dataset_coco.json --split test

A predictions file is a COCO results file, `[{"image_id": 391895, "caption": "...", "beams": [...]}]`, one entry
per image (`beams`, every beam of a beam search, is optional and used only by --original_bleu; the `captions`
list predict.py writes with --num_captions is read as the beams). With
--checkpoint the split is captioned first (beam 5, every beam kept) and the predictions are written too.
Outputs go to --out_dir: metrics.json (corpus scores, coverage, per-image CIDEr and BLEU-4), scores_hist.png,
and predictions.json with --checkpoint. The work is captioning/evaluation.py's; this script is its command line.
"""
import argparse
import sys
from typing import Dict

from captioning.choices import ALL_METRICS
from captioning.cli import POSITIVE, add_precision_argument, add_quantize_argument, add_thread_arguments, device_name
from captioning.configs import EvaluateConfig, defaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score captions with the COCO caption metrics (pycocoevalcap).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", help="COCO results file, [{\"image_id\", \"caption\", \"beams\"?}], or the "
                                              "CSV file predict.py writes")
    source.add_argument("--checkpoint", help="export directory: caption the split with it, then score")
    p.add_argument("--annotations", required=True,
                   help="references: official COCO captions_*.json, Karpathy's dataset_coco.json (with --split), "
                        "or any format captioning.data.annotations reads, webdataset shards included (a .tar, a "
                        "brace pattern, a directory of .tar files or a list of them)")
    p.add_argument("--split",
                   help="Karpathy split of dataset_coco.json: test (the standard 5,000 images), val, ...")
    p.add_argument("--images_root",
                   help="--checkpoint: folder the annotation's file names are relative to (default %(default)s)")
    p.add_argument("--out_dir", help="where metrics.json, scores_hist.png (and predictions.json) go; default: "
                                     "<predictions>_eval or <checkpoint>_eval_<split>")
    p.add_argument("--metrics", nargs="+", choices=ALL_METRICS,
                   help="metrics to compute (default: all; SPICE is skipped with a note when not installed)")
    p.add_argument("--allow_partial", action="store_true",
                   help="score only the predicted images when some reference images have no prediction")
    p.add_argument("--allow_empty", action="store_true", help="score empty captions as 0 instead of refusing them")
    p.add_argument("--original_bleu", action="store_true",
                   help="also compute the original notebook's BLEU-4 (not comparable with papers)")
    p.add_argument("--beam_size", type=POSITIVE,
                   help="--checkpoint: beam width; every beam is kept (default %(default)s)")
    p.add_argument("--max_length", type=POSITIVE,
                   help="--checkpoint: most tokens per caption (default: the original's 67, or the most the "
                        "checkpoint's decoder holds after its prefix if fewer)")
    p.add_argument("--batch_size", type=POSITIVE, help="--checkpoint: images captioned together (default %(default)s)")
    p.add_argument("--max_images", type=POSITIVE, help="--checkpoint: caption only the first N images")
    p.add_argument("--device", type=device_name,
                   help="--checkpoint: torch device (default: cuda when available)")
    add_precision_argument(p, aliases=["--dtype"], what="--checkpoint: precision of the model while captioning")
    add_quantize_argument(p, what="--checkpoint: weights of the model while captioning")
    add_thread_arguments(p, workers=False)
    p.set_defaults(**defaults(EvaluateConfig))
    return p


def main(argv=None) -> Dict:
    """Flags -> an `EvaluateConfig` -> `captioning.evaluation.evaluate`; returns its report. A user's mistake is
    one line on stderr and exit status 1."""
    config = EvaluateConfig(**vars(build_parser().parse_args(argv)))
    from captioning.evaluation import USER_ERRORS, evaluate  # torch and transformers: after the flags
    try:
        return evaluate(config)
    except USER_ERRORS as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
