"""The project's own error types: every bad input is reported through one of these.

Each message names the field, the value that was given, what is allowed, and what to do next.
"""
from __future__ import annotations

from typing import Any


class PatchscopeError(Exception):
    """Base class of every error that pytest-patchscope raises on purpose."""


class ProbeConfigError(PatchscopeError, ValueError):
    """A probe argument (layer, position, prompt, mapping, ...) is not valid for this model."""

    def __init__(self, field: str, value: Any, allowed: str, hint: str | None = None) -> None:
        self.field, self.value, self.allowed, self.hint = field, value, allowed, hint
        message = f"{field}={value!r} is not valid: {allowed}."
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
