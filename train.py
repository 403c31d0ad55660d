"""Train the captioner: a features pickle (or, with --train_encoder, images and captions) -> export directories.

    python train.py --data ./data/coco/oscar_split_tinyvit_train.pkl --out_dir ./coco_train_transformer_4/ \\
        --mapping_type transformer --num_layers 8 --prefix_length 40 --prefix_length_clip 40
    torchrun --nproc_per_node=2 train.py ...    # DistributedDataParallel: nccl on GPUs, gloo on CPUs

--out_dir receives `<prefix>-<epoch>/` every --save_every epochs and `<prefix>_latest/` (export directories that
predict.py loads), `<prefix>_resume.pt` (for --resume), `train_log.jsonl`, `loss_curve.png` and `train_args.json`; with
--eval_every also `best/`, the export with the best validation CIDEr so far (its scores in best/eval.json).
"""
import argparse
import functools
import json
import sys
from pathlib import Path

from captioning.choices import ANNOTATION_FORMATS
from captioning.cli import (COUNT, POSITIVE, SEED, add_precision_argument, add_thread_arguments, device_name,
                            number, pretrained_source)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_original_flags(p.add_argument_group("the original flags, same names and meanings").add_argument)
    group = p.add_argument_group("optimisation, data, devices and checkpoints")
    add_training_flags(group.add_argument)
    add_runtime_flags(group)
    add_encoder_flags(p.add_argument_group("end-to-end training from images (--train_encoder)").add_argument)
    return p


def add_original_flags(a) -> None:
    a("--data", default=None,
      help="features pickle from parse_coco.py (default: ./data/coco/oscar_split_tinyvit_train.pkl)")
    a("--out_dir", default="./checkpoints", help="where exports, the resume checkpoint and logs go")
    a("--prefix", default="coco_prefix", help="name prefix of the saved exports and checkpoint")
    a("--epochs", type=POSITIVE, default=10, help="passes over the training captions")
    a("--save_every", type=POSITIVE, default=1, help="write the export <prefix>-<epoch> every N epochs (and the last)")
    a("--prefix_length", type=POSITIVE, default=10, help="GPT-2 prefix embeddings produced by the mapping network")
    a("--prefix_length_clip", type=POSITIVE, default=10,
      help="transformer mapper: tokens projected from a pooled image feature")
    a("--bs", type=POSITIVE, default=40, help="batch size per process")
    a("--only_prefix", dest="only_prefix", action="store_true",
      help="train only the mapping network (and encoder); the GPT-2 decoder stays frozen")
    a("--mapping_type", choices=["mlp", "transformer"], default="mlp", help="mapping network type")
    a("--num_layers", type=POSITIVE, default=8, help="transformer mapper depth")
    a("--is_rn", dest="is_rn", action="store_true",
      help="ignored: the feature size and type now come from the features pickle (kept for old commands)")
    a("--normalize_prefix", dest="normalize_prefix", action="store_true",
      help="L2-normalise image features before the mapper; saved in the config, so inference does the same")


def add_runtime_flags(p) -> None:
    add_precision_argument(p, aliases=["--amp"],
                           what="autocast mixed precision of training (fp16: CUDA only, with loss scaling)")
    add_thread_arguments(p, workers_help=(
        "DataLoader workers per process (default: none for features, which sit in memory, or cached images; "
        "for images on a CPU none below 8 usable cores, since the model needs them; on a GPU every core but "
        "one, at most 8)"))


