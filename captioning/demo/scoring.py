"""How the demo scores a model: caption the test split, then CIDEr (as evaluate.py computes it) and the share of
captions right on each fact of the scene (colour, shape, position), against a baseline that always answers the
most frequent training caption.
"""
import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from captioning import runtime
from captioning.configs import DemoConfig
from captioning.data import shapes
from captioning.data.results import read_results
from captioning.data.shapes import parse_caption, same_scene_facts
from captioning.evaluation import EvaluateConfig, evaluate
from captioning.inference import Captioner
from captioning.metrics import score_captions
from models.decoding import DecodingOptions


@dataclass
class Figures:
    """One stage's figures: the accuracy per fact (None where no test image has a known scene) and CIDEr, with
    the captions they were measured on."""
    accuracy: Dict[str, Optional[float]]
    cider: float
    predictions: Dict


def ground_truth(data: Path, records) -> Dict:
    """The scene of each test image: the generator's `scene` when the annotation file has it, else the scene its
    reference captions describe (datasets made elsewhere; the first reference that parses). Images whose scene
    is unknown are left out of the accuracy, and the caller says how many."""
    scenes = shapes.read_scenes(data / "captions_test.json")
    for record in records:
        if record.image_id not in scenes:
            parsed = next((s for s in map(parse_caption, record.captions) if s is not None), None)
            if parsed is not None:
                scenes[record.image_id] = parsed
    return scenes


def accuracy(predictions, scenes) -> Dict[str, Optional[float]]:
    """Percent of captions right on each fact, over the images with a known scene (None when there are none)."""
    totals, known = collections.Counter(), [i for i in predictions if i in scenes]
    for image_id in known:
        facts = same_scene_facts(parse_caption(predictions[image_id]), scenes[image_id])
        totals.update({k: int(v) for k, v in facts.items()})
    return {k: 100.0 * totals[k] / len(known) if known else None for k in ("colour", "shape", "position")}


def caption_test_split(export: Path, records, config: DemoConfig, quantize: str = "none") -> List:
    """The demo's captions of `records` by `export` (`quantize`: as Captioner.from_pretrained takes it)."""
    captioner = Captioner.from_pretrained(export, device=config.device, precision=config.precision, quantize=quantize)
    with runtime.thread_budget(runtime.plan_threads(config.device, loads_images=False, threads=config.threads)):
        results = captioner.predict([r.path for r in records], DecodingOptions(beam_size=config.beam_size,
                                                                               max_length=40),
                                    batch_size=64, progress=True)
    failed = [r for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} test images could not be captioned, e.g. {failed[0].error}")
    return results


def score(predictions_file: Path, data: Path, root: Path, scenes: Dict, report_dir: Path) -> Figures:
    """The figures of a predictions file; the full COCO report goes to `report_dir`."""
    report = evaluate(EvaluateConfig(annotations=str(data / "captions_test.json"), predictions=str(predictions_file),
                                     images_root=str(root), out_dir=str(report_dir)))
    predictions = {p.image_id: p.caption for p in read_results(predictions_file)}
    return Figures(accuracy(predictions, scenes), report["metrics"]["CIDEr"], predictions)


def baseline(train_captions: List[str], test_records) -> tuple:
    """(the most frequent training caption, the CIDEr of answering it for every test image)."""
    most_frequent = collections.Counter(train_captions).most_common(1)[0][0]
    references = {r.image_id: r.captions for r in test_records}
    cider = score_captions({i: most_frequent for i in references}, references, metrics=("CIDEr",))["metrics"]["CIDEr"]
    return most_frequent, cider
