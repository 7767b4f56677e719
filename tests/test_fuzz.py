"""A Hypothesis fuzz of the public API on the tiny models: generate, score, sweep, run and the settings.

Arguments come from wide strategies (huge and negative ints, NaN/inf/huge floats, bools, strings,
lone surrogates, numpy and torch arrays and scalars, empty lists, None, tuples, odd Placeholder/Substring
specs, lists of positions, every site and odd ones, units out of range or repeated, mappings that
return wrong shapes, dtypes, layouts or devices, or change their input in place, candidates that are empty, repeated or nothing but special tokens, and
sampling settings out of range). Allowed outcomes: a result, or a ProbeConfigError
whose field is one of the arguments given (its message starts with it). After every example no
hook is left and a fixed reference probe still gives exactly its original tokens. Deterministic
(derandomize=True, no example database); the outcome counts are printed for the README.
"""
from __future__ import annotations

import collections
import math
import warnings
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_patchscope import ENTITY_DESCRIPTION, LOGIT_LENS, TOKEN_IDENTITY, Placeholder, Probe, Substring, attribute_extraction
from pytest_patchscope.errors import PatchscopeWarning, ProbeConfigError
from pytest_patchscope.model.sites import SITES
from pytest_patchscope.scope import Patchscope

from conftest import active_hooks

pytestmark = pytest.mark.slow  # EXAMPLES examples per tiny model: not in make test-fast

EXAMPLES = 300
D_MODEL = 64  # the tiny models'


def _raises(h: torch.Tensor) -> torch.Tensor:
    raise ValueError("a broken map")


torch.manual_seed(0)
_LINEAR = torch.nn.Linear(D_MODEL, D_MODEL)

MAPPINGS: dict[str, Any] = {
    "none": None,
    "identity": lambda h: h,
    "double_in_place": lambda h: h.mul_(2),
    "negate": lambda h: -h,
    "zeros": torch.zeros_like,
    "linear_module": _LINEAR,
    "float16": lambda h: h.half(),
    "huge_but_finite": lambda h: h * 1e36,
    "inf_once_cast": lambda h: h.double() * 1e300,
    "nan": lambda h: h * math.nan,
    "inf": lambda h: h + math.inf,
    "too_short": lambda h: h[:10],
    "2d": lambda h: h.reshape(8, 8),
    "batched": lambda h: h[None],
    "scalar": lambda h: h.sum(),
    "complex": lambda h: h.to(torch.complex64),
    "sparse": lambda h: h.to_sparse(),
    "meta": lambda h: h.to("meta"),
    "int": lambda h: h.long(),
    "bool": lambda h: h > 0,
    "returns_none": lambda h: None,
    "returns_list": lambda h: h.tolist(),
    "returns_numpy": lambda h: h.numpy(),
    "raises": _raises,
    "not_callable_int": 42,
    "not_callable_str": "identity",
}

huge_ints = st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1, 10**19])
ints = st.one_of(st.integers(-3, 6), st.integers(), huge_ints)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1000.5, -1000.5, 3.5e38, 1e308, -1e308]),
)
surrogates = st.sampled_from(["\ud800", "Tokyo \udfff", "x \udbff\udc00 x"])
"""Lone surrogates (what json.loads('"\\ud800"') gives): no tokenizer can encode them."""
arrays = st.one_of(
    st.builds(np.arange, st.integers(0, 5)), st.builds(torch.arange, st.integers(0, 5)), st.just(torch.tensor(5)),
    st.just(np.int64(2)), st.just(np.array([0.5, 1.5])), st.just(np.array([True])), st.just(np.zeros((2, 2), dtype=int)),
)
"""numpy and torch values: integer ones count as the ints they hold, the others are refused like their lists."""
junk = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(-2, 5), max_size=3),
    st.tuples(st.integers(-2, 5)), st.just(b"x"), st.just({"a": 1}), st.just(object()), st.just([]), surrogates, arrays,
)
anything = st.one_of(ints, floats, junk)

