"""Where a model runs and in what precision: device specs, dtypes and device maps, all checked
before any weights load or CUDA work starts.

Pure functions of plain values where possible (no torch at import), so a typo in a device,
dtype or device map is a ProbeConfigError naming the field before anything expensive happens.
"""
from __future__ import annotations

import re
from typing import Any

from pytest_patchscope.errors import ProbeConfigError

DEVICE_OPTION = "--patchscope-device"
"""The field a device spec is named by when no other is given: the CLI option most specs come from."""


ALLOWED_DEVICES = "one of 'auto', 'cpu', 'cuda', 'cuda:N' (N = 0-based GPU index)"


_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def parse_device(spec: str, field: str = DEVICE_OPTION) -> str:
    """Validate a device spec and return its canonical form ("auto", "cpu", "cuda", "cuda:N").

    Pure (no torch), so a typo is reported before any model or CUDA work starts. Pass
    ``field="patchscope_device"`` when the value came from the ini file, so the message names it.
    """
    if not isinstance(spec, str):
        raise ProbeConfigError(field, spec, ALLOWED_DEVICES)
    normal = spec.strip().lower()
    if normal in ("auto", "cpu", "cuda"):
        return normal
    match = _CUDA_INDEX.fullmatch(normal)
    if match:
        return f"cuda:{int(match.group(1))}"
    raise ProbeConfigError(
        field, spec, ALLOWED_DEVICES,
        "Use 'auto' to take the GPU when there is one and the CPU otherwise.",
    )


def _setting(field: str, value: str) -> str:
    """How a user writes ``value`` for ``field``: "--opt cpu" on the command line, "device='cpu'" in Python."""
    return f"{field} {value}" if field.startswith("-") else f"{field}={value!r}"


def resolve_device(spec: str, cuda_available: bool, n_cuda: int, field: str = DEVICE_OPTION) -> str:
    """Turn a device spec into the torch device to use, failing with a fix when it cannot work.

    ``field`` is what the messages name: the CLI option by default, ``"device"`` for the Python API.
    """
    device = parse_device(spec, field)
    if device == "auto":
        return "cuda" if cuda_available and n_cuda > 0 else "cpu"
    if device == "cpu":
        return device
    if not cuda_available or n_cuda < 1:
        raise ProbeConfigError(
            field, spec, "a CUDA device, but torch sees no CUDA GPU in this process",
            f"Use {_setting(field, 'cpu')}, or {_setting(field, 'auto')} to fall back to the CPU.",
        )
    match = _CUDA_INDEX.fullmatch(device)
    if match and int(match.group(1)) >= n_cuda:
        raise ProbeConfigError(
            field, spec, f"'cuda' or cuda:0 .. cuda:{n_cuda - 1} ({n_cuda} GPU(s) visible)",
            "Indices count within CUDA_VISIBLE_DEVICES, not physical GPU numbers.",
        )
    return device


def detect_device(spec: str, field: str = DEVICE_OPTION) -> str:
    """Resolve ``spec`` against this process's CUDA (imports torch; call after any pinning)."""
    import torch

    available = torch.cuda.is_available()
    return resolve_device(spec, available, torch.cuda.device_count() if available else 0, field)


# ---- dtypes ------------------------------------------------------------------------------------
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
"""What `dtype=` / --patchscope-dtype accept (or the torch dtypes of the last three)."""


def dtype_name(value: Any, field: str = "dtype") -> str:
    """A dtype given as a name or a torch dtype, as one of DTYPE_NAMES (ProbeConfigError otherwise)."""
    import torch

    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
        if name in DTYPE_NAMES:
            return name
    elif isinstance(value, str) and value.strip().lower() in DTYPE_NAMES:
        return value.strip().lower()
    raise ProbeConfigError(
        field, value, f"one of {', '.join(DTYPE_NAMES)} (or torch.float32, torch.bfloat16, torch.float16)",
        "'auto' is the checkpoint's own dtype on a GPU and float32 on a CPU.",
    )


def checkpoint_dtype(config: dict[str, Any]) -> str | None:
    """The dtype a config.json says its weights were saved in ('dtype', or the older 'torch_dtype')."""
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPE_NAMES[1:] else None


