"""pytest-patchscope: Patchscopes probes as pytest tests, and a knowledge-localization gate.

Public names are imported lazily, so that loading the pytest plugin (or importing the engine
under `python -c`) does not pull in torch, transformers or pytest before they are needed. The
`TYPE_CHECKING` block gives type checkers and editors the same names, with their signatures.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_patchscope.assertions import (
        assert_generation_changed as assert_generation_changed,
    )
    from pytest_patchscope.assertions import (
        assert_localized as assert_localized,
    )
    from pytest_patchscope.assertions import (
        assert_patched_generation_contains as assert_patched_generation_contains,
    )
    from pytest_patchscope.assertions import (
        assert_patched_generation_matches as assert_patched_generation_matches,
    )
    from pytest_patchscope.assertions import (
        assert_patched_generation_not_contains as assert_patched_generation_not_contains,
    )
    from pytest_patchscope.assertions import (
        assert_patched_prefers as assert_patched_prefers,
    )
    from pytest_patchscope.baseline.profile import (
        LayerCell as LayerCell,
    )
    from pytest_patchscope.baseline.profile import (
        LocalizationProfile as LocalizationProfile,
    )
    from pytest_patchscope.engine.results import (
        MATCH_RULES as MATCH_RULES,
    )
    from pytest_patchscope.engine.results import (
        CandidateScore as CandidateScore,
    )
    from pytest_patchscope.engine.results import (
        PatchResult as PatchResult,
    )
    from pytest_patchscope.engine.results import (
        Sample as Sample,
    )
    from pytest_patchscope.errors import (
        BaselineError as BaselineError,
    )
    from pytest_patchscope.errors import (
        EngineError as EngineError,
    )
    from pytest_patchscope.errors import (
        ModelLoadError as ModelLoadError,
    )
    from pytest_patchscope.errors import (
        PatchscopeError as PatchscopeError,
    )
    from pytest_patchscope.errors import (
        PatchscopeWarning as PatchscopeWarning,
    )
    from pytest_patchscope.errors import (
        ProbeConfigError as ProbeConfigError,
    )
    from pytest_patchscope.errors import (
        ReportError as ReportError,
    )
    from pytest_patchscope.errors import (
        WeightsNotInstalledError as WeightsNotInstalledError,
    )
    from pytest_patchscope.model.loading import (
        PatchscopeModel as PatchscopeModel,
    )
    from pytest_patchscope.model.loading import (
        load_model as load_model,
    )
    from pytest_patchscope.model.sites import (
        SITES as SITES,
    )
    from pytest_patchscope.plugin import (
        PatchscopeFixture as PatchscopeFixture,
    )
    from pytest_patchscope.probes.decoding import (
        Decoding as Decoding,
    )
    from pytest_patchscope.probes.mappings import (
        ZERO as ZERO,
    )
    from pytest_patchscope.probes.mappings import (
        AffineMapping as AffineMapping,
    )
    from pytest_patchscope.probes.mappings import (
        mean_ablation as mean_ablation,
    )
    from pytest_patchscope.probes.presets import (
        ATTRIBUTE_EXTRACTION as ATTRIBUTE_EXTRACTION,
    )
    from pytest_patchscope.probes.presets import (
        ENTITY_DESCRIPTION as ENTITY_DESCRIPTION,
    )
    from pytest_patchscope.probes.presets import (
        LOGIT_LENS as LOGIT_LENS,
    )
    from pytest_patchscope.probes.presets import (
        TOKEN_IDENTITY as TOKEN_IDENTITY,
    )
    from pytest_patchscope.probes.presets import (
        Preset as Preset,
    )
    from pytest_patchscope.probes.presets import (
        attribute_extraction as attribute_extraction,
    )
    from pytest_patchscope.probes.probe import (
        Placeholder as Placeholder,
    )
    from pytest_patchscope.probes.probe import (
        Probe as Probe,
    )
    from pytest_patchscope.probes.probe import (
        Span as Span,
    )
    from pytest_patchscope.probes.probe import (
        Substring as Substring,
    )
    from pytest_patchscope.scope import (
        Patchscope as Patchscope,
    )

_EXPORTS = {
    "Patchscope": "scope",
    "PatchscopeFixture": "plugin",
    "PatchResult": "engine.results",
    "CandidateScore": "engine.results",
    "MATCH_RULES": "engine.results",
    "Sample": "engine.results",
    "Decoding": "probes.decoding",
    "Probe": "probes.probe",
    "Substring": "probes.probe",
    "Placeholder": "probes.probe",
    "Span": "probes.probe",
    "Preset": "probes.presets",
    "TOKEN_IDENTITY": "probes.presets",
    "ENTITY_DESCRIPTION": "probes.presets",
    "ATTRIBUTE_EXTRACTION": "probes.presets",
    "LOGIT_LENS": "probes.presets",
    "attribute_extraction": "probes.presets",
    "AffineMapping": "probes.mappings",
    "ZERO": "probes.mappings",
    "mean_ablation": "probes.mappings",
    "SITES": "model.sites",
    "LocalizationProfile": "baseline.profile",
    "LayerCell": "baseline.profile",
    "load_model": "model.loading",
    "PatchscopeModel": "model.loading",
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
