"""Peak memory of train.py's data path at COCO scale: 590k captions over 118k pooled 576-d features.

Generates a features pickle of that size (float32 features, 5 captions per image, COCO-like lengths),
then, in a fresh process, runs what train.py does with it: `read_features`, caption table, tokenization (and
the token cache on a second pass), the datasets with a validation split, and a few DataLoader batches.
Reports the process's peak resident memory (the Python interpreter and imported libraries included) and what
the data adds to it. The model and optimizer come on top (distilgpt2 + a 40/40/8 transformer mapper with
AdamW: about 2.2 GB in fp32 for full fine-tuning, far less under --only_prefix).

    python benchmarks/bench_train_memory.py [--images 120000] [--captions_per_image 5]

Last line: RESULT peak_rss_gb=<..> data_peak_gb=<..> data_steady_gb=<..> tokenize_s=<..> cached_load_s=<..>
"""
import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Words of the synthetic captions: COCO-like sentences from a small vocabulary.
COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
THINGS = ["dog", "cat", "man", "woman", "bus", "pizza", "horse", "table"]
PLACES = ["on a street", "in a field", "next to a tree", "on a table", "in the kitchen", "at the beach"]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def generate(path: Path, images: int, per_image: int, seed: int) -> None:
    import numpy as np
    import torch

    from captioning.data.features import write_features

    rng = np.random.default_rng(seed)
    words = [f"{c} {t} {p}" for c in COLOURS for t in THINGS for p in PLACES]
    entries = []
    for i in range(images):
        for _ in range(per_image):
            a, b = rng.integers(len(words), size=2)
            entries.append({"image_id": i, "caption": f"A {words[a]} and a {words[b]}.", "clip_embedding": i})
    write_features(path, torch.randn(images, 576), entries, {})


def make_tokenizer(directory: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    corpus = [f"A {c} {t} {p}." for c in COLOURS for t in THINGS for p in PLACES]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(str(directory))


def measure(path: Path, tokenizer_dir: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    from captioning.runtime import Distributed
    from captioning.training.config import TrainConfig
    from captioning.training.inputs import build_feature_inputs
    from captioning.training.runner import make_loaders

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = current_rss_gb()
    config = TrainConfig(data=str(path), out_dir=str(out_dir), cache_dir=str(out_dir), val_fraction=0.01,
                         mapping_type="transformer", bs=40)
    start = time.perf_counter()
    inputs = build_feature_inputs(config, tokenizer, Distributed())  # tokenizes and writes the token cache
    tokenize_s, first_peak = time.perf_counter() - start, rss_gb()
    del inputs
    start = time.perf_counter()
    inputs = build_feature_inputs(config, tokenizer, Distributed())  # reads the token cache
    cached_s = time.perf_counter() - start
    loader, _, _ = make_loaders(config, inputs, Distributed(), tokenizer.eos_token_id, workers=0)
    for _ in zip(range(50), loader):  # draw 50 batches: the collate path counts in the peak
        continue
    print(f"{len(inputs.train)} training captions, {len(inputs.val)} validation captions, "
          f"tokens {inputs.train.tokens.flat.nbytes / 2**20:.0f} MiB, features "
          f"{inputs.train.features.numel() * inputs.train.features.element_size() / 2**20:.0f} MiB")
    print(f"RESULT peak_rss_gb={first_peak:.2f} data_peak_gb={first_peak - base:.2f} "
          f"data_steady_gb={current_rss_gb() - base:.2f} tokenize_s={tokenize_s:.1f} cached_load_s={cached_s:.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118000)
    p.add_argument("--captions_per_image", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        measure(*map(Path, args._measure))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        generate(tmp / "coco_like.pkl", args.images, args.captions_per_image, args.seed)
        make_tokenizer(tmp / "tokenizer")
        print(f"generated {tmp / 'coco_like.pkl'} ({(tmp / 'coco_like.pkl').stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - start:.0f} s; measuring in a fresh process", flush=True)
        subprocess.run([sys.executable, __file__, "--_measure", str(tmp / "coco_like.pkl"), str(tmp / "tokenizer"),
                        str(tmp / "out")], check=True)


if __name__ == "__main__":
    main()
