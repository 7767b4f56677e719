"""Fact tables: ``*.patchscope.yaml`` files collected as tests, one item per probe, run as batched jobs.

    target: "The capital city of x is"
    target_position: {placeholder: x}
    layers: [0, 1, 2, 3, 4, 5]      # a sweep per probe; or layer: 3 for one probe
    min_hits: 1
    max_new_tokens: 8
    probes:
      - id: France
        source: France
        expect: Paris

Teams that gate checkpoints keep facts in tables, not Python. Every key outside ``probes`` is a
default that each probe may override. A probe with ``layers`` is the test

    profile = patchscope.sweep(source, target, layers=..., expect=..., ...)
    patchscope.record(profile)                    # the gate: baseline entry, keys like any sweep's
    assert_localized(profile, min_hits=min_hits)

and one with ``layer`` is ``result = patchscope.generate(...)`` (``score`` with ``candidates``)
checked by ``assert_patched_generation_contains(result, expect)`` and/or
``assert_patched_prefers(result, prefers, over=over, margin=margin)``: the same failure texts.

Speed is the point: at the first item of a model's table probes, every *selected* item that uses
that model (on an xdist worker: of the same file, so use ``--dist loadfile``) is planned and run in
one batched job (`Patchscope.run_plans`); each item then reports its own verdict. A deselected
probe (``-k``, ``--lf``, ...) is not run. A wrong key, type or value is a collection error naming
the file, line and key; a probe that is invalid for the model (a layer it lacks, a placeholder its
tokenizer splits) fails its own item with the probe's ProbeConfigError, and the others still run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

import pytest
import yaml

from pytest_patchscope.assertions import assert_localized, assert_patched_generation_contains, assert_patched_prefers
from pytest_patchscope.baseline.comparator import Tolerances
from pytest_patchscope.baseline.keys import project_root
from pytest_patchscope.errors import PatchscopeError, ProbeConfigError
from pytest_patchscope.model.sites import check_site_name
from pytest_patchscope.options import model_spec
from pytest_patchscope.plugin import _session
from pytest_patchscope.probes.decoding import Decoding, check_decoding
from pytest_patchscope.probes.options import DECODING_SHORTHANDS, decoding_of
from pytest_patchscope.probes.presets import PRESETS
from pytest_patchscope.probes.probe import TOKEN_CHOICES, Placeholder, Span, Substring
from pytest_patchscope.validation import check_int, closest, finite_real

if TYPE_CHECKING:
    from pytest_patchscope.baseline.profile import LocalizationProfile
    from pytest_patchscope.engine.results import PatchResult
    from pytest_patchscope.scope import Patchscope, ProbePlan

SUFFIXES = (".patchscope.yaml", ".patchscope.yml")
QUOTE_HINT = "Quote it: YAML reads unquoted numbers, yes/no, on/off and null as other types."


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> "FactTable | None":
    if file_path.name.endswith(SUFFIXES):
        return FactTable.from_parent(parent, path=file_path)
    return None


# ---- YAML with line numbers ---------------------------------------------------------------------
class _Marked(dict[str, Any]):
    """A YAML mapping that remembers its own line and each key's line (1-based)."""

    line = 0
    lines: dict[str, int]


class _MarkedList(list[Any]):
    """A YAML sequence that remembers each element's line."""

    lines: list[int]


