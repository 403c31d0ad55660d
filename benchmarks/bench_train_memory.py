"""Private memory of train.py's data path, the features pickle against the memory-mapped store, at Conceptual
Captions scale: 3.3M images with one caption each, pooled 576-d float16 features (`--images`, `--dim`).

Generates both files once (kept in `--data_dir` for the next run; a different size regenerates them) and warms the
caption-token cache, then, for each format, in a fresh process, runs what train.py does with it
(`build_feature_inputs` with a 1% validation split, then the DataLoader): its private memory (Private_Dirty of
/proc/self/smaps_rollup: pages this process alone holds; RSS would count the page cache a store shares), after
loading and while drawing batches, the peak of what it sampled, the time to the first batch and the loader's
samples/s. Every torchrun process of a node holds its own private memory; a store's features are shared.

    python benchmarks/bench_train_memory.py [--images 3300000] [--captions_per_image 1]

Last line: RESULT pickle_private_gb=.. store_private_gb=.. pickle_first_batch_s=.. store_first_batch_s=..
pickle_samples_per_s=.. store_samples_per_s=.. (peaks, in GB of private memory beyond the interpreter's)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Words of the synthetic captions: COCO-like sentences from a small vocabulary.
COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
THINGS = ["dog", "cat", "man", "woman", "bus", "pizza", "horse", "table"]
PLACES = ["on a street", "in a field", "next to a tree", "on a table", "in the kitchen", "at the beach"]
BATCHES = 200  # drawn to measure the loader
FILES = {"pickle": "data.pkl", "store": "data.store"}


def private_gb() -> float:
    """This process's Private_Dirty memory (smaps_rollup), in GB: what it alone holds and could not drop. A store's
    mapped pages are clean page cache (Private_Clean while no other process maps them, Shared_Clean once one does),
    which RSS and Private_Clean count and the kernel reclaims or shares."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("/proc/self/smaps_rollup has no Private_Dirty line")


def generate(directory: Path, images: int, per_image: int, dim: int, seed: int) -> None:
    """data.pkl and data.store of the same features and captions, and a tokenizer."""
    import numpy as np
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    from captioning.data.features import write_features
    from captioning.data.store import write_store

    rng = np.random.default_rng(seed)
    words = [f"{c} {t} {p}" for c in COLOURS for t in THINGS for p in PLACES]
    pairs = rng.integers(len(words), size=(images * per_image, 2))
    captions = [{"image_id": i // per_image, "caption": f"A {words[a]} and a {words[b]}.", "clip_embedding":
                 i // per_image} for i, (a, b) in enumerate(pairs.tolist())]
    features = torch.empty(images, dim, dtype=torch.float16)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, images, 262144):  # in chunks: no float32 copy of the whole tensor
        end = min(start + 262144, images)
        features[start:end] = torch.randn(end - start, dim, generator=generator).half()
    write_features(directory / "data.pkl", features, captions, {})
    write_store(directory / "data.store", features, captions, {})
    corpus = [f"A {w}." for w in words]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                      bos_token="<|endoftext|>").save_pretrained(str(directory / "tokenizer"))


def measure(path: Path, directory: Path) -> dict:
    """train.py's data path over `path` in this (fresh) process."""
    from transformers import AutoTokenizer

    from captioning.runtime import Distributed
    from captioning.training.config import TrainConfig
    from captioning.training.inputs import build_feature_inputs
    from captioning.training.runner import make_loaders

    tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    base = private_gb()
    config = TrainConfig(data=str(path), out_dir=str(directory / "run"), cache_dir=str(directory / "cache"),
                         val_fraction=0.01, mapping_type="transformer", bs=40)
    start = time.perf_counter()
    inputs = build_feature_inputs(config, tokenizer, Distributed())
    loaded = private_gb()
    loader, _, _ = make_loaders(config, inputs, Distributed(), tokenizer.eos_token_id, workers=0)
    batches = iter(loader)
    next(batches)
    first_batch_s = time.perf_counter() - start
    drawn, start, peak = 0, time.perf_counter(), max(loaded, private_gb())
    for drawn, _ in enumerate(zip(range(BATCHES), batches), start=1):
        if drawn % 50 == 0:
            peak = max(peak, private_gb())
    samples_per_s = drawn * config.bs / (time.perf_counter() - start)  # drop_last: every batch is full
    return {"private_gb": peak - base, "steady_gb": private_gb() - base, "first_batch_s": first_batch_s,
            "samples_per_s": samples_per_s, "captions": len(inputs.train)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3_300_000)
    p.add_argument("--captions_per_image", type=int, default=1)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/tinytiny-bench/train_memory"),
                   help="where the generated files are kept between runs")
    p.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(Path(args._measure[0]), Path(args._measure[1]))))
        return
    from captioning import runtime
    print(runtime.describe_cpu())
    spec = {"images": args.images, "captions_per_image": args.captions_per_image, "dim": args.dim, "seed": args.seed}
    directory = Path(args.data_dir) / "_".join(f"{k}{v}" for k, v in spec.items())
    if not (directory / "done.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        generate(directory, args.images, args.captions_per_image, args.dim, args.seed)
        (directory / "done.json").write_text(json.dumps(spec))
        print(f"generated {directory} in {time.perf_counter() - start:.0f} s", flush=True)
    size = (directory / "data.pkl").stat().st_size / 2**30
    print(f"{args.images:,} images x {args.captions_per_image} caption(s), {args.dim}-d float16 features "
          f"(pickle {size:.2f} GB); each format measured in a fresh process, the token cache warm", flush=True)
    results = {}
    for kind in ("store", "pickle", "store"):  # the first run warms the token cache for both (same captions)
        out = subprocess.run([sys.executable, __file__, "--_measure", str(directory / FILES[kind]), str(directory)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"measuring the {kind} failed:\n{out.stderr[-3000:]}")
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    for kind, r in results.items():
        print(f"{kind:<7} private memory: peak {r['private_gb']:.2f} GB, steady {r['steady_gb']:.2f} GB; first batch "
              f"after {r['first_batch_s']:.1f} s; {r['samples_per_s']:,.0f} samples/s ({r['captions']:,} training "
              f"captions)")
    kinds = ("pickle", "store")
    print("RESULT " + " ".join(f"{kind}_{key}={results[kind][key]:.2f}" for kind in kinds
                               for key in ("private_gb", "steady_gb", "first_batch_s"))
          + " " + " ".join(f"{kind}_samples_per_s={results[kind]['samples_per_s']:.0f}" for kind in kinds))


if __name__ == "__main__":
    main()
