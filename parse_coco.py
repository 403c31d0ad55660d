"""Encode every image of an annotation file once and write the features pickle that train.py reads.

    python parse_coco.py --clip_model_type tinyvit            # ./data/coco/oscar_split_tinyvit_train.pkl
    torchrun --nproc_per_node=4 parse_coco.py --annotations data/coco/annotations/dataset_coco.json \
        --split train+restval --out_path data/coco/karpathy_train.pkl

Interrupted runs resume: rerun the same command. See captioning/extraction.py for how.
"""
import argparse
import datetime
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from captioning.choices import ANNOTATION_FORMATS, FEATURE_DTYPES
from captioning.cli import POSITIVE, SEED, add_precision_argument, add_thread_arguments, device_name
from models.choices import CLIP_MODEL_TYPES, FEATURE_TYPES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # flags without a fixed default say what they default to in words
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"drop_path_rate\": 0}}', got {text!r}")
    return value


def feature_dtype(text: str) -> str:
    """float32 or float16, also as fp32 / fp16 (the names --precision uses)."""
    return {"fp32": "float32", "fp16": "float16"}.get(text.lower(), text.lower())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--clip_model_type", default="tinyvit", choices=["tinyvit", *CLIP_MODEL_TYPES],
                   help="image encoder: TinyViT-21M, or an OpenAI CLIP image tower (timm) as in the original")
    p.add_argument("--encoder", default=None,
                   help="timm model as NAME (timm's default tag) or NAME.TAG (e.g. "
                        "tiny_vit_21m_224.dist_in22k_ft_in1k); overrides --clip_model_type")
    p.add_argument("--encoder_weights", default="pretrained",
                   help="'pretrained' (timm hub or cache), 'random', or a checkpoint file (timm or official TinyViT)")
    p.add_argument("--encoder_kwargs", type=json_object, default={},
                   help="extra timm.create_model arguments as JSON, e.g. '{\"drop_path_rate\": 0}'")
    p.add_argument("--feature_type", default="pooled", choices=FEATURE_TYPES,
                   help="pooled: one vector per image (N, D); grid: the last feature map as tokens (N, T, D)")
    p.add_argument("--image_size", type=POSITIVE, default=None, help="encoder input size; default: the model's own")
    p.add_argument("--annotations", default="./data/coco/annotations/train_caption.json",
                   help="train_caption.json, a COCO captions_*.json, Karpathy's dataset_coco.json, or your own "
                        "JSON list / CSV of (file name, caption)")
    p.add_argument("--annotation_format", default="auto", choices=ANNOTATION_FORMATS,
                   help="auto detects it; list: a JSON list of caption entries, coco, karpathy, csv")
    p.add_argument("--split", default=None,
                   help="Karpathy split: train, val, test, restval, or several joined by '+' (train+restval)")
    p.add_argument("--images_root", default="./data/coco", help="folder that annotation file names are relative to")
    p.add_argument("--out_path", default=None,
                   help="features pickle; default ./data/coco/oscar_split_<clip_model_type or encoder>_train.pkl")
    p.add_argument("--batch_size", type=POSITIVE, default=None,
                   help="images per encoder call; default 128 on CUDA, 4 on CPU (where small batches stay in cache)")
    add_thread_arguments(p)
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_precision_argument(p, what="encoder compute precision (autocast)")
    p.add_argument("--feature_dtype", "--dtype", dest="dtype", default="float32", type=feature_dtype,
                   choices=sorted(FEATURE_DTYPES), help="stored feature dtype (--dtype: the earlier spelling)")
    p.add_argument("--channels_last", default=True, action=argparse.BooleanOptionalAction,
                   help="channels-last memory format (TinyViT-21M on a CPU measured 26-36%% faster)")
    p.add_argument("--on_error", default="skip", choices=["skip", "fail"],
                   help="unusable images (missing, unreadable, truncated, too large): report and leave out, or stop")
    p.add_argument("--error_log", default=None, help="where unusable images are listed; default <out>.errors.log")
    p.add_argument("--max_image_pixels", type=POSITIVE, default=None,
                   help="refuse images with more pixels (decompression bombs); default PIL's limit (89,478,485)")
    p.add_argument("--fresh", action="store_true", help="discard partial results of an earlier interrupted run")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the encoder's weights with --encoder_weights random (recorded in the metadata)")
    args = p.parse_args(argv)
    tag = (args.encoder or args.clip_model_type).replace("/", "_")
    args.out_path = Path(args.out_path or f"./data/coco/oscar_split_{tag}_train.pkl")
    args.error_log = Path(args.error_log or args.out_path.with_suffix(".errors.log"))
    return args


