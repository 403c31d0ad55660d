"""The demo's figures with the time of each stage: `python benchmarks/bench_demo.py [demo.py flags]`.

Runs demo.py's pipeline (generate, tokenizer, train, caption, evaluate) and ends with one line
`RESULT colour_acc=.. shape_acc=.. position_acc=.. cider=.. baseline_cider=.. seconds=.. <stage>_s=..`.
Pass `--data DIR` to measure the recipe on another dataset in the same COCO format.
"""
import sys

import demo


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out_dir" not in argv:
        argv += ["--out_dir", "./runs/bench_demo"]
    result = demo.main(argv)
    stages = "".join(f" {name}_s={seconds}" for name, seconds in result["stages"].items())
    print(demo.result_line(result, stages))


if __name__ == "__main__":
    main()