def add_training_flags(a) -> None:
    a("--gpt2", type=pretrained_source, default="distilgpt2",
      help="GPT-2 decoder and tokenizer: hub name or local directory")
    a("--lr", type=number(0), default=2e-5, help="peak learning rate (AdamW), after linear warmup, then linear decay")
    a("--warmup_steps", type=COUNT, default=5000, help="optimizer steps of linear learning-rate warmup")
    a("--weight_decay", type=number(0), default=0.0, help="AdamW weight decay on weight matrices (not biases, norms)")
    a("--adam_eps", type=number(0, low_open=True), default=1e-6,
      help="AdamW epsilon: 1e-6, the default of the transformers.AdamW the original trained with (torch's is 1e-8)")
    a("--grad_clip", type=number(0), default=0.0, help="clip the gradient norm to this value (0: off)")
    a("--grad_accum", type=POSITIVE, default=1, help="micro-batches accumulated per optimizer step")
    a("--seed", type=SEED, default=0, help="seed of initialisation, data order, dropout and augmentation")
    a("--device", type=device_name, default=None,
      help="cpu, cuda or mps (default: cuda when available); torchrun picks the GPU")
    a("--val_data", default=None, help="validation features pickle; validation loss reported per epoch")
    a("--val_fraction", type=number(0, 1, low_open=True, high_open=True), default=None,
      help="hold out this fraction of the training images (all their captions) for validation instead")
    a("--init_from", default=None,
      help="fine-tune this export (train.py's or convert_checkpoint.py's): its architecture, decoder, tokenizer "
           "and feature normalisation are kept; features only")
    a("--resume", default=None,
      help="a resume checkpoint (<prefix>_resume.pt) or 'latest' (the one in --out_dir; a fresh start if none)")
    a("--max_steps", type=POSITIVE, default=None, help="stop after this many optimizer steps (quick runs)")
    a("--cache_dir", default=None,
      help="where caption tokens are cached (default: $TINYTINY_CACHE, else ~/.cache/tinytiny-captioner; the "
           "run's --out_dir when that cannot be written); never the dataset's folder")
    a("--log_every", type=POSITIVE, default=10, help="optimizer steps between train_log.jsonl records")
    a("--save_every_steps", type=COUNT, default=10000,
      help="also checkpoint (resume file + <prefix>_latest export) every N steps within an epoch (0: off)")
    a("--eval_every", type=COUNT, default=0,
      help="every N epochs (and the last), caption --eval_images validation images with the new export, log "
           "CIDEr and BLEU-4 to train_log.jsonl and keep the best export by CIDEr as <out_dir>/best/ (0: off)")
    a("--eval_images", type=POSITIVE, default=500,
      help="with --eval_every: the first N distinct validation images, scored against all their captions")


def add_encoder_flags(e) -> None:
    e("--train_encoder", action="store_true",
      help="train the image encoder too, on the images of --annotations; the export holds the encoder")
    e("--annotations", default="./data/coco/annotations/train_caption.json",
      help="annotation file, as parse_coco.py reads it: a caption list JSON (train_caption.json), a "
           "COCO captions_*.json, Karpathy's dataset_coco.json or a CSV of file names and captions")
    e("--annotation_format", choices=ANNOTATION_FORMATS, default="auto")
    e("--split", default=None, help="Karpathy split(s) of --annotations, e.g. train+restval")
    e("--images_root", default="./data/coco", help="image paths in the annotations are relative to it")
    e("--val_annotations", default=None, help="validation annotation file (same images root)")
    e("--val_split", default=None, help="Karpathy split(s) of --val_annotations, e.g. val")
    e("--encoder", default="tiny_vit_21m_224",
      help="timm model as NAME (timm's default tag: tiny_vit_21m_224 is tiny_vit_21m_224.dist_in22k) or NAME.TAG")
    e("--encoder_weights", default="pretrained", help="pretrained, random, or a weights file")
    e("--encoder_kwargs", default="{}", help="JSON dict of extra timm.create_model arguments")
    e("--image_size", type=POSITIVE, default=None, help="input resolution (default: the model's)")
    e("--feature_type", choices=["pooled", "grid"], default="pooled",
      help="pooled vector per image, or the last feature map as tokens (transformer mapper)")
    e("--freeze_stages", type=COUNT, default=None,
      help="freeze the stem and first N stages (default: 1 with pretrained or file weights, as the "
           "original; 0 with random weights)")
    e("--encoder_lr", type=number(0), default=None, help="learning rate of the encoder (default: --lr)")
    e("--augment", action="store_true",
      help="light augmentation: a random resized crop (no flips: captions say left and right)")
    e("--channels_last", default=None, action=argparse.BooleanOptionalAction,
      help="run the encoder in channels-last memory format (default: on CUDA); faster for convolutions, "
           "measured 2x for test_resnet under bf16 on an AMX CPU")
    e("--cache_images", action="store_true",
      help="preprocess every image once and keep it in memory (small datasets)")


if __name__ == "__main__":  # --help and flag errors answer before the heavy imports below (seconds)
    build_parser().parse_args()

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from captioning import runtime
from captioning.data.images import ImageError
from captioning.outputs import OutputError, check_output_dir
from captioning.runtime import Distributed
from captioning.training.datasets import CaptionCollator, ResumableDistributedSampler, validation_shard
from captioning.training.evaluation import build_caption_evaluation
from captioning.training.finetune import adopt_export_config, flags_given, load_tokenizer, model_from_export
from captioning.training.inputs import build_feature_inputs, build_image_inputs
from captioning.training.loop import CaptionLoss, Stepper, Trainer, TrainOptions, count_steps
from captioning.training.state import TrainingError, previous_state_path, seed_everything
from models.captioner import CaptionerConfig, ClipCaptionModel
from models.checkpoint_io import CheckpointError, atomic_write

