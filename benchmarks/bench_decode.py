"""Beam search speed: models/decoding.py against the original ClipCap algorithm, measured in the same run.

A randomly initialised distilgpt2-sized decoder (6 layers, 768 wide, vocabulary 50257), a 40-token prefix per
image, beam 5, exactly `--new_tokens` new tokens (no stop tokens on either side, so lengths match).
  (a) the original `generate_beam`: full recompute at every step, one image at a time (fp32)
  (b) ours, one image at a time (fp32)
  (c) ours, a batch of `--batch_size` images (fp32, and again in bf16 where the device computes bf16
      natively: a GPU, or a CPU with AMX or AVX512-BF16; `--bf16 yes` asks for it anywhere)
With `--with_generate`, transformers' `generate(num_beams=...)` is timed on (b) and (c) too.
The captions of (a), (b) and (c) are checked to be the same token sequences (fp32). Each measurement is
repeated `--rounds` times, interleaved with the others, and the fastest time counts.
On a CPU, (b) and (c) run again with int8 weights (models/quantize.py, as `--quantize int8` loads them), on the
same prefixes, unless `--int8 no`: their speed over fp32's, the time to quantize the decoder, and the share of
captions identical to fp32's (on random weights, whose next-token distributions are nearly flat, small rounding
differences change many captions; a trained model's margins are wider).

    python benchmarks/bench_decode.py [--device cuda]

The last line is `RESULT ratio_single=<b/a> ratio_batched=<c/a> ratio_batched_bf16=<c bf16/a> ...
int8_speedup_single=<b int8/b> int8_speedup_batched=<c int8/c> int8_agreement=.. int8_quantize_s_per_100m=..`.

With `--decoder_type gpt2|llama` it compares ours with transformers' `generate(num_beams=5)` instead, on the same
prefixes, one image and a batch, in fp32: gpt2 is the distilgpt2 shape above, llama a SmolLM2-135M-shaped random
LLaMA (30 layers, hidden 576, 9 heads with 3 key/value heads, MLP 1536, vocabulary 49152, tied embeddings).

    python benchmarks/bench_decode.py --decoder_type llama

Its last line is `RESULT decoder=llama captions_per_s_single=.. captions_per_s_batched=.. ratio_generate_single=..
ratio_generate_batched=..` (ours over generate), with the int8 fields above (ours int8 over ours fp32).
"""
import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig

from captioning import runtime
from captioning.original_decoding import original_beam_search
from models.decoding import beam_search
from models.quantize import quantize_int8


SHAPES = {
    "gpt2": GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "llama": LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--batch_size", type=int, default=32, help="images decoded together in (c)")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=20, help="tokens generated per caption")
    p.add_argument("--prefix_length", type=int, default=40, help="prefix embeddings per image")
    p.add_argument("--original_images", type=int, default=1, help="images timed with the original algorithm")
    p.add_argument("--single_images", type=int, default=4, help="images timed one at a time with ours")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all measurements; the fastest counts")
    p.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                   help="the bf16 run of (c): auto runs it where bf16 is native (captioning/runtime.py's rule)")
    p.add_argument("--no_bf16", dest="bf16", action="store_const", const="no", help="same as --bf16 no")
    p.add_argument("--int8", choices=["yes", "no"], default="yes",
                   help="also time ours with int8 weights on the same prefixes (a CPU only; skipped elsewhere)")
    p.add_argument("--with_generate", action="store_true", help="also time transformers' generate")
    p.add_argument("--decoder_type", choices=sorted(SHAPES),
                   help="compare ours with generate on this decoder shape (see above) instead of the original")
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


def measure(name, fn, captions, best, device):
    """Time `fn` (which makes `captions` captions); keep the fastest time of the rounds under `name`."""
    out, seconds = timed(fn, device)
    best[name] = min(best.get(name, float("inf")), seconds / captions)
    return out


def int8_copy(decoder, args, device):
    """A copy of `decoder` with int8 weights and the seconds quantizing it took per 100M parameters, or (None,
    None) where the int8 arm does not run."""
    if args.int8 == "no" or device.type != "cpu":
        if args.int8 == "yes":
            print(f"int8: skipped, int8 weights run on a CPU only (device {device})")
        return None, None
    copied = copy.deepcopy(decoder)
    start = time.perf_counter()
    quantize_int8(copied)
    seconds = time.perf_counter() - start
    count = sum(p.numel() for p in decoder.parameters())
    print(f"int8: quantized in {seconds:.2f} s ({seconds / count * 1e8:.2f} s per 100M parameters)")
    return copied, seconds / count * 1e8


