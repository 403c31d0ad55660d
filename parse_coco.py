"""Encode every image of an annotation file once and write the features pickle that train.py reads.

    python parse_coco.py --clip_model_type tinyvit            # ./data/coco/oscar_split_tinyvit_train.pkl
    torchrun --nproc_per_node=4 parse_coco.py --annotations data/coco/annotations/dataset_coco.json \
        --split train+restval --out_path data/coco/karpathy_train.pkl

Interrupted runs resume: rerun the same command. The job itself is captioning/featurize.py's `extract_features`;
see captioning/extraction.py for how it resumes.
"""
import argparse
import sys
from typing import Optional

from captioning.choices import ANNOTATION_FORMATS, FEATURE_DTYPES
from captioning.cli import (POSITIVE, SEED, add_precision_argument, add_thread_arguments, device_name, json_object,
                            run_command)
from captioning.configs import EXTRACTION_BATCH_SIZES, OUT_FORMATS, ExtractionConfig, defaults
from models.choices import CLIP_MODEL_TYPES, FEATURE_TYPES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # flags without a fixed default say what they default to in words
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def feature_dtype(text: str) -> str:
    """float32 or float16, also as fp32 / fp16 (the names --precision uses)."""
    return {"fp32": "float32", "fp16": "float16"}.get(text.lower(), text.lower())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--clip_model_type", choices=["tinyvit", *CLIP_MODEL_TYPES],
                   help="image encoder: TinyViT-21M, or an OpenAI CLIP image tower (timm) as in the original")
    p.add_argument("--encoder",
                   help="timm model as NAME (timm's default tag) or NAME.TAG (e.g. "
                        "tiny_vit_21m_224.dist_in22k_ft_in1k); overrides --clip_model_type")
    p.add_argument("--encoder_weights",
                   help="'pretrained' (timm hub or cache), 'random', or a checkpoint file (timm or official TinyViT)")
    p.add_argument("--encoder_kwargs", type=json_object,
                   help="extra timm.create_model arguments as JSON, e.g. '{\"drop_path_rate\": 0}'")
    p.add_argument("--feature_type", choices=FEATURE_TYPES,
                   help="pooled: one vector per image (N, D); grid: the last feature map as tokens (N, T, D)")
    p.add_argument("--image_size", type=POSITIVE, help="encoder input size; default: the model's own")
    p.add_argument("--annotations",
                   help="train_caption.json, a COCO captions_*.json, Karpathy's dataset_coco.json, your own "
                        "JSON list / CSV of (file name, caption), or webdataset shards as img2dataset writes them: "
                        "a .tar, a brace pattern 'cc3m/{00000..00331}.tar', a directory of .tar files or a text "
                        "file listing them (--images_root plays no part)")
    p.add_argument("--annotation_format", choices=ANNOTATION_FORMATS,
                   help="auto detects it; list: a JSON list of caption entries, coco, karpathy, csv, webdataset")
    p.add_argument("--split",
                   help="Karpathy split: train, val, test, restval, or several joined by '+' (train+restval)")
    p.add_argument("--images_root", help="folder that annotation file names are relative to")
    p.add_argument("--out_path",
                   help="features pickle; default ./data/coco/oscar_split_<clip_model_type or encoder>_train.pkl")
    p.add_argument("--out_format", choices=OUT_FORMATS,
                   help="pickle: the original's features pickle (default); mmap: a directory of memory-mapped files "
                        "that the processes of a node share (millions of images: docs/data.md)")
    p.add_argument("--convert", metavar="FEATURES",
                   help="write this features pickle or store in --out_format at --out_path, row for row, encoding "
                        "nothing")
    p.add_argument("--batch_size", type=POSITIVE,
                   help=f"images per encoder call; default {EXTRACTION_BATCH_SIZES['cuda']} on CUDA, "
                        f"{EXTRACTION_BATCH_SIZES['cpu']} on CPU (where small batches stay in cache)")
    add_thread_arguments(p)
    p.add_argument("--device", type=device_name,
                   help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_precision_argument(p, what="encoder compute precision (autocast)")
    p.add_argument("--feature_dtype", "--dtype", dest="dtype", type=feature_dtype,
                   choices=sorted(FEATURE_DTYPES), help="stored feature dtype (--dtype: the earlier spelling)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction,
                   help="channels-last memory format (faster for convolutional encoders: docs/benchmarks.md)")
    p.add_argument("--on_error", choices=["skip", "fail"],
                   help="unusable images (missing, unreadable, truncated, too large): report and leave out, or stop")
    p.add_argument("--error_log", help="where unusable images are listed; default <out>.errors.log")
    p.add_argument("--max_image_pixels", type=POSITIVE,
                   help="refuse images with more pixels (decompression bombs); default PIL's limit (89,478,485)")
    p.add_argument("--fresh", action="store_true", help="discard partial results of an earlier interrupted run")
    p.add_argument("--seed", type=SEED,
                   help="seed of the encoder's weights with --encoder_weights random (recorded in the metadata)")
    p.set_defaults(**defaults(ExtractionConfig))
    return p


def main(argv=None) -> Optional[dict]:
    """Run the extraction; the main process returns a summary (out_path, counts, extraction_seconds)."""
    config = ExtractionConfig(**vars(build_parser().parse_args(argv)))
    from captioning.featurize import convert_features, extract_features  # torch and timm: after the flags
    return convert_features(config) if config.convert else extract_features(config)


def user_errors() -> tuple:
    from captioning.data.annotations import AnnotationError
    from captioning.data.features import FeaturesError
    from captioning.extraction import ExtractionError
    from captioning.outputs import OutputError
    from models.checkpoint_io import CheckpointError
    return AnnotationError, ExtractionError, FeaturesError, CheckpointError, OutputError, ValueError


if __name__ == "__main__":
    sys.exit(run_command(main, user_errors))
