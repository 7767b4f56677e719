"""A Patchscopes probe: (S, i, l) -> (T, i*, l*, f, strength), and how its positions resolve.

Positions always index the token ids that the model's own tokenizer produces for the prompt
(with its own BOS convention), so position 3 means the same token in every code path.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence, Union

from .decoding import GREEDY, Decoding, check_decoding
from .errors import ProbeConfigError
from .sites import SiteLocation, locate_site

if TYPE_CHECKING:
    import torch

    from .models import PatchscopeModel


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


def finite_real(value: Any) -> float | None:
    """`value` as a float if it is a finite real number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        return None
    return number if math.isfinite(number) else None


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
) -> tuple[int, ...]:
    start, end = span
    if not (0 <= start < end <= len(prompt)):
        raise ProbeConfigError(field_name, shown, f"a (start, end) character span with 0 <= start < end <= {len(prompt)}")
    covering = [k for k, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    if token not in TOKEN_CHOICES:
        raise ProbeConfigError(f"{field_name}.token", token, "'last', 'first' or 'all'")
    if covering:
        last, first = covering[-1], covering[0]
        head = prompt[offsets[first][0]:start]
        starts_aligned = head == "" or head.isspace()
        ends_aligned = offsets[last][1] == end
        if token == "last" and ends_aligned:
            return (last,)
        if token == "first" and starts_aligned:
            return (first,)
        if token == "all" and starts_aligned and ends_aligned:
            return tuple(covering)
    raise ProbeConfigError(
        field_name, shown,
        f"text that starts and ends on token boundaries; {prompt[start:end]!r} is lost to tokenization "
        f"(tokens: {_token_table(prompt, offsets)})",
        "Use a whole-token substring or an int position.",
    )


def resolve_positions(field_name: str, position: Positions, prompt: str, model: "PatchscopeModel") -> tuple[int, ...]:
    """Resolve a position spec, or a list of them, to token indices into `model.tokenize(prompt)`.

    A list resolves element by element (a token="all" element gives all its tokens), in order.
    """
    if isinstance(position, list):
        if not position:
            raise ProbeConfigError(field_name, position, "a position or a non-empty list of positions")
        return tuple(k for n, p in enumerate(position) for k in _resolve_one(f"{field_name}[{n}]", p, prompt, model))
    return _resolve_one(field_name, position, prompt, model)


def _resolve_one(field_name: str, position: Position, prompt: str, model: "PatchscopeModel") -> tuple[int, ...]:
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
        return (position % n,)
    if isinstance(position, str):
        position = Substring(position)
    if isinstance(position, (Substring, Placeholder)):
        if not isinstance(position.text, str):
            raise ProbeConfigError(f"{field_name}.text", position.text, "a string")
        if isinstance(position.occurrence, bool) or not isinstance(position.occurrence, int):
            raise ProbeConfigError(f"{field_name}.occurrence", position.occurrence, "an int (0 = first, -1 = last)")
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
        return (matches[position.occurrence],)
    if isinstance(position, Span):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (position.start, position.end)):
            raise ProbeConfigError(field_name, position, "a Span of int character offsets")
        return _resolve_span(field_name, prompt, offsets, (position.start, position.end), position.token, position)
    if isinstance(position, tuple) and len(position) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in position):
        return _resolve_span(field_name, prompt, offsets, position, "last", position)
    raise ProbeConfigError(
        field_name, position,
        "an int, a substring, a Substring(...), a Placeholder(...), a (start, end) span, a Span(...) or a list of these",
    )


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