PROMPTS = ["Tokyo", "The capital city of x is", "Short x", "cat -> cat\n?", "A much longer source prompt about Rome"]
PRESETS = [TOKEN_IDENTITY, ENTITY_DESCRIPTION, LOGIT_LENS, attribute_extraction()]
GOOD_MAPPINGS = ["none", "identity", "double_in_place", "negate", "zeros", "linear_module", "float16", "huge_but_finite"]
words = st.sampled_from(["capital", "Toky", "Tokyo", "x", "", "city of", "q", "cit"])
some_layers = st.one_of(
    st.integers(0, 3), st.lists(st.integers(0, 3), min_size=1, max_size=3), st.builds(range, st.integers(1, 4)),
    st.builds(np.arange, st.integers(1, 4)),
)
bad_layers = st.one_of(
    st.lists(st.integers(-2, 5), max_size=4), st.builds(range, st.integers(-2, 3), st.integers(0, 10**30)), st.just("same"), anything
)
bad_budgets = st.one_of(st.integers(max_value=0), st.integers(min_value=255), st.sampled_from([1025, 10**7, 10**400]), floats, junk)

# (valid, invalid) values per argument. Valid budgets stay tiny (1..3) so that the fuzz is fast;
# "invalid" values are drawn wide and may happen to be valid (a float strength, an int position).
ARGUMENTS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "source": (
        st.one_of(st.sampled_from(PROMPTS), st.text(min_size=1, max_size=16)),
        st.one_of(st.sampled_from(["", "   ", "word " * 300]), surrogates, anything),
    ),
    "layer": (st.integers(0, 3), st.one_of(st.integers(-2, 5), ints, floats, junk)),
    "target_layer": (st.one_of(st.none(), st.integers(0, 3)), st.one_of(st.integers(-2, 5), ints, floats, junk)),
    "source_position": (
        st.sampled_from([-1, 0, 1, -2]),
        st.one_of(
            ints, st.just(Placeholder("x")), st.builds(Substring, st.sampled_from(["Tokyo", "capital", "city of"])),
            st.builds(Placeholder, st.one_of(words, anything), st.one_of(st.integers(-3, 3), anything)),
            st.builds(Substring, st.one_of(words, anything), st.one_of(st.sampled_from(["last", "first", "middle"]), anything),
                      st.one_of(st.integers(-3, 3), anything)),
            st.tuples(st.integers(-3, 30), st.integers(-3, 30)),
            words, floats, junk,
        ),
    ),
    "mapping": (st.sampled_from(GOOD_MAPPINGS), st.sampled_from(sorted(set(MAPPINGS) - set(GOOD_MAPPINGS)))),
    "strength": (st.one_of(st.floats(-2, 2), st.sampled_from([0, 1, Fraction(1, 2), 999.9, -1000])), st.one_of(floats, ints, junk)),
    "max_new_tokens": (st.one_of(st.none(), st.integers(1, 3)), bad_budgets),
    "stop": (
        st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        st.one_of(st.lists(st.text(max_size=3), max_size=3), anything),
    ),
    "layers": (st.one_of(st.none(), some_layers), bad_layers),
    "target_layers": (st.one_of(st.none(), st.just("same"), some_layers), bad_layers),
    "expect": (st.one_of(st.none(), st.sampled_from(["Tokyo", "paris"]), st.text(min_size=1, max_size=5)), anything),
    "clean": (st.booleans(), anything),
    "site": (st.sampled_from(list(SITES)), st.one_of(st.sampled_from(["mlp", "attn", "RESID_POST", ""]), anything)),
    "units": (
        st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True), st.builds(torch.arange, st.integers(1, 4))),
        st.one_of(st.lists(st.integers(-2, 200), max_size=4), st.just("each"), anything),
    ),
}
CANDIDATES = ["Paris", "London", "Rome", "New York City", "x is"]
ARGUMENTS |= {
    "candidates": (
        st.lists(st.sampled_from(CANDIDATES), min_size=1, max_size=3, unique=True),
        st.one_of(
            st.just([]), st.just(["Paris", "Paris"]), st.just(["Paris", " Paris"]), st.just(["<|endoftext|>"]),
            st.lists(st.one_of(st.text(max_size=3), anything), max_size=3), anything,
        ),
    ),
    "do_sample": (st.booleans(), anything),
    "temperature": (st.floats(0.1, 3), st.one_of(st.sampled_from([0, -1.0, 0.0]), floats, ints, junk)),
    "top_p": (st.floats(0.05, 1), st.one_of(st.sampled_from([0, 1.5, -0.1]), floats, ints, junk)),
    "top_k": (st.one_of(st.none(), st.integers(1, 100)), st.one_of(st.integers(-3, 0), floats, junk)),
    "seed": (st.integers(0, 2**31), st.one_of(st.integers(max_value=-1), huge_ints, floats, junk)),
    "n_samples": (st.integers(1, 2), st.one_of(st.integers(-2, 0), st.sampled_from([1025, 10**9]), floats, junk)),
    "repetition_penalty": (st.floats(0.5, 2), st.one_of(st.sampled_from([0, -1.0]), floats, junk)),
    "no_repeat_ngram_size": (st.integers(0, 3), st.one_of(st.integers(max_value=-1), floats, junk)),
}
ARGUMENTS["target"] = (st.one_of(ARGUMENTS["source"][0], st.sampled_from(PRESETS)), ARGUMENTS["source"][1])
ARGUMENTS["source_position"] = (
    st.one_of(ARGUMENTS["source_position"][0], st.lists(st.sampled_from([0, -1, 1]), min_size=1, max_size=2)),
    ARGUMENTS["source_position"][1],
)
ARGUMENTS["target_position"] = ARGUMENTS["source_position"]
SETTINGS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "max_new_tokens": (st.integers(1, 3), st.one_of(st.none(), bad_budgets)),
    "max_new_tokens_limit": (st.integers(3, 10**6), st.one_of(st.integers(max_value=2), anything)),
    "batch_memory_mb": (
        st.one_of(st.sampled_from([1.5, 512, 10**6]), st.floats(2, 1e6)),
        st.one_of(st.sampled_from([0.1, 0.5, -1, 0]), floats, ints, junk),
    ),
    "progress": (st.one_of(st.none(), st.just(lambda done, total: None)), anything),
}
PROBE = ["target_layer", "source_position", "target_position", "mapping", "strength", "max_new_tokens", "stop", "site", "units"]
DECODING = ["do_sample", "temperature", "top_p", "top_k", "seed", "n_samples", "repetition_penalty", "no_repeat_ngram_size"]
SAMPLING_ONLY = {"temperature", "top_p", "top_k", "seed", "n_samples"}
OPTIONAL = {
    "generate": [*PROBE, "candidates", *DECODING],
    "run": [*PROBE, "candidates"],
    "score": [*PROBE, *DECODING],  # candidates are always given
    "sweep": ["layers", "target_layers", "expect", "clean", *PROBE[1:], "candidates", *DECODING],  # sweep() refuses target_layer
}


