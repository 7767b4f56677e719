"""Unit tests of per-worker device, thread and model-cache logic, with fake GPUs and environments."""
from __future__ import annotations

import os
import subprocess
import sys
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_patchscope import workers
from pytest_patchscope.errors import PatchscopeWarning, ProbeConfigError
from pytest_patchscope.model.devices import parse_device, resolve_device
from pytest_patchscope.workers import (
    ModelCache,
    WorkerSetup,
    assign_visible_devices,
    configure_worker,
    count_physical_gpus,
    cpu_threads_per_worker,
    worker_index,
)


class FakeConfig:
    """The two things configure_worker reads from a pytest Config: options and xdist's workerinput."""

    def __init__(self, workerinput: dict[str, Any] | None = None, **options: Any) -> None:
        if workerinput is not None:
            self.workerinput = workerinput
        self._options = options

    def getoption(self, name: str, default: Any = None) -> Any:
        return self._options.get(name, default)


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record torch.set_num_threads calls instead of changing this test process's thread pool."""
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    return calls


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No caller CUDA_VISIBLE_DEVICES or OMP_NUM_THREADS leaking in from the machine running the tests."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return monkeypatch


# ---- parse_device ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "canonical"),
    [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"), (" CUDA:01 ", "cuda:1"), ("Cpu", "cpu")],
)
def test_parse_device_accepts_and_normalises(spec: str, canonical: str) -> None:
    assert parse_device(spec) == canonical


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda0", "mps", "", "cpu:0", "tpu"])
def test_parse_device_rejects_with_field_value_and_allowed(spec: str) -> None:
    with pytest.raises(ProbeConfigError) as info:
        parse_device(spec)
    message = str(info.value)
    assert info.value.field == "--patchscope-device"
    assert info.value.value == spec
    assert "--patchscope-device" in message and repr(spec) in message
    for allowed in ("'auto'", "'cpu'", "'cuda'", "'cuda:N'"):
        assert allowed in message


def test_parse_device_names_the_ini_field_when_asked() -> None:
    with pytest.raises(ProbeConfigError, match="^patchscope_device='gpu'"):
        parse_device("gpu", field="patchscope_device")


def test_parse_device_rejects_non_string() -> None:
    with pytest.raises(ProbeConfigError) as info:
        parse_device(0)  # type: ignore[arg-type]
    assert info.value.value == 0


# ---- worker_index ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("worker_id", "index"), [("gw0", 0), ("gw3", 3), ("gw12", 12), (None, None), ("master", None), ("gw", None)]
)
def test_worker_index(worker_id: str | None, index: int | None) -> None:
    assert worker_index(worker_id) == index


# ---- assign_visible_devices ------------------------------------------------------------------
def test_four_workers_on_two_gpus_alternate() -> None:
    assert [assign_visible_devices(k, None, 2) for k in range(4)] == ["0", "1", "0", "1"]


def test_caller_list_is_shared_out_round_robin() -> None:
    assert [assign_visible_devices(k, "3,4", 8) for k in range(3)] == ["3", "4", "3"]
    assert [assign_visible_devices(k, "2, 5,7", 0) for k in (0, 1, 3)] == ["2", "5", "2"]


def test_caller_uuids_are_shared_out_as_opaque_tokens() -> None:
    assert assign_visible_devices(1, "GPU-aaa,GPU-bbb", 0) == "GPU-bbb"


def test_explicit_single_device_per_worker_is_kept() -> None:
    """--tx popen//env:CUDA_VISIBLE_DEVICES=1 gives each worker one device: never remap it."""
    assert [assign_visible_devices(k, "1", 4) for k in range(3)] == ["1", "1", "1"]


def test_empty_caller_value_means_no_gpus_and_is_kept() -> None:
    assert assign_visible_devices(2, "", 4) == ""


def test_not_a_worker_leaves_environment_alone() -> None:
    assert assign_visible_devices(None, None, 4) is None
    assert assign_visible_devices(None, "0,1", 4) is None


def test_no_gpus_leaves_environment_alone() -> None:
    assert assign_visible_devices(3, None, 0) is None


