"""The training loop: optimizer steps over dynamically padded batches, validation, checkpoints, logging.

One code path serves one process and torchrun's many: the model is wrapped in DistributedDataParallel only when
there are several processes, and `Distributed.is_main` gates every print and file write.
"""
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioning.outputs import OutputError, write_or_rescue
from captioning.runtime import FP32, Distributed, Precision
from captioning.training.state import (TrainingError, TrainLog, capture_rng, config_differences, load_resumable,
                                       restore_rng, save_state, set_aside_corrupt)
from models.checkpoint_io import CheckpointError, load_state_dict_strict, remove_stale_temporaries

# Arguments that cannot change what is computed: where and how often things are written, how many processes load
# images, and --resume itself (`--resume latest` after a run started without it).
BOOKKEEPING_ARGS = ("resume", "num_workers", "cache_dir", "log_every", "save_every", "save_every_steps")


def without_bookkeeping(args: dict) -> dict:
    return {k: v for k, v in args.items() if k not in BOOKKEEPING_ARGS}


class CaptionLoss(nn.Module):
    """The model's loss as a forward pass, so DistributedDataParallel sees it and synchronises gradients."""

    def __init__(self, model: nn.Module, images: bool, channels_last: bool = False):
        super().__init__()
        self.model = model
        self.images = images
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, tokens: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.images:
            images = inputs.contiguous(memory_format=self.memory_format)
            return self.model.loss(tokens, mask=mask, images=images)
        return self.model.loss(tokens, inputs, mask)


class MicroBatchLoss(NamedTuple):
    """What a micro-batch's forward pass gives the Stepper: its loss, and figures for the log (CIDEr
    optimisation's rewards), if any."""
    loss: torch.Tensor
    stats: Optional[Dict[str, float]] = None


def to_device(batch: Dict, device: torch.device) -> Dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Stepper:
    """One optimizer step over `grad_accum` micro-batches.

    The loss is the mean over every caption token of the global batch (all micro-batches of all processes),
    as the original's single-batch token mean, so the update is the same however the batch is split across
    processes or accumulation steps. Returns this process's share of that mean (detached, on the device).
    """

    def __init__(self, loss_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 dist: Distributed, precision: Precision = FP32, grad_clip: float = 0.0):
        self.loss_module = loss_module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dist = dist
        self.precision = precision
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(dist.device.type) if self.precision.needs_loss_scaling else None
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def autocast(self):
        # Under bf16 the CPU flash-attention kernel's forward + backward is slower than the math kernel at
        # caption shapes, while in fp32 it is the faster one (docs/benchmarks.md); so bf16 training on the CPU
        # uses the math kernel.
        return self.precision.autocast(self.dist.device, math_attention_on_cpu=True)

    @property
    def caption_loss(self) -> nn.Module:
        """The cross-entropy module validation runs (unwrapped: validation shards differ in length)."""
        module = self.loss_module
        return module.module if isinstance(module, DistributedDataParallel) else module

    def __call__(self, micro_batches: Sequence[Dict], step: int = 0) -> torch.Tensor:
        counts = [b["num_tokens"] for b in micro_batches]
        denom = sum(counts)
        if self.dist.enabled:  # tokens of the global batch; a device tensor, so no host synchronisation
            denom = self.dist.all_reduce(torch.tensor(float(denom), device=self.dist.device))
        # DistributedDataParallel averages gradients over processes; the world size undoes that.
        weights = [count * self.dist.world_size / denom for count in counts]
        losses = self.backward(micro_batches, weights, lambda batch: MicroBatchLoss(
            self.loss_module(batch["tokens"], batch["inputs"], batch["mask"])))
        share = sum(loss.float() * (count / denom) for (loss, _), count in zip(losses, counts))
        self.update()
        return share

    def backward(self, micro_batches: Sequence[Dict], weights: Sequence[float],
                 forward: Callable[[Dict], "MicroBatchLoss"]) -> List["MicroBatchLoss"]:
        """Backpropagate each micro-batch's loss x its weight, `forward(batch)` running under autocast; loss
        scaling for fp16, and gradients synchronised across processes on the last micro-batch only. Returns each
        micro-batch's loss (detached) with what else its forward reported."""
        ddp = isinstance(self.loss_module, DistributedDataParallel)
        out = []
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            last = i == len(micro_batches) - 1
            with self.loss_module.no_sync() if ddp and not last else contextlib.nullcontext():
                with self.autocast():
                    result = forward(batch)
                scaled = result.loss * weight
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            out.append(result._replace(loss=result.loss.detach()))
        return out

    def update(self) -> None:
        if self.grad_clip > 0:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class TrainOptions:
    out_dir: Path
    prefix: str = "coco_prefix"
    epochs: int = 10
    batch_size: int = 40  # per process
    grad_accum: int = 1
    max_steps: Optional[int] = None
    save_every: int = 1  # epochs between numbered exports, as the original
    save_every_steps: int = 10000  # steps between mid-epoch checkpoints (0: only at epoch ends)
    log_every: int = 10
    seed: int = 0
    export_adapters: bool = False  # exports also hold <export>/adapters (LoRA runs)

    @property
    def resume_path(self) -> Path:
        return Path(self.out_dir) / f"{self.prefix}_resume.pt"


