"""How a run executes on its device: the precision it computes in, and how many threads it may use.

Every script asks here, so that a default is right on whatever machine runs it without the user knowing the
machine: a GPU, a CPU with native bf16 matrix units (AMX, AVX512-BF16), a CPU without them (AVX2 laptops,
where bf16 runs in software), Apple's mps.

Precision (`--precision auto|fp32|bf16|fp16`): `auto` is bf16 on a CUDA GPU that supports it and fp16 with loss
scaling on one that does not; on mps fp32 for training and fp16 for inference; on a CPU bf16 only where the CPU
multiplies bf16 matrices natively, else fp32. An explicit choice is kept, with a one-line warning where it will be
slow. Training uses it as autocast; inference casts the weights.

Quantization (`--quantize none|int8`, inference only): int8 weights for the decoder's and the mapper's linear
layers (models/quantize.py), on a CPU only, computing in fp32 around them; without a device named it runs on the
CPU, and a GPU is an error, raised before anything touches CUDA.

Threads: torch's intra-op threads and the loader workers that run beside them share the cores this process may
use (CPU affinity and a container's CPU quota, divided among torchrun's processes on this machine), so that
together they never oversubscribe them.
"""
import contextlib
import datetime
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from captioning.choices import PRECISION_ALIASES, PRECISIONS, normalize_precision  # noqa: F401 (re-exported)
from captioning.choices import QUANTIZATIONS

T = TypeVar("T")

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# What a software bf16 matrix product costs on a CPU without bf16 units, in words (the figures are in
# docs/benchmarks.md): quoted in the warning, so that a user knows what an explicit bf16 there means.
SOFTWARE_BF16_SLOWDOWN = "far slower than fp32"


# ---- precision ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """The precision a run computes in, and why it was chosen."""
    name: str  # fp32 | bf16 | fp16
    requested: str  # as asked, after aliases: auto | fp32 | bf16 | fp16
    reason: str
    warning: Optional[str] = None  # an explicit choice that will be slow or unsupported here

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.name]

    @property
    def needs_loss_scaling(self) -> bool:
        return self.name == "fp16"

    def autocast(self, device: torch.device, math_attention_on_cpu: bool = False):
        """Autocast in this precision (nothing for fp32). `math_attention_on_cpu`: under bf16 on a CPU, use
        PyTorch's math attention kernel, which training measured faster there than the CPU flash kernel."""
        stack = contextlib.ExitStack()
        if self.name != "fp32":
            stack.enter_context(torch.autocast(device_type=device.type, dtype=self.dtype))
            if math_attention_on_cpu and device.type == "cpu" and self.name == "bf16":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack

    def describe(self) -> str:
        return f"precision {self.name} ({self.reason})"

    def record(self) -> Dict[str, str]:
        """What train_args.json and the features metadata keep."""
        return {"precision": self.name, "precision_requested": self.requested, "precision_reason": self.reason}


FP32 = Precision("fp32", "fp32", "as asked")  # what code given no precision computes in


