"""pytest-patchscope: Patchscopes probes as pytest tests, and a knowledge-localization gate.

Public names are imported lazily, so that loading the pytest plugin (or importing the engine
under `python -c`) does not pull in torch, transformers or pytest before they are needed.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Patchscope": "scope",
    "PatchResult": "results",
    "CandidateScore": "results",
    "Sample": "results",
    "Decoding": "decoding",
    "Probe": "probe",
    "Substring": "probe",
    "Placeholder": "probe",
    "Preset": "presets",
    "TOKEN_IDENTITY": "presets",
    "ENTITY_DESCRIPTION": "presets",
    "ATTRIBUTE_EXTRACTION": "presets",
    "LOGIT_LENS": "presets",
    "attribute_extraction": "presets",
    "AffineMapping": "mappings",
    "ZERO": "mappings",
    "mean_ablation": "mappings",
    "Span": "probe",
    "SITES": "sites",
    "LocalizationProfile": "profile",
    "LayerCell": "profile",
    "load_model": "models",
    "PatchscopeModel": "models",
    "PatchscopeError": "errors",
    "ProbeConfigError": "errors",
    "ModelLoadError": "errors",
    "WeightsNotInstalledError": "errors",
    "BaselineError": "errors",
    "ReportError": "errors",
    "EngineError": "errors",
    "PatchscopeWarning": "errors",
    "assert_patched_generation_contains": "assertions",
    "assert_patched_generation_not_contains": "assertions",
    "assert_patched_generation_matches": "assertions",
    "assert_generation_changed": "assertions",
    "assert_localized": "assertions",
    "assert_patched_prefers": "assertions",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_patchscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
