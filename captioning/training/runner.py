"""The training run train.py makes: a TrainConfig -> export directories, resume checkpoint and logs.

`train(config)` checks where the run writes and what it reads, sets the precision and thread budget, builds the
inputs and the model (new, or `--init_from` an export), the loaders and optimiser, and hands them to the Trainer
(captioning/training/loop.py), on one process or each of torchrun's.
"""
import functools
import json
import sys
from pathlib import Path
from typing import Optional, Set

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from captioning import runtime
from captioning.outputs import check_output_dir
from captioning.runtime import Distributed
from captioning.training.config import ARCHITECTURE_FLAGS, ENCODER_FLAGS, TrainConfig
from captioning.training.datasets import CaptionCollator, ResumableDistributedSampler, validation_shard
from captioning.training.evaluation import build_caption_evaluation
from captioning.training.finetune import adopt_export_config, load_tokenizer, model_from_export
from captioning.training.inputs import build_feature_inputs, build_image_inputs
from captioning.training.lock import hold_run_directory
from captioning.training.loop import CaptionLoss, Stepper, Trainer, TrainOptions, count_steps
from captioning.training.scst import Rewards, ScstImages, ScstLoss, ScstOptions, ScstStepper, collate_images
from captioning.training.state import previous_state_path, seed_everything
from captioning.data.store import is_store
from models.captioner import CaptionerConfig, ClipCaptionModel
from models.checkpoint_io import CheckpointError, atomic_write
from models.decoders import caption_end_id, load_decoder, position_limit, stop_token_ids
from models.lora import base_fingerprint, lora_settings


def check_files(config: TrainConfig) -> None:
    """Where the run writes, and the features it reads, before the decoder is fetched."""
    check_output_dir(config.out_dir, "--out_dir")
    if not config.train_encoder:
        for flag, path in (("--data", config.data), ("--val_data", config.val_data)):
            if path is not None and not Path(path).is_file() and not is_store(path):
                raise ValueError(f"{flag} {path}: " + ("is a directory; expected a features pickle or store "
                                                       "(store.json is missing)" if Path(path).is_dir()
                                                       else "no such features file"))


