"""pytest_patchscope.strategies: what they draw, what they shrink to, what they refuse at definition time."""
from __future__ import annotations

import pytest
from hypothesis import find, given, settings

from pytest_patchscope import Probe, ProbeConfigError, Substring
from pytest_patchscope import strategies as ps
from pytest_patchscope.engine.resolve import resolve_probe
from pytest_patchscope.hypothesis_profile import HYPOTHESIS_PROFILE
from pytest_patchscope.scope import Patchscope

pytest_plugins = ["pytester"]

FACTS = [
    {"subject": "France", "relation": "capital", "template": "The capital city of x is", "answer": "Paris"},
    {"subject": "Japan", "relation": "currency", "template": "The currency of x is", "answer": "yen"},
]


def minimal(strategy):
    return find(strategy, lambda _: True, settings=settings(database=None, max_examples=200))


def test_every_strategy_shrinks_to_the_simple_case(tiny_llama):
    assert minimal(ps.layers(tiny_llama, min=2)) == 2
    assert minimal(ps.positions("The capital of France is", tiny_llama)) == -1
    assert minimal(ps.sites(tiny_llama)) == "resid_post"
    assert minimal(ps.units(tiny_llama, "heads", max_size=2)) is None
    assert minimal(ps.prompts_from_templates(["The capital city of {c} is", "{c}:"], {"c": ["Japan", "Peru"]})) == "Peru:"
    assert minimal(ps.identity_prompts()) == "cat -> cat\n?"
    assert minimal(ps.entity_facts(FACTS)).subject == "France"
    assert minimal(ps.mappings()) is None
    assert minimal(ps.strengths()) == 1.0
    probe = minimal(ps.probes(tiny_llama, sources=["Tokyo", "Lima"], targets=ps.identity_prompts(), layers=(1, 3)))
    assert probe == Probe("Tokyo", "cat -> cat\n?", layer=1, max_new_tokens=8)


def test_what_they_draw_is_valid_for_the_model(tiny_llama):
    @settings(max_examples=60, database=None, derandomize=True)
    @given(
        position=ps.positions("The capital of France is", tiny_llama), site=ps.sites(tiny_llama),
        heads=ps.units(tiny_llama, "heads", max_size=3), mapping=ps.mappings(), layer=ps.layers(tiny_llama, 1, 2),
    )
    def check(position, site, heads, mapping, layer):
        probe = Probe("The capital of France is", "Short x", layer=layer, source_position=position, site="heads", units=heads, mapping=mapping)
        resolve_probe(probe, tiny_llama)
        assert 1 <= layer <= 2 and (heads is None or list(heads) == sorted(set(heads)))
        assert isinstance(position, (int, Substring))

    check()


def test_a_scaled_map_has_a_stable_identity_and_a_pastable_repr():
    scale = ps.Scale(1.25)
    assert Probe("a", "b", 0, mapping=scale).identity()["mapping"] == "scale(1.25)"
    assert eval(repr(scale), {"Scale": ps.Scale}) == scale


@pytest.mark.parametrize(
    ("build", "field", "says"),
    [
        (lambda m: ps.layers(m, min=3, max=1), "max", "is empty"),
        (lambda m: ps.layers(m, min=-1), "min", "from 0 to 3"),
        (lambda m: ps.units(m, "heads", max_size=5), "max_size", "from 1 to 4 (site 'heads' has 4 attention heads)"),
        (lambda m: ps.units(m, "lens"), "site", "one of"),
        (lambda m: ps.prompts_from_templates(["no placeholder"], {}), "templates", 'at least one "{name}" placeholder'),
        (lambda m: ps.prompts_from_templates(["{a} and {b}"], {"a": ["x"]}), "fillers", "for ['b']"),
        (lambda m: ps.prompts_from_templates([], {}), "templates", "non-empty list"),
        (lambda m: ps.entity_facts([]), "table", "non-empty list"),
        (lambda m: ps.entity_facts([{"subject": "France"}]), "table[0]", "subject, relation, template and answer"),
        (lambda m: ps.entity_facts(FACTS, relation="anthem"), "relation", "a relation that the table has"),
        (lambda m: ps.identity_prompts(min_demos=3, max_demos=2), "max_demos", "min_demos <= max_demos"),
        (lambda m: ps.identity_prompts(separators=[]), "separators", "non-empty list"),
        (lambda m: ps.mappings(2.0, 1.0), "max_scale", ">= min_scale"),
        (lambda m: ps.probes(sources=["a"], targets=["b"]), "model", "a model"),
    ],
)
def test_an_impossible_request_fails_when_the_strategy_is_defined(tiny_llama, build, field, says):
    with pytest.raises(ProbeConfigError) as info:
        build(tiny_llama)
    assert info.value.field == field and says in str(info.value), str(info.value)


def test_check_all_runs_drawn_probes_in_one_job_and_names_the_first_failure(tiny_llama):
    scope = Patchscope(tiny_llama)
    batch = [Probe("Tokyo", "Short x", layer=layer, max_new_tokens=3) for layer in range(4)]
    results = scope.check_all(batch, lambda r: len(r.tokens) <= 3)
    assert [r.probe for r in results] == batch

    def never(result):
        return False

    shown = r"4 of 4 probes fail the property; the first:\nnever\(result\) is False\n  probe: .*\n  patched: .*\n  clean: .*\n  as code:  Probe\(source='Tokyo'"
    with pytest.raises(AssertionError, match=shown):
        scope.check_all(batch, never)
    with pytest.raises(ProbeConfigError, match="predicate"):
        scope.check_all(batch, "yes")


def test_the_settings_profile_is_registered_through_hypothesis_entry_point():
    import importlib.metadata

    from hypothesis import settings as hypothesis_settings

    entry = [e for e in importlib.metadata.entry_points(group="hypothesis") if e.name == "patchscope"]
    assert entry and entry[0].value == "pytest_patchscope.hypothesis_profile:register_profile"
    profile = hypothesis_settings.get_profile(HYPOTHESIS_PROFILE)
    assert profile.deadline is None and profile.max_examples == 20


def test_a_model_test_under_given_with_the_profile(pytester, tiny_llama_dir):
    """The session-scoped fixture raises no health check; a test's own @settings wins over the profile."""
    pytester.makepyfile(
        """
        from hypothesis import given, settings, strategies as st

        SEEN = []

        @given(layer=st.integers(0, 3))
        def test_profile(patchscope, layer):
            SEEN.append(layer)
            assert patchscope.generate("Tokyo", "Short x", layer=layer, max_new_tokens=2).tokens

        @settings(max_examples=3)
        @given(layer=st.integers(0, 3))
        def test_own_settings_win(patchscope, layer):
            SEEN.append(layer)

        def test_counts():
            assert len(SEEN) <= 20 + 3, len(SEEN)
        """
    )
    result = pytester.runpytest_subprocess(
        f"--patchscope-model={tiny_llama_dir}", "--hypothesis-profile=patchscope", "-p", "no:cacheprovider", "-q"
    )
    result.assert_outcomes(passed=3)
    assert "FailedHealthCheck" not in result.stdout.str()
