"""The whole pipeline on a shapes dataset (demo.py, `make demo`): data, decoder, training, captions, scores.

Generates the synthetic shapes dataset (captioning/data/shapes.py) unless given one, trains a byte-level BPE
tokenizer on its captions, builds a small GPT-2, trains a small timm encoder end to end with the mapper and the
decoder (captioning.training), captions the test split (the Captioner), scores it (captioning.evaluation) and
checks each caption's colours, shapes and positions against the scene. The recipe is `recipe`, the scoring
`scoring`, what is shown `report`; this module runs them in order.
"""
import shutil
import time
from pathlib import Path
from typing import Dict

from captioning.configs import DemoConfig
from captioning.data.annotations import read_annotations
from captioning.demo.recipe import (ANNOTATION_FILES, build_decoder, dataset, epochs_for, images_root, scst_config,
                                    train_config)
from captioning.demo.report import print_stages_side_by_side, print_summary, result_line, write_grid
from captioning.demo.scoring import Figures, accuracy, baseline, caption_test_split, ground_truth, score
from captioning.outputs import check_output_dir
from captioning.prediction import write_json
from captioning.training.runner import train

CROSS_ENTROPY, SCST = "cross_entropy", "scst"  # the stages, in order


class Stages:
    """Seconds spent in each stage of the run, in order."""

    def __init__(self):
        self.start, self.seconds = time.time(), {}

    def done(self, name: str) -> None:
        self.seconds[name] = round(time.time() - self.start - sum(self.seconds.values()), 1)


class Run:
    """What every stage of one demo run shares: the dataset, its records, the decoder and the output folder."""

    def __init__(self, config: DemoConfig, out: Path, data: Path):
        self.config, self.out, self.data = config, out, data
        self.root = images_root(data)
        self.train_records = read_annotations(data / "captions_train.json", images_root=self.root)
        self.test_records = read_annotations(data / "captions_test.json", images_root=self.root)
        self.train_captions = [c for r in self.train_records for c in r.captions]
        self.scenes = ground_truth(data, self.test_records)

    def fresh(self, name: str) -> Path:
        run_dir = self.out / name
        if run_dir.exists():  # the demo's own output: each run trains afresh instead of refusing to overwrite it
            print(f"note: replacing the previous demo run in {run_dir}")
            shutil.rmtree(run_dir)
        return run_dir

    def train_stages(self, gpt2_dir: Path, stages: Stages) -> Dict[str, Path]:
        """Train cross-entropy, then (--scst) CIDEr optimisation from its export; the export of each stage."""
        c = self.config
        exports = {}
        run_dir = self.fresh("run")
        train(train_config(self.data, self.root, gpt2_dir, run_dir,
                           epochs_for(len(self.train_captions), c, c.steps if c.lora_r is None else c.lora_steps), c))
        exports[CROSS_ENTROPY] = run_dir / "demo_latest"
        stages.done("train")
        if c.scst:
            scst_dir = self.fresh("run_scst")
            train(scst_config(self.data, self.root, len(self.train_records), exports[CROSS_ENTROPY], scst_dir, c))
            exports[SCST] = scst_dir / "demo_latest"
            stages.done("scst")
        return exports

    def files(self, stage: str, last: str) -> tuple:
        """(predictions file, report folder) of a stage: the last stage's keep the plain names
        (test_predictions.json, eval/), an earlier stage's carry its name."""
        suffix = "" if stage == last else f"_{stage}"
        return self.out / f"test_predictions{suffix}.json", self.out / f"eval{suffix}"

    def caption(self, export: Path, path: Path) -> Path:
        """Caption the test split with `export` into the predictions file `path`."""
        results = caption_test_split(export, self.test_records, self.config)
        write_json(path, results, [r.image_id for r in self.test_records], 1)
        return path

    def score(self, path: Path, report_dir: Path) -> Figures:
        return score(path, self.data, self.root, self.scenes, report_dir)

    def caption_and_score(self, exports: Dict[str, Path], stages: Stages) -> Dict[str, Figures]:
        last = list(exports)[-1]
        predictions = {stage: self.caption(export, self.files(stage, last)[0]) for stage, export in exports.items()}
        stages.done("caption")
        return {stage: self.score(path, self.files(stage, last)[1]) for stage, path in predictions.items()}


def run_demo(config: DemoConfig) -> Dict:
    """Run the pipeline; returns the accuracy per fact, CIDEr, the baseline's CIDEr and the seconds per stage
    (with --scst, the figures after CIDEr optimisation, and those of cross-entropy alone under "cross_entropy")."""
    out = check_output_dir(config.out_dir, "--out_dir")
    stages = Stages()
    run = Run(config, out, dataset(config, out))
    stages.done("data")
    gpt2_dir = build_decoder(run.train_captions, out / "decoder", config.seed, config.decoder_type,
                             frozen_embeddings=config.lora_r is not None)
    stages.done("tokenizer")
    figures = run.caption_and_score(run.train_stages(gpt2_dir, stages), stages)
    final = figures[SCST if config.scst else CROSS_ENTROPY]
    most_frequent, baseline_cider = baseline(run.train_captions, run.test_records)
    write_grid(out / "test_captions.png", run.test_records, final.predictions)
    stages.done("evaluate")
    return report(figures, final, most_frequent, baseline_cider, run, stages)


def report(figures: Dict[str, Figures], final: Figures, most_frequent: str, baseline_cider: float, run: Run,
           stages: Stages) -> Dict:
    """Print the summary and the RESULT line; the figures as run_demo returns them."""
    result = {"accuracy": final.accuracy, "cider": final.cider, "baseline_cider": baseline_cider}
    print_summary(result, most_frequent, final.predictions, run.scenes, run.test_records)
    if SCST in figures:
        xe = {"accuracy": figures[CROSS_ENTROPY].accuracy, "cider": figures[CROSS_ENTROPY].cider}
        print_stages_side_by_side(xe, result)
        result["cross_entropy"] = xe
    print(f"stages (s): {stages.seconds}; grid of test images with captions: {run.out / 'test_captions.png'}")
    result.update(seconds=round(time.time() - stages.start, 1), stages=stages.seconds)
    print(result_line(result))
    return result


__all__ = ["ANNOTATION_FILES", "DemoConfig", "Figures", "Run", "Stages", "accuracy", "epochs_for", "images_root",
           "run_demo"]