@dataclass(frozen=True)
class ResolvedProbe:
    """A probe checked against a model: token ids and absolute positions, validated layers and site.

    `source_indices` has one entry per target index, or one entry shared by all of them.
    """

    probe: Probe
    source_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    source_indices: tuple[int, ...]
    target_indices: tuple[int, ...]
    layer: int
    target_layer: int
    location: SiteLocation
    units: tuple[int, ...] | None = None
    source_model: "PatchscopeModel | None" = None
    """The model S runs on when it is not the target's (None: the target's own)."""
    candidate_ids: tuple[tuple[int, ...], ...] = ()
    """Each candidate's tokens as a continuation of the target (see `candidate_tokens`)."""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def source_index(self) -> int:
        """The (first) source token index."""
        return self.source_indices[0]

    @property
    def target_index(self) -> int:
        """The first target token index: the target's tokens before it are a prefix shared with other rows."""
        return min(self.target_indices)


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
    limit = position_limit(model)
    if limit is not None and len(ids) > limit:
        raise ProbeConfigError(
            field_name, prompt, f"a prompt of at most {limit} tokens (the model's position limit); it has {len(ids)}"
        )
    return ids


def position_limit(model: "PatchscopeModel") -> int | None:
    """The model's position limit (`max_position_embeddings`, `n_positions` for GPT-2), None if unknown.

    Past it GPT-2's position table raises IndexError and RoPE models extrapolate into garbage.
    """
    config = model.hf.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def _check_max_new_tokens(
    value: Any, target_ids: tuple[int, ...], model: "PatchscopeModel", limit: int | None, scoring: bool = False
) -> None:
    """max_new_tokens within the settings' bound and the room the position limit leaves after T
    (0 is allowed when the probe scores candidates: it then only scores)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if scoring else 1):
        if value == 0 and type(value) is int:
            raise ProbeConfigError("max_new_tokens", value, "an int >= 1", "max_new_tokens=0 (score only) needs candidates=[...].")
        raise ProbeConfigError("max_new_tokens", value, "an int >= 0 with candidates" if scoring else "an int >= 1")
    if limit is not None and value > limit:
        raise ProbeConfigError(
            "max_new_tokens", value, f"an int from 1 to {limit} (the max_new_tokens_limit setting)",
            "Raise the bound with Patchscope(..., max_new_tokens_limit=N) or the patchscope_max_new_tokens_limit ini key.",
        )
    positions = position_limit(model)
    if positions is not None and len(target_ids) + value > positions:
        raise ProbeConfigError(
            "max_new_tokens", value,
            f"an int from 1 to {positions - len(target_ids)}: the target prompt has {len(target_ids)} tokens "
            f"and the model's position limit is {positions}",
            "Shorten the target prompt or generate fewer tokens.",
        )


def resolve_probe(probe: Probe, model: "PatchscopeModel", *, max_new_tokens_limit: int | None = None) -> ResolvedProbe:
    """Validate every field of `probe` against `model`; raise ProbeConfigError on the first bad one.

    `max_new_tokens_limit` is the settings' sanity bound on max_new_tokens (None: only the model's
    position limit bounds it).
    """
    if not isinstance(probe, Probe):
        raise ProbeConfigError("probes", probe, "Probe objects (see Patchscope.probe)")
    source_model = None if probe.source_model is None else resolve_source_model(probe.source_model, model.device)
    on_source = source_model or model
    source_ids = _check_prompt("source", probe.source, on_source)
    target_ids = _check_prompt("target", probe.target, model)
    layer = _check_layer("layer", probe.layer, on_source.n_layers)
    target_layer = layer if probe.target_layer is None else _check_layer("target_layer", probe.target_layer, model.n_layers)
    candidate_ids = candidate_tokens(probe.candidates, probe.target, target_ids, model)
    _check_max_new_tokens(probe.max_new_tokens, target_ids, model, max_new_tokens_limit, scoring=bool(candidate_ids))
    longest = max((len(ids) for ids in candidate_ids), default=0)
    positions = position_limit(model)
    if positions is not None and len(target_ids) + longest > positions:
        raise ProbeConfigError(
            "candidates", list(probe.candidates),
            f"candidates of at most {positions - len(target_ids)} tokens: the target has {len(target_ids)} "
            f"tokens and the model's position limit is {positions}",
        )
    check_decoding(probe.decoding)
    strength = finite_real(probe.strength)
    if strength is None or abs(strength) > MAX_STRENGTH:
        raise ProbeConfigError(
            "strength", probe.strength,
            f"a finite number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g} (0 = clean, 1 = full patch, in between interpolates)",
        )
    if probe.mapping is not None and not callable(probe.mapping):
        raise ProbeConfigError("mapping", probe.mapping, "None (identity), a callable or a torch.nn.Module from the site's shape to itself")
    if not isinstance(probe.stop, tuple) or not all(isinstance(s, str) and s for s in probe.stop):
        raise ProbeConfigError("stop", probe.stop, "a tuple of non-empty strings")
    location = locate_site(model, probe.site)
    if source_model is not None:
        locate_site(source_model, probe.site)
    units = check_units("units", probe.units, location)
    source_indices = resolve_positions("source_position", probe.source_position, probe.source, on_source)
    target_indices = resolve_positions("target_position", probe.target_position, probe.target, model)
    if len(set(target_indices)) < len(target_indices):
        raise ProbeConfigError(
            "target_position", describe_position(probe.target_position),
            f"distinct target tokens; it resolves to {list(target_indices)}, which writes one token twice",
        )
    if len(source_indices) not in (1, len(target_indices)):
        raise ProbeConfigError(
            "source_position", describe_position(probe.source_position),
            f"one position, or as many as target_position resolves to ({len(target_indices)}: {list(target_indices)}); "
            f"it resolves to {len(source_indices)}: {list(source_indices)}",
            "Lists of positions are patched pairwise, so both must have the same length.",
        )
    return ResolvedProbe(
        probe=probe,
        source_ids=source_ids,
        target_ids=target_ids,
        source_indices=source_indices,
        target_indices=target_indices,
        layer=layer,
        target_layer=target_layer,
        location=location,
        units=units,
        source_model=source_model,
        candidate_ids=candidate_ids,
    )


def candidate_tokens(candidates: Any, target: str, target_ids: tuple[int, ...], model: "PatchscopeModel") -> tuple[tuple[int, ...], ...]:
    """Each candidate's tokens as the continuation of `target`, checked.

    A candidate that starts with no whitespace after a target that ends with none is scored as
    " " + candidate, the way a word follows a prompt ("is" -> " Paris"). Its tokens are those of
    target + continuation past the target's own (so a merge at the seam is what the model would
    see), or the continuation tokenized alone where the target's tokens do not survive the join.
    """
    allowed = "a non-empty list of distinct strings, each with a non-space character"
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, (list, tuple)):
        raise ProbeConfigError("candidates", candidates, allowed, "Use candidates=[...] for one answer.")
    if not candidates:
        return ()
    special = set(model.tokenizer.all_special_ids)
    seen: dict[tuple[int, ...], str] = {}
    for candidate in candidates:
        if not isinstance(candidate, str) or not candidate.strip():
            raise ProbeConfigError("candidates", list(candidates), f"{allowed}; {candidate!r} is not")
        if list(candidates).count(candidate) > 1:
            raise ProbeConfigError("candidates", list(candidates), f"{allowed}; {candidate!r} appears more than once")
        continuation = candidate if candidate[0].isspace() or target[-1:].isspace() else " " + candidate
        joined = model.tokenize(target + continuation)
        if tuple(joined[: len(target_ids)]) == target_ids:
            ids = tuple(joined[len(target_ids):])
        else:
            ids = tuple(model.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        ids = tuple(i for i in ids if i not in special)
        if not model.decode(list(ids)).strip():
            raise ProbeConfigError(
                "candidates", list(candidates), f"{allowed}; {candidate!r} tokenizes to nothing but special tokens and spaces"
            )
        if ids in seen:
            raise ProbeConfigError(
                "candidates", list(candidates),
                f"{allowed} as tokens; {seen[ids]!r} and {candidate!r} are both scored as the tokens {list(ids)}",
            )
        seen[ids] = candidate
    return tuple(seen)


def describe_source_model(value: Any) -> str:
    """A source model's name for identities and messages: its name and weights hash, or the spec."""
    model = getattr(value, "model", value)  # a Patchscope holds its model
    if hasattr(model, "weights_hash") and hasattr(model, "name"):
        return f"{model.name}#{model.short_hash}" if model.weights_hash else str(model.name)
    return str(value)