if __name__ == "__main__":  # --help and flag errors answer before the heavy imports below (seconds)
    parse_args()

import torch

from captioning import runtime
from captioning.data.annotations import AnnotationError, read_annotations
from captioning.data.features import FeaturesError, write_features
from captioning.extraction import (ExtractionError, assemble, check_manifest, done_indices, extract, plan_batches,
                                   prepare_partial)
from captioning.outputs import OutputError, check_output_file, write_or_rescue
from captioning.runtime import Distributed
from models.checkpoint_io import CheckpointError, atomic_write
from models.encoder import EncoderConfig, ImageEncoder

FORMAT_VERSION = 1
# Images per encoder call. On a CPU small batches stay in cache: TinyViT-21M at 224 px (channels-last, 2 cores)
# ran 11-12% faster at 4 than at 8, on an AVX512-BF16 CPU and with torch and oneDNN limited to AVX2.
BATCH_SIZES = {"cuda": 128, "cpu": 4}


def build_encoder(args) -> ImageEncoder:
    kwargs = dict(feature_type=args.feature_type, weights=args.encoder_weights, image_size=args.image_size,
                  model_kwargs=args.encoder_kwargs)
    config = EncoderConfig(name=args.encoder, **kwargs) if args.encoder else \
        EncoderConfig.for_clip_model_type(args.clip_model_type, **kwargs)
    try:
        torch.manual_seed(args.seed)  # --encoder_weights random: the same seed, the same encoder
        encoder = ImageEncoder(config)
    except (CheckpointError, ValueError):  # weights that do not fit, an unknown model name or argument
        raise
    except Exception as e:  # hub and network errors come in many classes
        if config.weights != "pretrained":
            raise
        raise ExtractionError(f"could not load pretrained weights for {config.name} ({e.__class__.__name__}: {e}); "
                              f"without internet access pass --encoder_weights with a checkpoint file") from e
    encoder.eval().requires_grad_(False)
    encoder.fold_batch_norms()
    return encoder


def run_manifest(args, records, encoder, precision) -> dict:
    """Everything that decides the features of image i: a resumed run must match it exactly."""
    images = hashlib.sha256(json.dumps([(str(r.image_id), r.file_name) for r in records]).encode()).hexdigest()
    # The weights' fingerprint (encoder.config.weights_sha256, inside "encoder") tells a resumed run whether the
    # encoder is the one that made the partial results, whatever the weights' source, random ones included.
    return {"format_version": FORMAT_VERSION, "images_sha256": images, "num_images": len(records),
            "images_root": str(Path(args.images_root).resolve()), "encoder": encoder.config.to_dict(),
            "seed": args.seed, "dtype": args.dtype, "precision": precision.name}


