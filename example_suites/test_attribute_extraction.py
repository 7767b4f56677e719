"""Attribute extraction (paper §4.2): patch an entity into "The capital city of x is" at x.

A bare one-token country ("France", "Japan") works only at the first layers (0-1), because
position 0 carries a huge activation from layer 2 on. With a short lead-in ("Country: France",
source = its last token) the capital comes out at every layer from 0 to 10, and other relations
(official language, currency) work the same way at layers 0-5.
"""
import pytest

from pytest_patchscope import (
    Placeholder,
    assert_localized,
    assert_patched_generation_contains,
    attribute_extraction,
)

CAPITAL_CITY = attribute_extraction("The capital city of x is")


@pytest.mark.parametrize("country,capital,layer", [("France", "Paris", 0), ("France", "Paris", 1), ("Japan", "Tokyo", 0)])
def test_bare_country_at_the_first_layers(patchscope, country, capital, layer):
    result = patchscope.generate(country, CAPITAL_CITY, layer=layer)
    assert_patched_generation_contains(result, capital)


@pytest.mark.parametrize(
    "country,capital",
    [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid")],
)
def test_capital_is_decodable_across_early_layers(patchscope, country, capital):
    profile = patchscope.sweep(f"Country: {country}", CAPITAL_CITY, layers=range(0, 11), expect=capital, max_new_tokens=5)
    assert_localized(profile, layers=range(0, 11), min_hits=10)


def test_target_layer_can_differ_from_the_source_layer(patchscope):
    result = patchscope.generate("Country: Japan", CAPITAL_CITY, layer=8, target_layer=0)
    assert_patched_generation_contains(result, "Tokyo")


@pytest.mark.parametrize(
    "relation,country,answer",
    [
        ("The official language of x is", "Germany", "German"),
        ("The official language of x is", "Spain", "Spanish"),
        ("The currency of x is", "Japan", "yen"),
        ("The currency of x is", "France", "euro"),
    ],
)
def test_other_relations(patchscope, relation, country, answer):
    profile = patchscope.sweep(
        f"Country: {country}", attribute_extraction(relation), layers=range(0, 5), expect=answer, max_new_tokens=6
    )
    assert_localized(profile, layers=range(0, 5), min_hits=4)


def test_placeholder_position_is_explicit_too(patchscope):
    result = patchscope.generate(
        "Country: Italy", "The capital city of x is", layer=2, target_position=Placeholder("x"), max_new_tokens=6
    )
    assert_patched_generation_contains(result, "Rome")
