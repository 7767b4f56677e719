"""The keywords that every probe-building call takes, defined once.

`Patchscope.probe`, `generate`, `score` and `sweep` (and the `patchscope` fixture's methods, which
share their signatures) take their own few arguments plus `**options: Unpack[PatchOptions]`, so a
type checker and an editor see every keyword, and `keywords_checked` turns a misspelt one into a
ProbeConfigError that names the closest real keyword instead of Python's bare TypeError.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypedDict, TypeVar

from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.probes.decoding import GREEDY, Decoding
from pytest_patchscope.validation import closest, plain

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    from pytest_patchscope.probes.probe import Mapping, Positions

    P = ParamSpec("P")
R = TypeVar("R")


class PatchOptions(TypedDict, total=False):
    """Keywords of every probe-building call besides its own layer, budget, units and candidates.

    `decoding=Decoding(...)` says how the continuation is decoded (greedy by default). The eight
    decoding fields may also be given flat, as shorthands (`do_sample=True, temperature=0.8`),
    but not together with `decoding=`.
    """

    source_position: Positions
    target_position: Positions | None
    mapping: Mapping | None
    strength: float
    stop: Sequence[str] | None
    site: str
    source_model: Any
    decoding: Decoding | None
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int | None
    seed: int
    n_samples: int
    repetition_penalty: float
    no_repeat_ngram_size: int


DECODING_SHORTHANDS = tuple(f.name for f in fields(Decoding))
"""The flat keywords that fill in a `Decoding` (its field names)."""


def decoding_of(options: PatchOptions) -> Decoding:
    """The probe's Decoding: `decoding=` as given, or one built from the flat shorthands."""
    given: dict[str, Any] = {name: options[name] for name in DECODING_SHORTHANDS if name in options}  # type: ignore[literal-required]
    decoding = options.get("decoding")
    if decoding is None:
        return Decoding(**given) if given else GREEDY
    if given:
        name = next(iter(given))
        raise ProbeConfigError(
            name, given[name], "not given together with decoding=Decoding(...)",
            f"Put it in the Decoding: decoding=Decoding({name}={given[name]!r}, ...).",
        )
    return decoding


def keywords_checked(method: Callable[P, R]) -> Callable[P, R]:
    """`method` with its keywords checked before it runs: an unknown one (a misspelling) or a missing
    required one is a ProbeConfigError that names it and the closest real keyword. A numpy or torch
    value (units=np.argsort(...)[-5:], layers=torch.arange(4)) is passed on as the Python values it
    holds (`validation.plain`), so every check judges it like the list or int it stands for."""
    signature = inspect.signature(method)
    named = [p.name for p in signature.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_options = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    known = [n for n in named if n != "self"] + (list(PatchOptions.__annotations__) if takes_options else [])
    where = f"{method.__name__}()"

    @functools.wraps(method)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        __tracebackhide__ = True
        for name, value in kwargs.items():
            if name not in known:
                guess = closest(name, known)
                raise ProbeConfigError(
                    name, value, f"not a keyword of {where}",
                    f"Did you mean {guess}={value!r}?" if guess else f"The keywords are: {', '.join(known)}.",
                )
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ProbeConfigError(where, "(the arguments given)", f"the arguments of {where}: {exc}") from None
        return method(*args, **{name: plain(value) for name, value in kwargs.items()})

    return checked