def features_metadata(args, encoder, precision, records, kept, failures, skipped_entries, num_captions) -> dict:
    config = encoder.config
    return {
        "format_version": FORMAT_VERSION, "created_by": "parse_coco.py",
        "encoder": config.to_dict(), "encoder_name": config.name, "weights": config.weights,
        "seed": args.seed if config.weights == "random" else None,
        "clip_model_type": None if args.encoder else args.clip_model_type,
        "preprocessing": config.data_config, "feature_type": config.feature_type,
        "feature_dim": encoder.feature_dim, "num_tokens": encoder.num_tokens if config.feature_type == "grid" else None,
        "dtype": args.dtype, **precision.record(),
        "num_images": len(kept), "num_captions": num_captions, "num_failed_images": len(failures),
        "num_skipped_captions": sum(len(records[f.index].captions) for f in failures),
        "num_skipped_annotation_entries": len(skipped_entries),
        "source": {"annotations": str(args.annotations), "annotation_format": args.annotation_format,
                   "split": args.split, "images_root": str(args.images_root)},
        "image_ids": [records[i].image_id for i in kept], "file_names": [records[i].file_name for i in kept],
    }


def caption_dicts(records, kept):
    """The original schema's caption entries: image_id, the source's caption id where it has one, caption, row."""
    out = []
    for row, index in enumerate(kept):
        record = records[index]
        ids = record.caption_ids or [None] * len(record.captions)
        for caption, caption_id in zip(record.captions, ids):
            entry = {"image_id": record.image_id}
            if caption_id is not None:
                entry["id"] = caption_id
            entry.update(caption=caption, clip_embedding=row)
            out.append(entry)
    return out


def write_error_log(path: Path, annotations, records, failures, skipped_entries) -> None:
    """One line per problem: file, kind, reason (tab separated); bad annotation entries first."""
    if not failures and not skipped_entries:
        path.unlink(missing_ok=True)  # a list from an earlier run would no longer be true
        return
    prefix = f"{annotations}: "
    lines = [f"{annotations}\tannotation\t{e[len(prefix):] if e.startswith(prefix) else e}\n" for e in skipped_entries]
    lines += [f"{f.path}\t{f.kind}\t{f.reason}\timage_id={records[f.index].image_id}\t"
              f"captions_skipped={len(records[f.index].captions)}\n" for f in failures]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(lines))


def finish(args, records, encoder, precision, partial: Path, failures, skipped_entries, encoded: int,
           seconds: float) -> dict:
    """Main process: merge the partial results into the pickle, list the failures, remove the partial results."""
    failed = {f.index for f in failures}
    kept = [i for i in range(len(records)) if i not in failed]
    write_error_log(args.error_log, args.annotations, records, failures, skipped_entries)
    if not kept:
        raise ExtractionError(f"none of the {len(records)} images could be read; see {args.error_log}")
    features = assemble(partial, kept)
    captions = caption_dicts(records, kept)
    if not captions:
        raise ExtractionError(f"{args.annotations}: the readable images have no captions; nothing to write")
    metadata = features_metadata(args, encoder, precision, records, kept, failures, skipped_entries, len(captions))
    write_or_rescue(args.out_path, lambda path: write_features(path, features, captions, metadata), "--out_path")
    shutil.rmtree(partial)
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(Counter(f.kind for f in failures).items()))
    print(f"wrote {args.out_path}: {len(kept)} images, {len(captions)} captions, features "
          f"{tuple(features.shape)} {args.dtype}; this run read {encoded} images in {seconds:.1f} s "
          f"({encoded / max(seconds, 1e-9):.1f} images/s)")
    if failures:
        print(f"{len(failures)} image(s) left out ({kinds}), {metadata['num_skipped_captions']} caption(s) "
              f"skipped; listed in {args.error_log}", file=sys.stderr)
    if skipped_entries:
        print(f"{len(skipped_entries)} bad annotation entries skipped; listed in {args.error_log}", file=sys.stderr)
    return {"out_path": args.out_path, "num_images": len(kept), "num_captions": len(captions),
            "num_failed_images": len(failures), "num_skipped_annotation_entries": len(skipped_entries),
            "images_read": encoded, "extraction_seconds": seconds}


