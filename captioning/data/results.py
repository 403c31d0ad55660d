"""The COCO results file, `[{"image_id", "caption", ...}]`: its one writer and its one reader.

predict.py writes an entry per captioned image with its `file_name`, and with `--num_captions` above 1 the other
captions and their scores (`captions`, `scores`); evaluate.py --checkpoint keeps every beam (`beams`). The reader
takes either, and predict.py's CSV file (`read_results` of a `.csv` path: rank 1 is the caption, every rank a
beam, rows of images that failed are not predictions), refusing malformed entries, empty captions (unless
allowed) and duplicate ids. File names and ids are written as captioning/data/text.py says.
"""
import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, List, Optional, Sequence

from captioning.data.annotations import image_id_key
from captioning.data.text import from_csv_cell, printable_name
from models.checkpoint_io import atomic_write


class ResultsError(ValueError):
    """A results file that is missing, malformed, or holds an entry that cannot be used."""


@dataclass
class Prediction:
    image_id: Hashable
    caption: str
    beams: List[str] = field(default_factory=list)  # every beam (or sample), best first, when kept
    file_name: Optional[str] = None
    scores: List[float] = field(default_factory=list)  # of `beams`, when kept


def write_results(path, predictions: Sequence[Prediction], beams_key: str = "beams") -> None:
    """Write atomically; `beams` are stored under `beams_key` ("captions" where predict.py writes them, with their
    scores), and fields left empty are left out."""
    entries = []
    for p in predictions:
        entry = {"image_id": printable_name(p.image_id) if isinstance(p.image_id, str) else p.image_id,
                 "caption": p.caption}
        if p.file_name is not None:
            entry["file_name"] = printable_name(p.file_name)
        if p.beams:
            entry[beams_key] = list(p.beams)
        if p.scores:
            entry["scores"] = [round(s, 5) for s in p.scores]
        entries.append(entry)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(entries, indent=1, ensure_ascii=False), encoding="utf-8")


def _parse_entry(entry, where: str, allow_empty: bool) -> Prediction:
    if not isinstance(entry, dict):
        raise ResultsError(f"{where}: expected an object {{\"image_id\", \"caption\"}}, got {type(entry).__name__}")
    for key in ("image_id", "caption"):
        if key not in entry:
            raise ResultsError(f"{where}: missing key {key!r}")
    image_id = image_id_key(entry["image_id"])  # the annotation readers' key: '391895' and 391895 are one image
    if image_id is None:
        raise ResultsError(f"{where}: image_id {entry['image_id']!r} is not usable; expected an integer or a string")
    caption = entry["caption"]
    if not isinstance(caption, str):
        raise ResultsError(f"{where} (image_id {image_id!r}): caption is {type(caption).__name__}; expected a "
                           f"string")
    if not caption.strip() and not allow_empty:
        raise ResultsError(f"{where} (image_id {image_id!r}): empty caption; every image needs a caption "
                           f"(--allow_empty scores empty captions as 0)")
    key = "beams" if "beams" in entry else "captions"  # predict.py writes every beam as "captions"
    beams = entry.get(key, [])
    if not isinstance(beams, list) or not all(isinstance(b, str) for b in beams):
        raise ResultsError(f"{where} (image_id {image_id!r}): {key!r} must be a list of strings")
    return Prediction(image_id, caption, beams, entry.get("file_name"))


CSV_COLUMNS = ("file_name", "image_id", "rank", "caption", "score", "error")  # predict.py's CSV


def _csv_entries(path: Path, text: str) -> list:
    """predict.py's CSV -> entries as in the JSON file, one per captioned image, in order of first appearance."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or [c.strip() for c in header] != list(CSV_COLUMNS):
        raise ResultsError(f"{path}: line 1: expected predict.py's CSV header {','.join(CSV_COLUMNS)}, got "
                           f"{header}")
    entries = {}
    for row in reader:
        where = f"{path}: line {reader.line_num}"
        if len(row) != len(CSV_COLUMNS):
            raise ResultsError(f"{where}: {len(row)} column(s); expected {len(CSV_COLUMNS)}")
        file_name, image_id, rank, caption, _, error = (from_csv_cell(cell) for cell in row)
        if error and not caption:  # an image predict.py could not caption: not a prediction
            continue
        if not rank.strip().isdigit():
            raise ResultsError(f"{where}: rank {rank!r}; expected a positive integer")
        entry = entries.setdefault(image_id, {"image_id": image_id, "file_name": file_name, "ranks": []})
        entry["ranks"].append((int(rank), caption))
    out = []
    for entry in entries.values():
        beams = [caption for _, caption in sorted(entry.pop("ranks"))]
        out.append({**entry, "caption": beams[0], **({"beams": beams} if len(beams) > 1 else {})})
    return out


def read_results(path, allow_empty: bool = False) -> List[Prediction]:
    """A COCO results file (or predict.py's CSV) -> predictions, refusing malformed entries, empty captions and
    duplicate ids."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such predictions file")
    try:
        text = path.read_text(encoding="utf-8")
        data = _csv_entries(path, text) if path.suffix.lower() == ".csv" else json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(data, list):
        raise ResultsError(f"{path}: expected a JSON list of {{\"image_id\", \"caption\"}} objects (the COCO "
                           f"results format), got a JSON {type(data).__name__}")
    if not data:
        raise ResultsError(f"{path}: the list of predictions is empty")
    predictions = [_parse_entry(entry, f"{path}: entry {i}", allow_empty) for i, entry in enumerate(data)]
    counts = Counter(p.image_id for p in predictions)
    duplicates = [i for i, n in counts.items() if n > 1]
    if duplicates:
        first = duplicates[0]
        where = [i for i, p in enumerate(predictions) if p.image_id == first]
        raise ResultsError(f"{path}: {len(duplicates)} image id(s) have several captions, e.g. image_id {first!r} "
                           f"at entries {where}; expected one caption per image")
    return predictions
