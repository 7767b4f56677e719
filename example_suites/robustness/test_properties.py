"""Properties of the default model that Hypothesis tries to break, with the strategies of
`pytest_patchscope.strategies`. Every range below was measured before it was claimed:

- identity: "The capital of France is" decodes " Paris" in every few-shot identity format that
  `identity_prompts()` builds (4 separators x 3 joiners x 3 placeholders x 1-4 demonstrations,
  1512 probes) at every layer 23-29;
- paraphrases: bare "France" (and "Country: France") into five wordings of the capital relation
  gives " Paris" at layers 0 and 1;
- facts: every row of facts.json, with a "Country: " lead-in, at layers 0-3 (Japan's currency
  fails from layer 4 on);
- negative control: eight unrelated sources into four of those wordings never give " Paris" at
  layers 0-5. The fifth wording, "The capital of x is the city of", is no control: it gives
  " Paris" for "a red car" at layers 3-5.

The xfail property adds "x's capital city is", where the patch fails; Hypothesis finds it and
shrinks the example to it (docs/hypothesis.md shows the report).
"""
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_patchscope import Placeholder, assert_patched_generation_contains, assert_patched_generation_not_contains
from pytest_patchscope import strategies as ps

FACTS = Path(__file__).with_name("facts.json")
PARAPHRASES = [
    "The capital of x is",
    "The capital city of x is",
    "The capital city of x is called",
    "The largest city and capital of x is",
    "The capital of x is the city of",
]
CONTROL_WORDINGS = PARAPHRASES[:4]
UNRELATED = ["Japan", "banana", "Germany", "the weather", "Albert Einstein", "Country: Italy", "London", "a red car"]


@given(target=ps.identity_prompts(), layer=st.integers(23, 29))
def test_identity_decoding_holds_across_prompt_formats_at_late_layers(patchscope, target, layer):
    result = patchscope.generate("The capital of France is", target, layer=layer, max_new_tokens=4, stop=())
    assert_patched_generation_contains(result, "Paris")


@given(template=st.sampled_from(PARAPHRASES), source=st.sampled_from(["France", "Country: France"]), layer=st.integers(0, 1))
def test_attribute_extraction_holds_across_paraphrases_at_early_layers(patchscope, template, source, layer):
    result = patchscope.generate(source, template, layer=layer, target_position=Placeholder("x"), max_new_tokens=6)
    assert_patched_generation_contains(result, "Paris")


@given(fact=ps.entity_facts(FACTS), layer=st.integers(0, 3))
def test_every_fact_of_the_table_at_layers_0_to_3(patchscope, fact, layer):
    result = patchscope.generate(f"Country: {fact.subject}", fact.template, layer=layer, target_position=Placeholder("x"), max_new_tokens=6)
    assert_patched_generation_contains(result, fact.answer)


@given(source=st.sampled_from(UNRELATED), template=st.sampled_from(CONTROL_WORDINGS), layer=st.integers(0, 5))
def test_an_unrelated_source_never_gives_the_fact(patchscope, source, template, layer):
    result = patchscope.generate(source, template, layer=layer, target_position=Placeholder("x"), max_new_tokens=8)
    assert_patched_generation_not_contains(result, "Paris")


@pytest.mark.xfail(reason="'x's capital city is' does not read the patched France (measured: ' the capital of the state of')", strict=True)
@given(template=st.sampled_from([*PARAPHRASES, "x's capital city is"]), layer=st.integers(0, 1))
def test_any_wording_of_the_relation_works(patchscope, template, layer):
    result = patchscope.generate("France", template, layer=layer, target_position=Placeholder("x"), max_new_tokens=6)
    assert_patched_generation_contains(result, "Paris")


def decodes_paris(result):
    return "paris" in result.text.lower()


@given(batch=st.lists(ps.probes(sources=["The capital of France is"], targets=ps.identity_prompts(), layers=st.integers(23, 29),
                                max_new_tokens=4), min_size=1, max_size=8))
def test_identity_decoding_checked_in_batches(patchscope, batch):
    """The same property as the first, many drawn probes per example in one batched engine job."""
    patchscope.check_all(batch, decodes_paris)