class TableError(PatchscopeError):
    """A fact table that cannot be collected: its line (1-based) and what is wrong there."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that keeps line numbers and refuses a key given twice in one mapping."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Marked:
    own: dict[str, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line = key_node.start_mark.line + 1
        key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise TableError(line, f"the key {key_node.value!r} is not valid: keys are plain names")
        if key in own:
            raise TableError(line, f"the key {key!r} appears twice in this mapping (first on line {own[key]})")
        own[key] = line
    loader.flatten_mapping(node)  # `<<: *defaults` merges, overridden by the mapping's own keys
    marked = _Marked()
    marked.line, marked.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        marked[key] = loader.construct_object(value_node, deep=True)
        marked.lines[key] = key_node.start_mark.line + 1
    return marked


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _MarkedList:
    marked = _MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    marked.lines = [child.start_mark.line + 1 for child in node.value]
    return marked


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


# ---- the keys of a table, and their checks (everything that needs no model) -----------------------
def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProbeConfigError(key, value, "a non-empty string", None if isinstance(value, str) else QUOTE_HINT)
    return value


def _texts(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ProbeConfigError(key, value, "a non-empty list of non-empty strings", f"Write {key}: [...] even for one.")
    return tuple(_text(f"{key}[{n}]", v) for n, v in enumerate(value))


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProbeConfigError(key, value, "true or false")
    return value


def _number(key: str, value: Any) -> float:
    if finite_real(value) is None:
        raise ProbeConfigError(key, value, "a finite number")
    return float(value)


def _count(minimum: int) -> Callable[[str, Any], int]:
    return lambda key, value: check_int(key, value, minimum)


def _layers(word: str) -> Callable[[str, Any], Any]:
    """A layer or a list of layers, or `word` ("all" layers; "same" target layer as the source)."""

    def check(key: str, value: Any) -> Any:
        if value == word:
            return None if word == "all" else word
        if isinstance(value, list):
            if not value:
                raise ProbeConfigError(key, value, "a non-empty list of layers")
            return [check_int(f"{key}[{n}]", v, 0) for n, v in enumerate(value)]
        if isinstance(value, int) and not isinstance(value, bool):
            return [check_int(key, value, 0)]
        raise ProbeConfigError(key, value, f"a layer (an int >= 0), a list of layers, or {word!r}")

    return check


def _units(key: str, value: Any) -> Any:
    if value == "each":
        return value
    if not isinstance(value, list) or not value:
        raise ProbeConfigError(key, value, 'a non-empty list of unit indices, or "each" (one probe per head, site: heads)')
    return tuple(check_int(f"{key}[{n}]", v, 0) for n, v in enumerate(value))


def _choice(choices: dict[str, Any], what: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            guess = closest(value, choices) if isinstance(value, str) else None
            raise ProbeConfigError(key, value, f"{what}: one of {', '.join(choices)}", f"Did you mean {guess}?" if guess else None)
        return value

    return check


def _site(key: str, value: Any) -> str:
    check_site_name(key, value)
    return value


def _keys_of(key: str, value: Any, allowed: tuple[str, ...], what: str) -> _Marked:
    """`value` as a mapping whose keys are all in `allowed` (a misspelt one names the closest)."""
    if not isinstance(value, _Marked):
        raise ProbeConfigError(key, value, f"a mapping of {what}")
    for name in value:
        if name not in allowed:
            guess = closest(name, allowed)
            raise TableError(value.lines[name], str(ProbeConfigError(
                f"{key}.{name}", value[name], f"a key of {what}",
                f"Did you mean {guess}?" if guess else f"The keys are: {', '.join(allowed)}.",
            )))
    return value


def _inner(mapping: _Marked, key: str, check: Callable[[], Any]) -> Any:
    """`check()`, with a ProbeConfigError placed at the line of `key` inside `mapping`."""
    try:
        return check()
    except ProbeConfigError as exc:
        raise TableError(mapping.lines.get(key, mapping.line), str(exc)) from None


POSITION_KINDS = {"placeholder": ("occurrence",), "substring": ("token", "occurrence"), "span": ("token",)}
POSITION_ALLOWED = (
    "a token index (an int), a substring, {placeholder: x, occurrence: -1}, {substring: text, token: last, "
    "occurrence: 0}, {span: [start, end], token: last}, or a list of these"
)


def _position(key: str, value: Any) -> Any:
    if isinstance(value, list):
        if not value:
            raise ProbeConfigError(key, value, POSITION_ALLOWED)
        return [_one_position(f"{key}[{n}]", v) for n, v in enumerate(value)]
    return _one_position(key, value)


def _one_position(key: str, value: Any) -> Any:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value  # an int index, or a substring: resolved like Substring(text)
    if not isinstance(value, _Marked):
        raise ProbeConfigError(key, value, POSITION_ALLOWED)
    kinds = [kind for kind in POSITION_KINDS if kind in value]
    if len(kinds) != 1:
        raise ProbeConfigError(key, dict(value), f"{POSITION_ALLOWED}; a mapping names exactly one of placeholder, substring, span")
    kind = kinds[0]
    mapping = _keys_of(key, value, (kind, *POSITION_KINDS[kind]), f"a {kind} position")

    def token() -> str:
        choice = mapping.get("token", "last")
        if choice not in TOKEN_CHOICES:
            raise ProbeConfigError(f"{key}.token", choice, "last, first or all")
        return str(choice)

    def occurrence(default: int) -> int:
        number = mapping.get("occurrence", default)
        if isinstance(number, bool) or not isinstance(number, int):
            raise ProbeConfigError(f"{key}.occurrence", number, "an int (0 = first, -1 = last)")
        return number

    if kind == "span":
        def span() -> tuple[int, int]:
            pair = mapping["span"]
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
                raise ProbeConfigError(f"{key}.span", pair, "[start, end]: two int character offsets")
            return pair[0], pair[1]

        start, end = _inner(mapping, "span", span)
        return Span(start, end, _inner(mapping, "token", token))
    text = _inner(mapping, kind, lambda: _text(f"{key}.{kind}", mapping[kind]))
    if kind == "placeholder":
        return Placeholder(text, _inner(mapping, "occurrence", lambda: occurrence(-1)))
    return Substring(text, _inner(mapping, "token", token), _inner(mapping, "occurrence", lambda: occurrence(0)))


def _decoding(key: str, value: Any) -> Decoding:
    """A `decoding:` mapping of Decoding's fields (checked with the probe's flat settings, see `_fact`)."""
    return Decoding(**_keys_of(key, value, DECODING_SHORTHANDS, "decoding settings"))


def _tolerances(key: str, value: Any) -> dict[str, Any]:
    names = tuple(f.name for f in dataclasses.fields(Tolerances))
    mapping = _keys_of(key, value, names, "comparison tolerances")
    try:
        Tolerances().merged(**mapping)
    except ProbeConfigError as exc:  # its field is "Tolerances.<name>" or "<name>"
        raise TableError(mapping.lines.get(exc.field.rpartition(".")[2], mapping.line), str(exc)) from None
    return dict(mapping)


SETTINGS: dict[str, Callable[[str, Any], Any]] = {
    "source": _text,
    "target": _text,
    "preset": _choice(PRESETS, "a preset name"),
    "layer": _count(0),
    "target_layer": _count(0),
    "layers": _layers("all"),
    "target_layers": _layers("same"),
    "source_position": _position,
    "target_position": _position,
    "expect": _text,
    "min_hits": _count(1),
    "candidates": _texts,
    "prefers": _text,
    "over": _texts,
    "margin": _number,
    "max_new_tokens": _count(0),
    "stop": _texts,
    "site": _site,
    "units": _units,
    "mapping": _choice({"identity": None, "zero": None}, "a named mapping"),
    "strength": _number,
    "source_model": _text,
    "clean": _flag,
    "tolerances": _tolerances,
    "decoding": _decoding,
    **{name: (lambda key, value: value) for name in DECODING_SHORTHANDS},  # judged together by check_decoding
}
"""Every key a probe may have (and the file may default), with its model-free check."""
SWEEP_ONLY = ("layers", "target_layers", "min_hits", "clean", "tolerances")
SINGLE_ONLY = ("layer", "target_layer", "margin", "over")
FILE_KEYS = ("model", "probes")
PROBE_KEYS = ("id",)


# ---- one probe of a table, checked -----------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """One table probe: the call it stands for and what it asserts, with the line of every setting."""

    id: str
    line: int
    sweep: bool
    source: str
    target: str
    preset: str | None
    call: dict[str, Any]
    """Keywords of `Patchscope.plan_sweep` (a sweep) or `Patchscope.probe` (one probe), model-free."""
    expect: str | None = None
    candidates: tuple[str, ...] = ()
    prefers: str | None = None
    over: tuple[str, ...] | None = None
    margin: float = 0.0
    min_hits: int = 1
    tolerances: dict[str, Any] = field(default_factory=dict)
    source_model: str | None = None
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, error: ProbeConfigError) -> int:
        """The line of the setting a ProbeConfigError is about ("target_position[1].token": target_position)."""
        name = error.field.split(".")[0].split("[")[0]
        if name in DECODING_SHORTHANDS and name not in self.lines:
            name = "decoding"
        return self.lines.get(name, self.line)

    def plan(self, scope: "Patchscope", source_model: Any) -> "ProbePlan":
        """The probes this fact runs on `scope`'s model, checked by the same code as sweep/generate."""
        from pytest_patchscope.scope import ProbePlan

        call = dict(self.call)
        if source_model is not None:
            call["source_model"] = source_model
        if call.get("mapping") is not None:
            from pytest_patchscope.probes.mappings import ZERO

            call["mapping"] = {"zero": ZERO, "identity": None}[call["mapping"]]
        target: Any = PRESETS[self.preset] if self.preset is not None else self.target
        if self.sweep:
            return scope.plan_sweep(self.source, target, **call)
        return ProbePlan((scope.probe(self.source, target, **call),))

    def check(self, item: pytest.Item, outcome: "LocalizationProfile | PatchResult") -> None:
        """Record a sweep in the gate and assert, exactly as the equivalent test function would."""
        __tracebackhide__ = True
        from pytest_patchscope.baseline.profile import LocalizationProfile

        if isinstance(outcome, LocalizationProfile):
            from pytest_patchscope.gate import gate_of

            gate_of(item.config).record(item, outcome, None, dict(self.tolerances))
            assert_localized(outcome, min_hits=self.min_hits)
            return
        if self.expect is not None:
            assert_patched_generation_contains(outcome, self.expect)
        if self.prefers is not None:
            assert_patched_prefers(outcome, self.prefers, over=self.over, margin=self.margin)


