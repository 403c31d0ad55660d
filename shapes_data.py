"""Write the synthetic shapes dataset (captioning/data/shapes.py): one or two coloured shapes on varied
backgrounds, captioned by a small grammar, in the official COCO caption format, deterministically from a seed.

  python shapes_data.py --out_dir ./data/shapes --num_train 2000 --num_val 200 --num_test 300 --seed 0
"""
import argparse
import sys

from captioning.cli import COUNT, POSITIVE, SEED, integer, number
from captioning.configs import ShapesConfig, defaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="where images/ and captions_<split>.json go (default %(default)s)")
    p.add_argument("--num_train", type=POSITIVE, help="training images (default %(default)s)")
    p.add_argument("--num_val", type=COUNT, help="validation images (default %(default)s)")
    p.add_argument("--num_test", type=POSITIVE, help="test images (default %(default)s)")
    p.add_argument("--image_size", type=integer(16), help="pixels per side (default %(default)s)")
    p.add_argument("--seed", type=SEED, help="same seed, same images and captions (default %(default)s)")
    p.add_argument("--either_order", action="store_true",
                   help="captions may name either of two shapes first ('B below A' as well as 'A above B')")
    p.add_argument("--reverse_fraction", type=number(0, 1),
                   help="share of two-shape captions that name the shapes in reverse order, 'B below A' for 'A above "
                        "B' (default %(default)s; --either_order is about one half)")
    p.set_defaults(**defaults(ShapesConfig))
    return p


def main(argv=None) -> int:
    """Write the dataset; returns the exit status (2 when --out_dir cannot be written)."""
    try:
        config = ShapesConfig(**vars(build_parser().parse_args(argv)))
    except ValueError as e:
        print(f"shapes_data.py: error: {e}", file=sys.stderr)
        return 2
    from captioning.data.shapes import generate  # numpy and PIL: after the flags
    from captioning.outputs import OutputError, check_output_dir
    try:
        check_output_dir(config.out_dir, "--out_dir")
    except OutputError as e:
        print(f"shapes_data.py: error: {e}", file=sys.stderr)
        return 2
    generate(config.out_dir, config.num_train, config.num_val, config.num_test, config.seed, config.image_size,
             config.either_order, config.reverse_fraction)
    print(f"wrote {config.num_train}/{config.num_val}/{config.num_test} train/val/test images to {config.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
