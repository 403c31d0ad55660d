"""The latency of one photo on the CPU, end to end, with fp32 and with int8 decoder weights.

What a user of `predict.py` or the Captioner API waits for when captioning one photo: reading and decoding a
640x480 JPEG, TinyViT-21M at 224 (the default encoder, its own preprocessing), train.py's default MLP mapper
(prefix 10) and beam search (beam 5) for `--new_tokens` tokens, through `Captioner.from_pretrained(...)` on an
export written here with random weights (no downloads): the decoder is distilgpt2-sized (6 layers, 768 wide,
vocabulary 50257) or SmolLM2-135M-shaped (30 layers, hidden 576, vocabulary 49152). Random decoders never choose
the end token in practice, so every caption is `--new_tokens` long. Each arm is timed `--rounds` times after a
warm-up, the arms interleaved; the median counts. The encoder runs in fp32 in both arms (int8 is the decoder's
and the mapper's).

    python benchmarks/bench_photo.py [--rounds 5] [--new_tokens 12] [--threads N]

The last line is `RESULT gpt2_fp32_ms=.. gpt2_int8_ms=.. llama_fp32_ms=.. llama_int8_ms=.. encoder_ms=..`.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, GPT2TokenizerFast

from bench_decode import SHAPES  # the decoder shapes bench_decode.py times
from captioning import runtime
from captioning.inference import Captioner
from captioning.training.config import TrainConfig
from models.captioner import CaptionerConfig, ClipCaptionModel
from models.decoding import DecodingOptions, beam_search
from models.encoder import EncoderConfig, ImageEncoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="timed captions per arm (the median counts)")
    p.add_argument("--new_tokens", type=int, default=12, help="tokens per caption")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: the usable cores)")
    return p.parse_args(argv)


def small_tokenizer() -> GPT2TokenizerFast:
    """A small byte-level BPE tokenizer (the decoder's vocabulary is the real size; the text only needs ids)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a photo of a dog on a beach", "a man riding a wave on a surfboard"], vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def write_export(directory: Path, decoder_type: str, encoder: ImageEncoder) -> Path:
    """An export of a random captioner: `encoder`, train.py's default mapper and a random decoder of the shape."""
    torch.manual_seed(0)
    tokenizer = small_tokenizer()
    decoder = AutoModelForCausalLM.from_config(SHAPES[decoder_type])
    defaults = TrainConfig()
    config = CaptionerConfig(mapping_type=defaults.mapping_type, prefix_length=defaults.prefix_length,
                             prefix_length_clip=defaults.prefix_length_clip, prefix_size=encoder.feature_dim,
                             eos_token_ids=[tokenizer.eos_token_id])
    ClipCaptionModel(config, gpt=decoder, encoder=encoder).save_pretrained(directory / decoder_type, tokenizer)
    return directory / decoder_type


def write_photo(path: Path) -> Path:
    """A 640x480 JPEG with smooth colour and noise, about the bytes of a phone photo scaled down."""
    rng = np.random.default_rng(0)
    x = np.mgrid[0:480, 0:640][1] / 640.0
    pixels = np.stack([np.sin(6 * x + c) * 90 + 128 + rng.normal(0, 12, x.shape) for c in range(3)], axis=-1)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(runtime.describe_cpu())
    options = DecodingOptions(beam_size=args.beam_size, max_length=args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photo = write_photo(tmp / "photo.jpg")
        encoder = ImageEncoder(EncoderConfig(name="tiny_vit_21m_224", weights="random"))
        exports = {kind: write_export(tmp, kind, encoder) for kind in ("gpt2", "llama")}
        arms = {}
        for kind, export in exports.items():
            for quantize in ("none", "int8"):
                start = time.perf_counter()
                captioner = Captioner.from_pretrained(export, precision="fp32", quantize=quantize)
                print(f"{kind} {quantize}: loaded in {time.perf_counter() - start:.2f} s "
                      f"({captioner.precision.reason})")
                arms[f"{kind}_{'fp32' if quantize == 'none' else quantize}"] = captioner
        pixels = encoder.preprocess(Image.open(photo).convert("RGB")).unsqueeze(0)
        loaded_encoder = arms["gpt2_fp32"].encoder  # as captioning runs it: eval mode, batch norms folded
        print(f"torch threads {torch.get_num_threads()}, beam {args.beam_size}, {args.new_tokens} tokens, "
              f"{args.rounds} rounds (median counts)")
        times = {name: [] for name in arms}
        times["encoder"] = []
        for captioner in arms.values():  # warm-up: allocator, kernels, lazy initialisation
            captioner.caption(str(photo), options)
        for _ in range(args.rounds):
            for name, captioner in arms.items():
                times[name].append(timed_ms(lambda captioner=captioner: captioner.caption(str(photo), options)))
            with torch.no_grad():
                times["encoder"].append(timed_ms(lambda: loaded_encoder(pixels)))
        with torch.no_grad():  # the length of each arm's best beam, from the same prefix the captioner makes
            tokens = {name: len(beam_search(c.model.gpt, c.model.prefix_embeddings(c.encoder(pixels)),
                                            c.model.config.eos_token_ids, args.beam_size,
                                            args.new_tokens).sequences()[0][0]) for name, c in arms.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        spread = f"{min(times[name]):.0f}-{max(times[name]):.0f}"
        print(f"{name:<12} {value:8.1f} ms (rounds {spread} ms)" +
              (f", captions of {tokens[name]} tokens" if name in tokens else ""))
    print(f"int8 speed-up: distilgpt2-sized {median['gpt2_fp32'] / median['gpt2_int8']:.2f}x, "
          f"SmolLM2-135M-shaped {median['llama_fp32'] / median['llama_int8']:.2f}x (whole photo)")
    print("RESULT " + " ".join(f"{name}_ms={value:.0f}" for name, value in median.items()))


if __name__ == "__main__":
    main()
