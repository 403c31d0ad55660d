"""Flags that several scripts share, defined once: precision and the thread budget (captioning/runtime.py), and
the argparse types that check every number a script takes.

Earlier spellings stay accepted and are listed in --help beside the new name (`--precision, --amp`). A number out
of range is refused by argparse, naming the flag: `error: argument --temperature: expected a finite number in
[0.01, 100], got 'nan'`.
"""
import argparse
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from captioning import choices
from captioning.choices import PRECISIONS, QUANTIZATIONS, normalize_precision


def integer(low: int = 1, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def number(low: float = 0.0, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between low and high (open ends where asked); never nan or inf."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = math.isfinite(value) and (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not inside:
            span = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open or high == math.inf
                                                                        else "]")
            raise argparse.ArgumentTypeError(f"expected a finite number in {span}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def json_object(text: str) -> dict:
    """A JSON object flag (`--encoder_kwargs`), parsed by the rule the library uses."""
    try:
        return choices.json_object(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def device_name(text: str) -> str:
    """An argparse type: a torch device this machine has (`cpu`, `cuda`, `cuda:1`, `mps`), or `auto`."""
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}, but Apple's mps is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected cpu, cuda, cuda:N or mps")
    return text


def pretrained_source(text: str) -> str:
    """An argparse type: a hub name (`distilgpt2`, `org/name`) or a local directory; a path that is not a
    directory is refused here rather than sent to the hub as a malformed name."""
    path = Path(text).expanduser()
    looks_local = text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or path.exists()
    if looks_local and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: " + ("is a file, not a directory" if path.exists() else
                                         "no such directory") + "; give a directory written by save_pretrained, "
                                         "or a hub name such as distilgpt2")
    if looks_local and not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: holds no config.json, so it is not a model directory written by "
                                         f"save_pretrained")
    return text


POSITIVE = integer(1)
COUNT = integer(0)  # a non-negative integer
SEED = integer(0, 2 ** 32 - 1)  # numpy's seeds
TEMPERATURE = number(0.01, 100)  # models.decoding's MIN_TEMPERATURE, MAX_TEMPERATURE


def precision_value(text: str) -> str:
    try:
        return normalize_precision(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_precision_argument(parser, *, aliases: Sequence[str] = (), what: str) -> None:
    """`--precision auto|fp32|bf16|fp16`, also spelled as each of `aliases`; `what` says what it applies to. Old
    values such as `none` (of --amp) mean fp32. The default is the script's config's (`auto`)."""
    parser.add_argument(
        "--precision", *aliases, dest="precision", type=precision_value, choices=PRECISIONS,
        metavar="{" + ",".join(PRECISIONS) + "}",
        help=f"{what}. auto: bf16 on a GPU that supports it (else fp16), fp32 on a CPU without native bf16 "
             f"matrix units (AMX or AVX512-BF16; bf16 runs in software there, far slower), bf16 on one with them; "
             f"the choice and its reason are printed" + (f". {', '.join(aliases)}: the earlier spelling"
                                                         f"{'s' if len(aliases) > 1 else ''}, 'none' meaning fp32"
                                                         if aliases else ""))


def add_quantize_argument(parser, *, what: str) -> None:
    """`--quantize none|int8`; `what` says what it applies to. The default is the script's config's (`none`)."""
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS,
        help=f"{what}: int8 weights for the decoder's and the mapper's linear layers, on a CPU (fp32 around them; "
             f"faster where reading the weights bounds captioning, as for one image at a time). Without --device "
             f"it runs on the CPU; on a GPU it is an error (default %(default)s)")


def add_thread_arguments(parser, *, workers: bool = True, workers_help: str = "") -> None:
    """`--threads` (torch's intra-op threads) and, where the script has loader workers, `--num_workers`."""
    parser.add_argument("--threads", type=POSITIVE,
                        help="torch intra-op threads (default: the usable cores, less the loader workers beside "
                             "them; OMP_NUM_THREADS also sets it). On a machine busy with other work, fewer "
                             "threads than cores avoid OpenMP threads waiting on a contended core")
    if workers:
        parser.add_argument("--num_workers", type=COUNT, help=workers_help or (
            "loader processes decoding images beside the model (default: on a CPU none below 8 usable cores, "
            "the model gets them; on a GPU every core but one, at most 8)"))


def run_command(main: Callable[[], object], user_errors: Callable[[], tuple], interrupted: Optional[str] = None):
    """A script's `main()` as a command; returns what `sys.exit` takes. A user's mistake (an exception of one of
    `user_errors()`, called only then, since its classes live beside torch) is one line `error: ...` on stderr and
    exit status 1, not a traceback; Ctrl-C is one line too where `interrupted` says what is kept."""
    try:
        result = main()
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        return f"interrupted: {interrupted}"
    except Exception as error:
        if isinstance(error, user_errors()):
            return f"error: {error}"
        raise
    return result if isinstance(result, int) else 0
