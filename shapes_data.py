"""Write the synthetic shapes dataset (captioning/data/shapes.py): one or two coloured shapes on varied
backgrounds, captioned by a small grammar, in the official COCO caption format, deterministically from a seed.

  python shapes_data.py --out_dir ./data/shapes --num_train 2000 --num_val 200 --num_test 300 --seed 0
"""
import argparse
import sys

from captioning.cli import COUNT, POSITIVE, SEED, integer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="./data/shapes", help="where images/ and captions_<split>.json go")
    p.add_argument("--num_train", type=POSITIVE, default=2000)
    p.add_argument("--num_val", type=COUNT, default=200)
    p.add_argument("--num_test", type=POSITIVE, default=300)
    p.add_argument("--image_size", type=integer(16), default=64)
    p.add_argument("--seed", type=SEED, default=0, help="same seed, same images and captions")
    p.add_argument("--either_order", action="store_true",
                   help="captions may name either of two shapes first ('B below A' as well as 'A above B')")
    return p


if __name__ == "__main__":  # --help and flag errors answer before the heavy imports below (seconds)
    build_parser().parse_args()

from captioning.data.shapes import generate
from captioning.outputs import OutputError, check_output_dir


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output_dir(args.out_dir, "--out_dir")
    except OutputError as e:
        print(f"shapes_data.py: error: {e}", file=sys.stderr)
        return 2
    generate(args.out_dir, args.num_train, args.num_val, args.num_test, args.seed, args.image_size,
             args.either_order)
    print(f"wrote {args.num_train}/{args.num_val}/{args.num_test} train/val/test images to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
