"""Caption metrics during training (train.py --eval_every): caption a fixed set of validation images with the
export just written, score CIDEr and BLEU-4, and keep the best export by CIDEr as `<out_dir>/best/`.

Rank 0 does the work while the other processes wait at a barrier, as they do for exports.
"""
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Hashable, List, Optional

import torch

from captioning.inference import Captioner
from captioning.metrics import score_captions
from captioning.runtime import Precision
from captioning.training.config import TrainConfig
from models.captioner import ClipCaptionModel
from models.checkpoint_io import atomic_directory
from models.decoding import DecodingOptions
from models.model_card import CARD_FILE, render_model_card

BEST_DIR = "best"
BEST_INFO = "eval.json"  # inside best/: the scores of the export held there
BEAM_SIZE = 3


@dataclass
class EvalImages:
    items: List  # feature tensors or image paths, as `Captioner.predict` takes them
    ids: List[Hashable]  # one per item: its row in the validation features or image list
    references: Dict[Hashable, List[str]]  # every validation caption of each image


def select_eval_images(val, n: int) -> EvalImages:
    """The first `n` distinct images of the validation set, in caption order (deterministic), with all of
    their validation captions as references."""
    rows: Dict[int, List[str]] = {}
    for c in val.caption_ids:
        row = int(val.image_index[c])
        if row in rows:
            rows[row].append(val.captions[c])
        elif len(rows) < n:
            rows[row] = [val.captions[c]]
    ids = list(rows)
    paths = getattr(val, "paths", None)
    items = [paths[r] for r in ids] if paths is not None else [val.features[r].float() for r in ids]
    return EvalImages(items, ids, rows)


def read_best_cider(out_dir: Path) -> float:
    """The CIDEr of the export kept in best/ (-inf when there is none), so a resumed run keeps a better one."""
    path = Path(out_dir) / BEST_DIR / BEST_INFO
    if not path.is_file():
        return -math.inf
    try:
        return float(json.loads(path.read_text())["cider"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a best-export record ({e}); move best/ aside to start a new one") from e


class CaptionEvaluation:
    """hook(trainer, epoch, export_dir) for Trainer's epoch_end_hooks; returns the scores on rank 0."""

    def __init__(self, images: EvalImages, every: int, epochs: int, best_cider: float = -math.inf,
                 batch_size: int = 32, dtype: torch.dtype = torch.float32):
        self.images = images
        self.dtype = dtype  # of the model while captioning
        self.every = every
        self.epochs = epochs
        self.best_cider = best_cider
        self.batch_size = batch_size

    def due(self, trainer, epoch: int) -> bool:
        """As --save_every: epochs 0, N, 2N, ..., the last, and wherever the run stops (--max_steps)."""
        return epoch % self.every == 0 or epoch == self.epochs - 1 or trainer.pos.step >= trainer.total_steps

    def __call__(self, trainer, epoch: int, export_dir: Path) -> Optional[Dict]:
        if not self.due(trainer, epoch):
            return None
        metrics = self.evaluate(trainer, epoch, export_dir) if trainer.dist.is_main else None
        trainer.dist.barrier()
        return metrics

    def evaluate(self, trainer, epoch: int, export_dir: Path) -> Dict:
        # The export just written is loaded back rather than the in-memory model wrapped: the scores then
        # describe exactly the files best/ keeps, the training model's mode and dtype are left alone, and
        # the export is checked to load. The feature encoder a features export records is not built: the
        # validation features are already encoded (Captioner.from_pretrained would load its weights).
        model = ClipCaptionModel.from_pretrained(export_dir).to(trainer.dist.device, self.dtype)
        captioner = Captioner(model, trainer.tokenizer)
        options = DecodingOptions(beam_size=BEAM_SIZE, max_length=captioner.fit_max_length(None)[0])
        results = captioner.predict(self.images.items, options, self.batch_size, progress=True, on_error="raise")
        predictions = {i: r.caption or "" for i, r in zip(self.images.ids, results)}
        del captioner, model
        scores = score_captions(predictions, self.images.references, metrics=("BLEU", "CIDEr"))["metrics"]
        record = {"eval_cider": scores["CIDEr"], "eval_bleu4": scores["Bleu_4"], "eval_images": len(predictions)}
        best = record["eval_cider"] > self.best_cider
        if best:
            self.keep_best(export_dir, epoch, trainer.pos.step, record)
        print(f"epoch {epoch}: CIDEr {record['eval_cider']:.2f}, BLEU-4 {record['eval_bleu4']:.2f} on "
              f"{len(predictions)} validation images" + (f"; new best, copied to {BEST_DIR}/" if best else ""),
              flush=True)
        return record

    def keep_best(self, export_dir: Path, epoch: int, step: int, record: Dict) -> None:
        """Copy the export to best/ with its scores, atomically: a complete best/ exists at every instant."""
        info = {"cider": record["eval_cider"], "bleu4": record["eval_bleu4"], "eval_images": record["eval_images"],
                "epoch": epoch, "step": step, "source": Path(export_dir).name}
        with atomic_directory(Path(export_dir).parent / BEST_DIR) as tmp:
            shutil.copytree(export_dir, tmp, dirs_exist_ok=True)
            (tmp / BEST_INFO).write_text(json.dumps(info, indent=2))
            card = render_model_card(json.loads((tmp / "config.json").read_text()),
                                     {"CIDEr": info["cider"], "Bleu_4": info["bleu4"]},
                                     f"{info['eval_images']} validation images (epoch {epoch}, step {step})")
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        self.best_cider = record["eval_cider"]


def build_caption_evaluation(config: TrainConfig, val, precision: Precision) -> CaptionEvaluation:
    """train.py's hook; `val` is the validation dataset (check_args made sure there is one); captions are
    decoded in `precision`, the one training computes in."""
    best = read_best_cider(Path(config.out_dir)) if config.resume is not None else -math.inf
    return CaptionEvaluation(select_eval_images(val, config.eval_images), config.eval_every, config.epochs, best,
                             dtype=precision.dtype)
