"""The whole pipeline on a fresh machine, without pretrained weights or COCO: `make demo`.

Generates the synthetic shapes dataset (captioning/data/shapes.py), trains a byte-level BPE tokenizer on its
captions, builds a small GPT-2, trains a small timm encoder end to end with the mapper and the decoder (as train.py
--train_encoder does), captions the test split (the Captioner), scores it (as evaluate.py does) and checks each
caption's colours, shapes and positions against the scene (captioning/demo.py). Any folder holding `images/`, `captions_train.json` and `captions_test.json` in
official COCO format (`captions_val.json` optional) runs through the same recipe with `--data DIR`.

    python demo.py                          # generate ./data/shapes, train, caption, evaluate
    python demo.py --data path/to/dataset   # the same recipe on another dataset in COCO format
"""
import argparse
import sys

from captioning.cli import (COUNT, POSITIVE, SEED, add_precision_argument, add_thread_arguments, device_name,
                            integer, number)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="dataset folder (images/, captions_train.json, captions_test.json, captions_val.json "
                        "optional); default: generate the shapes dataset into <out_dir>/shapes")
    p.add_argument("--out_dir", default="./runs/demo", help="dataset, decoder, checkpoints, predictions, metrics")
    p.add_argument("--num_train", type=POSITIVE, default=2000)
    p.add_argument("--num_val", type=COUNT, default=100)
    p.add_argument("--num_test", type=POSITIVE, default=300)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--image_size", type=integer(16), default=48,
                   help="pixels per side of the generated images and of the encoder's input")
    p.add_argument("--steps", type=POSITIVE, default=1500,
                   help="cross-entropy optimizer steps, rounded to whole epochs (times per CPU kind: docs/demo.md; "
                        "--scst adds its steps after them)")
    p.add_argument("--epochs", type=POSITIVE, default=None,
                   help="passes over the training captions (overrides --steps)")
    p.add_argument("--bs", type=POSITIVE, default=64)
    p.add_argument("--lr", type=number(0, low_open=True), default=2e-3)
    p.add_argument("--encoder_lr", type=number(0, low_open=True), default=1e-2, help="the encoder's learning rate")
    add_precision_argument(p, aliases=["--amp"], what="precision of training and captioning")
    add_thread_arguments(p, workers=False)
    p.add_argument("--beam_size", type=POSITIVE, default=3)
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--scst", action="store_true",
                   help="after cross-entropy, optimise CIDEr-D (train.py --scst) and print both stages' figures")
    p.add_argument("--scst_steps", type=POSITIVE, default=90, help="steps of CIDEr optimisation")
    p.add_argument("--scst_lr", type=number(0, low_open=True), default=1e-3,
                   help="learning rate of CIDEr optimisation (encoder included)")
    p.add_argument("--scst_samples", type=integer(2), default=5, help="captions sampled per image and step")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and flag errors answer before the heavy imports below (seconds)
    parse_args()

from captioning.demo import DemoConfig, run_demo
from captioning.outputs import OutputError


def main(argv=None) -> dict:
    """Run the demo; returns the accuracy per fact, CIDEr, the baseline's CIDEr and the seconds per stage."""
    return run_demo(DemoConfig(**vars(parse_args(argv))))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, OutputError) as error:
        sys.exit(f"error: {error}")
