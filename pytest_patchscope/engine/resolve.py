"""A probe resolved against a model: token ids, absolute positions, checked layers, site and units.

`resolve_probe` is where a user's `Probe` meets a model. Every field is checked here, before any
hook is added, and a ProbeConfigError names the first bad one. Positions always index the token
ids that the model's own tokenizer produces for the prompt (with its own BOS convention), so
position 3 means the same token in every code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.model.loading import resolve_source_model
from pytest_patchscope.model.sites import SiteLocation, locate_site
from pytest_patchscope.probes.decoding import check_decoding
from pytest_patchscope.probes.probe import (
    MAX_STRENGTH,
    TOKEN_CHOICES,
    Mapping,
    Placeholder,
    Position,
    Positions,
    Probe,
    Span,
    Substring,
    describe_position,
    mapping_name,
)
from pytest_patchscope.validation import as_int, check_layer, check_text, finite_real

if TYPE_CHECKING:
    import torch

    from pytest_patchscope.model.loading import PatchscopeModel


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
        if as_int(position.occurrence) is None:
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
        if as_int(position.start) is None or as_int(position.end) is None:
            raise ProbeConfigError(field_name, position, "a Span of int character offsets")
        return _resolve_span(field_name, prompt, offsets, (position.start, position.end), position.token, position)
    if isinstance(position, tuple) and len(position) == 2 and all(as_int(v) is not None for v in position):
        return _resolve_span(field_name, prompt, offsets, position, "last", position)
    raise ProbeConfigError(
        field_name, position,
        "an int, a substring, a Substring(...), a Placeholder(...), a (start, end) span, a Span(...) or a list of these",
    )


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


def _check_prompt(field_name: str, prompt: Any, model: "PatchscopeModel") -> tuple[int, ...]:
    ids = tuple(model.tokenize(check_text(field_name, prompt)))
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
    if as_int(value) is None or value < (0 if scoring else 1):
        if type(value) is int and value == 0:
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
    layer = check_layer("layer", probe.layer, on_source.n_layers)
    target_layer = layer if probe.target_layer is None else check_layer("target_layer", probe.target_layer, model.n_layers)
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
    location = locate_site(model, probe.site, target_layer)  # a general-path model's layers may differ
    locate_site(on_source, probe.site, layer)
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
        check_text("candidates", candidate, allowed)
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


def check_units(field_name: str, units: Any, location: SiteLocation) -> tuple[int, ...] | None:
    """`units` as a sorted tuple of distinct indices into the site's first axis, or None for all."""
    if units is None:
        return None
    n = location.n_units
    allowed = f"None (all) or a non-empty list of distinct ints from 0 to {n - 1} ({location.site.units_are} of site {location.site.name!r})"
    if isinstance(units, (str, bytes)) or not isinstance(units, (list, tuple, range)):
        hint = 'units="each" is for sweep(..., site="heads"): one probe per head.' if isinstance(units, str) and units == "each" else None
        raise ProbeConfigError(field_name, units, allowed, hint)
    values = list(units)
    if not values:
        raise ProbeConfigError(field_name, units, allowed, "An empty list would patch nothing; use strength=0 for a clean run.")
    for value in values:
        if as_int(value) is None or not 0 <= value < n:
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
                f"a map from the source's {tuple(vector.shape)} to the target's {tuple(shape)}: the two models (or layers) differ in width",
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