Setting = tuple[Any, int]
"""A checked value and the line it was written on."""


def _checked(mapping: _Marked, allowed: tuple[str, ...], what: str, skip: tuple[str, ...] = ()) -> dict[str, Setting]:
    """The mapping's settings (but `skip`), each checked by its key's rule; an unknown key names the closest."""
    settings: dict[str, Setting] = {}
    for key, value in mapping.items():
        if key in skip:
            continue
        line = mapping.lines[key]
        if key not in allowed:
            guess = closest(key, allowed)
            hint = f"Did you mean {guess}?" if guess else f"The keys are: {', '.join(sorted(allowed))}."
            if key in FILE_KEYS:
                hint = f"{key} is a key of the file, not of a probe."
            elif key in PROBE_KEYS:
                hint = f"{key} is a key of each probe, not of the file."
            raise TableError(line, str(ProbeConfigError(key, value, f"a key of {what}", hint)))
        check = SETTINGS.get(key)
        try:
            settings[key] = (check(key, value) if check is not None else value, line)
        except ProbeConfigError as exc:
            raise TableError(line, str(exc)) from None
    return settings


OVERRIDES = {"layer": ("layers",), "layers": ("layer",), "target": ("preset",), "preset": ("target",)}
"""A probe's own key that replaces a file default of another name (one probe instead of a sweep)."""


