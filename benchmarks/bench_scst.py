"""CIDEr optimisation against cross-entropy alone, in the same training time: `python benchmarks/bench_scst.py`.

1. The comparison. On the shapes dataset whose captions name two shapes in either order (shapes_data.py --seed 3
   --either_order, 64x64, the demo's recipe at 48x48; the case cross-entropy does not learn), arm "scst" trains
   the demo's cross-entropy recipe for --xe_steps and then optimises CIDEr-D for --scst_steps (train.py --scst:
   5 samples per image, greedy baseline, learning rate 1e-3, encoder included); arm "xe" trains cross-entropy alone
   for as many steps as take the same seconds (from arm scst's own cross-entropy speed). Both caption the 300 test
   images with beam search 3, scored as the demo scores them. About 10 minutes on 2 CPU cores.
2. The cost of a step, for planning the stage on COCO: cross-entropy steps per second against CIDEr optimisation
   steps per second on bench_train.py's model (a distilgpt2-sized decoder, transformer mapper 40/40/8, pooled 576-d
   features), batch 40, 5 samples per image of up to 20 tokens, mean baseline. Its random decoder rarely ends a
   caption, so every sample runs to 20 tokens: an upper bound. Rewards score words `w<id>` against 5 random
   references per image (the cost of CIDEr-D, not its meaning).

Last line: RESULT xe_cider=.. scst_cider=.. xe_position_acc=.. scst_position_acc=.. xe_colour_acc=.. scst_colour_acc=..
xe_shape_acc=.. scst_shape_acc=.. xe_seconds=.. scst_seconds=.. xe_steps_per_s=.. scst_steps_per_s=..
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from captioning import demo, runtime
from captioning.data import shapes
from captioning.runtime import Distributed
from captioning.training.config import TrainConfig
from captioning.training.datasets import CaptionCollator
from captioning.training.loop import CaptionLoss, Stepper
from captioning.training.runner import build_optimizer, train
from captioning.training.scst import Rewards, ScstLoss, ScstOptions, ScstStepper
from models.captioner import CaptionerConfig, ClipCaptionModel

FEATURE_DIM, PREFIX, VOCAB, EOS = 576, 40, 50257, 50256


def timed_train(config: TrainConfig) -> float:
    start = time.perf_counter()
    train(config)
    return time.perf_counter() - start


def compare_arms(args) -> dict:
    out = Path(args.out_dir)
    data = out / "either_order"
    if not (data / "captions_test.json").exists():
        shapes.generate(data, seed=3, size=64, either_order=True)
    config = demo.DemoConfig(data=str(data), out_dir=str(out), scst_steps=args.scst_steps, scst_lr=args.scst_lr,
                             device=args.device, threads=args.threads)
    run = demo.Run(config, out, data)
    gpt2 = demo.build_decoder(run.train_captions, out / "decoder", config.seed)
    steps_per_epoch = len(run.train_captions) // config.bs

    def xe_config(name, steps):
        epochs = demo.epochs_for(len(run.train_captions), config, steps)
        return demo.train_config(run.data, run.root, gpt2, run.fresh(name), epochs, config), epochs * steps_per_epoch

    first, first_steps = xe_config("arm_scst_xe", args.xe_steps)
    seconds = {"scst_xe": timed_train(first)}
    second = demo.scst_config(run.data, run.root, len(run.train_records), Path(first.out_dir) / "demo_latest",
                              run.fresh("arm_scst"), config)
    seconds["scst_stage"] = timed_train(second)
    total = seconds["scst_xe"] + seconds["scst_stage"]
    alone, alone_steps = xe_config("arm_xe", round(first_steps * total / seconds["scst_xe"]))
    seconds["xe"] = timed_train(alone)
    scores = {}
    for name, trained in (("xe", alone), ("scst_xe", first), ("scst", second)):
        path = run.caption(Path(trained.out_dir) / "demo_latest", out / f"test_predictions_arm_{name}.json")
        figures = run.score(path, out / f"eval_arm_{name}")
        scores[name] = {"accuracy": figures.accuracy, "cider": figures.cider}
    print(f"\narm xe:   {alone_steps} cross-entropy steps in {seconds['xe']:.0f} s")
    print(f"arm scst: {first_steps} cross-entropy steps in {seconds['scst_xe']:.0f} s, then "
          f"{second.epochs * (len(run.train_records) // config.bs)} CIDEr optimisation steps in "
          f"{seconds['scst_stage']:.0f} s")
    print(f"{'':28}{'CIDEr':>8}{'colour':>8}{'shape':>8}{'position':>10}")
    for name, label in (("xe", "cross-entropy alone"), ("scst_xe", "arm scst, cross-entropy part"),
                        ("scst", "arm scst, after CIDEr opt.")):
        acc = scores[name]["accuracy"]
        print(f"{label:28}{scores[name]['cider']:8.1f}{acc['colour']:8.1f}{acc['shape']:8.1f}{acc['position']:10.1f}")
    return {"xe": scores["xe"], "scst": scores["scst"], "xe_seconds": seconds["xe"], "scst_seconds": total}


class WordTokenizer:
    """Token ids as words: what CIDEr-D scores in the cost measurement (no vocabulary files offline)."""

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [" ".join(f"w{t}" for t in seq if t != EOS) for seq in sequences]


def model(only_prefix: bool = False) -> ClipCaptionModel:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = CaptionerConfig(mapping_type="transformer", prefix_length=PREFIX, prefix_length_clip=PREFIX, num_layers=8,
                             prefix_size=FEATURE_DIM, only_prefix=only_prefix, eos_token_ids=[EOS])
    return ClipCaptionModel(config, gpt=GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=VOCAB)))


def step_rates(args) -> dict:
    device = torch.device(args.device)
    precision = runtime.resolve_precision("auto", device, training=True)
    dist = Distributed(device=device)
    rng = np.random.default_rng(0)
    bs, features = 40, torch.randn(40, FEATURE_DIM, device=device)
    references = {i: [" ".join(f"w{t}" for t in rng.integers(0, VOCAB, 11)) for _ in range(5)] for i in range(bs)}
    tokens = [torch.tensor(rng.integers(0, EOS, int(n)).tolist() + [EOS]) for n in rng.normal(12, 3, bs).clip(4, 30)]
    batch = CaptionCollator(EOS)(list(zip(tokens, features.cpu())))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    rates = {}
    for name in ("xe", "scst"):
        m = model().to(device).train()
        optimizer = build_optimizer(m, TrainConfig(), device)
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, 1000)
        caption_loss = CaptionLoss(m, images=False)
        if name == "xe":
            stepper, micro = Stepper(caption_loss, optimizer, scheduler, dist, precision), [batch]
        else:
            options = ScstOptions(samples=5, max_length=20)
            loss = ScstLoss(m, WordTokenizer(), Rewards(references), options, images=False)
            stepper = ScstStepper(loss, caption_loss, optimizer, scheduler, dist, precision)
            micro = [{"inputs": features, "rows": torch.arange(bs), "num_tokens": 0}]
        stepper(micro, step=0)  # optimizer state and caches
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for step in range(args.rate_steps):
            stepper(micro, step=step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates[name] = args.rate_steps / (time.perf_counter() - start)
        print(f"{name:5s} {rates[name]:.3f} steps/s (batch {bs}{', 5 samples per image' if name == 'scst' else ''}, "
              f"{precision.name})", flush=True)
        del stepper, m, optimizer
    return rates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="./runs/bench_scst")
    p.add_argument("--xe_steps", type=int, default=1500, help="arm scst's cross-entropy steps (the demo's)")
    p.add_argument("--scst_steps", type=int, default=500, help="arm scst's CIDEr optimisation steps")
    p.add_argument("--scst_lr", type=float, default=1e-3)
    p.add_argument("--rate_steps", type=int, default=None,
                   help="timed steps of the cost measurement (default 1 on the CPU, 10 on a GPU)")
    p.add_argument("--skip_arms", action="store_true", help="only the cost measurement (gpu_check.sh)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.rate_steps = args.rate_steps or (1 if args.device == "cpu" else 10)
    print(f"bench_scst: {runtime.describe_cpu()}", flush=True)
    fields = []
    if not args.skip_arms:
        arms = compare_arms(args)
        fields += [f"xe_cider={arms['xe']['cider']:.1f}", f"scst_cider={arms['scst']['cider']:.1f}"]
        for fact in ("position", "colour", "shape"):
            fields += [f"{arm}_{fact}_acc={arms[arm]['accuracy'][fact]:.1f}" for arm in ("xe", "scst")]
        fields += [f"xe_seconds={arms['xe_seconds']:.0f}", f"scst_seconds={arms['scst_seconds']:.0f}"]
    rates = step_rates(args)
    fields += [f"xe_steps_per_s={rates['xe']:.3f}", f"scst_steps_per_s={rates['scst']:.3f}",
               f"scst_step_cost={rates['xe'] / rates['scst']:.1f}"]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