def int8_fields(rate, single: str, batched: str, fp32_captions, int8_captions, quantize_seconds) -> str:
    """The RESULT fields of the int8 arm: the speed of measurements `single` and `batched` + "_int8" over theirs,
    the share of captions (best beams; each image's beams are given) identical to fp32's, and the quantization
    time; empty where it did not run."""
    if quantize_seconds is None:
        return ""
    same = [a[0] == b[0] for a, b in zip(fp32_captions, int8_captions, strict=True)]
    print(f"int8 captions identical to fp32: {sum(same)} of {len(same)}")
    return (f" int8_speedup_single={rate[single + '_int8'] / rate[single]:.2f}"
            f" int8_speedup_batched={rate[batched + '_int8'] / rate[batched]:.2f}"
            f" int8_agreement={sum(same) / len(same):.2f} int8_quantize_s_per_100m={quantize_seconds:.2f}")


def against_generate(args, device):
    """Ours against transformers' generate on one decoder shape, one image at a time and in a batch (fp32)."""
    torch.manual_seed(0)
    decoder = AutoModelForCausalLM.from_config(SHAPES[args.decoder_type]).eval().to(device)
    width, k, n_new = decoder.get_input_embeddings().embedding_dim, args.beam_size, args.new_tokens
    prefix = torch.randn(args.batch_size, args.prefix_length, width, device=device)
    count = sum(p.numel() for p in decoder.parameters())
    print(runtime.describe_cpu())
    print(f"device {device}, torch threads {torch.get_num_threads()}, decoder {args.decoder_type} "
          f"({count / 1e6:.0f}M parameters), prefix {args.prefix_length}, beam {k}, {n_new} new tokens, "
          f"batch {args.batch_size}, {args.rounds} rounds (fastest counts)")
    int8, quantize_seconds = int8_copy(decoder, args, device)
    arms = {"ours": decoder, **({"ours_int8": int8} if int8 is not None else {})}
    for model in arms.values():
        beam_search(model, prefix[:2], [], k, 3)  # warm-up
    generate_beams(decoder, prefix[:1], argparse.Namespace(beam_size=k, new_tokens=3))
    best, n_single, captions = {}, args.original_images, {}
    for _ in range(args.rounds):
        for name, model in arms.items():
            captions[name] = measure(name.replace("ours", "ours_single"), lambda model=model: [
                beam_search(model, prefix[i:i + 1], [], k, n_new).sequences()[0] for i in range(n_single)],
                n_single, best, device)
            captions[name] += measure(name.replace("ours", "ours_batched"), lambda model=model: beam_search(
                model, prefix, [], k, n_new).sequences(), args.batch_size, best, device)
        measure("generate_single", lambda: [generate_beams(decoder, prefix[i:i + 1], args)
                                            for i in range(n_single)], n_single, best, device)
        measure("generate_batched", lambda: generate_beams(decoder, prefix, args), args.batch_size, best, device)
    rate = {name: 1.0 / seconds for name, seconds in best.items()}
    for name, value in rate.items():
        print(f"{name:<18} {value:8.3f} captions/s")
    print(f"RESULT decoder={args.decoder_type} captions_per_s_single={rate['ours_single']:.3f} "
          f"captions_per_s_batched={rate['ours_batched']:.3f} "
          f"ratio_generate_single={rate['ours_single'] / rate['generate_single']:.2f} "
          f"ratio_generate_batched={rate['ours_batched'] / rate['generate_batched']:.2f}"
          + int8_fields(rate, "ours_single", "ours_batched", captions["ours"], captions.get("ours_int8"),
                        quantize_seconds))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.decoder_type:
        return against_generate(args, device)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    gpt = GPT2LMHeadModel(config).eval().to(device)
    with_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and
                                       runtime.resolve_precision("auto", device, training=False).name == "bf16")
    gpt_bf16 = copy.deepcopy(gpt).to(torch.bfloat16) if with_bf16 else None
    gpt_int8, quantize_seconds = int8_copy(gpt, args, device)
    prefix = torch.randn(args.batch_size, args.prefix_length, config.n_embd, device=device)
    k, n_new, n_orig = args.beam_size, args.new_tokens, args.original_images
    n_single = max(args.single_images, n_orig)
    print(runtime.describe_cpu())
    print(f"device {device}, torch threads {torch.get_num_threads()}, decoder 6x768, vocabulary 50257, "
          f"prefix {args.prefix_length}, beam {k}, {n_new} new tokens, batch {args.batch_size}, "
          f"{args.rounds} rounds (fastest counts)")

    beam_search(gpt, prefix[:2], [], k, 3)  # warm-up: allocator, kernels, lazy initialisation
    original_beam_search(gpt, prefix[:1], [], k, 3)
    if gpt_bf16 is not None:
        beam_search(gpt_bf16, prefix[:2].to(torch.bfloat16), [], k, 3)
    if gpt_int8 is not None:
        beam_search(gpt_int8, prefix[:2], [], k, 3)
    if args.with_generate:
        generate_beams(gpt, prefix[:1], argparse.Namespace(beam_size=k, new_tokens=3))
    # Rounds interleave the measurements, so that a busy spell of a shared machine slows all of them alike.
    best = {}
    for _ in range(args.rounds):
        originals = measure("a", lambda: [original_beam_search(gpt, prefix[i:i + 1], [], k, n_new)[0]
                                          for i in range(n_orig)], n_orig, best, device)
        singles = measure("b", lambda: [beam_search(gpt, prefix[i:i + 1], [], k, n_new).sequences()[0]
                                        for i in range(n_single)], n_single, best, device)
        batched = measure("c", lambda: beam_search(gpt, prefix, [], k, n_new).sequences(), args.batch_size,
                          best, device)
        if gpt_int8 is not None:
            singles_int8 = measure("b_int8", lambda: [beam_search(gpt_int8, prefix[i:i + 1], [], k, n_new)
                                                      .sequences()[0] for i in range(n_single)], n_single, best, device)
            batched_int8 = measure("c_int8", lambda: beam_search(gpt_int8, prefix, [], k, n_new).sequences(),
                                   args.batch_size, best, device)
        if gpt_bf16 is not None:
            measure("c_bf16", lambda: beam_search(gpt_bf16, prefix.to(torch.bfloat16), [], k, n_new),
                    args.batch_size, best, device)
        if args.with_generate:
            measure("generate_single", lambda: [generate_beams(gpt, prefix[i:i + 1], args) for i in range(n_orig)],
                    n_orig, best, device)
            measure("generate_batched", lambda: generate_beams(gpt, prefix, args), args.batch_size, best, device)

    rate = {name: 1.0 / seconds for name, seconds in best.items()}
    labels = {"a": "(a) original, one image at a time", "b": "(b) ours, one image at a time",
              "c": f"(c) ours, batch of {args.batch_size}", "c_bf16": f"(c) ours, batch of {args.batch_size}, bf16",
              "b_int8": "(b) ours, one image at a time, int8", "c_int8": f"(c) ours, batch of {args.batch_size}, int8",
              "generate_single": "generate, one image at a time",
              "generate_batched": f"generate, batch of {args.batch_size}"}
    for name, value in rate.items():
        print(f"{labels[name]:<38} {value:8.3f} captions/s  ({value / rate['a']:.1f}x)")
    same_a = all(originals[i] == singles[i] for i in range(n_orig))
    same_c = all(singles[i] == batched[i] for i in range(n_single))
    print(f"same beams: original vs ours {same_a}; one at a time vs batch {same_c}")
    names = dict(b="ratio_single", c="ratio_batched", c_bf16="ratio_batched_bf16",
                 generate_single="generate_single", generate_batched="generate_batched")
    result = {key: rate[name] / rate["a"] for name, key in names.items() if name in rate}
    int8 = int8_fields(rate, "b", "c", singles + batched, singles_int8 + batched_int8,
                       quantize_seconds) if gpt_int8 is not None else ""
    print("RESULT " + " ".join(f"{key}={value:.2f}" for key, value in result.items())
          + f" beams_match={int(same_a and same_c)}" + int8)


if __name__ == "__main__":
    main()
