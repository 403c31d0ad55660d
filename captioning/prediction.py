"""What predict.py runs: image files, a folder of them or a features pickle -> captions from the Captioner,
printed, or written as the COCO results file (captioning/data/results.py) or a CSV file.

    from captioning.prediction import PredictConfig, predict
    predict(PredictConfig(checkpoint="checkpoints/coco_prefix_latest", images_dir="val2014", out="captions.json"))
"""
import csv
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from captioning import runtime
from captioning.configs import PredictConfig
from captioning.data.annotations import image_id_from_name
from captioning.data.features import FeaturesError, metadata_file_names, read_features
from captioning.data.store import is_store, read_store
from captioning.data.results import CSV_COLUMNS, Prediction, write_results
from captioning.data.text import printable_name, to_csv_cell
from captioning.inference import Captioner, CaptionResult, DecodingOptions
from captioning.outputs import OutputError, check_output_file, write_or_rescue
from models.checkpoint_io import CheckpointError, atomic_write
from models.decoding import DEFAULT_MAX_LENGTH

PREFIX = "predict.py: "  # the messages on stderr are predict.py's, whoever calls predict()
OUTPUT_SUFFIXES = (".json", ".csv")


def list_images(directory: Path):
    """Entries directly inside `directory` named as images (by the extensions PIL can open), sorted, and the
    other entries, which are reported rather than silently skipped. An image entry that is no regular file (a
    FIFO, a symlink loop) is kept, so that captioning it reports what it is."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: " + ("is a file, not a directory" if directory.exists()
                                             else "no such directory"))
    extensions = set(Image.registered_extensions())
    images, ignored = [], []
    for path in sorted(directory.iterdir()):
        (images if not path.is_dir() and path.suffix.lower() in extensions else ignored).append(path)
    if not images:
        raise ValueError(f"{directory}: no image files found")
    return images, ignored


def features_inputs(path):
    """A features pickle (parse_coco.py) -> one feature row per image, its image_id, and its image's file name
    where the metadata records one per row (parse_coco.py's do), else None."""
    data = read_store(path) if is_store(path) else read_features(path)
    rows = {}
    for caption in data["captions"]:
        rows.setdefault(caption["clip_embedding"], caption["image_id"])
    order = sorted(rows)
    names = metadata_file_names(data["metadata"], data["clip_embedding"].shape[0])
    names = [names[row] for row in order] if names is not None else None
    return [data["clip_embedding"][row] for row in order], [rows[row] for row in order], names


def collect_inputs(config: PredictConfig):
    """(inputs for the Captioner, image ids, the inputs' names where the Captioner cannot know them: the file
    names of a features pickle's images, notices for stderr)."""
    if sum(source is not None for source in (config.image, config.images_dir, config.features)) != 1:
        raise ValueError("give exactly one source of inputs: image files, an images directory or a features "
                         "pickle")
    if config.features:
        features, image_ids, names = features_inputs(config.features)
        return features, image_ids, names, []
    if config.images_dir:
        try:
            paths, ignored = list_images(Path(config.images_dir))
        except ValueError as e:
            raise ValueError(f"--images_dir {e}") from None
        notes = [f"{len(ignored)} entries of {config.images_dir} are not image files and were not captioned: "
                 + ", ".join(p.name for p in ignored[:5]) + (" ..." if len(ignored) > 5 else "")] if ignored else []
    else:
        paths, notes = [Path(p) for p in config.image], []
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


def write_json(path, results: Sequence[CaptionResult], image_ids, num_captions: int) -> None:
    """COCO results format, `[{"image_id", "caption"}]`, plus the file name (and the other captions and their
    scores when several were asked for), written by captioning/data/results.py. Images that failed are not
    entries; they are reported on stderr."""
    several = num_captions > 1
    write_results(path, [Prediction(image_id, r.caption, r.captions[:num_captions] if several else [],
                                    r.source, r.scores[:num_captions] if several else [])
                         for r, image_id in zip(results, image_ids) if r.error is None], beams_key="captions")


def write_csv(path, results: Sequence[CaptionResult], image_ids, num_captions: int) -> None:
    """One row per caption (`rank` 1 is the best), and one row with the `error` for each image that failed; text
    cells as captioning/data/text.py writes them (never a spreadsheet formula), which `read_results` reads back."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for result, image_id in zip(results, image_ids):
                name, image_id = to_csv_cell(result.source), to_csv_cell(str(image_id))
                if result.error is not None:
                    writer.writerow([name, image_id, "", "", "", to_csv_cell(result.error)])
                for rank, (caption, score) in enumerate(zip(result.captions[:num_captions],
                                                            result.scores[:num_captions]), start=1):
                    writer.writerow([name, image_id, rank, to_csv_cell(caption), f"{score:.5f}", ""])


def print_results(results: Sequence[CaptionResult], num_captions: int) -> None:
    for result in results:
        source = printable_name(result.source)
        if result.error is not None:
            print(f"{source}\tERROR: {printable_name(result.error)}")
        for caption in result.captions[:num_captions]:
            print(f"{source}\t{caption}")


def output_writer(path):
    """The writer of the file format that `path`'s suffix names."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {path}: the file name must end in .json or .csv")
    return write_json if suffix == ".json" else write_csv


def predict(config: PredictConfig) -> int:
    """Caption `config`'s inputs, then print them or write `config.out`, with notes and errors on stderr.

    Returns the exit status: 0; 1 when some images could not be captioned (the others are still written); 2 when
    the checkpoint, the inputs or the output place cannot be used (captions whose final write failed are saved
    elsewhere, and the error says where)."""
    device = config.device or runtime.default_device(config.quantize)
    budget = runtime.plan_threads(device, loads_images=False, threads=config.threads)
    with runtime.thread_budget(budget):
        try:
            results, image_ids, notes = _caption(config, device)
        except (CheckpointError, FeaturesError, OutputError, ValueError) as e:
            print(f"{PREFIX}error: {e}", file=sys.stderr)
            return 2
        return _report(config, results, image_ids, notes)


def _report(config: PredictConfig, results: Sequence[CaptionResult], image_ids, notes: Sequence[str]) -> int:
    """Notes, then the captions (printed, or written to `config.out`), then the failures; the exit status."""
    for note in notes:
        print(f"{PREFIX}note: {note}", file=sys.stderr)
    if config.out:
        writer = output_writer(config.out)
        try:
            write_or_rescue(config.out, lambda path: writer(path, results, image_ids, config.num_captions), "--out")
        except OutputError as e:
            print(f"{PREFIX}error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {sum(r.error is None for r in results)} captioned images to {config.out}", file=sys.stderr)
    else:
        print_results(results, config.num_captions)
    failed = [r for r in results if r.error is not None]
    for result in failed:
        print(f"{PREFIX}could not caption {result.error}", file=sys.stderr)
    if failed:
        print(f"{PREFIX}{len(failed)} of {len(results)} images could not be captioned", file=sys.stderr)
    return 1 if failed else 0


def _caption(config: PredictConfig, device: str):
    """(a `CaptionResult` per input, their image ids, notes for stderr); every check that can fail comes before
    the captioning, which may take hours."""
    if config.out:
        output_writer(config.out)
        check_output_file(config.out, "--out")
    options = DecodingOptions(decoding=config.decoding, beam_size=config.beam_size,
                              max_length=config.max_length or DEFAULT_MAX_LENGTH, top_p=config.top_p,
                              temperature=config.temperature, num_captions=config.num_captions, seed=config.seed)
    inputs, image_ids, names, notes = collect_inputs(config)
    captioner = Captioner.from_pretrained(config.checkpoint, device=device, precision=config.precision,
                                          encoder_weights=config.encoder_weights, quantize=config.quantize)
    runtime.announce(captioner.precision, prefix=PREFIX)
    max_length, clipped = captioner.fit_max_length(config.max_length)
    if clipped:
        print(f"{PREFIX}note: {clipped}", file=sys.stderr)
    options = dataclasses.replace(options, max_length=max_length)
    results = captioner.predict(inputs, options, batch_size=config.batch_size, progress=len(inputs) > 1)
    if names is not None:
        results = [dataclasses.replace(r, source=name) for r, name in zip(results, names)]
    return results, image_ids, notes
