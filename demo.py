"""The whole pipeline on a fresh machine, without pretrained weights or COCO: `make demo`.

Generates the synthetic shapes dataset (captioning/data/shapes.py), trains a byte-level BPE tokenizer on its
captions, builds a small decoder (GPT-2, or --decoder_type llama|qwen2|gpt_neox), trains a small timm encoder end
to end with the mapper and the decoder (as train.py --train_encoder does), captions the test split (the
Captioner), scores it (as evaluate.py does) and checks each caption's colours, shapes and positions against the
scene (captioning/demo/). Any folder holding `images/`, `captions_train.json` and `captions_test.json` in official
COCO format (`captions_val.json` optional) runs through the same recipe with `--data DIR`.

    python demo.py                          # generate ./runs/demo/shapes, train, caption, evaluate
    python demo.py --data path/to/dataset   # the same recipe on another dataset in COCO format
"""
import argparse
import sys

from captioning.cli import (COUNT, POSITIVE, SEED, add_precision_argument, add_thread_arguments, device_name, integer,
                            number, run_command)
from captioning.configs import DEMO_DECODER_TYPES, DemoConfig, defaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset folder (images/, captions_train.json, captions_test.json, "
                                  "captions_val.json optional); default: generate the shapes dataset into "
                                  "<out_dir>/shapes")
    p.add_argument("--out_dir", help="dataset, decoder, checkpoints, predictions, metrics (default %(default)s)")
    p.add_argument("--num_train", type=POSITIVE, help="generated training images (default %(default)s)")
    p.add_argument("--num_val", type=COUNT, help="generated validation images (default %(default)s)")
    p.add_argument("--num_test", type=POSITIVE, help="generated test images (default %(default)s)")
    p.add_argument("--seed", type=SEED, help="(default %(default)s)")
    p.add_argument("--image_size", type=integer(16),
                   help="pixels per side of the generated images and of the encoder's input (default %(default)s)")
    p.add_argument("--steps", type=POSITIVE,
                   help="cross-entropy optimizer steps, rounded to whole epochs (default %(default)s; times per CPU "
                        "kind: docs/demo.md; --scst adds its steps after them)")
    p.add_argument("--lora_steps", type=POSITIVE,
                   help="the cross-entropy steps with --lora_r, in place of --steps (default %(default)s)")
    p.add_argument("--epochs", type=POSITIVE, help="passes over the training captions (overrides --steps)")
    p.add_argument("--bs", type=POSITIVE, help="captions per batch (default %(default)s)")
    p.add_argument("--lr", type=number(0, low_open=True), help="learning rate (default %(default)s)")
    p.add_argument("--encoder_lr", type=number(0, low_open=True),
                   help="the encoder's learning rate (default %(default)s)")
    add_precision_argument(p, aliases=["--amp"], what="precision of training and captioning")
    add_thread_arguments(p, workers=False)
    p.add_argument("--beam_size", type=POSITIVE, help="beams when captioning the test split (default %(default)s)")
    p.add_argument("--device", type=device_name, help="(default %(default)s)")
    p.add_argument("--decoder_type", choices=DEMO_DECODER_TYPES,
                   help="architecture of the small decoder trained from scratch, at about the same parameter count "
                        "(default %(default)s; the table of all four: docs/demo.md)")
    p.add_argument("--lora_r", type=POSITIVE,
                   help="train LoRA adapters of this rank on the decoder instead of its weights (train.py --lora_r; "
                        "default: the whole decoder learns)")
    p.add_argument("--scst", action="store_true",
                   help="after cross-entropy, optimise CIDEr-D (train.py --scst) and print both stages' figures")
    p.add_argument("--scst_steps", type=POSITIVE, help="steps of CIDEr optimisation (default %(default)s)")
    p.add_argument("--scst_lr", type=number(0, low_open=True),
                   help="learning rate of CIDEr optimisation, encoder included (default %(default)s)")
    p.add_argument("--scst_samples", type=integer(2), help="captions sampled per image and step (default %(default)s)")
    p.set_defaults(**defaults(DemoConfig))
    return p


def main(argv=None) -> dict:
    """Run the demo; returns the accuracy per fact, CIDEr, the baseline's CIDEr and the seconds per stage."""
    config = DemoConfig(**vars(build_parser().parse_args(argv)))
    from captioning.demo import run_demo  # torch, timm and transformers: after the flags
    return run_demo(config)


def user_errors() -> tuple:
    from captioning.outputs import OutputError
    return FileNotFoundError, ValueError, RuntimeError, OutputError


if __name__ == "__main__":
    sys.exit(run_command(main, user_errors))
