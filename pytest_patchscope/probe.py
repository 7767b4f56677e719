"""A Patchscopes probe: (S, i, l) -> (T, i*, l*, f, strength), and how its positions resolve.

Positions always index the token ids that the model's own tokenizer produces for the prompt
(with its own BOS convention), so position 3 means the same token in every code path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Union

from .errors import ProbeConfigError

if TYPE_CHECKING:
    import torch

    from .models import PatchscopeModel


@dataclass(frozen=True)
class Substring:
    """A substring of the prompt; resolves to its last token (or its first, with token='first').

    `occurrence` picks which occurrence (0 = first, -1 = last).
    """

    text: str
    token: Literal["last", "first"] = "last"
    occurrence: int = 0


@dataclass(frozen=True)
class Placeholder:
    """A whole token of the prompt, such as the paper's "x"; `occurrence` defaults to the last one."""

    text: str = "x"
    occurrence: int = -1


CharSpan = tuple[int, int]
"""A (start, end) character span of the prompt: resolves like a Substring at exactly that place."""

Position = Union[int, str, Substring, Placeholder, CharSpan]
Mapping = Callable[["torch.Tensor"], "torch.Tensor"]


def describe_position(position: Position) -> str:
    if isinstance(position, Substring):
        return f"{position.text!r}[{position.token}]" + (f"#{position.occurrence}" if position.occurrence else "")
    if isinstance(position, Placeholder):
        return f"placeholder {position.text!r}"
    return repr(position)


def _token_table(prompt: str, offsets: list[tuple[int, int]]) -> str:
    return ", ".join(f"{k}:{prompt[s:e]!r}" for k, (s, e) in enumerate(offsets))


def _span_of_occurrence(field_name: str, prompt: str, text: str, occurrence: int) -> tuple[int, int]:
    if not text:
        raise ProbeConfigError(field_name, text, "a non-empty substring of the prompt")
    starts, at = [], prompt.find(text)
    while at >= 0:
        starts.append(at)
        at = prompt.find(text, at + 1)
    if not starts:
        raise ProbeConfigError(
            field_name, text, f"a substring of the prompt {prompt!r}", "Check spelling and case."
        )
    if not -len(starts) <= occurrence < len(starts):
        raise ProbeConfigError(
            f"{field_name}.occurrence", occurrence,
            f"an index into the {len(starts)} occurrence(s) of {text!r} (-{len(starts)}..{len(starts) - 1})",
        )
    start = starts[occurrence]
    return start, start + len(text)