@st.composite
def examples(draw: st.DrawFn) -> tuple[dict[str, Any], str, dict[str, Any], str | None]:
    """(scope settings, call kind, call arguments, the one argument given a bad value or None).

    Every argument is drawn valid, then (two times in three) one of them gets a value drawn from
    its wide, mostly invalid strategy: each check is reached with everything else in order.
    """
    kind = draw(st.sampled_from(sorted(OPTIONAL)))
    setting = {name: draw(valid) for name, (valid, _) in SETTINGS.items() if draw(st.booleans())}
    kwargs = {"source": draw(ARGUMENTS["source"][0]), "target": draw(ARGUMENTS["target" if kind != "run" else "source"][0])}
    if kind != "sweep":
        kwargs["layer"] = draw(ARGUMENTS["layer"][0])
    if kind == "score":
        kwargs["candidates"] = draw(ARGUMENTS["candidates"][0])
    kwargs |= {name: draw(ARGUMENTS[name][0]) for name in OPTIONAL[kind] if draw(st.booleans())}
    if kwargs.get("do_sample") is not True:  # valid sampling settings come with do_sample=True
        kwargs = {name: value for name, value in kwargs.items() if name not in SAMPLING_ONLY}
    faults = [f"setting:{name}" for name in SETTINGS] + sorted(kwargs) + [name for name in OPTIONAL[kind] if name not in kwargs]
    fault = draw(st.one_of(st.none(), st.sampled_from(faults), st.sampled_from(faults)))
    if fault is not None and fault.startswith("setting:"):
        setting[fault[8:]] = draw(SETTINGS[fault[8:]][1])
    elif fault is not None:
        kwargs[fault] = draw(ARGUMENTS[fault][1])
    return setting, kind, kwargs, fault


