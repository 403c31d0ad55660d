"""Caption images with an exported captioner: the command line of captioning/prediction.py, which captions through
the `Captioner` API (captioning/inference.py, also importable from here).

    python predict.py --checkpoint DIR --image a.jpg b.jpg
    python predict.py --checkpoint DIR --images_dir val2014/ --out captions.json
    python predict.py --checkpoint DIR --image a.jpg --decoding nucleus --num_captions 3 --seed 0

    from predict import Captioner
    captioner = Captioner.from_pretrained("checkpoints/coco_prefix_latest", device="cuda")
    captioner.caption(["a.jpg", "b.jpg"])        # ['A man riding a wave on a surfboard.', ...]
"""
import argparse
import sys
from pathlib import Path

from captioning.cli import (POSITIVE, SEED, TEMPERATURE, add_precision_argument, add_thread_arguments,
                            device_name, number)
from models.choices import DECODINGS, DEFAULT_BEAM_SIZE, DEFAULT_TOP_P


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Caption images with a checkpoint exported by train.py or "
                                            "convert_checkpoint.py.")
    p.add_argument("--checkpoint", required=True, help="export directory (config.json, model.safetensors, "
                                                       "tokenizer files)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="image file(s) to caption")
    source.add_argument("--images_dir", help="caption every image file in this directory (not recursive)")
    source.add_argument("--features", help="caption the precomputed features of a features pickle "
                                           "written by parse_coco.py (one caption per image)")
    p.add_argument("--out", help="write the captions to this file: .json (COCO results format) or .csv; "
                                 "without it they are printed")
    p.add_argument("--decoding", choices=DECODINGS, default="beam",
                   help="beam search (default, the original's generate_beam), greedy (what the original's "
                        "generate2 did in effect: its top-p filter was followed by an argmax), or nucleus "
                        "sampling (new: the original never sampled)")
    p.add_argument("--beam_size", type=POSITIVE, default=DEFAULT_BEAM_SIZE, help="beams per image for --decoding beam")
    p.add_argument("--max_length", type=POSITIVE, default=None,
                   help="most tokens per caption, stop token included (default: 67, the original's, or the most "
                        "the checkpoint's decoder holds after its prefix if fewer)")
    p.add_argument("--top_p", type=number(0, 1, low_open=True), default=DEFAULT_TOP_P,
                   help="nucleus sampling: draw from the most probable tokens holding this much probability")
    p.add_argument("--temperature", type=TEMPERATURE, default=1.0,
                   help="beam search and nucleus sampling divide the logits by it, as the original's beam search "
                        "did; below 1 is more conservative, above 1 more diverse (greedy: no effect)")
    p.add_argument("--num_captions", type=POSITIVE, default=1,
                   help="captions per image: samples for nucleus, the best beams for beam search")
    p.add_argument("--seed", type=SEED, default=None, help="nucleus sampling: makes the samples reproducible, "
                                                          "whatever the batch size")
    p.add_argument("--batch_size", type=POSITIVE, default=32, help="images decoded together")
    p.add_argument("--device", type=device_name, default=None,
                   help="torch device (default: cuda when available, else cpu)")
    add_precision_argument(p, aliases=["--dtype"], what="precision of the model's weights while captioning")
    add_thread_arguments(p, workers=False)
    p.add_argument("--encoder_weights", default=None,
                   help="image encoder weights (file or encoder export directory) to use instead of those "
                        "the checkpoint records, e.g. when the recorded file has moved")
    args = p.parse_args(argv)
    if args.out and Path(args.out).suffix.lower() not in (".json", ".csv"):
        p.error(f"--out {args.out}: the file name must end in .json or .csv")
    return args


if __name__ == "__main__":  # --help and flag errors answer before the heavy imports below (seconds)
    parse_args()

from captioning import prediction
from captioning.inference import CaptionResult, Captioner, DecodingOptions, build_encoder

__all__ = ["Captioner", "CaptionResult", "DecodingOptions", "build_encoder", "main"]


def main(argv=None) -> int:
    """Flags -> a `PredictConfig` -> `captioning.prediction.predict`; returns the exit status."""
    return prediction.predict(prediction.PredictConfig(**vars(parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
