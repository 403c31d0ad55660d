"""CIDEr optimisation against cross-entropy alone, in the same training time: `python benchmarks/bench_scst.py`.

1. The comparison. On the shapes dataset whose captions name two shapes in either order (shapes_data.py --seed 3
   --either_order, 64x64, the demo's recipe at 48x48; the case cross-entropy does not learn), arm "scst" trains
   the demo's cross-entropy recipe for --xe_steps and then optimises CIDEr-D for --scst_steps (train.py --scst:
   5 samples per image, greedy baseline, learning rate 1e-3, encoder included); arm "xe" trains cross-entropy alone
   for as many steps as take the same seconds (from arm scst's own cross-entropy speed). Both caption the 300 test
   images with beam search 3, scored as the demo scores them. By default both arms are short (312 cross-entropy
   steps, then 31 of CIDEr optimisation: a few minutes on 2 CPU cores, within 10 on the slowest we have seen);
   --long runs the comparison of docs/experiments.md (1,500 and 500 steps: 10 minutes on a 2-core Zen 5, three
   times that on a Zen 3). Before training, a few timed steps of each stage give the run's expected length on this
   machine; a run expected to take over --limit_minutes stops there unless --force is given.
2. The cost of a step, for planning the stage on COCO (on a GPU, or on the CPU with --step_cost): cross-entropy steps
   per second against CIDEr optimisation steps per second on bench_train.py's model (a distilgpt2-sized decoder,
   transformer mapper 40/40/8, pooled 576-d features), batch 40, 5 samples per image of up to 20 tokens, mean
   baseline. Its random decoder rarely ends a caption, so every sample runs to 20 tokens: an upper bound. Rewards
   score words `w<id>` against 5 random references per image (the cost of CIDEr-D, not its meaning).

Last line: RESULT xe_cider=.. scst_cider=.. xe_position_acc=.. scst_position_acc=.. xe_colour_acc=.. scst_colour_acc=..
xe_shape_acc=.. scst_shape_acc=.. xe_seconds=.. scst_seconds=..; with part 2 also xe_steps_per_s=..
scst_steps_per_s=.. scst_step_cost=..
"""
import argparse
import math
import sys
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
from captioning.training.state import TrainLog
from models.captioner import CaptionerConfig, ClipCaptionModel

FEATURE_DIM, PREFIX, VOCAB, EOS = 576, 40, 50257, 50256
QUICK, LONG = (312, 31), (1500, 500)  # (cross-entropy, CIDEr optimisation) steps of arm scst
# Part 2 on a CPU, for the estimate, in steps of the demo's own stages: the larger ratios measured (fp32, torch
# limited to AVX2; docs/benchmarks.md gives both precisions' figures).
COST_IN_DEMO_STEPS = {"xe": 90, "scst": 100}


def timed_train(config: TrainConfig) -> float:
    start = time.perf_counter()
    train(config)
    return time.perf_counter() - start