def _fact(defaults: dict[str, Setting], raw: _Marked) -> Fact:
    """One probe: the file's defaults that fit it, overridden by its own keys, checked together."""
    own = _checked(raw, (*SETTINGS, *PROBE_KEYS), "a fact-table probe")
    if "id" not in own:
        raise TableError(raw.line, "this probe has no id: give each probe a unique `id: ...` (its test name)")
    fact_id = _inner(raw, "id", lambda: _text("id", raw["id"]))
    if "::" in fact_id or "\n" in fact_id or fact_id != fact_id.strip():
        raise TableError(raw.lines["id"], str(ProbeConfigError("id", fact_id, "a name without '::', line breaks or edge spaces")))
    merged = dict(defaults)
    for key in own:
        for replaced in OVERRIDES.get(key, ()):
            merged.pop(replaced, None)
    sweep = "layers" in own or ("layer" not in own and "layers" in merged)

    def fail(key: str | None, message: str) -> TableError:
        line = own[key][1] if key in own else merged[key][1] if key in merged else raw.line
        return TableError(line, f"probe {fact_id!r}: {message}")

    if "layer" in own and "layers" in own:
        raise fail("layers", "give layers (a sweep) or layer (one probe), not both")
    for key in SINGLE_ONLY if sweep else SWEEP_ONLY:
        if key in own:
            kind = "a sweep (layers: ...)" if sweep else "one probe (layer: ...)"
            raise fail(key, f"{key} does not apply to {kind}")
        merged.pop(key, None)  # a file default that fits only the other kind of probe
    merged.update(own)
    merged.pop("id")
    if "layer" not in merged and "layers" not in merged:
        raise fail(None, "it needs layers: [...] (a sweep, one probe per layer) or layer: N (one probe)")
    if "target" in merged and "preset" in merged:
        raise fail("preset", "give a target prompt or a preset, not both")
    if "source" not in merged:
        raise fail(None, "it needs a source prompt (source: ...)")
    if "target" not in merged and "preset" not in merged:
        raise fail(None, "it needs a target prompt (target: ...) or a preset (preset: token_identity, ...)")
    value = {key: setting[0] for key, setting in merged.items()}
    candidates = value.pop("candidates", ())
    prefers = value.pop("prefers", None)
    if prefers is not None and not candidates:
        raise fail("prefers", "prefers names one of the candidates: give candidates: [...] too")
    if candidates:
        prefers = candidates[0] if prefers is None else prefers
        if prefers not in candidates:
            raise fail("prefers", f"prefers={prefers!r} is not one of the candidates {list(candidates)}")
    if "over" in value and not candidates:
        raise fail("over", "over lists candidates to prefer over: give candidates: [...] too")
    if sweep and candidates and "expect" in value:
        raise fail("expect", "a sweep with candidates hits where `prefers` (default: the first candidate) wins; drop expect")
    if "expect" not in value and not candidates:
        raise fail(None, "it asserts nothing: give expect: <answer>, or candidates: [...] (with prefers)")
    flat = {name: value.pop(name) for name in DECODING_SHORTHANDS if name in value}
    given = value.pop("decoding", None)
    try:
        decoding = check_decoding(decoding_of({**flat, **({} if given is None else {"decoding": given})}))  # type: ignore[typeddict-item]
    except ProbeConfigError as exc:
        name = exc.field if exc.field in merged else "decoding"
        raise fail(name, str(exc)) from None
    lines = {key: setting[1] for key, setting in merged.items()}
    expect = value.pop("expect", None)
    common = dict(
        id=fact_id, line=raw.line, sweep=sweep, source=value.pop("source"), target=value.pop("target", ""),
        preset=value.pop("preset", None), candidates=candidates, prefers=prefers, over=value.pop("over", None),
        margin=value.pop("margin", 0.0), min_hits=value.pop("min_hits", 1), tolerances=value.pop("tolerances", {}),
        source_model=value.pop("source_model", None), lines=lines,
    )
    call = dict(value, decoding=decoding)
    if candidates:
        call["candidates"] = list(candidates)
    if sweep:
        call["expect"] = prefers if candidates else expect
    elif candidates and expect is None and "max_new_tokens" not in call:
        call["max_new_tokens"] = 0  # like Patchscope.score: score only
    return Fact(expect=None if sweep else expect, call=call, **common)


