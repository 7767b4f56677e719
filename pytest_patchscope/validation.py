"""The one home of argument checks: plain values in, a checked value or a ProbeConfigError out.

Every module that checks a user's argument (probes, decoding settings, CLI options, strategies,
the evaluation) calls these, so a value is judged by one rule and described in one voice: the
field, the value, what is allowed, and what to do next. Nothing here imports torch.
"""
from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable

from pytest_patchscope.errors import ProbeConfigError

NEGATIVE_LAYER_HINT = "Negative layers are not accepted; use model.n_layers - 1 for the last layer."


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


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice that `name` most likely misspells (for "did you mean ...?" hints), or None."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None
