"""Flags that several scripts share, defined once: precision and the thread budget (captioning/runtime.py).

Earlier spellings stay accepted and are listed in --help beside the new name (`--precision, --amp`).
"""
import argparse
from typing import Sequence

from captioning.runtime import PRECISIONS, normalize_precision


def precision_value(text: str) -> str:
    try:
        return normalize_precision(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_precision_argument(parser, *, aliases: Sequence[str] = (), what: str) -> None:
    """`--precision auto|fp32|bf16|fp16` (default auto), also spelled as each of `aliases`; `what` says what
    it applies to. Old values such as `none` (of --amp) mean fp32."""
    parser.add_argument(
        "--precision", *aliases, dest="precision", type=precision_value, default="auto", choices=PRECISIONS,
        metavar="{" + ",".join(PRECISIONS) + "}",
        help=f"{what}. auto: bf16 on a GPU that supports it (else fp16), fp32 on a CPU without native bf16 "
             f"matrix units (AMX or AVX512-BF16; bf16 runs in software there, far slower), bf16 on one with them; "
             f"the choice and its reason are printed" + (f". {', '.join(aliases)}: the earlier spelling"
                                                         f"{'s' if len(aliases) > 1 else ''}, 'none' meaning fp32"
                                                         if aliases else ""))


def add_thread_arguments(parser, *, workers: bool = True, workers_help: str = "") -> None:
    """`--threads` (torch's intra-op threads) and, where the script has loader workers, `--num_workers`."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: the usable cores, less the loader workers beside "
                             "them; OMP_NUM_THREADS also sets it). On a machine busy with other work, fewer "
                             "threads than cores avoid OpenMP threads waiting on a contended core")
    if workers:
        parser.add_argument("--num_workers", type=int, default=None, help=workers_help or (
            "loader processes decoding images beside the model (default: on a CPU none below 8 usable cores, "
            "the model gets them; on a GPU every core but one, at most 8)"))
