"""The demo's figures with the time of each stage: `python benchmarks/bench_demo.py [demo.py flags]`.

Runs demo.py as `make demo` does (its own process, so the imports count too: the wall time a user waits) and
ends with one line `RESULT colour_acc=.. shape_acc=.. position_acc=.. cider=.. baseline_cider=.. seconds=..
<stage>_s=.. wall_s=..`. Pass `--data DIR` to measure the recipe on another dataset in the same COCO format.
"""
import ast
import subprocess
import sys
import time
from pathlib import Path

from captioning.runtime import describe_cpu

DEMO = Path(__file__).resolve().parent.parent / "demo.py"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out_dir" not in argv:
        argv += ["--out_dir", "./runs/bench_demo"]
    print(f"bench_demo: {describe_cpu()}", flush=True)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(DEMO), *argv], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    sys.stdout.write(run.stdout)
    if run.returncode:
        sys.exit(f"bench_demo: demo.py failed (exit status {run.returncode})")
    lines = run.stdout.splitlines()
    result = next(line for line in reversed(lines) if line.startswith("RESULT "))
    stages = next(line for line in lines if line.startswith("stages (s): "))
    seconds = ast.literal_eval(stages[len("stages (s): "):stages.index("}") + 1])
    print(result + "".join(f" {name}_s={s}" for name, s in seconds.items()) + f" wall_s={wall:.1f}")


if __name__ == "__main__":
    main()
