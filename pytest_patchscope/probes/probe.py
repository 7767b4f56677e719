"""A Patchscopes probe as the user writes it: (S, i, l) -> (T, i*, l*, f, strength), plain data.

Positions name tokens of a prompt (an index, a substring, a placeholder, a span); they resolve
against a model's tokenizer in `engine/resolve.py`. Nothing here needs a model or imports torch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence, Union

from pytest_patchscope.probes.decoding import GREEDY, Decoding
from pytest_patchscope.validation import plain

if TYPE_CHECKING:
    import torch



TokenChoice = Literal["last", "first", "all"]
TOKEN_CHOICES = ("last", "first", "all")


@dataclass(frozen=True)
class Substring:
    """A substring of the prompt; resolves to its last token (token='first': its first one;
    token='all': every token of it, e.g. all tokens of a multi-token entity).

    `occurrence` picks which occurrence (0 = first, -1 = last).
    """

    text: str
    token: TokenChoice = "last"
    occurrence: int = 0


@dataclass(frozen=True)
class Span:
    """A (start, end) character span of the prompt with a token choice, like Substring's."""

    start: int
    end: int
    token: TokenChoice = "last"


@dataclass(frozen=True)
class Placeholder:
    """A whole token of the prompt, such as the paper's "x"; `occurrence` defaults to the last one."""

    text: str = "x"
    occurrence: int = -1


CharSpan = tuple[int, int]
"""A (start, end) character span of the prompt: resolves like a Substring at exactly that place."""

Position = Union[int, str, Substring, Placeholder, CharSpan, Span]
Positions = Union[Position, list[Position]]
"""One position, or a list of them: a list patches several tokens (see `Probe`)."""
Mapping = Callable[["torch.Tensor"], "torch.Tensor"]

MAX_STRENGTH = 1000.0
"""Largest |strength| accepted: a sanity bound, far beyond interpolation (0..1) and any steering
strength in use, that keeps (1 - s) * h + s * f(h) from overflowing into inf/NaN text."""


def describe_position(position: Positions) -> str:
    if isinstance(position, list):
        return "[" + ", ".join(describe_position(p) for p in position) + "]"
    if isinstance(position, Span):
        return f"({position.start}, {position.end})" + ("" if position.token == "last" else f"[{position.token}]")
    if isinstance(position, Substring):
        return f"{position.text!r}[{position.token}]" + (f"#{position.occurrence}" if position.occurrence else "")
    if isinstance(position, Placeholder):
        return f"placeholder {position.text!r}"
    return repr(position)


@dataclass(frozen=True)
class Probe:
    """One Patchscopes probe, as the user wrote it (before resolution against a model).

    `site` is the activation read at (S, i, l) and written at (T, i*, l*): see `sites.SITES`.
    `units` limits the write to those indices of the site's first axis (residual dimensions, MLP
    neurons or heads); None writes all. `target_position` may be a list: the source vector goes
    to each of them (SelfIE); a `source_position` list of the same length patches pairwise.
    """

    source: str
    target: str
    layer: int
    target_layer: int | None = None
    source_position: Positions = -1
    target_position: Positions = -1
    mapping: Mapping | None = None
    strength: float = 1.0
    max_new_tokens: int = 20
    stop: tuple[str, ...] = ()
    preset: str | None = None
    site: str = "resid_post"
    units: tuple[int, ...] | None = None
    source_model: Any = None
    """None (S runs on the target's model), a loaded PatchscopeModel or Patchscope, or a model spec
    (a checkpoint path, GGUF file or hub id) loaded once per process: the paper's M != M*."""
    candidates: tuple[str, ...] = ()
    """Answers to teacher-force after the patched (and the clean) target and score: see
    `PatchResult.scores`. With candidates, max_new_tokens may be 0 (score only, generate nothing)."""
    decoding: Decoding = GREEDY
    """How the continuation is decoded: greedy (the default) or sampled, see `decoding.Decoding`."""

    def __post_init__(self) -> None:
        """numpy and torch values (an index array as units or positions, a numpy int as layer) become
        the Python values they hold (`validation.plain`): the probe then compares, prints and is
        checked and recorded as plain data."""
        for name in _INDEX_FIELDS:
            value = getattr(self, name)
            converted = plain(value)
            if name in ("units", "stop") and isinstance(converted, list) and not isinstance(value, list):
                converted = tuple(converted)  # an array given for a tuple field
            if converted is not value:
                object.__setattr__(self, name, converted)

    def __repr__(self) -> str:
        """The probe as code, with the fields that differ from their defaults (for @example(...))."""
        shown = [
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
            if f.name in ("source", "target", "layer") or getattr(self, f.name) != f.default
        ]
        return f"Probe({', '.join(shown)})"

    def identity(self) -> dict[str, Any]:
        """JSON-able identity of the probe without its layers (for baselines and reports).

        Everything that changes what the probe computes is in it, so two different probes never
        share a baseline key. A mapping without a stable identity (see `mapping_identity`) is
        `None` here, with its display name under "unstable_mapping"; `record` refuses it. The
        site and units appear only when they are not the defaults, so that a residual-stream
        probe keeps the key it always had.
        """
        identity: dict[str, Any] = {
            "source": self.source,
            "source_position": describe_position(self.source_position),
            "target": self.target,
            "target_position": describe_position(self.target_position),
            "mapping": mapping_identity(self.mapping),
            "strength": float(self.strength),
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "preset": self.preset,
        }
        if self.site != "resid_post":
            identity["site"] = self.site
        if self.units is not None:
            identity["units"] = list(self.units)
        if self.source_model is not None:
            identity["source_model"] = describe_source_model(self.source_model)
        if self.candidates:
            identity["candidates"] = list(self.candidates)
        if self.decoding != GREEDY:
            identity["decoding"] = self.decoding.changed()
        if identity["mapping"] is None:
            identity["unstable_mapping"] = mapping_name(self.mapping)
        return identity

    def describe(self) -> str:
        """(S, i, l) -> (T, i*, l*) on one line, for failure messages."""
        target = self.preset or repr(self.target)
        extra = ""
        if self.site != "resid_post":
            extra += f", site={self.site}"
        if self.units is not None:
            extra += f", units={describe_units(self.units)}"
        if self.source_model is not None:
            extra += f", M={describe_source_model(self.source_model)}"
        if self.mapping is not None:
            extra += f", f={mapping_name(self.mapping)}"
        if self.strength != 1.0:
            extra += f", strength={self.strength}"
        if self.decoding != GREEDY:
            extra += ", " + ", ".join(f"{name}={value!r}" for name, value in self.decoding.changed().items())
        return (
            f"(S={self.source!r}, i={describe_position(self.source_position)}, l={self.layer}) -> "
            f"(T={target}, i*={describe_position(self.target_position)}, "
            f"l*={self.layer if self.target_layer is None else self.target_layer}{extra})"
        )