def _resolve_span(
    field_name: str, prompt: str, offsets: list[tuple[int, int]], span: tuple[int, int], token: str, shown: Any
) -> int:
    start, end = span
    if not (0 <= start < end <= len(prompt)):
        raise ProbeConfigError(field_name, shown, f"a (start, end) character span with 0 <= start < end <= {len(prompt)}")
    covering = [k for k, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    if token not in ("last", "first"):
        raise ProbeConfigError(f"{field_name}.token", token, "'last' or 'first'")
    if covering:
        last, first = covering[-1], covering[0]
        head = prompt[offsets[first][0]:start]
        aligned = offsets[last][1] == end if token == "last" else (head == "" or head.isspace())
        if aligned:
            return last if token == "last" else first
    raise ProbeConfigError(
        field_name, shown,
        f"text that starts and ends on token boundaries; {prompt[start:end]!r} is lost to tokenization "
        f"(tokens: {_token_table(prompt, offsets)})",
        "Use a whole-token substring or an int position.",
    )


def resolve_position(field_name: str, position: Position, prompt: str, model: "PatchscopeModel") -> int:
    """Resolve a position spec to a non-negative index into `model.tokenize(prompt)`."""
    ids, offsets = model.tokenize_with_offsets(prompt)
    n = len(ids)
    if isinstance(position, bool):
        raise ProbeConfigError(field_name, position, "an int, a substring, a Substring, a Placeholder or a (start, end) span")
    if isinstance(position, int):
        if not -n <= position < n:
            raise ProbeConfigError(
                field_name, position, f"an index from {-n} to {n - 1} (the prompt has {n} tokens)",
                f"Tokens: {_token_table(prompt, offsets)}.",
            )
        return position % n
    if isinstance(position, str):
        position = Substring(position)
    if isinstance(position, Substring):
        span = _span_of_occurrence(field_name, prompt, position.text, position.occurrence)
        return _resolve_span(field_name, prompt, offsets, span, position.token, position.text)
    if isinstance(position, Placeholder):
        matches = [k for k, (s, e) in enumerate(offsets) if prompt[s:e].strip() == position.text]
        if not matches:
            where = "is not in" if position.text not in prompt else "is lost to tokenization in"
            raise ProbeConfigError(
                field_name, position.text,
                f"a placeholder that is a whole token of the prompt; it {where} {prompt!r} "
                f"(tokens: {_token_table(prompt, offsets)})",
                "Put the placeholder on its own, e.g. '... of x is'.",
            )
        if not -len(matches) <= position.occurrence < len(matches):
            raise ProbeConfigError(
                f"{field_name}.occurrence", position.occurrence,
                f"an index into the {len(matches)} occurrence(s) of placeholder {position.text!r}",
            )
        return matches[position.occurrence]
    if isinstance(position, tuple) and len(position) == 2 and all(isinstance(v, int) for v in position):
        return _resolve_span(field_name, prompt, offsets, position, "last", position)
    raise ProbeConfigError(
        field_name, position, "an int, a substring, a Substring(...), a Placeholder(...) or a (start, end) span"
    )


@dataclass(frozen=True)
class Probe:
    """One Patchscopes probe, as the user wrote it (before resolution against a model)."""

    source: str
    target: str
    layer: int
    target_layer: int | None = None
    source_position: Position = -1
    target_position: Position = -1
    mapping: Mapping | None = None
    strength: float = 1.0
    max_new_tokens: int = 20
    stop: tuple[str, ...] = ()
    preset: str | None = None

    def identity(self) -> dict[str, Any]:
        """JSON-able identity of the probe without its layers (for baselines and reports)."""
        return {
            "source": self.source,
            "source_position": describe_position(self.source_position),
            "target": self.target,
            "target_position": describe_position(self.target_position),
            "mapping": mapping_name(self.mapping),
            "strength": self.strength,
            "max_new_tokens": self.max_new_tokens,
            "preset": self.preset,
        }

    def describe(self) -> str:
        """(S, i, l) -> (T, i*, l*) on one line, for failure messages."""
        target = self.preset or repr(self.target)
        extra = ""
        if self.mapping is not None:
            extra += f", f={mapping_name(self.mapping)}"
        if self.strength != 1.0:
            extra += f", strength={self.strength}"
        return (
            f"(S={self.source!r}, i={describe_position(self.source_position)}, l={self.layer}) -> "
            f"(T={target}, i*={describe_position(self.target_position)}, "
            f"l*={self.layer if self.target_layer is None else self.target_layer}{extra})"
        )


def mapping_name(mapping: Any) -> str:
    if mapping is None:
        return "identity"
    return getattr(mapping, "name", None) or getattr(mapping, "__name__", None) or type(mapping).__name__


@dataclass(frozen=True)
class ResolvedProbe:
    """A probe checked against a model: token ids and absolute positions, validated layers."""

    probe: Probe
    source_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    source_index: int
    target_index: int
    layer: int
    target_layer: int
    extras: dict[str, Any] = field(default_factory=dict)


def _check_layer(field_name: str, layer: Any, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ProbeConfigError(
            field_name, layer, f"an int from 0 to {n_layers - 1} (the model has {n_layers} layers)",
            "Negative layers are not accepted; use model.n_layers - 1 for the last layer.",
        )
    return layer


def _check_prompt(field_name: str, prompt: Any, model: "PatchscopeModel") -> tuple[int, ...]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ProbeConfigError(field_name, prompt, "a non-empty string")
    ids = tuple(model.tokenize(prompt))
    if not ids:
        raise ProbeConfigError(field_name, prompt, "a prompt that tokenizes to at least one token")
    return ids


def resolve_probe(probe: Probe, model: "PatchscopeModel") -> ResolvedProbe:
    """Validate every field of `probe` against `model`; raise ProbeConfigError on the first bad one."""
    source_ids = _check_prompt("source", probe.source, model)
    target_ids = _check_prompt("target", probe.target, model)
    layer = _check_layer("layer", probe.layer, model.n_layers)
    target_layer = layer if probe.target_layer is None else _check_layer("target_layer", probe.target_layer, model.n_layers)
    if isinstance(probe.max_new_tokens, bool) or not isinstance(probe.max_new_tokens, int) or probe.max_new_tokens < 1:
        raise ProbeConfigError("max_new_tokens", probe.max_new_tokens, "an int >= 1")
    if isinstance(probe.strength, bool) or not isinstance(probe.strength, (int, float)) or not math.isfinite(probe.strength):
        raise ProbeConfigError(
            "strength", probe.strength, "a finite number (0 = clean, 1 = full patch, in between interpolates)"
        )
    if probe.mapping is not None and not callable(probe.mapping):
        raise ProbeConfigError("mapping", probe.mapping, "None (identity), a callable or a torch.nn.Module from d_model to d_model")
    if isinstance(probe.stop, str) or not all(isinstance(s, str) and s for s in probe.stop):
        raise ProbeConfigError("stop", probe.stop, "a tuple of non-empty strings")
    return ResolvedProbe(
        probe=probe,
        source_ids=source_ids,
        target_ids=target_ids,
        source_index=resolve_position("source_position", probe.source_position, probe.source, model),
        target_index=resolve_position("target_position", probe.target_position, probe.target, model),
        layer=layer,
        target_layer=target_layer,
    )


def apply_mapping(mapping: Mapping | None, vector: "torch.Tensor", d_model: int) -> "torch.Tensor":
    """f(h) with its output checked: a wrong shape or non-finite values is a ProbeConfigError."""
    import torch

    if mapping is None:
        return vector
    try:
        out = mapping(vector)
    except Exception as exc:
        raise ProbeConfigError(
            "mapping", mapping_name(mapping), f"a callable that accepts a ({vector.shape[-1]},) tensor",
            f"It raised {type(exc).__name__}: {exc}",
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (d_model,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ProbeConfigError(
            "mapping", mapping_name(mapping), f"a map returning a tensor of shape ({d_model},); it returned {shape}"
        )
    if not torch.isfinite(out).all():
        raise ProbeConfigError("mapping", mapping_name(mapping), "a map that returns finite values; it returned NaN/inf")
    return out.to(vector.dtype)
