"""The job parse_coco.py runs: annotations -> features pickle.

`extract_features(ExtractionConfig(...))` reads an annotation file, encodes every image once (resumably, across
torchrun's processes; see captioning/extraction.py) and writes the features pickle that train.py reads, with an
error log of the images and annotation entries it had to leave out.
"""
import datetime
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from captioning import runtime
from captioning.configs import ExtractionConfig, extraction_batch_size
from captioning.data.annotations import AnnotationError, ImageRecord, read_annotations
from captioning.data.features import read_features, write_features
from captioning.data.store import is_store, read_store, write_store
from captioning.extraction import (ExtractionError, Failure, assemble, check_manifest, done_indices, extract,
                                   plan_batches, prepare_partial)
from captioning.outputs import check_output_dir, check_output_file, write_or_rescue
from captioning.runtime import Distributed, Precision
from models.checkpoint_io import atomic_write, remove_stale_temporaries
from models.encoder import ImageEncoder

FORMAT_VERSION = 1  # of the features metadata and of the resume manifest


def frozen_encoder(config: ExtractionConfig) -> ImageEncoder:
    """The encoder in inference form (eval, no gradients, batch norms folded), its weights from `config.seed`
    where they are random."""
    torch.manual_seed(config.seed)  # --encoder_weights random: the same seed, the same encoder
    encoder = ImageEncoder(config.encoder_config())
    encoder.eval().requires_grad_(False)
    encoder.fold_batch_norms()
    return encoder


def run_manifest(config: ExtractionConfig, records: List[ImageRecord], encoder: ImageEncoder,
                 precision: Precision) -> dict:
    """Everything that decides the features of image i: a resumed run must match it exactly."""
    images = hashlib.sha256(json.dumps([(str(r.image_id), r.file_name) for r in records]).encode()).hexdigest()
    # The weights' fingerprint (encoder.config.weights_sha256, inside "encoder") tells a resumed run whether the
    # encoder is the one that made the partial results, whatever the weights' source, random ones included.
    return {"format_version": FORMAT_VERSION, "images_sha256": images, "num_images": len(records),
            "images_root": str(Path(config.images_root).resolve()), "encoder": encoder.config.to_dict(),
            "seed": config.seed, "dtype": config.dtype, "precision": precision.name}


def features_metadata(config: ExtractionConfig, encoder: ImageEncoder, precision: Precision,
                      records: List[ImageRecord], kept: List[int], failures: List[Failure],
                      skipped_entries: List[str], num_captions: int) -> dict:
    """The pickle's "metadata": how the features were made and which image each row holds."""
    encoder_config = encoder.config
    return {
        "format_version": FORMAT_VERSION, "created_by": "parse_coco.py",
        "encoder": encoder_config.to_dict(), "encoder_name": encoder_config.name, "weights": encoder_config.weights,
        "seed": config.seed if encoder_config.weights == "random" else None,
        "clip_model_type": None if config.encoder else config.clip_model_type,
        "preprocessing": encoder_config.data_config, "feature_type": encoder_config.feature_type,
        "feature_dim": encoder.feature_dim,
        "num_tokens": encoder.num_tokens if encoder_config.feature_type == "grid" else None,
        "dtype": config.dtype, **precision.record(),
        "num_images": len(kept), "num_captions": num_captions, "num_failed_images": len(failures),
        "num_skipped_captions": sum(len(records[f.index].captions) for f in failures),
        "num_skipped_annotation_entries": len(skipped_entries),
        "source": {"annotations": str(config.annotations), "annotation_format": config.annotation_format,
                   "split": config.split, "images_root": str(config.images_root)},
        "image_ids": [records[i].image_id for i in kept], "file_names": [records[i].file_name for i in kept],
    }


def caption_dicts(records: List[ImageRecord], kept: List[int]) -> List[dict]:
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


def write_error_log(path: Path, annotations, records: List[ImageRecord], failures: List[Failure],
                    skipped_entries: List[str]) -> None:
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


def finish(config: ExtractionConfig, records: List[ImageRecord], encoder: ImageEncoder, precision: Precision,
           partial: Path, failures: List[Failure], skipped_entries: List[str], encoded: int, seconds: float) -> dict:
    """Main process: merge the partial results into the pickle, list the failures, remove the partial results."""
    failed = {f.index for f in failures}
    kept = [i for i in range(len(records)) if i not in failed]
    write_error_log(config.error_log, config.annotations, records, failures, skipped_entries)
    if not kept:
        raise ExtractionError(f"none of the {len(records)} images could be read; see {config.error_log}")
    features = assemble(partial, kept)
    captions = caption_dicts(records, kept)
    if not captions:
        raise ExtractionError(f"{config.annotations}: the readable images have no captions; nothing to write")
    metadata = features_metadata(config, encoder, precision, records, kept, failures, skipped_entries, len(captions))
    write_output(config, features, captions, metadata)
    shutil.rmtree(partial)
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(Counter(f.kind for f in failures).items()))
    print(f"wrote {config.out_path}: {len(kept)} images, {len(captions)} captions, features "
          f"{tuple(features.shape)} {config.dtype}; this run read {encoded} images in {seconds:.1f} s "
          f"({encoded / max(seconds, 1e-9):.1f} images/s)")
    if failures:
        print(f"{len(failures)} image(s) left out ({kinds}), {metadata['num_skipped_captions']} caption(s) "
              f"skipped; listed in {config.error_log}", file=sys.stderr)
    if skipped_entries:
        print(f"{len(skipped_entries)} bad annotation entries skipped; listed in {config.error_log}", file=sys.stderr)
    return {"out_path": config.out_path, "num_images": len(kept), "num_captions": len(captions),
            "num_failed_images": len(failures), "num_skipped_annotation_entries": len(skipped_entries),
            "images_read": encoded, "extraction_seconds": seconds}