def load_table(text: str) -> tuple[str | None, list[Fact]]:
    """A table's model (None: the session's) and its facts; `TableError` (or PyYAML's error) on the first error."""
    return _parse(yaml.load(text, Loader=_Loader))


def _parse(document: Any) -> tuple[str | None, list[Fact]]:
    if not isinstance(document, _Marked):
        raise TableError(1, "a fact table is a mapping: defaults (target: ..., layers: ...) and probes: [...]")
    defaults = _checked(document, tuple(SETTINGS), "a fact table", skip=FILE_KEYS)
    for one, other in (("layer", "layers"), ("target", "preset")):
        if one in defaults and other in defaults:
            raise TableError(defaults[other][1], f"the file gives both {one} and {other} as defaults: give one (a probe may override it)")
    model = None
    if "model" in document:
        model = _inner(document, "model", lambda: _text("model", document["model"]))
    probes = document.get("probes")
    if not isinstance(probes, _MarkedList) or not probes:
        line = document.lines.get("probes", document.line)
        raise TableError(line, "probes: is a non-empty list of probes (each a mapping with an id)")
    facts: list[Fact] = []
    seen: dict[str, int] = {}
    for raw, line in zip(probes, probes.lines):
        if not isinstance(raw, _Marked):
            raise TableError(line, f"a probe is a mapping (id: ..., source: ..., ...), not {type(raw).__name__} {raw!r}")
        fact = _fact(defaults, raw)
        if fact.id in seen:
            raise TableError(raw.lines["id"], f"the id {fact.id!r} is used twice (first on line {seen[fact.id]}): ids name the tests")
        seen[fact.id] = raw.lines["id"]
        facts.append(fact)
    return model, facts


