"""The one home of argument checks: plain values in, a checked value or a ProbeConfigError out.

Every module that checks a user's argument (probes, decoding settings, CLI options, strategies,
the evaluation) calls these, so a value is judged by one rule and described in one voice: the
field, the value, what is allowed, and what to do next. Nothing here imports torch.
"""
from __future__ import annotations

import difflib
import math
import numbers
import re
from typing import Any, Iterable

from pytest_patchscope.errors import ProbeConfigError

NEGATIVE_LAYER_HINT = "Negative layers are not accepted; use model.n_layers - 1 for the last layer."


ARRAY_MODULES = ("numpy", "torch")
"""Whose values (arrays, tensors, scalars) count as the Python values they hold: see `plain`."""


def plain(value: Any, depth: int = 2) -> Any:
    """A numpy or torch value as the Python values it holds (its `.tolist()`): an index array such
    as `np.argsort(scores)[-5:]` or `torch.arange(3)` becomes a list of ints, a 0-d one or a numpy
    scalar an int; lists and tuples are converted element by element (`depth` levels: positions are
    lists of (start, end) spans). Anything else comes back unchanged.

    Why: an array's truth value and `==` are elementwise, so the checks would raise numpy's or
    torch's own errors on it; judged by its values it is checked like the list it holds, and a float
    or bool array is then refused as a list of floats or bools would be.
    """
    if type(value) in (list, tuple):
        return value if depth <= 0 else type(value)(plain(v, depth - 1) for v in value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and type(value).__module__.split(".")[0] in ARRAY_MODULES:
        try:
            return tolist()
        except Exception:  # a tensor without values (meta, sparse): refused as what it is
            return value
    return value


def encodable(text: str) -> bool:
    """Whether `text` encodes as UTF-8: a lone surrogate ("\\ud800", which json.loads gives for
    '"\\\\ud800"') does not, and tokenizers refuse it with a raw TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(field_name: str, value: Any, allowed: str = "a non-empty string") -> str:
    """`value` as a non-blank string that a tokenizer can encode, else a ProbeConfigError."""
    if not isinstance(value, str) or not value.strip():
        raise ProbeConfigError(field_name, value, allowed)
    if not encodable(value):
        at = next(k for k, char in enumerate(value) if not encodable(char))
        raise ProbeConfigError(
            field_name, value, f"{allowed} of valid Unicode; character {at} is a lone surrogate ({ord(value[at]):#06x})",
            "Decode the text with errors='replace' (or fix its source) before probing.",
        )
    return value


def finite_real(value: Any) -> float | None:
    """`value` as a float if it is a finite real number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        return None
    return number if math.isfinite(number) else None


def as_int(value: Any) -> int | None:
    """`value` if it is an int (bools are not: True is no count), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_int(field_name: str, value: Any, minimum: int, maximum: int | None = None, hint: str | None = None) -> int:
    """`value` as an int from `minimum` to `maximum` (None: no upper bound), else a ProbeConfigError."""
    number = as_int(value)
    if number is None or number < minimum or (maximum is not None and number > maximum):
        allowed = f"an int >= {minimum}" if maximum is None else f"an int from {minimum} to {maximum}"
        raise ProbeConfigError(field_name, value, allowed, hint)
    return number


def _layers_allowed(n_layers: int) -> str:
    return f"an int from 0 to {n_layers - 1} (the model has {n_layers} layers)"


def check_layer(field_name: str, layer: Any, n_layers: int) -> int:
    """One layer of a model with `n_layers` layers."""
    if as_int(layer) is None or not 0 <= layer < n_layers:
        raise ProbeConfigError(field_name, layer, _layers_allowed(n_layers), NEGATIVE_LAYER_HINT)
    return layer


def layer_list(field_name: str, layers: Any, n_layers: int) -> list[int]:
    """An int, range or iterable of layers as a list (None: every layer), each checked; a huge range
    fails at its first bad layer instead of being expanded."""
    if layers is None:
        return list(range(n_layers))
    layers = plain(layers)
    if as_int(layers) is not None:
        layers = [layers]
    allowed = f"an int, a range or a list of ints from 0 to {n_layers - 1} (the model has {n_layers} layers)"
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ProbeConfigError(field_name, layers, allowed)
    values = []
    for value in layers:
        if as_int(value) is None or not 0 <= value < n_layers:
            raise ProbeConfigError(field_name, layers, f"{allowed}; {value!r} is not", NEGATIVE_LAYER_HINT)
        values.append(value)
    if not values:
        raise ProbeConfigError(field_name, layers, "a non-empty range or list of layers")
    return values


_LAYER_PART = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*(?::\s*(\d+)\s*)?)?")


def parse_layers(spec: Any, n_layers: int, field_name: str = "layers") -> list[int]:
    """'all', '0-29', '0-29:2' (every second), '10,12,20-25', an int or an iterable of ints ->
    sorted, validated layers: how the CLIs and the evaluations take layer choices."""
    allowed = (
        f"'all', a list/range like '0-{n_layers - 1}', '0-{n_layers - 1}:2' (every second) or '10,12,20-25', "
        f"or layers from 0 to {n_layers - 1}"
    )
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(n_layers))
    values: list[int] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            match = _LAYER_PART.fullmatch(part)
            if not match:
                raise ProbeConfigError(field_name, spec, allowed)
            low, high, step = int(match.group(1)), int(match.group(2) or match.group(1)), int(match.group(3) or 1)
            if high >= n_layers or low > high or step < 1:
                raise ProbeConfigError(field_name, spec, allowed)
            values += list(range(low, high + 1, step))
    else:
        try:
            values = [spec] if isinstance(spec, int) else list(spec)
        except TypeError:
            raise ProbeConfigError(field_name, spec, allowed) from None
    if not values or any(as_int(v) is None or not 0 <= v < n_layers for v in values):
        raise ProbeConfigError(field_name, spec, allowed)
    return sorted(set(values))


def describe_layers(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'; an even stride, [0, 2, 4, 6] -> '0-6:2' (what parse_layers reads back)."""
    ordered = sorted(layers)
    steps = {b - a for a, b in zip(ordered, ordered[1:])}
    if len(ordered) >= 3 and len(steps) == 1 and min(steps) > 1:
        return f"{ordered[0]}-{ordered[-1]}:{steps.pop()}"
    parts: list[list[int]] = []
    for layer in ordered:
        if parts and parts[-1][1] == layer - 1:
            parts[-1][1] = layer
        else:
            parts.append([layer, layer])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice that `name` most likely misspells (for "did you mean ...?" hints), or None."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None