_INDEX_FIELDS = ("layer", "target_layer", "source_position", "target_position", "strength", "max_new_tokens", "units", "stop")
"""Probe fields that a numpy or torch value may fill (see `Probe.__post_init__`)."""


def describe_units(units: Sequence[int]) -> str:
    """Units for messages: [3] or [0, 1, 2, ... 63 units]."""
    shown = list(units[:8])
    return "[" + ", ".join(map(str, shown)) + (f", ... {len(units)} units" if len(units) > 8 else "") + "]"


def mapping_name(mapping: Any) -> str:
    """A short name of f for messages (not unique: see `mapping_identity` for keys)."""
    if mapping is None:
        return "identity"
    return getattr(mapping, "name", None) or getattr(mapping, "__name__", None) or type(mapping).__name__


def _stable_qualname(obj: Any) -> str | None:
    """``module.qualname`` of a function or class defined at module level; None for lambdas and locals."""
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str) or "<" in qualname:
        return None
    return f"{getattr(obj, '__module__', None) or '?'}.{qualname}"


def _module_digest(module: "torch.nn.Module") -> str:
    """sha256 of a module's state (names, dtypes, shapes and values), 16 hex digits."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous().view(-1)
        digest.update(f"{name}:{value.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def mapping_identity(mapping: Any) -> str | None:
    """A stable identity of f for baseline keys, or None when f has none.

    - None: ``"identity"``.
    - A ``torch.nn.Module`` (e.g. ``AffineMapping``): its name (its ``name`` attribute, else its
      class) plus a hash of its weights, so two maps with one name but other weights differ.
    - A callable with a string ``name`` attribute: that name (the user vouches for it).
    - A function or callable object defined at module level: ``module.qualname``, plus the
      object's own ``repr`` when its class defines one (a dataclass ``Scale(factor=2.0)``).
    - Anything else (a lambda, a local function, a ``functools.partial``, an object with only the
      default repr): None, because two different ones would look alike.
    """
    import torch

    if mapping is None:
        return "identity"
    name = getattr(mapping, "name", None)
    explicit = name if isinstance(name, str) and name else None
    if isinstance(mapping, torch.nn.Module):
        base = explicit or _stable_qualname(type(mapping))
        return None if base is None else f"{base}#{_module_digest(mapping)}"
    if explicit:
        return explicit
    if inspect.isroutine(mapping) or isinstance(mapping, type):
        return _stable_qualname(mapping)
    kind = type(mapping)
    base = _stable_qualname(kind)
    shown = repr(mapping)
    if base is None or kind.__repr__ is object.__repr__ or " at 0x" in shown:
        return None
    return f"{base}:{shown}"


def describe_source_model(value: Any) -> str:
    """A source model's name for identities and messages: its name and weights hash, or the spec."""
    model = getattr(value, "model", value)  # a Patchscope holds its model
    if hasattr(model, "weights_hash") and hasattr(model, "name"):
        return f"{model.name}#{model.short_hash}" if model.weights_hash else str(model.name)
    return str(value)