# ---- collection -----------------------------------------------------------------------------------
class FactTable(pytest.File):
    """A ``*.patchscope.yaml`` file: one FactItem per probe, or a collection error naming the file and line."""

    def collect(self) -> Iterator["FactItem"]:
        where = self.nodeid or self.path.name
        try:
            model, facts = load_table(self.path.read_text(encoding="utf-8"))
        except TableError as exc:
            raise self.CollectError(f"{where}:{exc.line}: {exc.message}") from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            raise self.CollectError(f"{where}:{line}: not valid YAML: {exc.problem or exc}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise self.CollectError(f"{where}: not a readable YAML file: {exc}") from None
        if model is not None:  # resolved like the marker: 'default', a hub id, or a path from the project root
            self.add_marker(pytest.mark.patchscope_model(model))
        root = project_root(self.path.parent) or self.config.rootpath
        for fact in facts:
            if fact.source_model is not None:
                fact = dataclasses.replace(fact, source_model=model_spec(fact.source_model, root))
            yield FactItem.from_parent(self, name=fact.id, fact=fact)


class FactItem(pytest.Item):
    """One probe of a fact table. Its outcome comes from the batched job of its model's items."""

    def __init__(self, *, fact: Fact, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fact = fact

    def runtest(self) -> None:
        __tracebackhide__ = True
        outcome = runner_of(self.config).outcome(self)
        if isinstance(outcome, BaseException):
            raise outcome
        self.fact.check(self, outcome)

    def located(self, error: ProbeConfigError) -> ProbeConfigError:
        """`error` with the file, line and probe it comes from in front of its field."""
        where = f"{self.parent.nodeid if self.parent else self.path.name}:{self.fact.line_of(error)}: probe {self.name!r}: "
        return ProbeConfigError(where + error.field, error.value, error.allowed, error.hint)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        """An assertion's or a probe error's message as it is: it names the probe and what failed."""
        if isinstance(excinfo.value, (AssertionError, PatchscopeError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Union[os.PathLike[str], str], int | None, str]:
        return self.path, self.fact.line - 1, self.name


# ---- running: one batched job per model -------------------------------------------------------------
class FactRunner:
    """Runs table probes in batches and keeps each item's outcome until the item reports it."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.outcomes: dict[str, Any] = {}
        self.planned: set[str] = set()

    def outcome(self, item: FactItem) -> Any:
        """The item's profile, result or error; at the first item of a batch, the whole batch runs."""
        __tracebackhide__ = True
        if item.nodeid not in self.outcomes:  # the first of its batch (or a rerun): run it with the others not yet run
            self._run_batch(item)
        return self.outcomes.pop(item.nodeid)

    def _run_batch(self, first: FactItem) -> None:
        """Run every selected, not yet run item that uses `first`'s model (on an xdist worker: of its file)."""
        __tracebackhide__ = True
        from pytest_patchscope.baseline.profile import LocalizationProfile
        from pytest_patchscope.gate import gate_of

        session = _session(self.config)
        spec = session.spec_for(first)
        worker = hasattr(self.config, "workerinput")  # another worker may run this model's other files
        group = [first] + [
            item for item in first.session.items
            if isinstance(item, FactItem) and item is not first and item.nodeid not in self.planned
            and (not worker or item.parent is first.parent) and session.spec_for(item) == spec
        ]
        scope = session.scope(spec)  # a model that does not load fails this item, and the next ones at once
        self.planned.update(item.nodeid for item in group)
        outcomes = _run_facts(scope, group, session)
        gate = gate_of(self.config)
        if gate.compare_spec is not None:  # each sweep also runs on the reference model, batched too
            swept = [item for item in group if isinstance(outcomes[item.nodeid], LocalizationProfile)]
            reference = _run_facts(session.scope(gate.compare_spec), swept, session)
            for item in swept:
                if isinstance(reference[item.nodeid], LocalizationProfile):
                    gate.remember_reference(outcomes[item.nodeid], reference[item.nodeid])
                else:
                    outcomes[item.nodeid] = reference[item.nodeid]
        self.outcomes.update(outcomes)


def _run_facts(scope: "Patchscope", items: list[FactItem], session: Any) -> dict[str, Any]:
    """Each item's outcome on `scope`'s model: its ProbeConfigError, or its profile/result from one job."""
    from pytest_patchscope.engine.resolve import resolve_probe

    outcomes: dict[str, Any] = {}
    plans, planned = [], []
    for item in items:
        try:
            source_model = None if item.fact.source_model is None else session.scope(item.fact.source_model).model
            plan = item.fact.plan(scope, source_model)
            for probe in plan.probes:  # the job checks these too, but one bad probe would stop all of it
                resolve_probe(probe, scope.model, max_new_tokens_limit=scope.engine.max_new_tokens_limit)
        except ProbeConfigError as exc:
            outcomes[item.nodeid] = item.located(exc)
            continue
        plans.append(plan)
        planned.append(item)
    try:
        ran = scope.run_plans(plans)
    except Exception as exc:  # noqa: BLE001 - every item of the job reports what stopped it
        return {**outcomes, **{item.nodeid: exc for item in planned}}
    for item, plan, results in zip(planned, plans, ran):
        outcomes[item.nodeid] = scope.plan_profile(plan, results) if item.fact.sweep else results[0]
    return outcomes


RUNNER_KEY = pytest.StashKey[FactRunner]()


def runner_of(config: pytest.Config) -> FactRunner:
    return config.stash[RUNNER_KEY]


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RUNNER_KEY] = FactRunner(config)
