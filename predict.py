"""Caption images with an exported captioner: the command line over the `Captioner` API (captioning/inference.py,
also importable from here).

    python predict.py --checkpoint DIR --image a.jpg b.jpg
    python predict.py --checkpoint DIR --images_dir val2014/ --out captions.json
    python predict.py --checkpoint DIR --image a.jpg --decoding nucleus --num_captions 3 --seed 0

    from predict import Captioner
    captioner = Captioner.from_pretrained("checkpoints/coco_prefix_latest", device="cuda")
    captioner.caption(["a.jpg", "b.jpg"])        # ['A man riding a wave on a surfboard.', ...]
"""
import argparse
import csv
import dataclasses
import re
import sys
from pathlib import Path
from typing import Sequence

from captioning.cli import (POSITIVE, SEED, TEMPERATURE, add_precision_argument, add_thread_arguments,
                            device_name, number)
from models.choices import DECODINGS, DEFAULT_BEAM_SIZE, DEFAULT_TOP_P


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Caption images with a checkpoint exported by train.py or "
                                            "convert_checkpoint.py.")
    p.add_argument("--checkpoint", required=True, help="export directory (config.json, model.safetensors, "
                                                       "tokenizer files)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="image file(s) to caption")
    source.add_argument("--images_dir", help="caption every image file in this directory (not recursive)")
    source.add_argument("--features", help="caption the precomputed features of a features pickle "
                                           "written by parse_coco.py (one caption per image)")
    p.add_argument("--out", help="write the captions to this file: .json (COCO results format) or .csv; "
                                 "without it they are printed")
    p.add_argument("--decoding", choices=DECODINGS, default="beam",
                   help="beam search (default, the original's generate_beam), greedy (what the original's "
                        "generate2 did in effect: its top-p filter was followed by an argmax), or nucleus "
                        "sampling (new: the original never sampled)")
    p.add_argument("--beam_size", type=POSITIVE, default=DEFAULT_BEAM_SIZE, help="beams per image for --decoding beam")
    p.add_argument("--max_length", type=POSITIVE, default=None,
                   help="most tokens per caption, stop token included (default: 67, the original's, or the most "
                        "the checkpoint's decoder holds after its prefix if fewer)")
    p.add_argument("--top_p", type=number(0, 1, low_open=True), default=DEFAULT_TOP_P,
                   help="nucleus sampling: draw from the most probable tokens holding this much probability")
    p.add_argument("--temperature", type=TEMPERATURE, default=1.0,
                   help="beam search and nucleus sampling divide the logits by it, as the original's beam search "
                        "did; below 1 is more conservative, above 1 more diverse (greedy: no effect)")
    p.add_argument("--num_captions", type=POSITIVE, default=1,
                   help="captions per image: samples for nucleus, the best beams for beam search")
    p.add_argument("--seed", type=SEED, default=None, help="nucleus sampling: makes the samples reproducible, "
                                                          "whatever the batch size")
    p.add_argument("--batch_size", type=POSITIVE, default=32, help="images decoded together")
    p.add_argument("--device", type=device_name, default=None,
                   help="torch device (default: cuda when available, else cpu)")
    add_precision_argument(p, aliases=["--dtype"], what="precision of the model's weights while captioning")
    add_thread_arguments(p, workers=False)
    p.add_argument("--encoder_weights", default=None,
                   help="image encoder weights (file or encoder export directory) to use instead of those "
                        "the checkpoint records, e.g. when the recorded file has moved")
    args = p.parse_args(argv)
    if args.out and Path(args.out).suffix.lower() not in (".json", ".csv"):
        p.error(f"--out {args.out}: the file name must end in .json or .csv")
    return args


if __name__ == "__main__":  # --help and flag errors answer before the heavy imports below (seconds)
    parse_args()

from PIL import Image

from captioning import runtime
from captioning.data.features import FeaturesError, read_features
from captioning.data.results import Prediction, write_results
from captioning.inference import CaptionResult, Captioner, DecodingOptions, build_encoder  # noqa: F401 (the API)
from captioning.outputs import OutputError, check_output_file, write_or_rescue
from models.checkpoint_io import CheckpointError, atomic_write
from models.decoding import DEFAULT_MAX_LENGTH

__all__ = ["Captioner", "CaptionResult", "DecodingOptions", "build_encoder", "main"]

# COCO's file names: COCO_val2014_000000391895.jpg (2014) and 000000391895.jpg (2017), twelve digits either way.
COCO_FILE_NAME = re.compile(r"(?:COCO_[a-z]+\d{4}_)?(\d{12})")


def image_id_from_name(path) -> object:
    """COCO's `image_id` for a COCO file name (`COCO_val2014_000000391895.jpg` -> 391895), else the file name
    itself: a number taken from any other name could give two files one id (`gray16.png`, `rgb16.png`)."""
    match = COCO_FILE_NAME.fullmatch(Path(path).stem)
    return int(match[1]) if match else Path(path).name


def list_images(directory: Path):
    """Image files directly inside `directory` (by the extensions PIL can open), sorted, and the other
    entries, which are reported rather than silently skipped."""
    if not directory.is_dir():
        raise ValueError(f"--images_dir {directory}: " + ("is a file, not a directory" if directory.exists()
                                                          else "no such directory"))
    extensions = set(Image.registered_extensions())
    images, ignored = [], []
    for path in sorted(directory.iterdir()):
        (images if path.is_file() and path.suffix.lower() in extensions else ignored).append(path)
    if not images:
        raise ValueError(f"--images_dir {directory}: no image files found")
    return images, ignored


def features_inputs(path):
    """A features pickle (parse_coco.py) -> one feature row per image, its image_id, and its image's file name
    where the metadata records one per row (parse_coco.py's do), else None."""
    data = read_features(path)
    rows = {}
    for caption in data["captions"]:
        rows.setdefault(caption["clip_embedding"], caption["image_id"])
    order = sorted(rows)
    names = data["metadata"].get("file_names")
    names = [str(names[row]) for row in order] if isinstance(names, list) and \
        len(names) == data["clip_embedding"].shape[0] else None
    return [data["clip_embedding"][row] for row in order], [rows[row] for row in order], names


def write_json(path, results: Sequence[CaptionResult], image_ids, num_captions: int) -> None:
    """COCO results format, `[{"image_id", "caption"}]`, plus the file name (and the other captions and their
    scores when several were asked for), written by captioning/data/results.py. Images that failed are not
    entries; they are reported on stderr."""
    several = num_captions > 1
    write_results(path, [Prediction(image_id, r.caption, r.captions[:num_captions] if several else [], r.source,
                                    r.scores[:num_captions] if several else [])
                         for r, image_id in zip(results, image_ids) if r.error is None], beams_key="captions")


def write_csv(path, results: Sequence[CaptionResult], image_ids, num_captions: int) -> None:
    """One row per caption (`rank` 1 is the best), and one row with the `error` for each image that failed."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "image_id", "rank", "caption", "score", "error"])
            for result, image_id in zip(results, image_ids):
                if result.error is not None:
                    writer.writerow([result.source, image_id, "", "", "", result.error])
                for rank, (caption, score) in enumerate(zip(result.captions[:num_captions],
                                                            result.scores[:num_captions]), start=1):
                    writer.writerow([result.source, image_id, rank, caption, f"{score:.5f}", ""])


def print_results(results: Sequence[CaptionResult], num_captions: int) -> None:
    for result in results:
        if result.error is not None:
            print(f"{result.source}\tERROR: {result.error}")
        for caption in result.captions[:num_captions]:
            print(f"{result.source}\t{caption}")


def collect_inputs(args):
    """(inputs for the Captioner, image ids, notices for stderr, the inputs' names where the Captioner cannot
    know them: the file names of a features pickle's images)."""
    if args.features:
        features, image_ids, names = features_inputs(args.features)
        return features, image_ids, names, []
    if args.images_dir:
        paths, ignored = list_images(Path(args.images_dir))
        notes = [f"{len(ignored)} entries of {args.images_dir} are not image files and were not captioned: "
                 + ", ".join(p.name for p in ignored[:5]) + (" ..." if len(ignored) > 5 else "")] if ignored else []
    else:
        paths, notes = [Path(p) for p in args.image], []
        directories = [str(p) for p in paths if p.is_dir()]
        if directories:
            raise ValueError(f"--image {directories[0]}: is a directory; caption a folder's images with "
                             f"--images_dir")
    image_ids = [image_id_from_name(p) for p in paths]
    seen = {}
    for path, image_id in zip(paths, image_ids):
        if image_id in seen:
            notes.append(f"{seen[image_id].name} and {path.name} both give image_id {image_id!r}")
        seen.setdefault(image_id, path)
    return [str(p) for p in paths], image_ids, None, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or runtime.default_device()  # --device is checked by argparse
    budget = runtime.plan_threads(device, loads_images=False, threads=args.threads)
    with runtime.thread_budget(budget):
        return caption_and_write(args, device)


def caption_and_write(args, device: str) -> int:
    try:
        if args.out:  # before the captioning, which may take hours
            check_output_file(args.out, "--out")
        options = DecodingOptions(decoding=args.decoding, beam_size=args.beam_size,  # checked before loading
                                  max_length=args.max_length or DEFAULT_MAX_LENGTH, top_p=args.top_p,
                                  temperature=args.temperature, num_captions=args.num_captions, seed=args.seed)
        inputs, image_ids, names, notes = collect_inputs(args)
        captioner = Captioner.from_pretrained(args.checkpoint, device=device, precision=args.precision,
                                              encoder_weights=args.encoder_weights)
        runtime.announce(captioner.precision, prefix="predict.py: ")
        max_length, clipped = captioner.fit_max_length(args.max_length)
        if clipped:
            print(f"predict.py: note: {clipped}", file=sys.stderr)
        options = dataclasses.replace(options, max_length=max_length)
        results = captioner.predict(inputs, options, batch_size=args.batch_size, progress=len(inputs) > 1)
        if names is not None:
            results = [dataclasses.replace(r, source=name) for r, name in zip(results, names)]
    except (CheckpointError, FeaturesError, OutputError, ValueError) as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"predict.py: note: {note}", file=sys.stderr)
    if args.out:
        writer = write_json if Path(args.out).suffix.lower() == ".json" else write_csv
        try:
            write_or_rescue(args.out, lambda path: writer(path, results, image_ids, args.num_captions), "--out")
        except OutputError as e:
            print(f"predict.py: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {sum(r.error is None for r in results)} captioned images to {args.out}", file=sys.stderr)
    else:
        print_results(results, args.num_captions)
    failed = [r for r in results if r.error is not None]
    for result in failed:
        print(f"predict.py: could not caption {result.error}", file=sys.stderr)
    if failed:
        print(f"predict.py: {len(failed)} of {len(results)} images could not be captioned", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
