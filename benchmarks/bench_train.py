"""Training-step speed: the original ClipCap algorithm against train.py's, on the same captions.

Model: transformer mapper (prefix 40, clip length 40, 8 layers) over a randomly initialised distilgpt2-sized
GPT-2 (6 layers, 768 wide, vocabulary 50257), pooled 576-d features, batch 40. Caption lengths are drawn like
COCO's GPT-2 token counts (mean about 12, standard deviation about 3, a few long outliers up to 50).

Original: every caption padded with token 0 to one static length (mean + 10 standard deviations, capped at the
longest), attention mask over the padding, logits over all prefix and caption positions, loss with
ignore_index 0; under --only_prefix the decoder still computes and accumulates gradients that are never used.
Ours: train.py's `Stepper` on batches from its collator (dynamic padding, end token appended, loss only at
labelled positions, frozen decoder under --only_prefix).

    python benchmarks/bench_train.py                       # CPU, fp32 (and bf16 where the CPU has it natively)
    python benchmarks/bench_train.py --also bf16           # also ours under bf16 autocast, on any CPU
    python benchmarks/bench_train.py --device cuda --also bf16

Last line: RESULT ratio_only_prefix=<ours/original samples/s> ratio_finetune=<...> [ratio_*_<precision>=<...>]
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

from captioning import runtime
from captioning.runtime import Distributed
from captioning.training.config import TrainConfig
from captioning.training.datasets import CaptionCollator
from captioning.training.loop import CaptionLoss, Stepper
from captioning.training.runner import build_optimizer
from models.captioner import CaptionerConfig, ClipCaptionModel

VOCAB, EOS, PREFIX, FEATURE_DIM = 50257, 50256, 40, 576


def caption_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    lengths = np.clip(np.round(rng.normal(12.0, 3.0, n)), 4, 30).astype(int)
    outliers = rng.choice(n, size=max(2, n // 1000), replace=False)
    lengths[outliers] = rng.integers(30, 51, size=len(outliers))
    lengths[outliers[0]] = 50
    return lengths


def original_max_seq_len(lengths: np.ndarray) -> int:
    all_len = torch.tensor(lengths, dtype=torch.float)
    return min(int(all_len.mean() + all_len.std() * 10), int(all_len.max()))


def make_model(only_prefix: bool, state=None) -> ClipCaptionModel:
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=VOCAB))
    config = CaptionerConfig(mapping_type="transformer", prefix_length=PREFIX, prefix_length_clip=PREFIX,
                             num_layers=8, prefix_size=FEATURE_DIM, only_prefix=only_prefix, eos_token_ids=[EOS])
    model = ClipCaptionModel(config, gpt=gpt)
    if state is not None:
        model.load_state_dict(state)
    return model


class Original:
    """The original train.py's step, reproduced on our model (same weights and layout)."""

    def __init__(self, model: ClipCaptionModel, only_prefix: bool, device):
        self.model, self.only_prefix, self.device = model.to(device), only_prefix, device
        params = model.clip_project.parameters() if only_prefix else model.parameters()  # ClipCaptionPrefix
        self.optimizer = torch.optim.AdamW(params, lr=2e-5)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 5000, 100000)

    def batch(self, seqs, prefix, max_len):
        tokens = torch.zeros(len(seqs), max_len, dtype=torch.long)
        mask = torch.zeros(len(seqs), max_len)
        for i, s in enumerate(seqs):
            s = s[:max_len]
            tokens[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return tokens.to(self.device), mask.to(self.device), prefix.to(self.device)

    def step(self, tokens, mask, prefix) -> None:
        self.model.train()
        if self.only_prefix:
            self.model.gpt.eval()
        self.optimizer.zero_grad()  # under only_prefix the decoder's gradients are never reset
        logits = self.model(tokens, prefix, mask)[:, PREFIX - 1: -1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()


class Ours:
    def __init__(self, model: ClipCaptionModel, device, precision: str):
        self.device = device
        model.to(device).train()
        optimizer = build_optimizer(model, TrainConfig(), device)  # as train.py builds it, with its defaults
        scheduler = get_linear_schedule_with_warmup(optimizer, 5000, 100000)
        self.stepper = Stepper(CaptionLoss(model, images=False), optimizer, scheduler,
                               Distributed(device=device),
                               precision=runtime.resolve_precision(precision, device, training=True))
        self.collate = CaptionCollator(pad_id=EOS)

    def batch(self, seqs, prefix, max_len):
        batch = self.collate([(torch.tensor(s + [EOS]), p) for s, p in zip(seqs, prefix)])
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step(self, batch) -> None:
        self.stepper([batch])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(runner, batch, device) -> float:
    sync(device)
    start = time.perf_counter()
    runner.step(*batch) if isinstance(batch, tuple) else runner.step(batch)
    sync(device)
    return time.perf_counter() - start


def compare(runners, chunks, max_len, device, warmup: int):
    """Samples per second of each runner on the same batches. Steps alternate between runners, in reversed
    order every other batch, so a load that changes during the run (other processes on a shared machine)
    weighs on all of them alike."""
    prepared = {name: [r.batch(s, f, max_len) for s, f in chunks] for name, r in runners.items()}
    for name, runner in runners.items():  # one untimed step on a small batch: optimizer state, caches
        run_step(runner, runner.batch(chunks[0][0][:4], chunks[0][1][:4], max_len), device)
        for _ in range(warmup):
            run_step(runner, prepared[name][0], device)
    seconds = dict.fromkeys(runners, 0.0)
    for i in range(len(chunks)):
        for name, runner in list(runners.items())[:: 1 if i % 2 == 0 else -1]:
            seconds[name] += run_step(runner, prepared[name][i], device)
    samples = sum(len(s) for s, _ in chunks)
    return {name: samples / t for name, t in seconds.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--also", "--amp", dest="also", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="also time ours under this autocast, reported separately (auto: bf16 where the device "
                        "computes it natively, else none; --amp: the earlier spelling)")
    p.add_argument("--bs", type=int, default=40)
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration (default: 2 on the CPU, where one takes about a minute; "
                        "20 on a GPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed full-size steps first (default: 0 on the CPU, 3 on a GPU); a small one always runs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.also == "auto":
        args.also = "none" if runtime.resolve_precision("auto", device, training=True).name == "fp32" else "bf16"
    print(runtime.describe_cpu())
    steps = args.steps or (2 if device.type == "cpu" else 20)
    warmup = args.warmup if args.warmup is not None else (0 if device.type == "cpu" else 3)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    lengths = caption_lengths(10000, rng)
    max_len = original_max_seq_len(lengths)
    n = args.bs * steps
    picked = rng.permutation(len(lengths))[:n]
    seqs = [rng.integers(1, EOS, size=lengths[i]).tolist() for i in picked]
    feats = torch.randn(n, FEATURE_DIM)
    chunks = [(seqs[i:i + args.bs], feats[i:i + args.bs]) for i in range(0, n, args.bs)]
    print(f"device {device}, batch {args.bs}, {steps} timed step(s) per configuration; static length of the "
          f"original {max_len} tokens; batches' longest caption (with end token) "
          f"{[max(len(s) for s in c[0]) + 1 for c in chunks]}", flush=True)
    results = {}
    for mode, only_prefix in (("only_prefix", True), ("finetune", False)):
        state = make_model(False).state_dict()
        runners = {("original", "none"): Original(make_model(False, state), only_prefix, device),
                   ("ours", "none"): Ours(make_model(only_prefix, state), device, "fp32")}
        if args.also != "none":
            runners[("ours", args.also)] = Ours(make_model(only_prefix, state), device, args.also)
        for (side, amp), speed in compare(runners, chunks, max_len, device, warmup).items():
            results[(mode, side, amp)] = speed
            print(f"{mode:12s} {side:9s} {'fp32' if amp == 'none' else amp:5s} {speed:8.2f} samples/s", flush=True)
        del runners, state
    fields = []
    for mode in ("only_prefix", "finetune"):
        base = results[(mode, "original", "none")]
        fields.append(f"ratio_{mode}={results[(mode, 'ours', 'none')] / base:.2f}")
    if args.also != "none":
        for mode in ("only_prefix", "finetune"):
            base = results[(mode, "original", "none")]
            fields.append(f"ratio_{mode}_{args.also}={results[(mode, 'ours', args.also)] / base:.2f}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
