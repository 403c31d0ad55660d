"""Time `metrics.score_captions` against the COCO caption toolkit's own pipeline on a Karpathy-test-
sized synthetic set (5,000 images, 5 references each), and check that both give the same numbers.

The baseline is what `pycocoevalcap.eval.COCOEvalCap.evaluate` runs: the PTB tokenizer once for the references
and once for the predictions, then BLEU, METEOR, ROUGE-L and CIDEr (SPICE is left out: it needs a separate
download). Its per-metric times show where an evaluation spends its time.

    python benchmarks/bench_evaluate.py [--images 5000] [--repeats 2] [--device cpu]

Metrics run on the CPU and in Java; --device is accepted for uniformity with the other benchmarks and does not
change the work done. Last line: RESULT images=... baseline_s=... ours_s=... ratio=... <metric>_s=...
max_abs_diff=...
"""
import argparse
import random
import time

from captioning.metrics import score_captions

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "brown", "grey"]
THINGS = ["dog", "cat", "man", "woman", "bus", "pizza", "horse", "table", "train", "bird", "boat", "child"]
VERBS = ["sitting", "standing", "running", "lying", "waiting", "playing", "parked"]
PLACES = ["on a street", "in a field", "next to a tree", "on a table", "in the kitchen", "at the beach",
          "near the water", "in a room", "on the grass", "under a bridge"]


def sentence(rng: random.Random, colour: str, thing: str) -> str:
    if rng.random() < 0.3:
        colour, thing = rng.choice(COLOURS), rng.choice(THINGS)
    article = "An" if colour[0] in "aeiou" else "A"
    return f"{article} {colour} {thing} {rng.choice(VERBS)} {rng.choice(PLACES)}."


def synthetic_set(n: int, seed: int = 0):
    rng = random.Random(seed)
    references, predictions = {}, {}
    for image_id in range(n):
        colour, thing = rng.choice(COLOURS), rng.choice(THINGS)
        references[image_id] = [sentence(rng, colour, thing) for _ in range(5)]
        predictions[image_id] = sentence(rng, colour, thing)
    return predictions, references


def baseline(predictions, references):
    """pycocoevalcap's COCOEvalCap.evaluate without SPICE; returns scores and per-stage seconds."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    times, scores = {}, {}
    start = time.perf_counter()
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    times["tokenize"] = time.perf_counter() - start
    for name, make, keys in (("bleu", lambda: Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
                             ("meteor", Meteor, ["METEOR"]), ("rouge", Rouge, ["ROUGE_L"]),
                             ("cider", Cider, ["CIDEr"])):
        start = time.perf_counter()
        scorer = make()
        score, _ = scorer.compute_score(gts, res, verbose=0) if name == "bleu" else scorer.compute_score(gts, res)
        del scorer
        times[name] = time.perf_counter() - start
        scores.update({k: 100 * float(s) for k, s in zip(keys, score if name == "bleu" else [score])})
    return scores, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="number of images (Karpathy test: 5000)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved; the fastest counts")
    parser.add_argument("--device", default="cpu", help="accepted for uniformity; metrics run on CPU and Java")
    args = parser.parse_args(argv)
    predictions, references = synthetic_set(args.images)
    metrics = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")

    base_s = ours_s = float("inf")
    for _ in range(args.repeats):  # interleaved, so JVM and disk-cache warm-up favour neither side
        start = time.perf_counter()
        base_scores, stage_times = baseline(predictions, references)
        if time.perf_counter() - start < base_s:
            base_s, times = time.perf_counter() - start, stage_times
        start = time.perf_counter()
        ours = score_captions(predictions, references, metrics=metrics)
        ours_s = min(ours_s, time.perf_counter() - start)

    diff = max(abs(ours["metrics"][k] - base_scores[k]) for k in base_scores)
    print(f"{args.images} images, 5 references each (device {args.device}: not used by the metrics)")
    for key in base_scores:
        print(f"  {key:<8} toolkit {base_scores[key]:8.3f}   ours {ours['metrics'][key]:8.3f}")
    print("  toolkit seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print(f"  toolkit pipeline {base_s:.1f} s, score_captions {ours_s:.1f} s")
    stages = " ".join(f"{k}_s={v:.2f}" for k, v in times.items())
    print(f"RESULT images={args.images} baseline_s={base_s:.2f} ours_s={ours_s:.2f} ratio={base_s / ours_s:.2f} "
          f"{stages} max_abs_diff={diff:.2e}")


if __name__ == "__main__":
    main()