DEFAULT_DATA = "./data/coco/oscar_split_tinyvit_train.pkl"


def check_args(args) -> None:
    if args.init_from and args.train_encoder:
        raise ValueError("--init_from fine-tunes on features: extract them with the export's encoder "
                         "(parse_coco.py) and give --data, without --train_encoder")
    if args.train_encoder and (args.data or args.val_data):
        raise ValueError("with --train_encoder the data are images: give --annotations (and --images_root, "
                         "--val_annotations), not --data/--val_data features pickles")
    if not args.train_encoder and args.val_annotations:
        raise ValueError("--val_annotations needs --train_encoder; validate features with --val_data")
    check_output_dir(args.out_dir, "--out_dir")
    if not args.train_encoder:
        args.data = args.data or DEFAULT_DATA
        for flag, path in (("--data", args.data), ("--val_data", args.val_data)):
            if path is not None and not Path(path).is_file():  # before the decoder is fetched
                raise ValueError(f"{flag} {path}: " + ("is a directory; expected a features pickle"
                                                       if Path(path).is_dir() else "no such features file"))
    if (args.val_data or args.val_annotations) and args.val_fraction is not None:
        raise ValueError("give validation data or --val_fraction, not both")
    if args.eval_every and not (args.val_data or args.val_annotations or args.val_fraction is not None):
        raise ValueError("--eval_every needs validation data: give --val_data or --val_fraction (with "
                         "--train_encoder: --val_annotations or --val_fraction)")
    if (args.augment or args.cache_images) and not args.train_encoder:
        raise ValueError("--augment and --cache_images apply to images: add --train_encoder")
    if args.augment and args.cache_images:
        raise ValueError("--cache_images keeps one fixed view per image, which --augment would not vary")