class Arms:
    """The dataset, its decoder and the demo's configs of both stages, in --out_dir."""

    def __init__(self, args):
        out = self.out = Path(args.out_dir)
        data = out / "either_order"
        if not (data / "captions_test.json").exists():
            shapes.generate(data, seed=3, size=64, either_order=True)
        self.config = demo.DemoConfig(data=str(data), out_dir=str(out), scst_steps=args.scst_steps,
                                      scst_lr=args.scst_lr, device=args.device, threads=args.threads)
        self.run = demo.Run(self.config, out, data)
        self.gpt2 = demo.build_decoder(self.run.train_captions, out / "decoder", self.config.seed)
        self.steps_per_epoch = len(self.run.train_captions) // self.config.bs
        self.scst_steps_per_epoch = max(1, len(self.run.train_records) // self.config.bs)

    def xe(self, name: str, steps: int, exact: bool = False) -> TrainConfig:
        """Cross-entropy for `steps` rounded to whole epochs as the demo rounds them, or exactly `steps`."""
        epochs = math.ceil(steps / self.steps_per_epoch) if exact else \
            demo.epochs_for(len(self.run.train_captions), self.config, steps)
        config = demo.train_config(self.run.data, self.run.root, self.gpt2, self.run.fresh(name), epochs, self.config)
        if exact:
            config.max_steps = steps
        return config

    def scst(self, name: str, export: Path) -> TrainConfig:
        return demo.scst_config(self.run.data, self.run.root, len(self.run.train_records), export,
                                self.run.fresh(name), self.config)


def measured_step(config: TrainConfig, steps: int) -> tuple:
    """(seconds per step of `config` trained for `steps` steps, from its log's last window; the seconds the rest
    of the run took: building, caching the images, exports)."""
    config.max_steps, config.log_every = steps, steps // 2
    seconds = timed_train(config)
    records = TrainLog(config.out_dir, enabled=False).records()
    step = config.bs / [r for r in records if "samples_per_s" in r][-1]["samples_per_s"]
    return step, max(0.0, seconds - steps * step)


def expected_seconds(arms: Arms, xe_steps: int, args) -> dict:
    """The seconds the run is expected to take, from a few timed steps of each stage and the time of captioning and
    scoring their export once (both arms train for arm scst's time and three models are scored; part 2 is counted
    in demo steps, COST_IN_DEMO_STEPS), with the step times and arm scst's steps of each stage it comes from."""
    xe, xe_setup = measured_step(arms.xe("calibrate", 20), 20)
    export = arms.out / "calibrate" / "demo_latest"
    calibration = arms.scst("calibrate_scst", export)
    scst_total = calibration.epochs * arms.scst_steps_per_epoch  # as the demo rounds --scst_steps, before max_steps
    scst, scst_setup = measured_step(calibration, 4)
    start = time.perf_counter()
    arms.run.score(arms.run.caption(export, arms.out / "test_predictions_calibrate.json"), arms.out / "eval_calibrate")
    score = time.perf_counter() - start
    xe_total = demo.epochs_for(len(arms.run.train_captions), arms.config, xe_steps) * arms.steps_per_epoch
    arm = xe_total * xe + xe_setup + scst_total * scst + scst_setup
    cost = 0.0 if args.device != "cpu" or not args.step_cost else \
        COST_IN_DEMO_STEPS["xe"] * xe * (args.rate_steps + 1) + COST_IN_DEMO_STEPS["scst"] * scst * args.rate_steps
    return {"seconds": 2 * arm + 3 * score + cost, "xe_step": xe, "scst_step": scst, "xe_steps": xe_total,
            "scst_steps": scst_total}


def compare_arms(arms: Arms, xe_steps: int) -> dict:
    run = arms.run
    first = arms.xe("arm_scst_xe", xe_steps)
    first_steps = first.epochs * arms.steps_per_epoch
    seconds = {"scst_xe": timed_train(first)}
    second = arms.scst("arm_scst", Path(first.out_dir) / "demo_latest")
    seconds["scst_stage"] = timed_train(second)
    total = seconds["scst_xe"] + seconds["scst_stage"]
    # exactly as many steps as arm scst's seconds hold at its own cross-entropy speed (whole epochs would add or
    # drop up to half an epoch's time)
    alone_steps = round(first_steps * total / seconds["scst_xe"])
    alone = arms.xe("arm_xe", alone_steps, exact=True)
    seconds["xe"] = timed_train(alone)
    scores = {}
    for name, trained in (("xe", alone), ("scst_xe", first), ("scst", second)):
        path = run.caption(Path(trained.out_dir) / "demo_latest", arms.out / f"test_predictions_arm_{name}.json")
        figures = run.score(path, arms.out / f"eval_arm_{name}")
        scores[name] = {"accuracy": figures.accuracy, "cider": figures.cider}
    print(f"\narm xe:   {alone_steps} cross-entropy steps in {seconds['xe']:.0f} s")
    print(f"arm scst: {first_steps} cross-entropy steps in {seconds['scst_xe']:.0f} s, then "
          f"{second.epochs * arms.scst_steps_per_epoch} CIDEr optimisation steps in {seconds['scst_stage']:.0f} s")
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
        if device.type == "cuda" or name == "xe":  # a CPU's CIDEr optimisation step takes seconds: no warm-up
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
    p.add_argument("--xe_steps", type=int, default=None,
                   help=f"arm scst's cross-entropy steps (default {QUICK[0]}; {LONG[0]}, the demo's, with --long)")
    p.add_argument("--scst_steps", type=int, default=None,
                   help=f"arm scst's CIDEr optimisation steps (default {QUICK[1]}; {LONG[1]} with --long)")
    p.add_argument("--long", action="store_true",
                   help="the comparison of docs/experiments.md: 10 minutes on a 2-core Zen 5, 30 on a Zen 3")
    p.add_argument("--limit_minutes", type=float, default=10.0,
                   help="stop before training when the run is expected to take longer (default %(default)s)")
    p.add_argument("--force", action="store_true", help="run however long it is expected to take")
    p.add_argument("--scst_lr", type=float, default=1e-3)
    p.add_argument("--rate_steps", type=int, default=None,
                   help="timed steps of the cost measurement (default 1 on the CPU, 10 on a GPU)")
    p.add_argument("--skip_arms", action="store_true", help="only the cost measurement (gpu_check.sh)")
    p.add_argument("--step_cost", action="store_true",
                   help="part 2 on the CPU too (default: on a GPU only; on a 2-core CPU it takes 1-3 minutes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.rate_steps = args.rate_steps or (1 if args.device == "cpu" else 10)
    args.step_cost = args.step_cost or args.skip_arms or args.device != "cpu"
    default_xe, default_scst = LONG if args.long else QUICK
    xe_steps = default_xe if args.xe_steps is None else args.xe_steps
    args.scst_steps = default_scst if args.scst_steps is None else args.scst_steps
    print(f"bench_scst: {runtime.describe_cpu()}", flush=True)
    fields = []
    if not args.skip_arms:
        arms = Arms(args)
        expected = expected_seconds(arms, xe_steps, args)
        print(f"bench_scst: expected to take about {expected['seconds'] / 60:.1f} minutes on this machine (a "
              f"cross-entropy step {expected['xe_step']:.3f} s, a CIDEr optimisation step {expected['scst_step']:.3f} "
              f"s, measured just now; arm scst: {expected['xe_steps']} + {expected['scst_steps']} steps, arm xe: its "
              f"time)", flush=True)
        if expected["seconds"] > 60 * args.limit_minutes and not args.force:
            sys.exit(f"bench_scst: that is over --limit_minutes {args.limit_minutes:g}; nothing else was run. Run "
                     f"with --force to go ahead, or with fewer --xe_steps / --scst_steps")
        arms_result = compare_arms(arms, xe_steps)
        fields += [f"xe_cider={arms_result['xe']['cider']:.1f}", f"scst_cider={arms_result['scst']['cider']:.1f}"]
        for fact in ("position", "colour", "shape"):
            fields += [f"{arm}_{fact}_acc={arms_result[arm]['accuracy'][fact]:.1f}" for arm in ("xe", "scst")]
        fields += [f"xe_seconds={arms_result['xe_seconds']:.0f}", f"scst_seconds={arms_result['scst_seconds']:.0f}"]
    if args.step_cost:
        rates = step_rates(args)
        fields += [f"xe_steps_per_s={rates['xe']:.3f}", f"scst_steps_per_s={rates['scst']:.3f}",
                   f"scst_step_cost={rates['xe'] / rates['scst']:.1f}"]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
