"""What a training run keeps besides the model: RNG states, resume checkpoints, the training log.

A resume checkpoint holds everything an uninterrupted run still has in memory (model, optimizer, scheduler,
gradient scaler, step, epoch, position in the epoch's data order, every process's RNG states, config), so
`--resume` continues exactly where the run stopped. It is written by rank 0 through a temporary file and a
rename and read back without executing pickled code. It carries a SHA-256 of its contents, verified on load, and
the checkpoint it replaces is kept beside it (`<prefix>_resume.prev.pt`), so that a corrupt file is refused and
the run continues from the one before.
"""
import hashlib
import json
import math
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from models.checkpoint_io import CheckpointError, atomic_write, hash_tensor

STATE_FORMAT = "tinytiny-train-state"
STATE_VERSION = 1


class TrainingError(RuntimeError):
    """The run cannot continue (for example the loss became NaN); the last checkpoint stays intact."""


# ---- processes ---------------------------------------------------------------------------------------------

# ---- RNG states --------------------------------------------------------------------------------------------

def capture_rng(device: torch.device) -> Dict:
    """This process's RNG states, as tensors and plain values a weights-only load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- resume checkpoints ------------------------------------------------------------------------------------

class CorruptCheckpoint(CheckpointError):
    """A resume checkpoint that cannot be read, or whose contents do not match the checksum written with it."""


def state_checksum(value) -> str:
    """SHA-256 over a resume state: every tensor's dtype, shape and bytes and every other value's repr, in key
    order; changes wherever a byte of the saved contents changed."""
    digest = hashlib.sha256()

    def walk(v):
        if isinstance(v, torch.Tensor):
            digest.update(b"T")
            hash_tensor(digest, v)
        elif isinstance(v, dict):
            digest.update(f"D{len(v)}".encode())
            for k in sorted(v, key=repr):
                digest.update(repr(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            digest.update(f"L{len(v)}".encode())
            for item in v:
                walk(item)
        else:
            digest.update(repr(v).encode())

    walk(value)
    return digest.hexdigest()


def previous_state_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".prev" + Path(path).suffix)


def save_state(path: Path, state: Dict) -> None:
    """Write the state atomically with its checksum; the checkpoint it replaces becomes the previous one."""
    path = Path(path)
    state = dict(state, format=STATE_FORMAT, version=STATE_VERSION)
    state["sha256"] = state_checksum(state)
    with atomic_write(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
        except RuntimeError as e:  # torch reports a failed write ("unexpected pos"); the OSError says why
            if isinstance(e.__context__, OSError):
                raise OSError(e.__context__.errno, e.__context__.strerror, str(path)) from e
            raise
        if path.is_file():  # the rename below replaces it: keep it, for when this one turns out corrupt
            os.replace(path, previous_state_path(path))


def load_resumable(path: Path) -> Tuple[Dict, Optional[str]]:
    """`load_state(path)`, or, when `path` is corrupt and the previous checkpoint is intact, that one, with the
    message saying so (None otherwise). The caller sets the corrupt file aside (`set_aside_corrupt`) once every
    process has read, so that the next checkpoint does not keep it as the previous one."""
    path = Path(path)
    try:
        return load_state(path), None
    except CorruptCheckpoint as error:
        previous = previous_state_path(path)
        if not previous.is_file():
            raise CheckpointError(f"{error}; there is no previous checkpoint ({previous}) to continue from") from None
        state = load_state(previous)
        return state, (f"warning: {error}: refused, kept as {corrupt_path(path)}; continuing from the previous "
                       f"checkpoint {previous} (step {state['step']})")


def corrupt_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".corrupt")


def set_aside_corrupt(path: Path) -> None:
    if Path(path).is_file():
        os.replace(path, corrupt_path(path))


def load_state(path: Path) -> Dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such resume checkpoint" + (" (it is a directory)" if path.is_dir()
                                                                      else ""))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: not a readable resume checkpoint (corrupt or truncated?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a resume checkpoint written by train.py (export directories and "
                              f"weight files cannot be resumed from)")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: resume checkpoint version {state.get('version')!r}, this code reads "
                              f"{STATE_VERSION}")
    recorded = state.pop("sha256", None)
    if recorded is None:
        print(f"note: {path} was written before resume checkpoints carried a checksum; it is loaded unverified",
              flush=True)
    elif state_checksum(state) != recorded:
        raise CorruptCheckpoint(f"{path} is corrupt: its contents do not match the checksum written with it")
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "epoch", "epoch_samples", "data_order", "rng",
                           "config", "data") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: resume checkpoint lacks {missing}")
    return state


def config_differences(saved: Dict, current: Dict) -> List[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in keys
            if saved.get(k) != current.get(k)]


# ---- the training log --------------------------------------------------------------------------------------

class TrainLog:
    """`train_log.jsonl` (one JSON object per line: step, loss, lr, throughput; validation loss per epoch)
    and `loss_curve.png`, written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.path = Path(out_dir) / "train_log.jsonl"
        self.plot_path = Path(out_dir) / "loss_curve.png"
        self.enabled = enabled

    def start(self, resume_step: Optional[int]) -> None:
        """A fresh run starts an empty log; a resumed one keeps only the records up to its checkpoint's step
        (a record cut short by a kill is dropped)."""
        if not self.enabled:
            return
        keep = []
        if resume_step is not None and self.path.is_file():
            keep = [r for r in self.records() if r.get("step", 0) <= resume_step]
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def records(self) -> List[Dict]:
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # only the last line can be partial, after a kill mid-write
        return out

    def append(self, record: Dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """The loss curve (training loss per logged interval, validation loss per epoch) as a PNG."""
        if not self.enabled or not self.path.is_file():
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        records = self.records()
        train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy per caption token")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
        with atomic_write(self.plot_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
