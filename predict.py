"""Caption images with an exported captioner: the command line of captioning/prediction.py, which captions through
the `Captioner` API (captioning/inference.py, also importable from here).

    python predict.py --checkpoint DIR --image a.jpg b.jpg
    python predict.py --checkpoint DIR --images_dir val2014/ --out captions.json
    python predict.py --checkpoint DIR --image a.jpg --decoding nucleus --num_captions 3 --seed 0
    python predict.py --checkpoint DIR --images_dir photos/ --quantize int8      # int8 weights, on a CPU

    from predict import Captioner
    captioner = Captioner.from_pretrained("checkpoints/coco_prefix_latest", device="cuda")
    captioner.caption(["a.jpg", "b.jpg"])        # ['A man riding a wave on a surfboard.', ...]
"""
import argparse
import sys
from pathlib import Path

from captioning.cli import (POSITIVE, SEED, TEMPERATURE, add_precision_argument, add_quantize_argument,
                            add_thread_arguments, device_name, number)
from captioning.configs import PredictConfig, defaults
from models.choices import DECODINGS

# The Captioner API, importable from here as documented; loaded on first use, so that --help answers at once.
API = ("Captioner", "CaptionResult", "DecodingOptions", "load_recorded_encoder")
__all__ = [*API, "main"]


def __getattr__(name):
    if name in API:
        from captioning import inference
        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Caption images with a checkpoint exported by train.py or "
                                            "convert_checkpoint.py.")
    p.add_argument("--checkpoint", required=True, help="export directory (config.json, model.safetensors, "
                                                       "tokenizer files) or Hub repository id (user/name)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="image file(s) to caption")
    source.add_argument("--images_dir", help="caption every image file in this directory (not recursive)")
    source.add_argument("--features", help="caption the precomputed features of a features pickle or store "
                                           "written by parse_coco.py (one caption per image)")
    p.add_argument("--out", help="write the captions to this file: .json (COCO results format) or .csv; "
                                 "without it they are printed")
    p.add_argument("--decoding", choices=DECODINGS,
                   help="beam search (the original's generate_beam), greedy (what the original's generate2 did in "
                        "effect: its top-p filter was followed by an argmax), or nucleus sampling (new: the "
                        "original never sampled) (default %(default)s)")
    p.add_argument("--beam_size", type=POSITIVE, help="beams per image for --decoding beam (default %(default)s)")
    p.add_argument("--max_length", type=POSITIVE,
                   help="most tokens per caption, stop token included (default: the original's 67, or the most "
                        "the checkpoint's decoder holds after its prefix if fewer)")
    p.add_argument("--top_p", type=number(0, 1, low_open=True),
                   help="nucleus sampling: draw from the most probable tokens holding this much probability "
                        "(default %(default)s)")
    p.add_argument("--temperature", type=TEMPERATURE,
                   help="beam search and nucleus sampling divide the logits by it, as the original's beam search "
                        "did; below 1 is more conservative, above 1 more diverse (greedy: no effect) "
                        "(default %(default)s)")
    p.add_argument("--num_captions", type=POSITIVE,
                   help="captions per image: samples for nucleus, the best beams for beam search "
                        "(default %(default)s)")
    p.add_argument("--seed", type=SEED, help="nucleus sampling: makes the samples reproducible, whatever the batch "
                                             "size")
    p.add_argument("--batch_size", type=POSITIVE, help="images decoded together (default %(default)s)")
    p.add_argument("--device", type=device_name, help="torch device (default: cuda when available, else cpu)")
    add_precision_argument(p, aliases=["--dtype"], what="precision of the model's weights while captioning")
    add_quantize_argument(p, what="weights of the model while captioning")
    add_thread_arguments(p, workers=False)
    p.add_argument("--encoder_weights",
                   help="image encoder weights (file or encoder export directory) to use instead of those "
                        "the checkpoint records, e.g. when the recorded file has moved")
    p.set_defaults(**defaults(PredictConfig))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out and Path(args.out).suffix.lower() not in (".json", ".csv"):
        parser.error(f"--out {args.out}: the file name must end in .json or .csv")
    return args


def main(argv=None) -> int:
    """Flags -> a `PredictConfig` -> `captioning.prediction.predict`; returns the exit status."""
    config = PredictConfig(**vars(parse_args(argv)))
    from captioning import prediction  # torch and transformers: after the flags
    return prediction.predict(config)


if __name__ == "__main__":
    sys.exit(main())
