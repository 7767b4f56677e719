"""Per-worker resources under pytest-xdist: which GPU a worker sees, how many CPU threads it
uses, and how many models it keeps loaded.

The decisions are pure functions of plain values so they can be unit-tested without GPUs;
``configure_worker`` applies them to the process. Neither pytest nor torch is imported at
module level: torch is imported only when a device is actually queried.
"""
from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pytest_patchscope.errors import ProbeConfigError, warn_at_caller
from pytest_patchscope.model.devices import detect_device, parse_device
from pytest_patchscope.validation import as_int

if TYPE_CHECKING:
    import pytest

T = TypeVar("T")


DEVICE_DEST = "patchscope_device"
NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")

_WORKER_ID = re.compile(r"gw(\d+)")


def worker_index(worker_id: str | None) -> int | None:
    """Map an xdist worker id ("gw3") to its index (3); None for the controller or a plain run."""
    if worker_id is None:
        return None
    match = _WORKER_ID.fullmatch(worker_id)
    return int(match.group(1)) if match else None


def _split_visible(value: str) -> list[str]:
    """The device tokens (indices or UUIDs) listed in a CUDA_VISIBLE_DEVICES value."""
    return [token.strip() for token in value.split(",") if token.strip()]


def assign_visible_devices(worker_index: int | None, caller_visible: str | None, n_cuda: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES value for worker ``worker_index``, or None to leave it unset.

    Worker K gets device K mod N, so workers share GPUs evenly instead of all piling onto GPU 0.
    When the caller already set CUDA_VISIBLE_DEVICES, its devices are the ones shared out
    ("2,5,7": worker 0 -> "2", worker 1 -> "5", worker 3 -> "2"); a single device (e.g. from
    ``--tx popen//env:CUDA_VISIBLE_DEVICES=1``) and an empty value (no GPUs) are kept as given.
    ``n_cuda`` (physical GPUs) is used only when the caller set nothing.
    """
    if worker_index is None:
        return None
    if caller_visible is not None:
        devices = _split_visible(caller_visible)
        return devices[worker_index % len(devices)] if devices else caller_visible
    if n_cuda < 1:
        return None
    return str(worker_index % n_cuda)


def cpu_threads_per_worker(n_workers: int, n_cpus: int) -> int:
    """Torch intra-op threads per worker so that all workers together do not oversubscribe the CPUs."""
    return max(1, n_cpus // max(1, n_workers))


def available_cpus() -> int:
    """CPUs this process may run on (honours taskset/cpuset affinity, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def count_physical_gpus(proc_gpus: Path = NVIDIA_PROC_GPUS, nvidia_smi: str | None = "nvidia-smi") -> int:
    """Count NVIDIA GPUs without initialising CUDA in this process.

    ``torch.cuda.device_count()`` is avoided: where NVML discovery is unavailable it falls back to
    cudaGetDeviceCount, whose cuInit freezes CUDA_VISIBLE_DEVICES for the process, which would make
    the pinning that follows silently ineffective. The driver's /proc listing (one entry per GPU;
    container runtimes show only the GPUs passed in) is read first, then ``nvidia-smi -L`` (a
    separate process); with neither, there are no usable GPUs: 0. MIG instances are not counted.
    """
    if proc_gpus.is_dir():
        return sum(1 for _ in proc_gpus.iterdir())
    executable = shutil.which(nvidia_smi) if nvidia_smi else None
    if executable is None:
        return 0
    try:
        listing = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def _cuda_already_initialised() -> bool:
    """True when torch's CUDA state exists already, so CUDA_VISIBLE_DEVICES can no longer change."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


@dataclass(frozen=True)
class WorkerSetup:
    """What ``configure_worker`` did in this process; plain values, so it can go into workeroutput."""

    worker_id: str | None
    """xdist worker id ("gw0"), None on the controller or in a plain run."""
    worker_count: int
    visible_devices: str | None
    """CUDA_VISIBLE_DEVICES as this process sees it after configuration (None: unset)."""
    device: str
    """The resolved torch device: "cpu", "cuda" or "cuda:N"."""
    threads: int | None
    """Torch CPU threads set for this worker, None when left to torch / OMP_NUM_THREADS."""

    def summary(self) -> str:
        """One line for the report header, e.g. "gw1: device cuda, CUDA_VISIBLE_DEVICES=1"."""
        who = self.worker_id or "main"
        parts = [f"device {self.device}"]
        if self.visible_devices is not None:
            parts.append(f"CUDA_VISIBLE_DEVICES={self.visible_devices}")
        if self.threads is not None:
            parts.append(f"{self.threads} torch thread(s)")
        return f"{who}: " + ", ".join(parts)


def configure_worker(config: pytest.Config) -> WorkerSetup:
    """Pin this xdist worker to its GPU and CPU share, then resolve its device.

    Must run before anything in the process touches CUDA (call it first in ``pytest_configure``).
    Reads the spec from ``config.getoption("patchscope_device")`` ("auto" when undeclared or None).
    Only "auto" and "cuda" are pinned: an explicit "cuda:N" names one device for every worker, and
    "cpu" needs no GPU. Threads are limited only on workers that run on the CPU and only when the
    user has not chosen OMP_NUM_THREADS; a plain run keeps torch's own default.
    Raises ProbeConfigError for an invalid or unusable device (the plugin should turn it into
    ``pytest.UsageError``).
    """
    option = config.getoption(DEVICE_DEST, "auto")
    spec = parse_device("auto" if option is None else option)
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is None:
        return WorkerSetup(None, 1, os.environ.get("CUDA_VISIBLE_DEVICES"), detect_device(spec), None)

    worker_id = str(workerinput["workerid"])
    worker_count = int(workerinput.get("workercount", 1))
    if spec in ("auto", "cuda"):
        _pin_gpu(worker_index(worker_id))
    device = detect_device(spec)
    threads = None
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = cpu_threads_per_worker(worker_count, available_cpus())
        torch.set_num_threads(threads)
    return WorkerSetup(worker_id, worker_count, os.environ.get("CUDA_VISIBLE_DEVICES"), device, threads)


def _pin_gpu(index: int | None) -> None:
    """Set CUDA_VISIBLE_DEVICES for worker ``index``, unless CUDA is already too far along to notice."""
    caller = os.environ.get("CUDA_VISIBLE_DEVICES")
    n_cuda = count_physical_gpus() if caller is None else 0
    visible = assign_visible_devices(index, caller, n_cuda)
    if visible is None or visible == caller:
        return
    if _cuda_already_initialised():
        warn_at_caller(
            f"pytest-patchscope: CUDA was initialised before worker pinning; CUDA_VISIBLE_DEVICES={visible} "
            "was not applied, so this worker may share a GPU with others."
        )
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = visible


def _release_cuda_cache() -> None:
    """Return freed GPU blocks to the driver, if this process uses CUDA at all (never imports torch)."""
    gc.collect()
    if _cuda_already_initialised():
        sys.modules["torch"].cuda.empty_cache()


class ModelCache(Generic[T]):
    """Least-recently-used cache of loaded models for one worker, bounded by ``max_models``.

    Eviction happens before the next model loads, so peak memory stays at ``max_models`` models.
    ``on_evict`` gets each evicted model for the plugin's own clean-up (e.g. removing hooks); the
    cache then drops its last reference and empties the CUDA allocator cache itself, because a
    callback cannot free a model that its own argument still references.
    """

    def __init__(self, max_models: int, on_evict: Callable[[T], None] | None = None) -> None:
        if as_int(max_models) is None or max_models < 1:
            raise ProbeConfigError(
                "max_models", max_models, "an integer >= 1",
                "It bounds how many models one worker keeps loaded at once.",
            )
        self.max_models = max_models
        self._on_evict = on_evict
        self._models: OrderedDict[Hashable, T] = OrderedDict()

    def get_or_load(self, key: Hashable, loader: Callable[[], T]) -> T:
        """The cached model for ``key`` (now most recently used), loading it with ``loader`` on a miss."""
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        while len(self._models) >= self.max_models:
            self._evict_oldest()
        value = loader()
        self._models[key] = value
        return value

    def clear(self) -> None:
        """Evict everything, oldest first (call at session end to free the GPU deterministically)."""
        while self._models:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, value = self._models.popitem(last=False)
        try:
            if self._on_evict is not None:
                self._on_evict(value)
        finally:
            del value
            _release_cuda_cache()

    def __contains__(self, key: object) -> bool:
        return key in self._models

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[Hashable]:
        """Cached keys, least recently used first."""
        return list(self._models)