# ---- resolve_device --------------------------------------------------------------------------
def test_resolve_auto_prefers_cuda_and_falls_back_to_cpu() -> None:
    assert resolve_device("auto", True, 2) == "cuda"
    assert resolve_device("auto", False, 0) == "cpu"
    assert resolve_device("auto", True, 0) == "cpu"


def test_resolve_explicit_devices_in_range() -> None:
    assert resolve_device("cpu", True, 2) == "cpu"
    assert resolve_device("cuda", True, 1) == "cuda"
    assert resolve_device("cuda:1", True, 2) == "cuda:1"


def test_resolve_cuda_without_cuda_tells_user_to_use_cpu_or_auto() -> None:
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ProbeConfigError) as info:
            resolve_device(spec, False, 0)
        assert info.value.field == "--patchscope-device"
        assert "--patchscope-device cpu" in str(info.value)
        assert "--patchscope-device auto" in str(info.value)


def test_resolve_cuda_index_out_of_range_lists_valid_indices() -> None:
    with pytest.raises(ProbeConfigError) as info:
        resolve_device("cuda:2", True, 2)
    assert info.value.value == "cuda:2"
    assert "cuda:0 .. cuda:1" in str(info.value)
    assert "CUDA_VISIBLE_DEVICES" in str(info.value)


def test_resolve_validates_the_spec_first() -> None:
    with pytest.raises(ProbeConfigError, match="'cuda', 'cuda:N'"):
        resolve_device("gpu0", True, 1)


# ---- cpu_threads_per_worker ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_workers", "n_cpus", "threads"),
    [(2, 2, 1), (1, 8, 8), (4, 16, 4), (3, 8, 2), (8, 2, 1), (0, 4, 4), (2, 0, 1)],
)
def test_cpu_threads_never_oversubscribe_and_are_at_least_one(n_workers: int, n_cpus: int, threads: int) -> None:
    assert cpu_threads_per_worker(n_workers, n_cpus) == threads


# ---- count_physical_gpus ---------------------------------------------------------------------
def _fake_nvidia_smi(directory: Path, stdout: str, rc: int = 0) -> str:
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{stdout}\nEOF\nexit {rc}\n")
    script.chmod(0o755)
    return str(script)


def test_count_gpus_reads_driver_proc_listing(tmp_path: Path) -> None:
    proc = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (proc / bus).mkdir(parents=True)
    assert count_physical_gpus(proc, nvidia_smi=None) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in for nvidia-smi")
def test_count_gpus_falls_back_to_nvidia_smi_and_skips_mig_lines(tmp_path: Path) -> None:
    smi = _fake_nvidia_smi(
        tmp_path,
        "GPU 0: NVIDIA H100 (UUID: GPU-a)\n  MIG 1g.10gb Device 0: (UUID: MIG-b)\nGPU 1: NVIDIA H100 (UUID: GPU-c)",
    )
    assert count_physical_gpus(tmp_path / "absent", nvidia_smi=smi) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in for nvidia-smi")
def test_count_gpus_is_zero_when_nvidia_smi_fails(tmp_path: Path) -> None:
    smi = _fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed", rc=9)
    assert count_physical_gpus(tmp_path / "absent", nvidia_smi=smi) == 0


def test_count_gpus_is_zero_without_driver(tmp_path: Path) -> None:
    assert count_physical_gpus(tmp_path / "absent", nvidia_smi=str(tmp_path / "no-such-nvidia-smi")) == 0


# ---- configure_worker ------------------------------------------------------------------------
def test_configure_worker_pins_gpu_before_querying_torch(clean_env: pytest.MonkeyPatch, thread_calls: list[int]) -> None:
    seen_at_query: list[str | None] = []

    def fake_detect(spec: str) -> str:
        seen_at_query.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        return "cuda"

    clean_env.setattr(workers, "count_physical_gpus", lambda: 2)
    clean_env.setattr(workers, "detect_device", fake_detect)
    setup = configure_worker(FakeConfig({"workerid": "gw3", "workercount": 4}, patchscope_device="auto"))

    assert seen_at_query == ["1"], "CUDA_VISIBLE_DEVICES must be set before torch looks at CUDA"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert setup == WorkerSetup("gw3", 4, "1", "cuda", None)
    assert thread_calls == [], "GPU workers keep torch's thread default"


