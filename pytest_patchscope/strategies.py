"""Hypothesis strategies that know the model: layers, positions, sites, units, prompts, probes.

    from hypothesis import given
    from pytest_patchscope import strategies as ps

    @given(probe=ps.probes(model, sources=["The capital of France is"], targets=ps.identity_prompts(), layers=(23, 29)))
    def test_identity(patchscope, probe): ...

Every strategy shrinks toward the simple case: the first layer in range, the last token, the
first (shortest) template and filler, the fewest demonstrations, strength 1, the identity map,
all units. An impossible request (an empty layer range, a template without a placeholder, more
units than the site has, an empty fact table) is a ProbeConfigError when the strategy is
defined, not a Hypothesis internals error when it is drawn.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from hypothesis import strategies as st

from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.model.sites import DEFAULT_SITE, SITES, check_site_name, locate_site
from pytest_patchscope.probes.probe import Probe, Substring
from pytest_patchscope.validation import as_int, check_layer

if TYPE_CHECKING:
    import torch

    from pytest_patchscope.model.loading import PatchscopeModel

def _model_of(model: Any) -> "PatchscopeModel":
    """A PatchscopeModel from a model, a Patchscope or the `patchscope` fixture."""
    return getattr(model, "model", model)


def layers(model: Any, min: int = 0, max: int | None = None) -> st.SearchStrategy[int]:  # noqa: A002 - the issue's names
    """Layers from `min` to `max` (inclusive; default the last), shrinking toward `min`."""
    n_layers = _model_of(model).n_layers
    top = n_layers - 1 if max is None else max
    for name, value in (("min", min), ("max", top)):
        check_layer(name, value, n_layers)
    if min > top:
        raise ProbeConfigError("max", top, f"a layer >= min ({min}): the range {min}..{top} is empty")
    return st.integers(min, top)


_layer_range = layers  # `probes` takes a `layers` argument of its own


def positions(prompt: str, model: Any) -> st.SearchStrategy[Any]:
    """Positions in `prompt`: token indices, or substrings that are whole tokens (resolving to the
    same index), shrinking toward the last token (-1, every probe's default)."""
    ids, offsets = _model_of(model).tokenize_with_offsets(prompt)
    if not ids:
        raise ProbeConfigError("prompt", prompt, "a prompt that tokenizes to at least one token")
    words = []
    for start, end in offsets:
        text = prompt[start:end].strip()
        if text and re.fullmatch(r"\w+", text) and prompt.count(text) == 1:
            words.append(Substring(text))
    return st.one_of(st.just(-1), st.integers(0, len(ids) - 1), *([st.sampled_from(words)] if words else []))


def sites(model: Any = None) -> st.SearchStrategy[str]:
    """Site names (those `model` has, when given), shrinking toward resid_post."""
    if model is None:
        return st.sampled_from(list(SITES))
    from pytest_patchscope.model.sites import available_sites

    return st.sampled_from(available_sites(_model_of(model)))


def units(model: Any, site: str = DEFAULT_SITE, max_size: int = 4) -> st.SearchStrategy[tuple[int, ...] | None]:
    """None (all units) or a sorted tuple of distinct unit indices of `site`, shrinking toward None."""
    check_site_name("site", site)
    n_units = locate_site(_model_of(model), site).n_units
    if as_int(max_size) is None or not 1 <= max_size <= n_units:
        raise ProbeConfigError("max_size", max_size, f"an int from 1 to {n_units} (site {site!r} has {n_units} {SITES[site].units_are})")
    subsets = st.lists(st.integers(0, n_units - 1), min_size=1, max_size=max_size, unique=True).map(lambda u: tuple(sorted(u)))
    return st.one_of(st.none(), subsets)


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def prompts_from_templates(templates: Sequence[str], fillers: Mapping[str, Sequence[str]]) -> st.SearchStrategy[str]:
    """Templates with "{name}" placeholders, filled from `fillers[name]`; shrinks toward the shortest
    template and the shortest fillers."""
    if isinstance(templates, str) or not templates:
        raise ProbeConfigError("templates", templates, 'a non-empty list of strings with "{name}" placeholders')
    for template in templates:
        names = _placeholders(template) if isinstance(template, str) else []
        if not names:
            raise ProbeConfigError("templates", template, 'a template with at least one "{name}" placeholder')
        missing = [n for n in names if not fillers.get(n)]
        if missing:
            raise ProbeConfigError("fillers", dict(fillers), f"a non-empty list of fillers for {missing} (used by {template!r})")
    ordered = sorted(templates, key=len)

    @st.composite
    def fill(draw: st.DrawFn) -> str:
        template = draw(st.sampled_from(ordered))
        values = {name: draw(st.sampled_from(sorted(fillers[name], key=len))) for name in dict.fromkeys(_placeholders(template))}
        return template.format(**values)

    return fill()


DEMONSTRATIONS = ("cat", "1135", "hello", "dog", "apple", "x7", "blue", "train")
SEPARATORS = (" -> ", ": ", " = ", " => ")
JOINERS = ("\n", "; ", ", ")
QUERIES = ("?", "x", "#")


def identity_prompts(
    demonstrations: Sequence[str] = DEMONSTRATIONS, separators: Sequence[str] = SEPARATORS,
    joiners: Sequence[str] = JOINERS, placeholders: Sequence[str] = QUERIES, min_demos: int = 1, max_demos: int = 4,
) -> st.SearchStrategy[str]:
    """Few-shot token-identity targets ("cat -> cat\\nhello -> hello\\n?"), whose last token is the
    placeholder to patch; shrinks toward one demonstration with the first separator and joiner."""
    for name, values in (("demonstrations", demonstrations), ("separators", separators), ("joiners", joiners), ("placeholders", placeholders)):
        if isinstance(values, str) or not values or not all(isinstance(v, str) and v for v in values):
            raise ProbeConfigError(name, values, "a non-empty list of non-empty strings")
    if not 1 <= min_demos <= max_demos <= len(demonstrations):
        raise ProbeConfigError(
            "max_demos", max_demos, f"min_demos <= max_demos <= {len(demonstrations)} (the demonstrations given), min_demos >= 1"
        )

    @st.composite
    def build(draw: st.DrawFn) -> str:
        shown = draw(st.lists(st.sampled_from(list(demonstrations)), min_size=min_demos, max_size=max_demos, unique=True))
        separator, joiner = draw(st.sampled_from(list(separators))), draw(st.sampled_from(list(joiners)))
        query = draw(st.sampled_from(list(placeholders)))
        return joiner.join(f"{word}{separator}{word}" for word in shown) + joiner + query

    return build()


@dataclass(frozen=True)
class Fact:
    """One row of a fact table: `template` with "x" for the subject, and the answer it should give."""

    subject: str
    relation: str
    template: str
    answer: str


def load_facts(table: str | Path | Iterable[Mapping[str, str]]) -> list[Fact]:
    """Facts from a JSON file (a list of {subject, relation, template, answer}) or from such rows."""
    where = str(table) if isinstance(table, (str, Path)) else "the table"
    rows: Any = json.loads(Path(table).read_text()) if isinstance(table, (str, Path)) else list(table)
    if not isinstance(rows, list) or not rows:
        raise ProbeConfigError("table", where, "a non-empty list of {subject, relation, template, answer} rows")
    facts = []
    for k, row in enumerate(rows):
        fields = ("subject", "relation", "template", "answer")
        if not isinstance(row, Mapping) or not all(isinstance(row.get(f), str) and row.get(f) for f in fields):
            raise ProbeConfigError(f"table[{k}]", row, "a row with non-empty strings subject, relation, template and answer")
        if " x " not in f" {row['template']} ":
            raise ProbeConfigError(f"table[{k}].template", row["template"], 'a template with a standalone "x" for the subject')
        facts.append(Fact(row["subject"], row["relation"], row["template"], row["answer"]))
    return facts


def entity_facts(table: str | Path | Iterable[Mapping[str, str]], relation: str | None = None) -> st.SearchStrategy[Fact]:
    """Rows of a fact table (optionally of one relation), shrinking toward the first row."""
    facts = load_facts(table)
    if relation is not None:
        facts = [f for f in facts if f.relation == relation]
        if not facts:
            raise ProbeConfigError("relation", relation, "a relation that the table has")
    return st.sampled_from(facts)


@dataclass(frozen=True)
class Scale:
    """f(h) = factor * h: a patch of another strength, with a stable identity for baselines."""

    factor: float

    @property
    def name(self) -> str:
        return f"scale({self.factor:g})"

    def __call__(self, hidden: "torch.Tensor") -> "torch.Tensor":
        return hidden * self.factor


def mappings(min_scale: float = 0.5, max_scale: float = 1.5) -> st.SearchStrategy[Scale | None]:
    """The identity (None) or a `Scale`, shrinking toward the identity."""
    if not 0 < min_scale <= max_scale:
        raise ProbeConfigError("max_scale", max_scale, f"a scale >= min_scale ({min_scale}) > 0")
    return st.one_of(st.none(), st.floats(min_scale, max_scale).map(lambda f: Scale(round(f, 3))))


def strengths(min_strength: float = 0.8) -> st.SearchStrategy[float]:
    """1.0, or a strength from `min_strength` to 1, shrinking toward 1."""
    if not 0 <= min_strength <= 1:
        raise ProbeConfigError("min_strength", min_strength, "a strength from 0 to 1")
    return st.one_of(st.just(1.0), st.floats(min_strength, 1.0).map(lambda s: round(s, 3)))


def _strategy(value: Any) -> st.SearchStrategy[Any]:
    """A strategy as it is, a non-empty list as a choice among its values, anything else as a constant."""
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ProbeConfigError("probes", value, "a non-empty list of values, or a strategy")
        return st.sampled_from(list(value))
    return st.just(value)


def probes(
    model: Any = None, *, sources: Any, targets: Any, layers: Any = None, target_layers: Any = None,
    source_positions: Any = -1, target_positions: Any = -1, site: Any = DEFAULT_SITE, units: Any = None,
    mapping: Any = None, strength: Any = 1.0, max_new_tokens: int = 8,
) -> st.SearchStrategy[Probe]:
    """`Probe` values: each field a strategy, a list to choose from, or a constant.

    `layers` may be a (min, max) pair (inclusive) or None (all), checked against `model`; or a
    strategy or list, which needs no model. `target_layers=None` means l* = l.
    """
    if model is None and (layers is None or isinstance(layers, tuple)):
        raise ProbeConfigError("model", model, "a model (or Patchscope) when layers is None or a (min, max) pair")
    if isinstance(layers, tuple) and len(layers) == 2 and all(isinstance(v, int) for v in layers):
        layer_strategy = _layer_range(model, *layers)
    else:
        layer_strategy = _layer_range(model) if layers is None else _strategy(layers)
    parts = {
        "source": _strategy(sources), "target": _strategy(targets), "source_position": _strategy(source_positions),
        "target_position": _strategy(target_positions), "site": _strategy(site), "units": _strategy(units),
        "mapping": _strategy(mapping), "strength": _strategy(strength),
    }

    @st.composite
    def build(draw: st.DrawFn) -> Probe:
        layer = draw(layer_strategy)
        target_layer = None if target_layers is None else draw(_strategy(target_layers))
        values = {name: draw(part) for name, part in parts.items()}
        return Probe(layer=layer, target_layer=target_layer, max_new_tokens=max_new_tokens, **values)

    return build()