def resolve_dtype(value: Any, device: str, saved: str | None, field: str = "dtype") -> str:
    """The dtype to load in: `value`, or for 'auto' the checkpoint's own on a GPU and float32 on a CPU."""
    name = dtype_name(value, field)
    if name == "auto":
        return saved if saved and device.startswith("cuda") else "float32"
    return name


def check_dtype_runs(name: str, device: str, field: str = "dtype") -> None:
    """Refuse a dtype that torch cannot compute in on `device` (fp16 on some CPU builds) before any weight is read."""
    import torch

    dtype = getattr(torch, name)
    try:
        x = torch.ones(2, 4, 8, dtype=dtype, device=device)
        weight = torch.ones(8, 8, dtype=dtype, device=device)
        y = torch.nn.functional.layer_norm(torch.nn.functional.linear(x, weight), (8,))
        torch.nn.functional.scaled_dot_product_attention(y[:, None], y[:, None], y[:, None]).softmax(-1).sum().item()
    except (RuntimeError, NotImplementedError) as exc:
        raise ProbeConfigError(
            field, name, f"a dtype that this torch build computes in on {device} ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            "Use float32 there (or bfloat16), or run on a GPU.",
        ) from exc


# ---- placement -----------------------------------------------------------------------------------
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: Any, field: str = "device_map") -> str:
    """Check a device_map before any weight is read; returns the device its inputs start on."""
    import torch

    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = "cpu, disk" + (f", cuda:0 .. cuda:{n_cuda - 1}" if n_cuda else " (torch sees no CUDA GPU here)")
    allowed = f"one of {', '.join(map(repr, DEVICE_MAP_NAMES))}, or a dict of module name -> device ({visible})"
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_NAMES:
            raise ProbeConfigError(field, device_map, allowed)
        return "cuda:0" if n_cuda else "cpu"
    if not isinstance(device_map, dict) or not device_map:
        raise ProbeConfigError(field, device_map, allowed)
    first = None
    for module, where in device_map.items():
        index = _cuda_index(where)
        ok = isinstance(module, str) and (where in ("cpu", "disk") or (index is not None and index < n_cuda))
        if not ok:
            raise ProbeConfigError(field, device_map, allowed, f"Entry {module!r}: {where!r} is not a device here.")
        first = first or ("cpu" if index is None else f"cuda:{index}")
    return first or "cpu"


def _cuda_index(where: Any) -> int | None:
    if isinstance(where, int) and not isinstance(where, bool) and where >= 0:
        return where
    if isinstance(where, str) and where.startswith("cuda"):
        rest = where[4:]
        if rest == "":
            return 0
        if rest.startswith(":") and rest[1:].isdigit():
            return int(rest[1:])
    return None


def module_device(module: Any) -> Any:
    """Where `module` computes: accelerate's execution device for a dispatched (maybe offloaded) module, else its weights'."""
    execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if execution_device is not None:
        return execution_device
    return next((p.device for p in module.parameters() if p.device.type != "meta"), "cpu")


def check_device_map_fits(device_map: Any, config: Any, field: str = "device_map") -> None:
    """A dict device_map must name modules of this model, and place every weight (checked on the meta
    device, before any weight is read); transformers would otherwise guess where the rest goes."""
    if not isinstance(device_map, dict):
        return
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    modules = {name for name, _ in skeleton.named_modules()}
    unknown = sorted(set(device_map) - modules - {""})
    placed = tuple(device_map)

    def is_placed(name: str) -> bool:
        return "" in device_map or any(name == key or name.startswith(key + ".") for key in placed)

    unplaced = [name for name, _ in skeleton.named_parameters() if not is_placed(name)]
    if unknown or unplaced:
        problem = f"it names no module {unknown[0]!r} of this model" if unknown else f"it places no device for {unplaced[0]!r} (and {len(unplaced) - 1} more)"
        raise ProbeConfigError(
            field, device_map, f"a placement that fits this model: {problem}",
            "Name the model's own modules (model.embed_tokens, model.layers.N, model.norm, lm_head for Llama), or use 'auto'.",
        )
