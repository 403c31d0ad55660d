"""What evaluate.py runs: captions (a COCO results file, or those a checkpoint gives the split's images) scored
against the references with the COCO caption metrics, into metrics.json, scores_hist.png and, for a checkpoint,
predictions.json. (captioning/training/evaluation.py is the other job: the metrics train.py computes as it trains.)

    from captioning.evaluation import EvaluateConfig, evaluate
    report = evaluate(EvaluateConfig(annotations="dataset_coco.json", split="test", predictions="results.json"))
"""
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from captioning.configs import EvaluateConfig
from captioning.data.annotations import AnnotationError, ImageRecord, read_annotations
from captioning.data.shards import image_exists
from captioning.data.results import Prediction, ResultsError, read_results, write_results
from captioning.metrics import MetricsError, original_bleu, require_toolkit, score_captions
from captioning.outputs import OutputError, check_output_dir, write_dir_or_rescue, write_or_rescue
from models.checkpoint_io import CheckpointError, atomic_write
from models.model_card import write_scores

METRIC_LABELS = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
ORIGINAL_BLEU_LABEL = ("original notebook BLEU-4 (NLTK sentence BLEU, smoothing 4, best beam, whitespace split, "
                       "first 5 references)")
NOT_COMPARABLE = "not comparable with published results"


class EvaluationError(Exception):
    """A user's mistake (bad file, ids that do not match, missing coverage): reported without a stack trace."""


# What `evaluate` raises for a user's mistake: a message to show, not a stack trace.
USER_ERRORS = (EvaluationError, AnnotationError, MetricsError, CheckpointError, OutputError, ResultsError)


# -------------------------------------------------------------------------------------------------- references

def load_references(annotations, split: Optional[str], images_root="./data/coco"):
    """Annotation records (any format captioning.data.annotations reads) and {image_id: [reference, ...]} for
    those with captions."""
    records = read_annotations(annotations, split=split, images_root=images_root)
    if not any(r.captions for r in records):
        where = f"split {split!r} of " if split else ""
        raise EvaluationError(f"{where}{annotations} holds no reference captions")
    return records, {r.image_id: list(r.captions) for r in records if r.captions}


def coverage_percent(covered: int, total: int) -> str:
    """`covered` of `total` as a percentage that reads 100% only when nothing is missing and 0% only when nothing
    is covered: 4,999 of 5,000 is 99.98%, not 100.0%."""
    percent = 100 * covered / total
    decimals = 1
    while decimals < 12 and (round(percent, decimals) == 100 and covered < total or
                             round(percent, decimals) == 0 and covered > 0):
        decimals += 1
    return f"{percent:.{decimals}f}%"


def check_coverage(predictions: Sequence[Prediction], references: Dict, allow_partial: bool, source: str) -> Dict:
    """Every prediction must have references; every reference image needs a prediction unless allow_partial."""
    unknown = [p.image_id for p in predictions if p.image_id not in references]
    if unknown:
        hint = "check --annotations and --split"
        if all(isinstance(i, str) for i in unknown) and all(isinstance(i, int) for i in references):
            hint = "the predictions use string ids but the references use integer COCO ids"
        raise EvaluationError(f"{len(unknown)} of {len(predictions)} predictions are for image ids not in the "
                              f"references ({source}), e.g. {unknown[:5]}; {hint}")
    covered = len(predictions)
    coverage = {"predicted": covered, "reference_images": len(references),
                "fraction": covered / len(references)}
    print(f"coverage: predictions for {covered:,} of {len(references):,} reference images "
          f"({coverage_percent(covered, len(references))})")
    if covered < len(references):
        predicted = {p.image_id for p in predictions}
        missing = [i for i in references if i not in predicted]
        if not allow_partial:
            raise EvaluationError(f"{len(missing):,} reference image(s) of {source} have no prediction, e.g. "
                                  f"{missing[:5]}; scores on a subset are not comparable with full-split scores. "
                                  f"Pass --allow_partial to score only the predicted images")
        print(f"warning: scoring only the {covered:,} predicted images (--allow_partial); these scores are not "
              f"comparable with scores on the full split")
    return coverage


# ------------------------------------------------------------------------------------------- --checkpoint mode