def count_steps(batches_per_epoch: int, options: TrainOptions):
    """Optimizer steps per epoch and in the whole run (the learning-rate schedule spans the latter)."""
    per_epoch = batches_per_epoch // options.grad_accum
    total = per_epoch * options.epochs
    return per_epoch, min(total, options.max_steps) if options.max_steps else total


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    epoch_samples: int = 0  # samples of this epoch's order already used, by all processes together


class Trainer:
    def __init__(self, model, tokenizer, stepper: Stepper, loader, sampler, options: TrainOptions,
                 dist: Distributed, run_info: Dict, val_loader=None,
                 epoch_end_hooks: Sequence[Callable] = ()):
        self.model = model  # unwrapped: exports and checkpoints hold its weights
        self.tokenizer = tokenizer
        self.stepper = stepper
        self.loader = loader
        self.sampler = sampler
        self.options = options
        self.dist = dist
        self.run_info = run_info  # config, data fingerprint and arguments, stored in every checkpoint
        self.val_loader = val_loader
        self.epoch_end_hooks = list(epoch_end_hooks)
        self.log = TrainLog(options.out_dir, dist.is_main)
        self.pos = Position()
        self.last_checkpoint: Optional[Path] = None
        self.last_step: Optional[int] = None
        self.global_batch = options.batch_size * options.grad_accum * dist.world_size
        self.steps_per_epoch, self.total_steps = count_steps(len(loader), options)
        self._meter_reset()

    # ---- the loop ------------------------------------------------------------------------------------------

    def fit(self, resume: Optional[Path] = None) -> Dict:
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.sampler.dataset)} training samples (captions; images under --scst) make no "
                             f"full global batch of {self.global_batch} (--bs x --grad_accum x processes); lower --bs")
        if self.dist.is_main:
            names = [self.options.prefix, self.log.path.name, self.log.plot_path.name, "train_args.json"]
            for path in remove_stale_temporaries(self.options.out_dir, names):
                print(f"removed {path}, left by an interrupted write")
        if resume is not None:
            self.restore(resume)
        self.log.start(self.pos.step if resume is not None else None)
        while self.pos.epoch < self.options.epochs and self.pos.step < self.total_steps:
            self.train_epoch()
        self.log.plot()
        return {"step": self.pos.step, "epoch": self.pos.epoch, "checkpoint": self.last_checkpoint,
                "latest_export": Path(self.options.out_dir) / f"{self.options.prefix}_latest"}

    def train_epoch(self) -> None:
        epoch, opts = self.pos.epoch, self.options
        self.sampler.set_epoch(epoch, start=self.pos.epoch_samples)
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(epoch)
        done = self.pos.epoch_samples // self.global_batch
        todo = min(self.steps_per_epoch - done, self.total_steps - self.pos.step)
        if self.loader.generator is not None:  # worker seeds depend on the epoch alone, also after a resume
            self.loader.generator.manual_seed(opts.seed + epoch)
        self.stepper.loss_module.train()
        batches = iter(self.loader)
        bar = tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch}", unit="step",
                   disable=not self.dist.is_main, dynamic_ncols=True)
        self._meter_reset()
        for i in range(todo):
            micro = [to_device(next(batches), self.dist.device) for _ in range(opts.grad_accum)]
            share = self.stepper(micro, step=self.pos.step)
            self._meter_add(share, sum(b["num_tokens"] for b in micro), getattr(self.stepper, "stats", None))
            self.pos.step += 1
            self.pos.epoch_samples += self.global_batch
            bar.update()
            if self.pos.step % opts.log_every == 0:
                bar.set_postfix(self.flush_log(), refresh=False)
            if opts.save_every_steps and self.pos.step % opts.save_every_steps == 0 and i < todo - 1:
                self.checkpoint(exports=[f"{opts.prefix}_latest"])
        bar.close()
        finished = self.pos.epoch_samples // self.global_batch >= self.steps_per_epoch
        self.flush_log()
        self.end_epoch(finished)

    def end_epoch(self, finished: bool) -> None:
        epoch, opts = self.pos.epoch, self.options
        val_loss = self.validate() if self.val_loader is not None else None
        if val_loss is not None:
            self.log.append({"step": self.pos.step, "epoch": epoch, "val_loss": val_loss})
            self.dist.print(f"epoch {epoch}: validation loss {val_loss:.4f}")
        exports = [f"{opts.prefix}_latest"]
        if finished and (epoch % opts.save_every == 0 or epoch == opts.epochs - 1):
            exports.append(f"{opts.prefix}-{epoch:03d}")
        if finished:
            self.pos.epoch, self.pos.epoch_samples = epoch + 1, 0
        self.checkpoint(exports)
        for hook in self.epoch_end_hooks:  # e.g. evaluation; its random draws must not shift training's
            with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
                metrics = hook(self, epoch, Path(opts.out_dir) / exports[-1])
            if metrics and self.dist.is_main:
                self.log.append({"step": self.pos.step, "epoch": epoch, **metrics})
        self.log.plot()

    @torch.no_grad()
    def validate(self) -> float:
        """Mean cross-entropy over every caption token of the validation set (all processes together)."""
        module = self.stepper.caption_loss  # unwrapped: shards differ in length, so no collective per batch
        module.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for batch in tqdm(self.val_loader, desc="validation", unit="batch", leave=False,
                          disable=not self.dist.is_main):
            batch = to_device(batch, self.dist.device)
            with self.stepper.autocast():
                loss = module(batch["tokens"], batch["inputs"], batch["mask"])
            total += torch.stack([loss.double() * batch["num_tokens"],
                                  torch.tensor(float(batch["num_tokens"]), device=total.device)])
        module.train()
        loss_sum, count = self.dist.all_reduce(total).tolist()
        return loss_sum / max(count, 1.0)

    # ---- logging -------------------------------------------------------------------------------------------

    def _meter_reset(self) -> None:
        self.meter_loss = torch.zeros((), device=self.dist.device)
        self.meter_tokens = 0
        self.meter_steps = 0
        self.meter_extra: Dict[str, float] = {}  # per-step figures a stepper reports (CIDEr optimisation's)
        self.meter_start = time.perf_counter()

    def _meter_add(self, share: torch.Tensor, tokens: int, extra: Optional[Dict[str, float]] = None) -> None:
        self.meter_loss += share  # stays on the device: no synchronisation on every step
        self.meter_tokens += tokens
        self.meter_steps += 1
        for name, value in (extra or {}).items():
            if name == "tokens":
                self.meter_tokens += int(value)
            else:
                self.meter_extra[name] = self.meter_extra.get(name, 0.0) + value

    def flush_log(self) -> Dict:
        """Average the loss since the last flush over all processes, stop on NaN/inf, append to the log."""
        if self.meter_steps == 0:
            return {}
        names = sorted(self.meter_extra)
        counts = torch.tensor([float(self.meter_tokens), *(self.meter_extra[n] for n in names)],
                              dtype=torch.float64, device=self.dist.device)
        totals = torch.cat([self.meter_loss.double().view(1), counts])
        loss_sum, tokens, *extra = self.dist.all_reduce(totals).tolist()
        loss = loss_sum / self.meter_steps
        extra = {name: value / (self.meter_steps * self.dist.world_size) for name, value in zip(names, extra)}
        if not math.isfinite(loss):
            first = self.pos.step - self.meter_steps + 1
            where = f"at step {first}" if first == self.pos.step else f"between steps {first} and {self.pos.step}"
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                "no checkpoint had been written yet"
            raise TrainingError(f"the training loss became {loss} {where} (epoch {self.pos.epoch}); stopping. "
                                f"Nothing was saved after the last finite loss: {kept}. Lower --lr, set "
                                f"--grad_clip, or use --precision bf16 instead of fp16, then --resume latest.")
        elapsed = max(time.perf_counter() - self.meter_start, 1e-9)
        record = {"step": self.pos.step, "epoch": self.pos.epoch, "loss": loss,
                  "lr": self.stepper.scheduler.get_last_lr()[0],
                  "samples_per_s": self.meter_steps * self.global_batch / elapsed, "tokens_per_s": tokens / elapsed,
                  **extra}
        self.log.append(record)
        self._meter_reset()
        return {"loss": f"{loss:.4f}", **{name: f"{value:.3f}" for name, value in extra.items()},
                "samples/s": f"{record['samples_per_s']:.1f}", "lr": f"{record['lr']:.2e}"}

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def checkpoint(self, exports: List[str]) -> None:
        """The resume checkpoint, then the exports, all after a finite loss. The checkpoint holds the exports'
        weights and names them, so a run stopped between the two (killed, or out of disk space) writes them again
        when it resumes; a write that fails is a TrainingError naming the file, the cause and the resume point."""
        self.flush_log()
        rng = self.dist.all_gather_object(capture_rng(self.dist.device))
        if not self.dist.is_main:
            return
        scaler = self.stepper.scaler
        state = {
            "model": self.model.checkpoint_state(), "optimizer": self.stepper.optimizer.state_dict(),
            "scheduler": self.stepper.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "step": self.pos.step, "epoch": self.pos.epoch, "epoch_samples": self.pos.epoch_samples,
            "data_order": {"seed": self.sampler.seed, "num_samples": len(self.sampler.dataset),
                           "global_batch": self.global_batch},
            "rng": rng, "exports": list(exports), **self.run_info}
        path = self.options.resume_path
        try:
            write_or_rescue(path, lambda target: save_state(target, state), "the resume checkpoint")
        except OutputError as e:
            if e.rescued:
                kept = (f"continue with --resume {e.rescued} (or move it to {path} once there is room, then "
                        f"--resume latest)")
            elif self.last_checkpoint:
                kept = f"the last resume point is intact: {self.last_checkpoint} (step {self.last_step})"
            else:
                kept = "no resume point had been written yet"
            raise TrainingError(f"at step {self.pos.step}: {e}; {kept}") from e
        self.last_checkpoint, self.last_step = path, self.pos.step
        self.write_exports(exports)

    def write_exports(self, names: Sequence[str]) -> None:
        for name in names:
            directory = Path(self.options.out_dir) / name
            try:
                self.model.save_pretrained(directory, self.tokenizer, with_adapters=self.options.export_adapters)
            except OSError as e:
                raise TrainingError(f"at step {self.pos.step}: the export {directory} could not be written "
                                    f"({e.strerror or e}); the resume checkpoint {self.last_checkpoint} holds "
                                    f"its weights: make room, then run the same command with --resume latest, "
                                    f"which writes the export again") from e

    def restore(self, path: Path) -> None:
        state, refused = load_resumable(path)
        self.dist.barrier()  # every process has read before a corrupt file is set aside
        if refused:
            if self.dist.is_main:
                set_aside_corrupt(path)
            self.dist.print(refused)
        stage, ours = state.get("stage", "cross-entropy"), self.run_info.get("stage", "cross-entropy")
        if stage != ours:
            raise CheckpointError(f"{path} is a {stage} checkpoint and this is a {ours} run: --resume continues "
                                  f"a run of the same stage. CIDEr optimisation (--scst) starts from an export "
                                  f"(--init_from DIR) in a new --out_dir")
        diff = config_differences(state["config"], self.run_info["config"])
        if diff:
            raise CheckpointError(f"{path}: the checkpoint was made for another model: " + "; ".join(diff))
        diff = config_differences(state["data"], self.run_info["data"])
        if diff:
            raise CheckpointError(f"{path}: the checkpoint was trained on other data: " + "; ".join(diff))
        if state.get("decoder_base") != self.run_info.get("decoder_base"):
            raise CheckpointError(f"{path}: the checkpoint's LoRA adapters were trained on another base decoder "
                                  f"than --gpt2 {self.run_info['args'].get('gpt2')} now holds (or without LoRA)")
        load_state_dict_strict(self.model, state["model"], path, optional_missing=self.model.frozen_base_keys())
        try:
            self.stepper.optimizer.load_state_dict(state["optimizer"])
            self.stepper.scheduler.load_state_dict(state["scheduler"])
            if self.stepper.scaler is not None and state.get("scaler"):
                self.stepper.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not match this run's trainable parameters "
                                  f"(was --only_prefix or --train_encoder different?): {e}") from e
        self.pos = Position(state["step"], state["epoch"], state["epoch_samples"])
        self.sampler.seed = state["data_order"]["seed"]  # each epoch's order is drawn from (seed, epoch)
        changed = config_differences(*(without_bookkeeping(d.get("args", {})) for d in (state, self.run_info)))
        if changed:
            self.dist.print("note: resuming with changed arguments (the run will not match an uninterrupted "
                            "one exactly): " + "; ".join(changed))
        if len(state["rng"]) == self.dist.world_size:
            restore_rng(state["rng"][self.dist.rank], self.dist.device)
        else:
            torch.manual_seed(self.options.seed + 1000 * self.pos.step + self.dist.rank)
            self.dist.print(f"note: the checkpoint holds RNG states of {len(state['rng'])} processes, this run has "
                            f"{self.dist.world_size}; dropout and augmentation are reseeded")
        if self.pos.epoch_samples % self.global_batch:
            raise CheckpointError(f"{path}: the checkpoint stopped {self.pos.epoch_samples} samples into epoch "
                                  f"{self.pos.epoch}, not a multiple of this run's global batch "
                                  f"{self.global_batch}; resume with the same --bs, --grad_accum and processes")
        self.last_checkpoint, self.last_step = Path(path), self.pos.step
        self.dist.print(f"resumed from {path}: step {self.pos.step}, epoch {self.pos.epoch}, "
                        f"{self.pos.epoch_samples} samples into the epoch")
        if self.dist.is_main:  # a stop after the checkpoint and before its exports left them unwritten or old
            self.write_exports(state.get("exports", []))