def build_optimizer(model, config: TrainConfig, device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only; the encoder at --encoder_lr. The fused kernel (CUDA and CPU) does
    the whole update in one pass over memory, far faster on the CPU than the default multi-tensor one."""
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr = config.encoder_lr if name.startswith("encoder.") and config.encoder_lr is not None else config.lr
            groups.setdefault((lr, config.weight_decay if param.ndim >= 2 else 0.0), []).append(param)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             lr=config.lr, eps=config.adam_eps, fused=device.type in ("cuda", "cpu"))


def make_loaders(config: TrainConfig, inputs, dist: Distributed, pad_id: int, workers: int):
    """Training batches of captions (cross-entropy) or of images (--scst), and validation batches of captions."""
    common = dict(batch_size=config.bs, num_workers=workers, pin_memory=dist.device.type == "cuda",
                  persistent_workers=False)
    collate = CaptionCollator(pad_id)
    train_set, train_collate = (ScstImages(inputs.train), collate_images) if config.scst else (inputs.train, collate)
    sampler = ResumableDistributedSampler(train_set, dist.world_size, dist.rank, seed=config.seed)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, generator=torch.Generator(),
                              collate_fn=train_collate, **common)
    val_loader = None
    if inputs.val is not None:
        shard = validation_shard(inputs.val.token_lengths(), dist.rank, dist.world_size)
        val_loader = DataLoader(Subset(inputs.val, shard), shuffle=False, collate_fn=collate, **common)
    return train_loader, sampler, val_loader


def resume_path(config: TrainConfig, options: TrainOptions, dist: Distributed):
    if config.resume is None:
        if options.resume_path.exists():
            raise CheckpointError(f"{options.resume_path} exists: continue that run with --resume latest, or "
                                  f"choose another --out_dir (nothing was overwritten)")
        return None
    if config.resume == "latest":
        if options.resume_path.is_file():
            return options.resume_path
        previous = previous_state_path(options.resume_path)
        if previous.is_file():  # the run stopped between setting the old checkpoint aside and writing the new one
            dist.print(f"note: --resume latest: no {options.resume_path}, continuing from {previous}")
            return previous
        dist.print(f"note: --resume latest: no {options.resume_path} yet, starting from scratch")
        return None
    path = Path(config.resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: " + ("is a directory; give the resume checkpoint file "
                                                      "(<prefix>_resume.pt) or 'latest'" if path.is_dir()
                                                      else "no such resume checkpoint"))
    return path


def train(config: TrainConfig, dist: Optional[Distributed] = None, given: Optional[Set[str]] = None) -> dict:
    """Train as `config` says; returns the Trainer's summary (step, latest export, ...). Without `dist`, sets up
    the processes itself (torchrun's, or this one alone) and closes them after. With --init_from the export's
    architecture is adopted here; a field of `given` (train.py: the flags its command line sets; by default the
    fields away from their defaults) must agree with it."""
    if dist is None:
        dist = Distributed.setup(config.device)
        try:
            return train(config, dist, given)
        finally:
            dist.close()
    if config.init_from:
        fields = ARCHITECTURE_FLAGS + ENCODER_FLAGS
        config = adopt_export_config(config, given if given is not None else config.changed(fields))
    check_files(config)
    with hold_run_directory(config.out_dir, dist):  # one run at a time writes into --out_dir
        precision = runtime.resolve_precision(config.precision, dist.device, training=True)
        budget = runtime.plan_threads(dist.device, loads_images=config.train_encoder and not config.cache_images,
                                      workers=config.num_workers, threads=config.threads)
        if dist.is_main:
            runtime.announce(precision)
            print(budget.describe(), file=sys.stderr, flush=True)
        with runtime.thread_budget(budget):
            return run_training(config, dist, precision, budget)


def run_training(config: TrainConfig, dist: Distributed, precision: runtime.Precision,
                 budget: runtime.ThreadBudget) -> dict:
    if config.is_rn:
        dist.print("note: --is_rn is ignored: the feature size and type come from the features pickle")
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matrix products: fp32 training, much faster
        torch.backends.cudnn.allow_tf32 = True
    options = TrainOptions(out_dir=Path(config.out_dir), prefix=config.prefix, epochs=config.epochs,
                           batch_size=config.bs, grad_accum=config.grad_accum, max_steps=config.max_steps,
                           save_every=config.save_every, save_every_steps=config.save_every_steps,
                           log_every=config.log_every, seed=config.seed, export_adapters=config.export_adapters)
    resume = resume_path(config, options, dist)
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config) if config.init_from else AutoTokenizer.from_pretrained(config.gpt2)
    caption_end_id(tokenizer, config.init_from or config.gpt2)  # every caption ends with it: refused early if none
    # Caching images happens before training, while torch waits: every core may decode then.
    cache_workers = config.num_workers if config.num_workers is not None else \
        (budget.cores if budget.cores > 1 else 0)
    export = ClipCaptionModel.from_pretrained(config.init_from) if config.init_from else None
    build = functools.partial(build_image_inputs, cache_workers=cache_workers,
                              encoder=export.encoder if export else None) if config.train_encoder else \
        build_feature_inputs
    inputs = dist.main_first(lambda: build(config, tokenizer, dist))  # rank 0 alone writes the token cache
    model = model_from_export(config, export, inputs, tokenizer.eos_token_id) if export else \
        new_model(config, inputs, tokenizer)
    inputs.fit_decoder(model.gpt.config, model.config.prefix_length, dist)
    model.to(dist.device)
    torch.manual_seed(config.seed + dist.rank)  # dropout differs across processes; initialisation did not
    train_loader, sampler, val_loader = make_loaders(config, inputs, dist, tokenizer.eos_token_id, budget.workers)
    optimizer = build_optimizer(model, config, dist.device)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps,
                                                count_steps(len(train_loader), options)[1])
    stepper = build_stepper(config, model, tokenizer, train_loader, dist, precision, optimizer, scheduler)
    run_info = {"config": model.config.to_dict(), "data": inputs.fingerprint, "args": config.to_dict(),
                "stage": config.stage}
    if model.adapted:  # resume checkpoints leave the frozen base out: a resumed run checks it is the same
        run_info["decoder_base"] = base_fingerprint(model.gpt)
    # After run_info: what the exports' model cards say, not what a resumed run must match.
    model.config.training = training_record(config, len(train_loader.dataset), len(inputs.train))
    if dist.is_main:
        with atomic_write(options.out_dir / "train_args.json") as tmp:
            tmp.write_text(json.dumps({**config.to_dict(), "runtime": {**precision.record(), "torch_threads":
                                       budget.torch_threads, "num_workers": budget.workers}}, indent=2))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = f"{len(train_loader.dataset)} training images (CIDEr optimisation)" if config.scst else \
        f"{len(inputs.train)} training captions"
    dist.print(f"training {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters on "
               f"{dist.world_size} x {dist.device}; {what}")
    trainer = Trainer(model, tokenizer, stepper, train_loader, sampler, options, dist, run_info,
                      val_loader=val_loader, epoch_end_hooks=epoch_end_hooks(config, inputs, precision))
    summary = trainer.fit(resume)
    dist.print(f"done: step {summary['step']}; latest export {summary['latest_export']}")
    return summary


def build_stepper(config: TrainConfig, model, tokenizer, train_loader, dist: Distributed,
                  precision: runtime.Precision, optimizer, scheduler) -> Stepper:
    """The optimizer step of the stage: cross-entropy over captions, or CIDEr optimisation over images."""
    channels_last = config.train_encoder and (dist.device.type == "cuda" if config.channels_last is None
                                              else config.channels_last)
    if channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    caption_loss = CaptionLoss(model, images=config.train_encoder, channels_last=channels_last)
    loss_module = caption_loss
    if config.scst:
        images = train_loader.dataset
        options = ScstOptions(samples=config.scst_samples, top_p=config.scst_top_p,
                              max_length=scst_max_length(config, images.base, model), baseline=config.scst_baseline,
                              bleu_weight=config.scst_bleu_weight, seed=config.seed)
        dist.print(f"CIDEr optimisation: {options.samples} samples per image of at most {options.max_length} "
                   f"tokens, {options.baseline} baseline; CIDEr-D document frequencies from the references of "
                   f"{len(images)} training images")
        loss_module = ScstLoss(model, tokenizer, Rewards(images.references, options.bleu_weight), options,
                               images=config.train_encoder, channels_last=channels_last)
    if dist.enabled:
        loss_module = DistributedDataParallel(
            loss_module, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
            find_unused_parameters=config.train_encoder)  # timm models may hold layers the features skip
    if config.scst:
        return ScstStepper(loss_module, caption_loss, optimizer, scheduler, dist, precision=precision,
                           grad_clip=config.grad_clip)
    return Stepper(loss_module, optimizer, scheduler, dist, precision=precision, grad_clip=config.grad_clip)


def scst_max_length(config: TrainConfig, captions, model) -> int:
    """--scst_max_length, or the longest training caption in tokens (end token included): a sample need not be
    longer than any reference, and each extra step of every sample costs; within the decoder's positions."""
    room = position_limit(model.gpt.config) - model.config.prefix_length
    if config.scst_max_length is not None:
        if config.scst_max_length > room:
            raise ValueError(f"--scst_max_length {config.scst_max_length} exceeds the {room} positions the "
                             f"decoder has after its {model.config.prefix_length}-token prefix")
        return config.scst_max_length
    return int(min(captions.token_lengths().max(), room))


def training_record(config: TrainConfig, num_samples: int, num_captions: int) -> dict:
    """The exports' `training` config field: data, its kind, the dataset's name when --dataset gives it, counts,
    stage, command and license."""
    record = {"data": config.annotations if config.train_encoder else config.data,
              "kind": "images" if config.train_encoder else "features", "num_captions": num_captions,
              "num_images" if config.scst else "num_samples": num_samples, "stage": config.stage,
              "command": config.command_line(), "license": config.license}
    if config.dataset:
        record["dataset"] = config.dataset
    return record


def new_model(config: TrainConfig, inputs, tokenizer) -> ClipCaptionModel:
    """A new captioner of the configured architecture for the inputs' features, on the pretrained decoder
    --gpt2 names (any causal LM), stopping where its tokenizer and generation config say."""
    decoder = load_decoder(config.gpt2)
    lora = lora_settings(config, decoder.config.model_type)
    return ClipCaptionModel(CaptionerConfig(
        mapping_type=config.mapping_type, prefix_length=config.prefix_length,
        prefix_length_clip=config.prefix_length_clip, num_layers=config.num_layers, prefix_size=inputs.prefix_size,
        feature_type=inputs.feature_type, num_grid_tokens=inputs.num_grid_tokens,
        normalize_prefix=config.normalize_prefix, only_prefix=config.only_prefix, gpt2=config.gpt2,
        eos_token_ids=stop_token_ids(tokenizer, decoder, config.gpt2), encoder=inputs.encoder_config,
        lora=lora.to_dict() if lora else None), gpt=decoder, encoder=inputs.encoder)


def epoch_end_hooks(config: TrainConfig, inputs, precision: runtime.Precision) -> list:
    """Functions called on every process after each epoch's export, as hook(trainer, epoch, export_dir); a
    dict they return is added to train_log.jsonl. Captions are decoded in the precision training runs in."""
    return [build_caption_evaluation(config, inputs.val, precision)] if config.eval_every else []
