"""The project's own error types: every bad input is reported through one of these.

Each message names the field, the value that was given, what is allowed, and what to do next.
"""
from __future__ import annotations

import reprlib
import sys
import warnings
from pathlib import Path
from typing import Any

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 80
_PACKAGE = str(Path(__file__).resolve().parent)


def shown(value: Any) -> str:
    """repr(value), shortened: a 10**400 or a 1 MB prompt must not drown (or break) the message."""
    try:
        return _SHOWN.repr(value)
    except Exception:  # a repr that raises (or an int past Python's digit limit)
        return f"<{type(value).__name__}>"


def warn_at_caller(message: str) -> None:
    """A PatchscopeWarning pointing at the first frame outside this package: the user's own line."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, PatchscopeWarning, stacklevel=level)


class PatchscopeError(Exception):
    """Base class of every error that pytest-patchscope raises on purpose."""


class ProbeConfigError(PatchscopeError, ValueError):
    """A probe argument (layer, position, prompt, mapping, ...) is not valid for this model."""

    def __init__(self, field: str, value: Any, allowed: str, hint: str | None = None) -> None:
        self.field, self.value, self.allowed, self.hint = field, value, allowed, hint
        message = f"{field}={shown(value)} is not valid: {allowed}."
        if hint:
            message += f" {hint}"
        super().__init__(message)


class ModelLoadError(PatchscopeError):
    """A model path or file cannot be loaded as a causal language model."""


class WeightsNotInstalledError(ModelLoadError):
    """The embedded default model's weights package is missing."""


class BaselineError(PatchscopeError):
    """A baseline file is corrupt, foreign, or cannot be written."""


class ReportError(PatchscopeError):
    """A report cannot be written, or an optional dependency it needs is missing."""


class EngineError(PatchscopeError):
    """An internal invariant of the engine failed: a bug in pytest-patchscope, not in the input."""

    def __init__(self, what: str) -> None:
        super().__init__(f"internal error: {what}. Please report this with the probe that caused it.")


class PatchscopeWarning(UserWarning):
    """Input that is valid but probably not what was meant (e.g. a placeholder that is not patched)."""