ALIASES = {"layers": {"layer"}, "target_layers": {"target_layer"}}
"""sweep's layer lists are checked layer by layer, by the probes' own fields."""

REFERENCE = dict(layer=1, target_position=Placeholder("x"), max_new_tokens=2)


def _call(model: Any, setting: dict[str, Any], kind: str, kwargs: dict[str, Any]) -> Any:
    """Run the drawn call, with mapping names replaced by the mappings."""
    kwargs = dict(kwargs)
    if "mapping" in kwargs:
        kwargs["mapping"] = MAPPINGS[kwargs["mapping"]]
    scope = Patchscope(model, **{"max_new_tokens": 2, **setting})  # a small default budget, for speed
    if kind == "run":
        return scope.run([Probe(**kwargs)])
    if kind == "score":
        return scope.score(kwargs.pop("source"), kwargs.pop("target"), kwargs.pop("candidates"), **kwargs)
    return getattr(scope, kind)(kwargs.pop("source"), kwargs.pop("target"), **kwargs)


@pytest.fixture
def one_thread():
    """One torch thread: on 2 cores the tiny models' many small passes run fastest, and share the
    machine without the thread pool oversubscribing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_public_api_fails_only_with_named_project_errors(tiny_model, one_thread):
    reference_scope = Patchscope(tiny_model)
    reference = reference_scope.generate("Tokyo", "The capital city of x is", **REFERENCE)
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(example=examples())
    def fuzz(example: tuple[dict[str, Any], str, dict[str, Any], str | None]) -> None:
        setting, kind, kwargs, fault = example
        # every probe has a budget: the scope's default (2 here) when the call gives none
        given_names = {"probes", "max_new_tokens", *setting, *kwargs}
        given_names |= {alias for name in kwargs for alias in ALIASES.get(name, ())}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                _call(tiny_model, setting, kind, kwargs)
                outcome = "ok"
            except ProbeConfigError as error:
                argument = error.field.split(".")[0].split("[")[0]  # "source_position[1].text" names source_position
                assert argument in given_names, f"{error.field!r} names no argument given: {error}"
                assert str(error).startswith(f"{error.field}="), str(error)
                outcome = f"error:{argument}"
        outcomes[outcome] += 1
        outcomes["faulty"] += fault is not None
        outcomes["warned"] += any(issubclass(w.category, PatchscopeWarning) for w in caught)
        assert active_hooks(tiny_model) == []
        after = reference_scope.generate("Tokyo", "The capital city of x is", **REFERENCE)
        assert (after.tokens, after.clean_tokens) == (reference.tokens, reference.clean_tokens)

    fuzz()
    errors = {key[6:]: n for key, n in sorted(outcomes.items()) if key.startswith("error:")}
    examples_run = outcomes["ok"] + sum(errors.values())
    print(f"\nfuzz {tiny_model.name}: {examples_run} examples ({outcomes['faulty']} with one bad argument), "  # shown with -s
          f"{outcomes['ok']} ok, {sum(errors.values())} ProbeConfigError by field: "
          + ", ".join(f"{field} {n}" for field, n in errors.items())
          + f"; {outcomes['warned']} PatchscopeWarning")
    assert examples_run >= EXAMPLES and outcomes["ok"] > EXAMPLES // 4 and len(errors) >= 10