def test_configure_worker_splits_caller_devices(clean_env: pytest.MonkeyPatch, thread_calls: list[int]) -> None:
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    clean_env.setattr(workers, "count_physical_gpus", lambda: pytest.fail("caller's list must be used, not a count"))
    clean_env.setattr(workers, "detect_device", lambda spec: "cuda")
    setup = configure_worker(FakeConfig({"workerid": "gw1", "workercount": 3}, patchscope_device="cuda"))
    assert setup.visible_devices == "4" == os.environ["CUDA_VISIBLE_DEVICES"]


def test_configure_worker_leaves_explicit_index_unpinned(clean_env: pytest.MonkeyPatch, thread_calls: list[int]) -> None:
    """cuda:1 names one device for every worker; pinning would renumber it out of range."""
    clean_env.setattr(workers, "count_physical_gpus", lambda: 2)
    clean_env.setattr(workers, "detect_device", lambda spec: spec)
    setup = configure_worker(FakeConfig({"workerid": "gw0", "workercount": 2}, patchscope_device="cuda:1"))
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert setup.device == "cuda:1" and setup.visible_devices is None


def test_configure_worker_on_cpu_splits_threads(clean_env: pytest.MonkeyPatch, thread_calls: list[int]) -> None:
    """Real torch here is a CPU build, so 'auto' resolves to cpu: 2 workers on 2 cores get 1 thread each."""
    if torch.cuda.is_available():
        pytest.skip("needs a process without CUDA")
    clean_env.setattr(workers, "count_physical_gpus", lambda: 0)
    clean_env.setattr(workers, "available_cpus", lambda: 2)
    setup = configure_worker(FakeConfig({"workerid": "gw1", "workercount": 2}, patchscope_device="auto"))
    assert thread_calls == [1]
    assert setup == WorkerSetup("gw1", 2, None, "cpu", 1)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_configure_worker_respects_user_omp_threads(clean_env: pytest.MonkeyPatch, thread_calls: list[int]) -> None:
    clean_env.setenv("OMP_NUM_THREADS", "3")
    setup = configure_worker(FakeConfig({"workerid": "gw0", "workercount": 2}, patchscope_device="cpu"))
    assert thread_calls == [] and setup.threads is None and setup.device == "cpu"