def check_out_path(config: ExtractionConfig) -> None:
    """--out_path can take a pickle (a file) or a store (a directory), before anything is encoded."""
    (check_output_dir if config.out_format == "mmap" else check_output_file)(config.out_path, "--out_path")


def write_output(config: ExtractionConfig, features, captions, metadata) -> None:
    """The features pickle, or the memory-mapped store (--out_format mmap), at --out_path, rescued elsewhere if
    that cannot be written."""
    writer = write_store if config.out_format == "mmap" else write_features
    write_or_rescue(config.out_path, lambda path: writer(path, features, captions, metadata), "--out_path")


def convert_features(config: ExtractionConfig) -> dict:
    """--convert: a features pickle or store written again in --out_format at --out_path, row for row."""
    source = Path(config.convert)
    data = read_store(source) if is_store(source) else read_features(source)
    check_out_path(config)
    write_output(config, data["clip_embedding"], data["captions"], data["metadata"])
    print(f"wrote {config.out_path} ({config.out_format}): {data['clip_embedding'].shape[0]} images, "
          f"{len(data['captions'])} captions, from {source}")
    return {"out_path": config.out_path, "num_images": data["clip_embedding"].shape[0],
            "num_captions": len(data["captions"])}


def read_records(config: ExtractionConfig, is_main: bool) -> Tuple[List[ImageRecord], List[str]]:
    """The annotation file's images, and (with on_error "skip") the bad entries left out, which the main process
    reports; no usable image is an AnnotationError."""
    entry_errors = [] if config.on_error == "skip" else None
    records = read_annotations(config.annotations, split=config.split, images_root=config.images_root,
                               fmt=config.annotation_format, errors=entry_errors)
    skipped_entries = [str(e) for e in entry_errors or []]
    if is_main:
        for message in skipped_entries:
            print(f"skipping {message}", file=sys.stderr)
    if not records:
        if is_main:
            write_error_log(config.error_log, config.annotations, records, [], skipped_entries)
        raise AnnotationError(f"{config.annotations}: no usable images" +
                              (f" in split {config.split!r}" if config.split else ""))
    return records, skipped_entries


def run(config: ExtractionConfig, processes: Distributed) -> Optional[dict]:
    """The extraction in one of `processes`; the main process returns finish's summary, the others None."""
    rank, world_size, device = processes.rank, processes.world_size, processes.device
    main_process, distributed = processes.is_main, processes.enabled
    if main_process:  # before hours of encoding
        check_out_path(config)
        check_output_file(config.error_log, "--error_log")
        for output in (config.out_path, config.error_log):
            for path in remove_stale_temporaries(output.parent, [output.name]):
                print(f"removed {path}, left by an interrupted write", file=sys.stderr)
    records, skipped_entries = read_records(config, main_process)
    precision = runtime.resolve_precision(config.precision, device, training=False)
    budget = runtime.plan_threads(device, loads_images=True, workers=config.num_workers, threads=config.threads)
    encoder = frozen_encoder(config).to(device)
    if config.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    manifest = run_manifest(config, records, encoder, precision)
    partial = Path(f"{config.out_path}.partial")
    if main_process:
        resumed = prepare_partial(partial, manifest, config.fresh)
    if distributed:
        processes.barrier()
    if not main_process:
        check_manifest(partial, manifest)
    done = done_indices(partial)
    if distributed:
        processes.barrier()  # everyone has planned from the same logs before anyone appends to them
    if main_process:
        print(f"{config.annotations}: {len(records)} images, {sum(len(r.captions) for r in records)} captions; "
              f"encoder {encoder.config.name} ({encoder.config.weights}) on {device}"
              + (f"; resuming, {len(done)} images already done" if resumed else ""))
        runtime.announce(precision)
        print(budget.describe(), file=sys.stderr)
    start = time.perf_counter()
    batch_size = extraction_batch_size(config.batch_size, device.type)
    try:
        with runtime.thread_budget(budget):
            failures = extract(records, encoder, partial, plan_batches(len(records), batch_size, done, rank,
                                                                       world_size),
                               device=device, precision=precision, dtype=config.dtype, num_workers=budget.workers,
                               decode_threads=budget.cores, channels_last=config.channels_last,
                               on_error=config.on_error, max_pixels=config.max_image_pixels, rank=rank,
                               show_progress=main_process)
        if distributed:
            gathered = processes.all_gather_object(failures)
            failures = sorted((f for part in gathered for f in part), key=lambda f: f.index)
        seconds = time.perf_counter() - start
        summary = finish(config, records, encoder, precision, partial, failures, skipped_entries,
                         len(records) - len(done), seconds) if main_process else None
    except BaseException:
        # A run that fails before finishing a batch leaves nothing to resume: its partial folder goes too.
        if main_process and not resumed and partial.is_dir() and not done_indices(partial):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if distributed:
        processes.barrier()
    return summary


def extract_features(config: ExtractionConfig, processes: Optional[Distributed] = None) -> Optional[dict]:
    """Run the extraction; the main process returns a summary (out_path, counts, extraction_seconds).

    `processes` None: join torchrun's processes where it started this one (else one process on config.device),
    and leave the process group at the end."""
    own_processes = processes is None
    if own_processes:
        # A rank waits at a barrier while rank 0 merges a large dataset's results: hours, not torch's default
        # minutes.
        processes = Distributed.setup(config.device, timeout=datetime.timedelta(hours=2))
    try:
        return run(config, processes)
    except KeyboardInterrupt:
        if processes.is_main:
            print(f"\ninterrupted; finished batches are kept in {config.out_path}.partial, rerun the same command "
                  f"to resume", file=sys.stderr)
        raise
    finally:
        if own_processes:
            processes.close()