def resolve_source_model(value: Any, device: str = "cpu") -> "PatchscopeModel":
    """A probe's source_model as a loaded model: a PatchscopeModel, a Patchscope's, or a spec loaded
    once per process on `device` (the target's)."""
    import os

    from .models import PatchscopeModel, load_cached

    model = getattr(value, "model", value)
    if isinstance(model, PatchscopeModel):
        return model
    if isinstance(value, (str, os.PathLike)):
        return load_cached(value, device)
    raise ProbeConfigError(
        "source_model", value, "None, a PatchscopeModel, a Patchscope, or a model spec (checkpoint directory, GGUF file, hub id)"
    )


def check_units(field_name: str, units: Any, location: SiteLocation) -> tuple[int, ...] | None:
    """`units` as a sorted tuple of distinct indices into the site's first axis, or None for all."""
    if units is None:
        return None
    n = location.n_units
    allowed = f"None (all) or a non-empty list of distinct ints from 0 to {n - 1} ({location.site.units_are} of site {location.site.name!r})"
    if isinstance(units, (str, bytes)) or not isinstance(units, (list, tuple, range)):
        hint = 'units="each" is for sweep(..., site="heads"): one probe per head.' if units == "each" else None
        raise ProbeConfigError(field_name, units, allowed, hint)
    values = list(units)
    if not values:
        raise ProbeConfigError(field_name, units, allowed, "An empty list would patch nothing; use strength=0 for a clean run.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise ProbeConfigError(field_name, units, f"{allowed}; {value!r} is not")
    if len(set(values)) < len(values):
        duplicated = sorted({v for v in values if values.count(v) > 1})
        raise ProbeConfigError(field_name, units, f"{allowed}; {duplicated} appear more than once")
    return tuple(sorted(values))


def _describe_output(out: Any) -> str:
    """What a mapping returned, for messages: type, or a tensor's shape, dtype, layout and device."""
    import torch

    if not isinstance(out, torch.Tensor):
        return f"a {type(out).__name__}"
    shape = "a nested tensor" if out.is_nested else f"shape {tuple(out.shape)}"
    return f"a tensor of {shape}, {out.dtype}, layout {out.layout}, on {out.device}"


def apply_mapping(mapping: Mapping | None, vector: "torch.Tensor", shape: tuple[int, ...]) -> "torch.Tensor":
    """f(h), checked: f must return a dense, real floating-point tensor of the site's `shape`, finite.

    f gets its own copy of h, so an in-place f (``h.mul_(2)``) cannot change the source state that
    other rows of the job map too. Anything else is a ProbeConfigError naming what f returned: a
    sparse, meta or nested tensor has no values to write, a complex one would lose its imaginary
    part and an integer one its fraction (a truncated state, not the one meant), and values that
    are not finite once cast to the model's dtype would turn the text to NaN.
    """
    import torch

    if mapping is None:
        if tuple(vector.shape) != tuple(shape):
            raise ProbeConfigError(
                "mapping", "identity",
                f"a map from the source's {tuple(vector.shape)} to the target's {tuple(shape)}: the two models differ in width",
                "Pass mapping=AffineMapping.fit(source_states, target_states) (or another map of those shapes).",
            )
        return vector
    try:
        out = mapping(vector.clone())
    except Exception as exc:
        raise ProbeConfigError(
            "mapping", mapping_name(mapping), f"a callable that accepts a {tuple(vector.shape)} tensor",
            f"It raised {type(exc).__name__}: {exc}",
        ) from exc
    wanted = f"a map returning a dense real floating-point tensor of shape {tuple(shape)}"
    if (
        not isinstance(out, torch.Tensor) or out.is_nested or out.layout != torch.strided or out.is_meta
        or not out.is_floating_point() or tuple(out.shape) != tuple(shape)
    ):
        raise ProbeConfigError("mapping", mapping_name(mapping), f"{wanted}; it returned {_describe_output(out)}")
    out = out.to(device=vector.device, dtype=vector.dtype)
    if not torch.isfinite(out).all():
        raise ProbeConfigError(
            "mapping", mapping_name(mapping), f"a map that returns finite values in {vector.dtype}; it returned NaN/inf"
        )
    return out
