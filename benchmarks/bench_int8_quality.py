"""What int8 weights cost in caption quality: the demo's trained export on its test split, fp32 against int8.

Captions the test split of the dataset `make demo` wrote (or `--data`) with the export it trained (or
`--export`) as the demo captions it (captioning/demo/scoring.py), once in fp32 and once with `--quantize int8`, on
the CPU; then scores both as the demo does (colour / shape / position accuracy against each scene, CIDEr against
the references) and counts the captions int8 leaves identical. The seconds are loading (int8: quantizing) and
captioning.

    make demo && python benchmarks/bench_int8_quality.py

The last line is `RESULT fp32_colour=.. int8_colour=.. fp32_shape=.. int8_shape=.. fp32_position=..
int8_position=.. fp32_cider=.. int8_cider=.. cider_change_pct=.. identical=.. fp32_s=.. int8_s=..`.
"""
import argparse
import time
from pathlib import Path

from captioning import runtime
from captioning.configs import DEMO_RUN, DemoConfig
from captioning.data.annotations import read_annotations
from captioning.demo.recipe import images_root
from captioning.demo.scoring import accuracy, caption_test_split, ground_truth
from captioning.metrics import score_captions


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", default=f"{DEMO_RUN}/run/demo_latest", help="export directory (default %(default)s)")
    p.add_argument("--data", default=f"{DEMO_RUN}/shapes", help="dataset folder with captions_test.json "
                                                                "(default %(default)s)")
    p.add_argument("--beam_size", type=int, default=DemoConfig.beam_size, help="(default: the demo's, %(default)s)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    data = Path(args.data)
    records = read_annotations(data / "captions_test.json", images_root=images_root(data))
    scenes = ground_truth(data, records)
    references = {r.image_id: r.captions for r in records}
    config = DemoConfig(device="cpu", precision="fp32", beam_size=args.beam_size)
    print(runtime.describe_cpu())
    captions, seconds, figures = {}, {}, {}
    for name in ("fp32", "int8"):
        start = time.perf_counter()
        results = caption_test_split(Path(args.export), records, config, quantize="int8" if name == "int8" else "none")
        seconds[name] = time.perf_counter() - start
        captions[name] = {r.image_id: result.caption for r, result in zip(records, results, strict=True)}
        cider = score_captions(captions[name], references, metrics=("CIDEr",))["metrics"]["CIDEr"]
        figures[name] = {**accuracy(captions[name], scenes), "cider": cider}
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures[name].items())
              + f"; {len(records)} images loaded and captioned in {seconds[name]:.1f} s")
    identical = sum(captions["fp32"][i] == captions["int8"][i] for i in references) / len(references)
    change = 100.0 * (figures["int8"]["cider"] - figures["fp32"]["cider"]) / figures["fp32"]["cider"]
    print(f"int8 captions identical to fp32's: {identical:.1%}; CIDEr change {change:+.2f}%")
    print("RESULT " + " ".join(f"{name}_{k}={figures[name][k]:.1f}" for k in ("colour", "shape", "position", "cider")
                               for name in ("fp32", "int8"))
          + f" cider_change_pct={change:.2f} identical={identical:.3f} fp32_s={seconds['fp32']:.1f} "
            f"int8_s={seconds['int8']:.1f}")


if __name__ == "__main__":
    main()
