"""Convert checkpoints of the original code into export directories that predict.py loads.

  # a ClipCap / Tini-Tiny captioner saved by the original train.py (a state dict, e.g. coco_prefix-009.pt)
  python convert_checkpoint.py --checkpoint coco_prefix-009.pt --out_dir exports/original_mlp --gpt2 gpt2

A converted captioner decodes as the original inference notebooks did: a transformer mapper's feature is divided
by its L2 norm first (both transformer notebooks do; the MLP notebook does not), which the export's config
records (`normalize_prefix`); `--normalize_prefix` / `--no-normalize_prefix` choose otherwise.

  # an official TinyViT release file, as a timm-format encoder export
  python convert_checkpoint.py --tinyvit tiny_vit_21m_22k_distill.pth --encoder tiny_vit_21m_224 \
      --out_dir exports/tinyvit_21m
"""
import argparse
import sys

from captioning.cli import POSITIVE, pretrained_source


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="state dict saved by the original train.py (keys gpt.*, clip_project.*)")
    src.add_argument("--tinyvit", help="official TinyViT release file ({'model': state_dict})")
    p.add_argument("--out_dir", required=True, help="export directory to write (replaced atomically)")
    p.add_argument("--gpt2", type=pretrained_source, default="distilgpt2",
                   help="hub name or directory of the GPT-2 the checkpoint was trained from: its config gives what "
                        "shapes cannot (number of heads) and its tokenizer is saved with the export")
    p.add_argument("--mapping_type", choices=["mlp", "transformer"], default=None,
                   help="mapper kind; inferred from the weights when omitted, checked when given")
    p.add_argument("--prefix_length", type=POSITIVE, default=None, help="inferred when omitted, checked when given")
    p.add_argument("--prefix_length_clip", type=POSITIVE, default=None,
                   help="inferred when omitted, checked when given")
    p.add_argument("--num_layers", type=POSITIVE, default=None, help="inferred when omitted, checked when given")
    p.add_argument("--normalize_prefix", default=None, action=argparse.BooleanOptionalAction,
                   help="L2-normalise each image feature before the mapper (default: as the original inference "
                        "did: on for transformer mappers, whose notebooks divide the feature by its norm, off "
                        "for MLP mappers)")
    p.add_argument("--clip_model_type", default="tinyvit",
                   help="encoder the features came from: tinyvit (default) or an OpenAI CLIP name (ViT-B/32, RN50...)")
    p.add_argument("--encoder", default=None, help="timm model name of the encoder (overrides --clip_model_type)")
    p.add_argument("--encoder_weights", default="pretrained",
                   help="'pretrained' (timm hub), 'random', or a weights file; a file is embedded in the export")
    p.add_argument("--preprocessing", choices=["clip", "timm"], default=None,
                   help="image preprocessing the features were made with (default: clip for --checkpoint, "
                        "as the original scripts; timm for --tinyvit)")
    p.add_argument("--feature_type", choices=["pooled", "grid"], default="pooled")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and flag errors answer before the heavy imports below (seconds)
    parse_args()

from transformers import AutoTokenizer, GPT2Config

from captioning.outputs import OutputError, check_output_dir
from models.checkpoint_io import CheckpointError, load_state_dict_file
from models.captioner import ClipCaptionModel
from models.encoder import EncoderConfig, ImageEncoder


def encoder_config(args, weights: str, default_preprocessing: str) -> EncoderConfig:
    return EncoderConfig.from_flags(encoder=args.encoder, clip_model_type=args.clip_model_type, weights=weights,
                                    feature_type=args.feature_type,
                                    preprocessing=args.preprocessing or default_preprocessing)


def convert_captioner(args) -> ClipCaptionModel:
    tokenizer = AutoTokenizer.from_pretrained(args.gpt2)
    stop = tokenizer.encode(".")
    if len(stop) != 1:
        raise CheckpointError(f"the tokenizer of {args.gpt2} does not encode '.' as one token; original "
                              f"checkpoints are decoded until '.'")
    enc_config = encoder_config(args, args.encoder_weights, "clip")
    # A weights file is embedded in the export; 'pretrained' stays a reference that timm resolves at inference.
    encoder = ImageEncoder(enc_config) if enc_config.weights not in ("pretrained", "random") else enc_config
    model = ClipCaptionModel.from_original_state_dict(
        load_state_dict_file(args.checkpoint), GPT2Config.from_pretrained(args.gpt2), source=args.checkpoint,
        encoder=encoder, mapping_type=args.mapping_type, prefix_length=args.prefix_length,
        prefix_length_clip=args.prefix_length_clip, num_layers=args.num_layers,
        normalize_prefix=args.normalize_prefix, eos_token_ids=stop, gpt2=args.gpt2)
    model.save_pretrained(args.out_dir, tokenizer=tokenizer)
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_output_dir(args.out_dir, "--out_dir")
        if args.checkpoint:
            model = convert_captioner(args)
            c = model.config
            print(f"wrote {args.out_dir}: {c.mapping_type} mapper, prefix {c.prefix_length}, feature dim "
                  f"{c.prefix_size}, stops at {c.eos_token_ids}")
            print(f"features are {'' if c.normalize_prefix else 'not '}L2-normalised before the mapper ("
                  + ("given" if args.normalize_prefix is not None else
                     f"as the original {c.mapping_type} inference did; --"
                     f"{'no-' if c.normalize_prefix else ''}normalize_prefix to decode otherwise") + ")")
        else:
            config = encoder_config(args, args.tinyvit, "timm")
            encoder = ImageEncoder(config)
            encoder.save_pretrained(args.out_dir)
            print(f"wrote {args.out_dir}: {config.name}, {encoder.feature_dim}-d {config.feature_type} features")
    except (CheckpointError, OutputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