def caption_records(records: Sequence[ImageRecord], config: EvaluateConfig) -> Tuple[List[Prediction], List[str]]:
    """Caption every record's image with the Captioner (beam search, every beam kept); its batches decode images
    ahead where the device leaves cores free.

    Returns the predictions and one message per image that could not be read.
    """
    # Imported here: scoring a results file needs neither transformers nor the model code.
    from captioning import runtime
    from captioning.inference import Captioner, DecodingOptions

    device = config.device or runtime.default_device(config.quantize)
    budget = runtime.plan_threads(device, loads_images=True, threads=config.threads)
    with runtime.thread_budget(budget):
        try:
            captioner = Captioner.from_pretrained(config.checkpoint, device=device, precision=config.precision,
                                                  quantize=config.quantize)
        except ValueError as e:  # a precision or quantization the device cannot take
            raise EvaluationError(str(e)) from None
        runtime.announce(captioner.precision)
        print(budget.describe(), file=sys.stderr)
        if captioner.encoder is None:
            raise EvaluationError(f"{config.checkpoint} records no image encoder, so it captions precomputed "
                                  f"features only: caption the split's features with predict.py, then score that "
                                  f"results file with --predictions")
        try:
            max_length, clipped = captioner.fit_max_length(config.max_length)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        if clipped:
            print(f"note: {clipped}", file=sys.stderr)
        options = DecodingOptions(decoding="beam", beam_size=config.beam_size, num_captions=config.beam_size,
                                  max_length=max_length)
        results = captioner.predict([r.path for r in records], options, batch_size=config.batch_size,
                                    progress=True, on_error="keep")
    predictions = [Prediction(r.image_id, res.captions[0], list(res.captions))
                   for r, res in zip(records, results) if res.error is None]
    return predictions, [res.error for res in results if res.error is not None]


# ------------------------------------------------------------------------------------------------------ report

def format_table(metrics: Dict[str, float], num_images: int, requested: Sequence[str],
                 original: Optional[float]) -> str:
    lines = [f"COCO caption metrics (x100, PTB-tokenised) on {num_images:,} images"]
    for key, label in METRIC_LABELS.items():
        if key in metrics:
            lines.append(f"  {label:<8} {metrics[key]:7.1f}")
        elif key == "SPICE" and "SPICE" in requested:
            lines.append(f"  {label:<8} skipped (see the note below)")
    if original is not None:
        lines.append(f"{NOT_COMPARABLE.capitalize()}:\n  {ORIGINAL_BLEU_LABEL}: {original:.1f}")
    return "\n".join(lines)


def plot_histograms(path, per_image: Dict[str, List[float]], corpus: Dict[str, float]) -> None:
    """One histogram per per-image score (the original notebook drew one for BLEU-4). Corpus BLEU pools n-gram
    counts over all images, so it differs from the mean of per-image BLEU; both are shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_image), figsize=(5 * len(per_image), 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], per_image.items()):
        mean = sum(values) / len(values)
        ax.hist(values, bins=40, color="tab:blue", alpha=0.8)
        ax.axvline(mean, color="tab:red", linestyle="--", label=f"per-image mean {mean:.1f}")
        if name in corpus:
            ax.axvline(corpus[name], color="tab:green", linestyle=":", label=f"corpus {corpus[name]:.1f}")
        ax.set(title=f"per-image {name} ({len(values):,} images)", xlabel=f"{name} (x100)", ylabel="images")
        ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, result: Dict, predictions: Sequence[Prediction], original: Optional[Dict],
                 info: Dict) -> Dict:
    per_image = []
    for p in predictions:
        row = {"image_id": p.image_id, "caption": p.caption, **result["per_image"][p.image_id]}
        if original is not None:
            row["original_Bleu_4"] = original["per_image"][p.image_id]
        per_image.append(row)
    report = {"units": "x100, as papers report them", "metrics": result["metrics"], "num_images":
              result["num_images"], **info, "notes": result["notes"], "per_image": per_image}
    if original is not None:
        report["original_bleu"] = {"Bleu_4": original["Bleu_4"],
                                   "description": f"{ORIGINAL_BLEU_LABEL}: {NOT_COMPARABLE}"}
    with atomic_write(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    histograms = {METRIC_LABELS[k]: [row[k] for row in per_image] for k in ("Bleu_4", "CIDEr") if k in
                  result["metrics"]}
    if original is not None:
        histograms["original BLEU-4"] = [row["original_Bleu_4"] for row in per_image]
    if histograms:
        corpus = {METRIC_LABELS[k]: v for k, v in result["metrics"].items()}
        plot_histograms(out_dir / "scores_hist.png", histograms, corpus)
    return report


# -------------------------------------------------------------------------------------------------- evaluate

def default_out_dir(config: EvaluateConfig) -> Path:
    """Beside the checkpoint or the predictions file, named after it (and the split)."""
    if config.checkpoint:
        checkpoint = Path(config.checkpoint)
        return checkpoint.parent / f"{checkpoint.name}_eval_{config.split or Path(config.annotations).stem}"
    predictions = Path(config.predictions)
    return predictions.parent / f"{predictions.stem}_eval"


def _predict(config: EvaluateConfig, records: Sequence[ImageRecord], out_dir: Path) -> List[Prediction]:
    present, missing = [], []
    for r in records:
        (present if image_exists(r.path) else missing).append(r)
    if missing and not config.allow_partial:
        raise EvaluationError(f"{len(missing):,} of {len(records):,} images are missing, e.g. {missing[0].path}; "
                              f"check --images_root (or pass --allow_partial to caption the others)")
    predictions, failed = caption_records(present, config)
    path = out_dir / "predictions.json"
    # kept even when some images failed: captioning may have taken hours
    write_or_rescue(path, lambda p: write_results(p, predictions), "--out_dir")
    print(f"wrote {path}")
    failed = [f"{r.path}: file not found" for r in missing] + failed
    if failed and not config.allow_partial:
        raise EvaluationError(f"{len(failed):,} image(s) could not be read, e.g. {failed[0]}; the other images' "
                              f"captions are in {path}: score them with --predictions {path} --allow_partial")
    if failed:
        print(f"warning: {len(failed):,} image(s) could not be captioned, e.g. {failed[0]}", file=sys.stderr)
    return predictions


def record_scores(config: EvaluateConfig, metrics: Dict[str, float], num_images: int) -> None:
    """Put the scores into a local export's model card (never into the Hugging Face cache, whose snapshot of a
    Hub repository is not the user's to change); an export that cannot be written to is left as it was."""
    directory = Path(config.checkpoint)
    if not directory.is_dir():  # a Hub repository id
        return
    where = f"{num_images:,} images of {config.annotations}" + (f" (split {config.split})" if config.split else "")
    try:
        path = write_scores(directory, metrics, where)
    except OSError as e:
        print(f"note: the scores were not added to {directory / 'README.md'} ({e.strerror})", file=sys.stderr)
        return
    print(f"added the scores to the model card {path}")


