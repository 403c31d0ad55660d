"""Memory and time of one training step with a modern decoder, before anyone trains one on COCO.

Random weights in the shape of SmolLM2-135M (`--decoder_type llama`: 30 layers, hidden 576, 9 heads with 3
key/value heads, MLP 1536, vocabulary 49152) or Qwen2.5-0.5B (`--decoder_type qwen2`: 24 layers, hidden 896,
14 heads with 2 key/value heads, MLP 4864, vocabulary 151936), both with tied embeddings, under train.py's
default mapper (MLP, prefix 10) on 576-d pooled features: a batch of `--bs` captions of `--caption_tokens` tokens,
AdamW, fp32. Each training mode runs in a fresh process, which reports its peak resident memory:
  frozen   --only_prefix: the mapper learns, the decoder is frozen (its backward pass still runs, to the prefix)
  lora8    --lora_r 8: the mapper and rank-8 adapters on every attention and MLP projection learn (peft)
  lora16   --lora_r 16
  full     every weight learns
The parameter state (weights, gradients and AdamW's two moments of what learns) is computed, not measured; on a
GPU it is what stays resident, and the activations come on top (about what the CPU peak adds to it).

    python benchmarks/bench_decoder_step.py --decoder_type llama

Last line: RESULT decoder=<..> <mode>_peak_gb=.. <mode>_state_gb=.. <mode>_step_s=.. <mode>_trainable_m=.. ...
"""
import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "llama": dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                  num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                  tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                  tie_word_embeddings=True),
}
MODES = ("frozen", "lora8", "lora16", "full")
LORA_ALPHA = 16.0  # train.py's default
FEATURE_DIM = 576


def measure(decoder_type: str, mode: str, bs: int, caption_tokens: int, steps: int, lora_dropout: float) -> dict:
    """One mode in this process: build, take `steps` training steps, return the figures."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.captioner import CaptionerConfig, ClipCaptionModel
    from models.lora import LoraSettings, default_targets

    torch.manual_seed(0)
    shape = dict(SHAPES[decoder_type])
    decoder = AutoModelForCausalLM.from_config(AutoConfig.for_model(shape.pop("model_type"), **shape))
    lora = None
    if mode.startswith("lora"):
        lora = LoraSettings(r=int(mode[4:]), alpha=LORA_ALPHA, dropout=lora_dropout,
                            targets=default_targets(decoder.config.model_type)).to_dict()
    model = ClipCaptionModel(CaptionerConfig(prefix_size=FEATURE_DIM, only_prefix=mode == "frozen",
                                             eos_token_ids=[0], lora=lora), gpt=decoder).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    features = torch.randn(bs, FEATURE_DIM)
    tokens = torch.randint(1, decoder.config.vocab_size, (bs, caption_tokens))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.loss(tokens, features).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    n_trainable = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    state = (4 * n_all + 12 * n_trainable) / 2**30  # weights; gradients and two AdamW moments of what learns
    return {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "state_gb": state,
            "step_s": min(times[1:] or times), "trainable_m": n_trainable / 1e6, "parameters_m": n_all / 1e6}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder_type", choices=sorted(SHAPES), default="llama")
    p.add_argument("--bs", type=int, default=40, help="captions per step (train.py's default)")
    p.add_argument("--caption_tokens", type=int, default=16, help="tokens per caption (COCO's mean is about 13)")
    p.add_argument("--steps", type=int, default=3, help="steps per mode; the fastest after the first counts")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--lora_dropout", type=float, default=0.05,
                   help="train.py's default; 0 spares the dropped copy of each adapted layer's input")
    p.add_argument("--_child", nargs=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(measure(args.decoder_type, args._child[0], args.bs, args.caption_tokens, args.steps,
                                 args.lora_dropout)))
        return
    from captioning import runtime
    print(runtime.describe_cpu())
    print(f"decoder {args.decoder_type} ({SHAPES[args.decoder_type]}), batch {args.bs} x {args.caption_tokens} "
          f"tokens + prefix 10, AdamW, fp32, LoRA alpha {LORA_ALPHA} dropout {args.lora_dropout}; each mode in a "
          f"fresh process", flush=True)
    results = {}
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--decoder_type", args.decoder_type, "--bs", str(args.bs),
                              "--caption_tokens", str(args.caption_tokens), "--steps", str(args.steps),
                              "--lora_dropout", str(args.lora_dropout), "--_child", mode],
                             check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:<7} {r['trainable_m']:8.2f}M of {r['parameters_m']:.1f}M parameters learn; peak RSS "
              f"{r['peak_gb']:.2f} GB, parameter state {r['state_gb']:.2f} GB, {r['step_s']:.2f} s a step",
              flush=True)
    print(f"RESULT decoder={args.decoder_type} " + " ".join(
        f"{mode}_{key}={value:.2f}" for mode, r in results.items() for key, value in r.items()
        if key != "parameters_m"))


if __name__ == "__main__":
    main()