def build_optimizer(model, args, device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only; the encoder at --encoder_lr. The fused kernel (CUDA and CPU) does
    the whole update in one pass over memory: on the CPU about 5x faster than the default multi-tensor one."""
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr = args.encoder_lr if name.startswith("encoder.") and args.encoder_lr is not None else args.lr
            groups.setdefault((lr, args.weight_decay if param.ndim >= 2 else 0.0), []).append(param)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             lr=args.lr, eps=args.adam_eps, fused=device.type in ("cuda", "cpu"))


def make_loaders(args, inputs, dist: Distributed, pad_id: int, workers: int):
    common = dict(batch_size=args.bs, num_workers=workers, collate_fn=CaptionCollator(pad_id),
                  pin_memory=dist.device.type == "cuda", persistent_workers=False)
    sampler = ResumableDistributedSampler(inputs.train, dist.world_size, dist.rank, seed=args.seed)
    train_loader = DataLoader(inputs.train, sampler=sampler, drop_last=True, generator=torch.Generator(), **common)
    val_loader = None
    if inputs.val is not None:
        shard = validation_shard(inputs.val.token_lengths(), dist.rank, dist.world_size)
        val_loader = DataLoader(Subset(inputs.val, shard), shuffle=False, **common)
    return train_loader, sampler, val_loader


def resume_path(args, options: TrainOptions, dist: Distributed):
    if args.resume is None:
        if options.resume_path.exists():
            raise CheckpointError(f"{options.resume_path} exists: continue that run with --resume latest, or "
                                  f"choose another --out_dir (nothing was overwritten)")
        return None
    if args.resume == "latest":
        if options.resume_path.is_file():
            return options.resume_path
        previous = previous_state_path(options.resume_path)
        if previous.is_file():  # the run stopped between setting the old checkpoint aside and writing the new one
            dist.print(f"note: --resume latest: no {options.resume_path}, continuing from {previous}")
            return previous
        dist.print(f"note: --resume latest: no {options.resume_path} yet, starting from scratch")
        return None
    path = Path(args.resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: " + ("is a directory; give the resume checkpoint file "
                                                      "(<prefix>_resume.pt) or 'latest'" if path.is_dir()
                                                      else "no such resume checkpoint"))
    return path


def run(args, dist: Distributed) -> dict:
    check_args(args)
    precision = runtime.resolve_precision(args.precision, dist.device, training=True)
    budget = runtime.plan_threads(dist.device, loads_images=args.train_encoder and not args.cache_images,
                                  workers=args.num_workers, threads=args.threads)
    if dist.is_main:
        runtime.announce(precision)
        print(budget.describe(), file=sys.stderr, flush=True)
    with runtime.thread_budget(budget):
        return run_training(args, dist, precision, budget)


def run_training(args, dist: Distributed, precision: runtime.Precision, budget: runtime.ThreadBudget) -> dict:
    if args.is_rn:
        dist.print("note: --is_rn is ignored: the feature size and type come from the features pickle")
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matrix products: fp32 training, much faster
        torch.backends.cudnn.allow_tf32 = True
    options = TrainOptions(out_dir=Path(args.out_dir), prefix=args.prefix, epochs=args.epochs, batch_size=args.bs,
                           grad_accum=args.grad_accum, max_steps=args.max_steps, save_every=args.save_every,
                           save_every_steps=args.save_every_steps, log_every=args.log_every, seed=args.seed)
    resume = resume_path(args, options, dist)
    seed_everything(args.seed)
    tokenizer = load_tokenizer(args) if args.init_from else AutoTokenizer.from_pretrained(args.gpt2)
    # Caching images happens before training, while torch waits: every core may decode then.
    cache_workers = args.num_workers if args.num_workers is not None else (budget.cores if budget.cores > 1 else 0)
    build = functools.partial(build_image_inputs, cache_workers=cache_workers) if args.train_encoder else \
        build_feature_inputs
    inputs = None
    for turn in (True, False):  # rank 0 first, so that it alone writes the token cache
        if dist.is_main == turn:
            inputs = build(args, tokenizer, dist)
        dist.barrier()
    if args.init_from:
        model = model_from_export(args, inputs, tokenizer.eos_token_id)
    else:
        config = CaptionerConfig(
            mapping_type=args.mapping_type, prefix_length=args.prefix_length,
            prefix_length_clip=args.prefix_length_clip, num_layers=args.num_layers, prefix_size=inputs.prefix_size,
            feature_type=inputs.feature_type, num_grid_tokens=inputs.num_grid_tokens,
            normalize_prefix=args.normalize_prefix, only_prefix=args.only_prefix, gpt2=args.gpt2,
            eos_token_ids=[tokenizer.eos_token_id], encoder=inputs.encoder_config)
        model = ClipCaptionModel.create(config, encoder=inputs.encoder)
    inputs.fit_decoder(model.gpt.config, model.config.prefix_length, dist)
    model.to(dist.device)
    torch.manual_seed(args.seed + dist.rank)  # dropout differs across processes; initialisation did not
    train_loader, sampler, val_loader = make_loaders(args, inputs, dist, tokenizer.eos_token_id, budget.workers)
    optimizer = build_optimizer(model, args, dist.device)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps,
                                                count_steps(len(train_loader), options)[1])
    channels_last = args.train_encoder and (dist.device.type == "cuda" if args.channels_last is None
                                            else args.channels_last)
    if channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    loss_module = CaptionLoss(model, images=args.train_encoder, channels_last=channels_last)
    if dist.enabled:
        loss_module = DistributedDataParallel(
            loss_module, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
            find_unused_parameters=args.train_encoder)  # timm models may hold layers the features skip
    stepper = Stepper(loss_module, optimizer, scheduler, dist, precision=precision, grad_clip=args.grad_clip)
    run_info = {"config": model.config.to_dict(), "data": inputs.fingerprint, "args": vars(args)}
    if dist.is_main:
        with atomic_write(options.out_dir / "train_args.json") as tmp:
            tmp.write_text(json.dumps({**vars(args), "runtime": {**precision.record(), "torch_threads":
                                       budget.torch_threads, "num_workers": budget.workers}}, indent=2))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dist.print(f"training {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters on "
               f"{dist.world_size} x {dist.device}; {len(inputs.train)} training captions")
    trainer = Trainer(model, tokenizer, stepper, train_loader, sampler, options, dist, run_info,
                      val_loader=val_loader, epoch_end_hooks=epoch_end_hooks(args, inputs, precision))
    summary = trainer.fit(resume)
    dist.print(f"done: step {summary['step']}; latest export {summary['latest_export']}")
    return summary


def epoch_end_hooks(args, inputs, precision: runtime.Precision) -> list:
    """Functions called on every process after each epoch's export, as hook(trainer, epoch, export_dir); a
    dict they return is added to train_log.jsonl. Captions are decoded in the precision training runs in."""
    return [build_caption_evaluation(args, inputs.val, precision)] if args.eval_every else []


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.init_from:
        adopt_export_config(args, flags_given(build_parser(), argv))
    dist = Distributed.setup(args.device)
    try:
        return run(args, dist)
    finally:
        dist.close()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, CheckpointError, TrainingError, ImageError, OSError, OutputError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last checkpoint is intact; continue with the same command and --resume latest")
