"""Beam search speed: models/decoding.py against the original ClipCap algorithm, measured in the same run.

A randomly initialised distilgpt2-sized decoder (6 layers, 768 wide, vocabulary 50257), a 40-token prefix per
image, beam 5, exactly `--new_tokens` new tokens (no stop tokens on either side, so lengths match).
  (a) the original `generate_beam`: full recompute at every step, one image at a time (fp32)
  (b) ours, one image at a time (fp32)
  (c) ours, a batch of `--batch_size` images (fp32, and again in bf16)
With `--with_generate`, transformers' `generate(num_beams=...)` is timed on (b) and (c) too.
The captions of (a), (b) and (c) are checked to be the same token sequences (fp32).

    python benchmarks/bench_decode.py [--device cuda]

The last line is `RESULT ratio_single=<b/a> ratio_batched=<c/a> ratio_batched_bf16=<c bf16/a> ...`.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.original_decoding import original_beam_search  # noqa: E402
from models.decoding import beam_search  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--batch_size", type=int, default=32, help="images decoded together in (c)")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=20, help="tokens generated per caption")
    p.add_argument("--prefix_length", type=int, default=40, help="prefix embeddings per image")
    p.add_argument("--original_images", type=int, default=2, help="images timed with the original algorithm")
    p.add_argument("--single_images", type=int, default=4, help="images timed one at a time with ours")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of (c); the fastest counts")
    p.add_argument("--no_bf16", action="store_true", help="skip the bf16 run of (c)")
    p.add_argument("--with_generate", action="store_true", help="also time transformers' generate")
    return p.parse_args(argv)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def generate_beams(gpt, prefix, args):
    """transformers' beam search on the same inputs, without stop tokens (it repeats the prefix per beam)."""
    config = GenerationConfig(num_beams=args.beam_size, num_return_sequences=1, do_sample=False,
                              max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    return gpt.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    gpt = GPT2LMHeadModel(config).eval().to(device)
    prefix = torch.randn(args.batch_size, args.prefix_length, config.n_embd, device=device)
    k, n_new = args.beam_size, args.new_tokens
    print(f"device {device}, torch threads {torch.get_num_threads()}, decoder 6x768, vocabulary 50257, "
          f"prefix {args.prefix_length}, beam {k}, {n_new} new tokens, batch {args.batch_size}")

    beam_search(gpt, prefix[:2], [], k, 3)  # warm-up: allocator, kernels, lazy initialisation
    original_beam_search(gpt, prefix[:1], [], k, 3)

    n_orig = args.original_images
    originals, t_orig = timed(lambda: [original_beam_search(gpt, prefix[i:i + 1], [], k, n_new)[0]
                                       for i in range(n_orig)], device)
    rate_a = n_orig / t_orig
    print(f"(a) original, one image at a time: {rate_a:.3f} captions/s")

    n_single = max(args.single_images, n_orig)
    singles, t_single = timed(lambda: [beam_search(gpt, prefix[i:i + 1], [], k, n_new).sequences()[0]
                                       for i in range(n_single)], device)
    rate_b = n_single / t_single
    print(f"(b) ours, one image at a time:     {rate_b:.3f} captions/s  ({rate_b / rate_a:.1f}x)")

    t_batch = float("inf")
    for _ in range(args.repeats):
        batched, t = timed(lambda: beam_search(gpt, prefix, [], k, n_new).sequences(), device)
        t_batch = min(t_batch, t)
    rate_c = args.batch_size / t_batch
    print(f"(c) ours, batch of {args.batch_size}:            {rate_c:.3f} captions/s  ({rate_c / rate_a:.1f}x)")

    same_a = all(originals[i] == singles[i] for i in range(n_orig))
    same_c = all(singles[i] == batched[i] for i in range(n_single))
    print(f"same beams: original vs ours {same_a}; one at a time vs batch {same_c}")
    result = dict(ratio_single=rate_b / rate_a, ratio_batched=rate_c / rate_a)

    if not args.no_bf16:
        gpt_bf16 = copy.deepcopy(gpt).to(torch.bfloat16)
        prefix_bf16 = prefix.to(torch.bfloat16)
        beam_search(gpt_bf16, prefix_bf16[:2], [], k, 3)
        _, t = timed(lambda: beam_search(gpt_bf16, prefix_bf16, [], k, n_new), device)
        rate = args.batch_size / t
        print(f"(c) ours, batch of {args.batch_size}, bf16:      {rate:.3f} captions/s  ({rate / rate_a:.1f}x)")
        result["ratio_batched_bf16"] = rate / rate_a

    if args.with_generate:
        generate_beams(gpt, prefix[:1], argparse.Namespace(beam_size=k, new_tokens=3))
        _, t = timed(lambda: [generate_beams(gpt, prefix[i:i + 1], args) for i in range(n_orig)], device)
        rate_gs = n_orig / t
        _, t = timed(lambda: generate_beams(gpt, prefix, args), device)
        rate_gb = args.batch_size / t
        print(f"generate, one image at a time:     {rate_gs:.3f} captions/s  ({rate_gs / rate_a:.1f}x)")
        print(f"generate, batch of {args.batch_size}:            {rate_gb:.3f} captions/s  ({rate_gb / rate_a:.1f}x)")
        result.update(generate_single=rate_gs / rate_a, generate_batched=rate_gb / rate_a)

    result["beams_match"] = int(same_a and same_c)
    print("RESULT " + " ".join(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                               for key, value in result.items()))


if __name__ == "__main__":
    main()
