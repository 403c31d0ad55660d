"""Convert checkpoints of the original code into export directories that predict.py loads.

  # a ClipCap / Tini-Tiny captioner saved by the original train.py (a state dict, e.g. coco_prefix-009.pt)
  python convert_checkpoint.py --checkpoint coco_prefix-009.pt --out_dir exports/original_mlp --gpt2 gpt2

A converted captioner decodes as the original inference notebooks did: a transformer mapper's feature is divided
by its L2 norm first (both transformer notebooks do; the MLP notebook does not), which the export's config
records (`normalize_prefix`); `--normalize_prefix` / `--no-normalize_prefix` choose otherwise.

  # an official TinyViT release file, as a timm-format encoder export
  python convert_checkpoint.py --tinyvit tiny_vit_21m_22k_distill.pth --encoder tiny_vit_21m_224 \\
      --out_dir exports/tinyvit_21m

The conversions are captioning/conversion.py's; this script is their command line.
"""
import argparse
import sys

from captioning.cli import POSITIVE, pretrained_source
from captioning.configs import ConvertConfig, defaults
from models.choices import FEATURE_TYPES, MAPPING_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="state dict saved by the original train.py (keys gpt.*, clip_project.*)")
    src.add_argument("--tinyvit", help="official TinyViT release file ({'model': state_dict})")
    p.add_argument("--out_dir", required=True, help="export directory to write (replaced atomically)")
    p.add_argument("--gpt2", type=pretrained_source,
                   help="hub name or directory of the GPT-2 the checkpoint was trained from: its config gives what "
                        "shapes cannot (number of heads) and its tokenizer is saved with the export "
                        "(default %(default)s)")
    p.add_argument("--mapping_type", choices=MAPPING_TYPES,
                   help="mapper kind; inferred from the weights when omitted, checked when given")
    p.add_argument("--prefix_length", type=POSITIVE, help="inferred when omitted, checked when given")
    p.add_argument("--prefix_length_clip", type=POSITIVE, help="inferred when omitted, checked when given")
    p.add_argument("--num_layers", type=POSITIVE, help="inferred when omitted, checked when given")
    p.add_argument("--normalize_prefix", action=argparse.BooleanOptionalAction,
                   help="L2-normalise each image feature before the mapper (default: as the original inference "
                        "did: on for transformer mappers, whose notebooks divide the feature by its norm, off "
                        "for MLP mappers)")
    p.add_argument("--clip_model_type",
                   help="encoder the features came from: tinyvit or an OpenAI CLIP name (ViT-B/32, RN50...) "
                        "(default %(default)s)")
    p.add_argument("--encoder", help="timm model name of the encoder (overrides --clip_model_type)")
    p.add_argument("--encoder_weights",
                   help="'pretrained' (timm hub), 'random', or a weights file; a file is embedded in the export "
                        "(default %(default)s)")
    p.add_argument("--preprocessing", choices=["clip", "timm"],
                   help="image preprocessing the features were made with (default: clip for --checkpoint, "
                        "as the original scripts; timm for --tinyvit)")
    p.add_argument("--feature_type", choices=FEATURE_TYPES, help="(default %(default)s)")
    p.set_defaults(**defaults(ConvertConfig))
    return p


def main(argv=None) -> int:
    """Convert; returns the exit status (1 when the checkpoint or the output place cannot be used)."""
    config = ConvertConfig(**vars(build_parser().parse_args(argv)))
    from captioning.conversion import convert_captioner, convert_tinyvit  # torch: after the flags
    from captioning.outputs import OutputError, check_output_dir
    from models.checkpoint_io import CheckpointError
    try:
        check_output_dir(config.out_dir, "--out_dir")
        if config.checkpoint:
            report_captioner(convert_captioner(config), config)
        else:
            encoder = convert_tinyvit(config)
            print(f"wrote {config.out_dir}: {encoder.config.name}, {encoder.feature_dim}-d "
                  f"{encoder.config.feature_type} features")
    except (CheckpointError, OutputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def report_captioner(model, config: ConvertConfig) -> None:
    c = model.config
    print(f"wrote {config.out_dir}: {c.mapping_type} mapper, prefix {c.prefix_length}, feature dim "
          f"{c.prefix_size}, stops at {c.eos_token_ids}")
    print(f"features are {'' if c.normalize_prefix else 'not '}L2-normalised before the mapper ("
          + ("given" if config.normalize_prefix is not None else
             f"as the original {c.mapping_type} inference did; --"
             f"{'no-' if c.normalize_prefix else ''}normalize_prefix to decode otherwise") + ")")


if __name__ == "__main__":
    sys.exit(main())
