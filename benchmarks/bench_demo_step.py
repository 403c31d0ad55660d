"""The demo's training step, and what the levers of a faster recipe do to it: `python benchmarks/bench_demo_step.py`.

Trains the demo's recipe (captioning/demo/recipe.py, the demo's own dataset) for --steps steps once per variant,
one after the other in this process, and times the steps after the first logging window from train_log.jsonl
(no profiler: on 2 cores it inflates small element-wise operations several times). Variants:

- recipe: the recipe as `make demo` trains it (its GPT-2 decoder's activation is `gelu_pytorch_tanh`);
- gelu_new: the same decoder with GPT-2's default `gelu_new`, the same function written as four element-wise
  operations (the recipe's activation until 2026-12-07);
- image40: images at 40x40 instead of 48x48;
- bs96: 96 captions a batch instead of 64 (compared per caption).

How the recipe was made faster is in docs/experiments.md ("Toward a faster recipe"). Last line: RESULT
recipe_step_s=.. gelu_fused_ratio=.. image40_ratio=.. bs96_caption_ratio=.. (gelu_fused_ratio: gelu_new's time over
the recipe's, what the fused activation gains; the others: the recipe's time over the variant's, per step, or per
caption for bs96; above 1, the variant is faster).
"""
import argparse
from pathlib import Path

from captioning import demo
from captioning.data import shapes
from captioning.runtime import describe_cpu
from captioning.training.runner import train
from captioning.training.state import TrainLog
from transformers import AutoConfig

# each variant's changes to DemoConfig (gelu_new changes the decoder's config instead)
VARIANTS = {"recipe": {}, "gelu_new": {}, "image40": {"image_size": 40}, "bs96": {"bs": 96}}


def seconds_per_sample(out_dir: Path, skip: int) -> float:
    """Mean seconds per sample over the logging windows after the first `skip` steps."""
    records = TrainLog(out_dir, enabled=False).records()
    windows = [r for r in records if "samples_per_s" in r and r["step"] > skip]
    if not windows:
        raise SystemExit(f"bench_demo_step: {out_dir}/train_log.jsonl has no steps after {skip}; raise --steps")
    return sum(1.0 / r["samples_per_s"] for r in windows) / len(windows)


def measure(variant: str, args, data: Path, out: Path) -> tuple:
    """(captions a batch, seconds per caption) of `variant`, over --steps steps after the first sixth."""
    config = demo.DemoConfig(data=str(data), out_dir=str(out), device="cpu", threads=args.threads,
                             precision=args.precision, **VARIANTS[variant])
    run = demo.Run(config, out, data)
    decoder = demo.build_decoder(run.train_captions, out / f"decoder_{variant}", config.seed)
    if variant == "gelu_new":
        decoder_config = AutoConfig.from_pretrained(decoder)
        decoder_config.activation_function = "gelu_new"
        decoder_config.save_pretrained(decoder)
    # two epochs: bs96 has 104 steps an epoch
    trained = demo.train_config(data, run.root, decoder, run.fresh(f"run_{variant}"), 2, config)
    trained.max_steps, trained.log_every = args.steps, args.steps // 6
    train(trained)
    return config.bs, seconds_per_sample(Path(trained.out_dir), args.steps // 6)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="./runs/bench_demo_step")
    p.add_argument("--steps", type=int, default=120, help="steps per variant, the first sixth untimed")
    p.add_argument("--precision", default="auto", help="as demo.py --precision (default %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.steps < 12:
        p.error("--steps must be at least 12 (the first sixth is not timed)")
    print(f"bench_demo_step: {describe_cpu()}", flush=True)
    out = Path(args.out_dir)
    data = out / "shapes"
    if not (data / "captions_test.json").exists():
        defaults = demo.DemoConfig()
        shapes.generate(data, num_train=defaults.num_train, num_val=defaults.num_val, num_test=defaults.num_test,
                        seed=defaults.seed, size=defaults.image_size)
    measured = {variant: measure(variant, args, data, out) for variant in VARIANTS}
    base = measured["recipe"][1]  # seconds per caption
    print(f"\n{'variant':12}{'s/step':>9}{'ms/caption':>12}{'x recipe':>10}")
    for variant, (bs, per_caption) in measured.items():
        print(f"{variant:12}{per_caption * bs:9.4f}{1000 * per_caption:12.2f}{base / per_caption:10.2f}")
    # the same batch size: the ratio per caption is the ratio per step
    print(f"RESULT recipe_step_s={base * measured['recipe'][0]:.4f} "
          f"gelu_fused_ratio={measured['gelu_new'][1] / base:.2f} image40_ratio={base / measured['image40'][1]:.2f} "
          f"bs96_caption_ratio={base / measured['bs96'][1]:.2f}")


if __name__ == "__main__":
    main()