def cpu_bf16_support() -> Tuple[bool, str]:
    """(whether this CPU multiplies bf16 matrices natively, a description of the CPU for messages).

    Native means bf16 instructions (AMX tiles or AVX512-BF16) that oneDNN, torch's bf16 matrix library, is
    allowed to use: `_is_mkldnn_bf16_supported` honours ONEDNN_MAX_CPU_ISA, and it alone would also accept a
    plain AVX-512 CPU, where oneDNN only emulates bf16. On ARM, oneDNN's own check (the BF16 extension) decides.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if _machine() in ("x86_64", "amd64"):
        amx, avx512_bf16 = (bool(getattr(torch.cpu, name, lambda: False)())
                            for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        units = "AMX" if amx else "AVX512-BF16" if avx512_bf16 else None
        if units is None:
            return False, f"this CPU ({capability}) has no bf16 matrix units (AMX or AVX512-BF16)"
        if not onednn or capability in ("DEFAULT", "AVX2"):
            return False, f"this CPU's {units} units are switched off here (ONEDNN_MAX_CPU_ISA or " \
                          f"ATEN_CPU_CAPABILITY; capability {capability})"
        return True, f"this CPU has native bf16 matrix units ({units})"
    if onednn:
        return True, f"this CPU ({_machine()}) has native bf16 instructions"
    return False, f"this CPU ({_machine()}, {capability}) has no native bf16 instructions"


def _machine() -> str:
    return os.uname().machine.lower() if hasattr(os, "uname") else "unknown"


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), with the architecture; the architecture alone elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return _machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]} ({_machine()})" if names else _machine()


def describe_cpu() -> str:
    """One line for benchmark headers and the web page: the CPU, what torch may use of it, its cores."""
    model = _cpu_model()
    native, why = cpu_bf16_support()
    return (f"cpu: {model}, torch capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
            f"{'yes' if native else 'no'} ({why}), {usable_cores()} usable core(s), torch {torch.__version__}")


def resolve_precision(requested: str, device, training: bool, quantize: str = "none") -> Precision:
    """The precision a run on `device` computes in. `training`: autocast with gradients (fp16 then needs loss
    scaling, which only CUDA has here); otherwise inference, where the weights are cast. `quantize` (inference):
    int8 weights, which `_int8_precision` checks before anything asks CUDA."""
    requested = normalize_precision(requested)
    if quantize != "none":
        return _int8_precision(requested, device, quantize)
    kind = torch.device(device).type
    if kind == "cuda":
        return _cuda_precision(requested)
    if kind == "mps":
        return _mps_precision(requested, training)
    if kind != "cpu":
        return Precision("fp32" if requested == "auto" else requested, requested, f"{kind}: as asked"
                         if requested != "auto" else f"auto: no precision rule for {kind}, so fp32")
    native, cpu = cpu_bf16_support()
    if requested == "auto":
        return Precision("bf16", "auto", f"auto: {cpu}") if native else \
            Precision("fp32", "auto", f"auto: {cpu}, where bf16 runs in software")
    if requested == "fp16":
        if training:
            raise ValueError("fp16 training needs a CUDA GPU (loss scaling); on a CPU use --precision auto, "
                             "fp32 or bf16")
        return Precision("fp16", "fp16", "as asked", warning="fp16 on a CPU runs mostly in software and is "
                         "usually slower than fp32; --precision auto picks the fast one")
    if requested == "bf16" and not native:
        return Precision("bf16", "bf16", "as asked", warning=f"bf16 on this CPU runs in software: {cpu}, so "
                         f"matrix products are {SOFTWARE_BF16_SLOWDOWN}; --precision auto picks fp32 here")
    return Precision(requested, requested, "as asked")


def _int8_precision(requested: str, device, quantize: str) -> Precision:
    """int8 weights, fp32 around them: quantized layers take and give fp32 (torch's CPU kernels only)."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZATIONS)}")
    kind = torch.device(device).type
    if kind != "cpu":
        raise ValueError(f"--quantize {quantize} runs on a CPU only (torch's int8 kernels are CPU kernels), not on "
                         f"{device}; leave --device out or give cpu, or on a GPU use --precision auto (bf16 or fp16)")
    if requested not in ("auto", "fp32"):
        raise ValueError(f"--quantize {quantize} computes in fp32 around its int8 weights, so --precision "
                         f"{requested} does not apply; give --precision auto or fp32")
    fast, cpu = cpu_int8_support()
    return Precision("fp32", requested, f"int8 weights for the decoder and the mapper, fp32 around them; {cpu}",
                     warning=None if fast else f"{cpu}: --quantize {quantize} works but may be slower than fp32 "
                                               f"here")


def cpu_int8_support() -> Tuple[bool, str]:
    """(whether torch's int8 kernels have fast instructions on this CPU, a description that says what to expect).
    On x86, fbgemm uses AVX512-VNNI dot products where present (FBGEMM_ENABLE_INSTRUCTIONS=AVX2 switches them off)
    and AVX2 multiply-adds otherwise; without AVX2 it falls back to reference code."""
    if _machine() not in ("x86_64", "amd64"):
        return True, f"this CPU ({_machine()}) runs int8 products in qnnpack's kernels"
    vnni = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
    if vnni and os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() != "AVX2":
        return True, "this CPU has int8 dot-product instructions (AVX512-VNNI)"
    if bool(getattr(torch.cpu, "_is_avx2_supported", lambda: True)()):
        return True, "this CPU multiplies int8 with AVX2 instructions, without AVX512-VNNI: docs/benchmarks.md " \
                     "measures the speed-up on such a CPU (its AVX2 rows)"
    return False, "this CPU has no AVX2, so int8 products run in reference code"


def _cuda_precision(requested: str) -> Precision:
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        return Precision("bf16", "auto", "auto: this GPU computes in bf16") if bf16 else \
            Precision("fp16", "auto", "auto: this GPU has no bf16, so fp16 (training scales the loss)")
    if requested == "bf16" and not bf16:
        return Precision("bf16", "bf16", "as asked", warning="this GPU has no native bf16: it is emulated and "
                         "slow; --precision auto picks fp16 here")
    return Precision(requested, requested, "as asked")


def _mps_precision(requested: str, training: bool) -> Precision:
    if requested == "auto":
        if training:
            return Precision("fp32", "auto", "auto: training on mps stays in fp32 (no loss scaling for fp16, "
                             "bf16 autocast only on recent macOS)")
        return Precision("fp16", "auto", "auto: Apple GPUs compute in fp16 natively")
    return Precision(requested, requested, "as asked")


def announce(precision: Precision, *, file=None, prefix: str = "") -> None:
    """The precision line, and the warning if any, on stderr (stdout stays for a script's results)."""
    file = file or sys.stderr
    print(f"{prefix}{precision.describe()}", file=file, flush=True)
    if precision.warning:
        print(f"{prefix}warning: {precision.warning}", file=file, flush=True)


# ---- threads -----------------------------------------------------------------------------------------------

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
MAX_WORKERS = 8  # beyond this, more decoding processes only cost memory


def cpu_quota() -> Optional[float]:
    """CPUs a container's quota allows (cgroup v2 cpu.max or v1 cfs quota), None without a quota."""
    try:
        if CGROUP_V2_CPU_MAX.is_file():
            quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if CGROUP_V1_QUOTA.is_file() and CGROUP_V1_PERIOD.is_file():
            quota, period = int(CGROUP_V1_QUOTA.read_text()), int(CGROUP_V1_PERIOD.read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a container's CPU quota (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def local_processes() -> int:
    """torchrun's processes on this machine (LOCAL_WORLD_SIZE), 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _env_threads() -> Optional[int]:
    """OMP_NUM_THREADS when the user set it. torchrun sets it to 1 for every process unless it was set, and
    that default is not a choice of the user's: the cores are then divided among the processes instead."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value.isdigit() or int(value) < 1:
        return None
    if value == "1" and local_processes() > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    return int(value)


@dataclass(frozen=True)
class ThreadBudget:
    """How this process shares its cores: `torch_threads` intra-op threads, `workers` loader processes (or
    prefetching threads) running beside them, and `cores` in all, for work done while torch waits."""
    cores: int
    torch_threads: int
    workers: int
    reason: str

    def describe(self) -> str:
        return f"threads: {self.torch_threads} torch + {self.workers} loader worker(s) on {self.cores} core(s) " \
               f"({self.reason})"


def plan_threads(device, *, loads_images: bool, workers: Optional[int] = None, threads: Optional[int] = None,
                 cores: Optional[int] = None, processes: Optional[int] = None) -> ThreadBudget:
    """The thread budget of one process. `loads_images`: the work decodes images beside the model (features
    in memory need no workers). Explicit `workers` / `threads` (and OMP_NUM_THREADS for threads) win.

    On a CPU the model is the work and decoding a small part of it (an encoder's forward pass costs an order of
    magnitude more than decoding its image), so torch gets every core and images are decoded in its pauses; a
    worker appears only from 8 cores on, one per 8. On a GPU the CPU's only heavy work is decoding: workers take
    every core but one.
    """
    total = cores if cores is not None else usable_cores()
    processes = processes if processes is not None else local_processes()
    share = max(1, total // processes)
    split = f"{total} usable core(s)" + (f" / {processes} local processes" if processes > 1 else "")
    if threads is None:
        threads = _env_threads()
        source = "OMP_NUM_THREADS" if threads is not None else None
    else:
        source = "--threads"
    gpu = torch.device(device).type != "cpu"
    if workers is None:
        if not loads_images:
            workers = 0
        elif gpu:
            workers = min(MAX_WORKERS, share - 1)
        else:
            workers = min(MAX_WORKERS, share // 8)
        if threads is not None:  # a fixed thread count: workers only on the cores it leaves
            workers = min(workers, max(0, share - threads))
    if threads is None:
        threads = max(1, share - workers)
    reason = split + (f", threads from {source}" if source else "")
    return ThreadBudget(cores=share, torch_threads=threads, workers=workers, reason=reason)


@contextlib.contextmanager
def thread_budget(budget: ThreadBudget):
    """torch's intra-op threads set to the budget for the duration (restored afterwards: scripts run inside
    other programs too, tests among them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(budget.torch_threads)
    try:
        yield budget
    finally:
        torch.set_num_threads(before)


# ---- processes ---------------------------------------------------------------------------------------------

def default_device(quantize: str = "none") -> str:
    """The device every script uses when none is given: cuda when available, else cpu; cpu for int8 weights
    (`quantize`), which run on a CPU only."""
    if quantize != "none":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Distributed:
    """One process (rank 0 of 1) or one of torchrun's processes; `is_main` gates every print and write."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: Optional[str] = None, timeout: Optional[datetime.timedelta] = None) -> "Distributed":
        """Join torchrun's process group when it set RANK (nccl on GPUs, gloo on CPUs), each process on the GPU
        of its local rank; else one process on `device` (None or "auto": cuda when available, else cpu).
        `timeout` bounds a wait at a barrier (torch's default where None)."""
        chosen = torch.device(default_device() if device in (None, "auto") else device)
        if "RANK" not in os.environ:
            if chosen.type == "cuda" and chosen.index is not None:
                torch.cuda.set_device(chosen)
            return cls(device=chosen)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        target = torch.device("cuda", local_rank) if chosen.type == "cuda" else torch.device(chosen.type)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo",
                                    device_id=target if target.type == "cuda" else None,
                                    **({"timeout": timeout} if timeout is not None else {}))
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=target)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def main_first(self, make: Callable[[], T]) -> T:
        """`make()` on rank 0, then on the other ranks: what rank 0 writes (a cache) the others then read."""
        result = make() if self.is_main else None
        self.barrier()
        if not self.is_main:
            result = make()
        self.barrier()
        return result

    def all_gather_object(self, obj) -> List:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)