def evaluate(config: EvaluateConfig) -> Dict:
    """Score `config.predictions`, or caption the split with `config.checkpoint` and score that; write the report
    to the output directory and return it (what metrics.json holds). Raises one of USER_ERRORS for a user's
    mistake, each checked before the work it would waste."""
    if (config.predictions is None) == (config.checkpoint is None):
        raise EvaluationError("give exactly one source of captions: a predictions file or a checkpoint")
    require_toolkit(nltk=config.original_bleu)  # before any captioning, which may take hours
    source = f"{config.annotations}" + (f", split {config.split}" if config.split else "")
    records, references = load_references(config.annotations, config.split, config.images_root)
    out_dir = check_output_dir(config.out_dir or default_out_dir(config), "--out_dir")  # before captioning, scoring
    if config.checkpoint:
        if config.max_images:
            records = records[:config.max_images]
            references = {r.image_id: references[r.image_id] for r in records if r.image_id in references}
        predictions = _predict(config, records, out_dir)
    else:
        predictions = read_results(config.predictions, allow_empty=config.allow_empty)
    empty = sum(not p.caption.strip() for p in predictions)
    if empty:
        print(f"warning: {empty:,} empty caption(s) score 0", file=sys.stderr)
    coverage = check_coverage(predictions, references, config.allow_partial, source)
    result = score_captions({p.image_id: p.caption for p in predictions}, references, metrics=config.metrics,
                            progress=True)
    original = None
    if config.original_bleu:
        if not any(p.beams for p in predictions):
            result["notes"].append("the predictions hold no 'beams': the original BLEU-4 scores the single "
                                   "caption (the original took the best of 5 beams)")
        original = original_bleu({p.image_id: p.beams or [p.caption] for p in predictions}, references,
                                 progress=True)
    info = {"annotations": str(config.annotations), "split": config.split, "coverage": coverage,
            "predictions": str(out_dir / "predictions.json") if config.checkpoint else str(config.predictions),
            "checkpoint": config.checkpoint, "tokenization": "PTB tokenizer of the COCO caption toolkit, lower-cased, "
                                                          "punctuation removed"}
    report = write_dir_or_rescue(out_dir, lambda d: write_report(d, result, predictions, original, info),
                                 "--out_dir")
    if config.checkpoint:
        record_scores(config, result["metrics"], len(predictions))
    print(format_table(result["metrics"], result["num_images"], config.metrics,
                       None if original is None else original["Bleu_4"]))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'scores_hist.png'}")
    return report
