"""captioning/runtime.py: the precision rule on every kind of device, and the thread budget."""
import io

import pytest
import torch

from captioning import runtime
from captioning.cli import add_precision_argument


def cpu(monkeypatch, *, machine="x86_64", capability="AVX512", onednn=True, amx=False, avx512_bf16=False):
    """Pretend to be a CPU with these capabilities: the checks are patched, not the rule's result."""
    monkeypatch.setattr(runtime, "_machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


def test_an_avx2_cpu_resolves_auto_to_fp32_and_warns_on_explicit_bf16(monkeypatch):
    cpu(monkeypatch, capability="AVX2", onednn=False)
    for training in (True, False):
        auto = runtime.resolve_precision("auto", "cpu", training=training)
        assert (auto.name, auto.dtype, auto.warning) == ("fp32", torch.float32, None)
        assert auto.reason == "auto: this CPU (AVX2) has no bf16 matrix units (AMX or AVX512-BF16), where bf16 " \
                              "runs in software"
    explicit = runtime.resolve_precision("bf16", "cpu", training=True)
    assert (explicit.name, explicit.dtype) == ("bf16", torch.bfloat16)
    assert explicit.warning.startswith("bf16 on this CPU runs in software: this CPU (AVX2) has no bf16 matrix units")
    assert "matrix products are far slower than fp32; --precision auto picks fp32 here" in explicit.warning
    out = io.StringIO()
    runtime.announce(explicit, file=out)
    assert out.getvalue().splitlines() == ["precision bf16 (as asked)", f"warning: {explicit.warning}"]


@pytest.mark.parametrize("units", [dict(amx=True), dict(avx512_bf16=True)])
def test_a_cpu_with_bf16_units_resolves_auto_to_bf16(monkeypatch, units):
    cpu(monkeypatch, **units)
    auto = runtime.resolve_precision("auto", torch.device("cpu"), training=True)
    name = "AMX" if units.get("amx") else "AVX512-BF16"
    assert (auto.name, auto.reason) == ("bf16", f"auto: this CPU has native bf16 matrix units ({name})")
    assert runtime.resolve_precision("bf16", "cpu", training=False).warning is None
    assert runtime.resolve_precision("fp32", "cpu", training=False).name == "fp32"


@pytest.mark.parametrize("cpu_kind, reason", [
    (dict(avx512_bf16=False), "this CPU (AVX512) has no bf16 matrix units"),  # oneDNN would only emulate bf16
    (dict(amx=True, capability="AVX2"), "switched off here"),  # ATEN_CPU_CAPABILITY=avx2
    (dict(amx=True, onednn=False), "switched off here"),  # ONEDNN_MAX_CPU_ISA=AVX2
])
def test_bf16_units_that_torch_cannot_use_count_as_absent(monkeypatch, cpu_kind, reason):
    cpu(monkeypatch, **cpu_kind)
    auto = runtime.resolve_precision("auto", "cpu", training=True)
    assert auto.name == "fp32" and reason in auto.reason


def test_arm_cpus_follow_onednn(monkeypatch):
    cpu(monkeypatch, machine="aarch64", capability="SVE256", onednn=True)
    assert runtime.resolve_precision("auto", "cpu", training=True).name == "bf16"
    cpu(monkeypatch, machine="aarch64", capability="DEFAULT", onednn=False)
    assert runtime.resolve_precision("auto", "cpu", training=True).name == "fp32"


def test_fp16_training_needs_cuda_and_fp16_inference_on_a_cpu_warns(monkeypatch):
    cpu(monkeypatch, capability="AVX2", onednn=False)
    with pytest.raises(ValueError, match=r"fp16 training needs a CUDA GPU \(loss scaling\)"):
        runtime.resolve_precision("fp16", "cpu", training=True)
    inference = runtime.resolve_precision("fp16", "cpu", training=False)
    assert inference.name == "fp16" and "slower than fp32" in inference.warning


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_cuda_picks_bf16_where_supported_else_fp16_with_loss_scaling(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    auto = runtime.resolve_precision("auto", "cuda:0", training=True)
    assert auto.name == expected and auto.needs_loss_scaling == (expected == "fp16")
    explicit = runtime.resolve_precision("bf16", "cuda", training=True)
    assert (explicit.warning is None) == bf16


def test_mps_trains_in_fp32_and_captions_in_fp16():
    assert runtime.resolve_precision("auto", "mps", training=True).name == "fp32"
    assert runtime.resolve_precision("auto", "mps", training=False).name == "fp16"
    assert runtime.resolve_precision("bf16", "mps", training=True).name == "bf16"


def test_precision_names_and_their_earlier_spellings():
    assert [runtime.normalize_precision(v) for v in ("none", "float32", "FP32", "bfloat16", "float16", "auto")] == \
        ["fp32", "fp32", "fp32", "bf16", "fp16", "auto"]
    with pytest.raises(ValueError, match=r"unknown precision 'int8': expected one of auto, fp32, bf16, fp16"):
        runtime.normalize_precision("int8")
    import argparse
    parser = argparse.ArgumentParser()
    add_precision_argument(parser, aliases=["--amp"], what="training")
    assert parser.parse_args([]).precision is None  # the script's config gives the default
    assert parser.parse_args(["--amp", "none"]).precision == "fp32"
    assert parser.parse_args(["--precision", "bf16"]).precision == "bf16"
    assert "--precision {auto,fp32,bf16,fp16}, --amp {auto,fp32,bf16,fp16}" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--amp", "int8"])


def test_autocast_follows_the_precision():
    fp32, bf16 = (runtime.Precision(n, n, "as asked") for n in ("fp32", "bf16"))
    with fp32.autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with bf16.autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.backends.cuda.flash_sdp_enabled()  # the math-kernel switch is training's, on request
    assert bf16.record() == {"precision": "bf16", "precision_requested": "bf16", "precision_reason": "as asked"}


# ---- threads -----------------------------------------------------------------------------------------------

@pytest.fixture
def no_thread_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("cores, processes, device, threads, workers", [
    (1, 1, "cpu", 1, 0),
    (2, 1, "cpu", 2, 0),  # the model needs both cores; images decode in its pauses
    (16, 1, "cpu", 14, 2),
    (16, 2, "cpu", 7, 1),  # two torchrun processes share the 16 cores
    (1, 1, "cuda", 1, 0),
    (2, 1, "cuda", 1, 1),
    (16, 1, "cuda", 8, 8),
    (16, 2, "cuda", 1, 7),
])
def test_threads_and_workers_never_oversubscribe_the_cores(no_thread_env, cores, processes, device, threads,
                                                           workers):
    budget = runtime.plan_threads(device, loads_images=True, cores=cores, processes=processes)
    assert (budget.torch_threads, budget.workers, budget.cores) == (threads, workers, cores // processes)
    assert budget.torch_threads + budget.workers <= max(1, cores // processes)
    features = runtime.plan_threads(device, loads_images=False, cores=cores, processes=processes)
    assert (features.torch_threads, features.workers) == (max(1, cores // processes), 0)


def test_explicit_counts_and_omp_num_threads_override_the_rule(no_thread_env, monkeypatch):
    budget = runtime.plan_threads("cpu", loads_images=True, workers=3, cores=16)
    assert (budget.torch_threads, budget.workers) == (13, 3)
    budget = runtime.plan_threads("cuda", loads_images=True, threads=4, cores=16)
    assert (budget.torch_threads, budget.workers) == (4, 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    budget = runtime.plan_threads("cpu", loads_images=True, cores=2)
    assert (budget.torch_threads, budget.workers) == (3, 0) and "OMP_NUM_THREADS" in budget.reason
    assert runtime.plan_threads("cpu", loads_images=False, threads=1, cores=2).torch_threads == 1


def test_torchruns_default_of_one_thread_is_not_taken_for_a_users_choice(no_thread_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert runtime.local_processes() == 2
    budget = runtime.plan_threads("cpu", loads_images=False, cores=16)
    assert (budget.torch_threads, budget.reason) == (8, "16 usable core(s) / 2 local processes")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # set by hand outside torchrun: the user's choice
    assert runtime.plan_threads("cpu", loads_images=False, cores=16).torch_threads == 1


def test_usable_cores_follow_the_affinity_mask_and_the_container_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 5, 7})
    monkeypatch.setattr(runtime, "CGROUP_V2_CPU_MAX", tmp_path / "cpu.max")
    monkeypatch.setattr(runtime, "CGROUP_V1_QUOTA", tmp_path / "missing")
    assert runtime.usable_cores() == 3
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: two threads may run
    assert (runtime.cpu_quota(), runtime.usable_cores()) == (1.5, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert runtime.usable_cores() == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert (runtime.cpu_quota(), runtime.usable_cores()) == (None, 3)
    quota, period = tmp_path / "quota", tmp_path / "period"
    monkeypatch.setattr(runtime, "CGROUP_V2_CPU_MAX", tmp_path / "none")
    monkeypatch.setattr(runtime, "CGROUP_V1_QUOTA", quota)
    monkeypatch.setattr(runtime, "CGROUP_V1_PERIOD", period)
    quota.write_text("200000")
    period.write_text("100000")
    assert runtime.usable_cores() == 2
    quota.write_text("-1")
    assert runtime.usable_cores() == 3


def test_the_budget_sets_torchs_threads_and_restores_them():
    before = torch.get_num_threads()
    with runtime.thread_budget(runtime.ThreadBudget(cores=1, torch_threads=1, workers=0, reason="test")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