def test_configure_worker_keeps_empty_caller_value(clean_env: pytest.MonkeyPatch, thread_calls: list[int]) -> None:
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "")
    clean_env.setattr(workers, "available_cpus", lambda: 8)
    clean_env.setattr(workers, "detect_device", lambda spec: resolve_device(spec, False, 0))
    setup = configure_worker(FakeConfig({"workerid": "gw0", "workercount": 4}))
    assert setup == WorkerSetup("gw0", 4, "", "cpu", 2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_configure_plain_run_changes_nothing(clean_env: pytest.MonkeyPatch, thread_calls: list[int]) -> None:
    clean_env.setattr(workers, "count_physical_gpus", lambda: pytest.fail("a plain run must not count GPUs"))
    clean_env.setattr(workers, "detect_device", lambda spec: "cuda")
    setup = configure_worker(FakeConfig(patchscope_device=None))
    assert setup == WorkerSetup(None, 1, None, "cuda", None)
    assert thread_calls == [] and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert setup.summary() == "main: device cuda"


def test_configure_worker_rejects_bad_device_before_touching_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(workers, "count_physical_gpus", lambda: 2)
    with pytest.raises(ProbeConfigError, match="--patchscope-device='gpu'"):
        configure_worker(FakeConfig({"workerid": "gw0", "workercount": 2}, patchscope_device="gpu"))
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_configure_worker_warns_instead_of_pinning_after_cuda_init(clean_env: pytest.MonkeyPatch) -> None:
    """Once CUDA is initialised a new CUDA_VISIBLE_DEVICES is ignored: say so rather than pretend."""
    clean_env.setattr(workers, "_cuda_already_initialised", lambda: True)
    clean_env.setattr(workers, "count_physical_gpus", lambda: 2)
    clean_env.setattr(workers, "detect_device", lambda spec: "cuda")
    with pytest.warns(PatchscopeWarning, match="CUDA_VISIBLE_DEVICES=1 was not applied"):
        setup = configure_worker(FakeConfig({"workerid": "gw1", "workercount": 2}))
    assert setup.visible_devices is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_worker_setup_summary_lists_what_was_set() -> None:
    assert WorkerSetup("gw1", 2, "1", "cuda", None).summary() == "gw1: device cuda, CUDA_VISIBLE_DEVICES=1"
    assert WorkerSetup("gw0", 2, None, "cpu", 4).summary() == "gw0: device cpu, 4 torch thread(s)"


def test_module_imports_neither_torch_nor_pytest() -> None:
    """Workers must be able to import it before deciding on CUDA, and the pure parts need no pytest."""
    code = (
        "import sys, pytest_patchscope.errors as _; before = set(sys.modules); "
        "import pytest_patchscope.workers; print(sorted({'torch', 'pytest', '_pytest'} & (set(sys.modules) - before)))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


# ---- ModelCache ------------------------------------------------------------------------------
class Model:
    """Stand-in for a loaded model (weak-referenceable, to check that eviction really lets go)."""

    def __init__(self, name: str) -> None:
        self.name = name


def test_cache_loads_once_and_hits_afterwards() -> None:
    cache: ModelCache[Model] = ModelCache(2)
    loads: list[str] = []

    def loader(name: str):
        return lambda: (loads.append(name), Model(name))[1]

    first = cache.get_or_load("a", loader("a"))
    assert cache.get_or_load("a", loader("a")) is first
    assert loads == ["a"] and len(cache) == 1 and "a" in cache


def test_cache_evicts_least_recently_used_in_order() -> None:
    evicted: list[str] = []
    cache: ModelCache[Model] = ModelCache(2, on_evict=lambda m: evicted.append(m.name))
    cache.get_or_load("a", lambda: Model("a"))
    cache.get_or_load("b", lambda: Model("b"))
    cache.get_or_load("a", lambda: Model("a-reloaded"))  # touch a: b is now the oldest
    cache.get_or_load("c", lambda: Model("c"))
    assert evicted == ["b"]
    assert cache.keys() == ["a", "c"]
    cache.get_or_load("d", lambda: Model("d"))
    assert evicted == ["b", "a"] and cache.keys() == ["c", "d"]
    cache.clear()
    assert evicted == ["b", "a", "c", "d"] and len(cache) == 0


def test_cache_evicts_before_loading_the_next_model() -> None:
    """Peak memory must stay at max_models: the old model goes before the new one is built."""
    events: list[str] = []
    cache: ModelCache[Model] = ModelCache(1, on_evict=lambda m: events.append(f"evict {m.name}"))
    cache.get_or_load("a", lambda: Model("a"))
    cache.get_or_load("b", lambda: (events.append("load b"), Model("b"))[1])
    assert events == ["evict a", "load b"]


def test_cache_frees_cuda_memory_after_dropping_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    alive_at_empty_cache: list[bool] = []
    ref: list[weakref.ref[Model]] = []
    fake_cuda = types.SimpleNamespace(
        is_initialized=lambda: True, empty_cache=lambda: alive_at_empty_cache.append(ref[0]() is not None)
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    cache: ModelCache[Model] = ModelCache(1)
    ref.append(weakref.ref(cache.get_or_load("a", lambda: Model("a"))))
    cache.get_or_load("b", lambda: Model("b"))
    assert alive_at_empty_cache == [False], "empty_cache must run after the last reference is gone"


def test_cache_does_not_touch_cuda_when_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda = types.SimpleNamespace(is_initialized=lambda: False, empty_cache=lambda: pytest.fail("no CUDA in use"))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    evicted: list[str] = []
    cache: ModelCache[Model] = ModelCache(1, on_evict=lambda m: evicted.append(m.name))
    cache.get_or_load("a", lambda: Model("a"))
    cache.get_or_load("b", lambda: Model("b"))
    assert evicted == ["a"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_cache_rejects_bad_max_models(bad: object) -> None:
    with pytest.raises(ProbeConfigError) as info:
        ModelCache(bad)  # type: ignore[arg-type]
    assert info.value.field == "max_models" and info.value.value == bad
    assert "integer >= 1" in str(info.value)