def run(args, processes: Distributed) -> Optional[dict]:
    rank, world_size, device = processes.rank, processes.world_size, processes.device
    main_process, distributed = processes.is_main, processes.enabled
    entry_errors = [] if args.on_error == "skip" else None
    if main_process:  # before hours of encoding
        check_output_file(args.out_path, "--out_path")
        check_output_file(args.error_log, "--error_log")
    records = read_annotations(args.annotations, split=args.split, images_root=args.images_root,
                               fmt=args.annotation_format, errors=entry_errors)
    skipped_entries = [str(e) for e in entry_errors or []]
    if main_process:
        for message in skipped_entries:
            print(f"skipping {message}", file=sys.stderr)
    if not records:
        if main_process:
            write_error_log(args.error_log, args.annotations, records, [], skipped_entries)
        raise AnnotationError(f"{args.annotations}: no usable images" +
                              (f" in split {args.split!r}" if args.split else ""))
    precision = runtime.resolve_precision(args.precision, device, training=False)
    budget = runtime.plan_threads(device, loads_images=True, workers=args.num_workers, threads=args.threads)
    encoder = build_encoder(args).to(device)
    if args.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    manifest = run_manifest(args, records, encoder, precision)
    partial = Path(f"{args.out_path}.partial")
    if main_process:
        resumed = prepare_partial(partial, manifest, args.fresh)
    if distributed:
        processes.barrier()
    if not main_process:
        check_manifest(partial, manifest)
    done = done_indices(partial)
    if distributed:
        processes.barrier()  # everyone has planned from the same logs before anyone appends to them
    if main_process:
        print(f"{args.annotations}: {len(records)} images, {sum(len(r.captions) for r in records)} captions; "
              f"encoder {encoder.config.name} ({encoder.config.weights}) on {device}"
              + (f"; resuming, {len(done)} images already done" if resumed else ""))
        runtime.announce(precision)
        print(budget.describe(), file=sys.stderr)
    start = time.perf_counter()
    batch_size = args.batch_size or BATCH_SIZES.get(device.type, BATCH_SIZES["cpu"])
    try:
        with runtime.thread_budget(budget):
            failures = extract(records, encoder, partial, plan_batches(len(records), batch_size, done, rank,
                                                                       world_size),
                               device=device, precision=precision, dtype=args.dtype, num_workers=budget.workers,
                               decode_threads=budget.cores, channels_last=args.channels_last,
                               on_error=args.on_error, max_pixels=args.max_image_pixels, rank=rank,
                               show_progress=main_process)
        if distributed:
            gathered = processes.all_gather_object(failures)
            failures = sorted((f for part in gathered for f in part), key=lambda f: f.index)
        seconds = time.perf_counter() - start
        summary = finish(args, records, encoder, precision, partial, failures, skipped_entries,
                         len(records) - len(done), seconds) if main_process else None
    except BaseException:
        # A run that fails before finishing a batch leaves nothing to resume: its partial folder goes too.
        if main_process and not resumed and partial.is_dir() and not done_indices(partial):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if distributed:
        processes.barrier()
    return summary


def main(argv=None) -> Optional[dict]:
    """Run the extraction; the main process returns a summary (out_path, counts, extraction_seconds)."""
    args = parse_args(argv)
    # A rank waits at a barrier while rank 0 merges a large dataset's results: hours, not torch's default minutes.
    processes = Distributed.setup(args.device, timeout=datetime.timedelta(hours=2))
    try:
        return run(args, processes)
    except KeyboardInterrupt:
        if processes.is_main:
            print(f"\ninterrupted; finished batches are kept in {args.out_path}.partial, rerun the same command to "
                  f"resume", file=sys.stderr)
        raise
    finally:
        processes.close()


if __name__ == "__main__":
    try:
        main()
    except (AnnotationError, ExtractionError, FeaturesError, CheckpointError, OutputError, ValueError) as e:
        sys.exit(f"error: {e}")
