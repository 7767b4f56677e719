"""Negative controls: unrelated sources must not decode the fact.

A probe is only evidence if it can fail. The same targets and layers that decode " Paris" from
France must not produce it from a sentence about the weather, from "Country: banana", or from
another country.
"""
import pytest

from pytest_patchscope import TOKEN_IDENTITY, assert_patched_generation_not_contains, attribute_extraction

CAPITAL_CITY = attribute_extraction("The capital city of x is")


@pytest.mark.parametrize("layer", [23, 26, 29])
def test_weather_does_not_decode_paris(patchscope, layer):
    assert_patched_generation_not_contains(patchscope.generate("The weather today is", TOKEN_IDENTITY, layer=layer), "Paris")


@pytest.mark.parametrize("source", ["Country: banana", "The weather today is", "I visited the store"])
def test_unrelated_sources_name_no_capital(patchscope, source):
    profile = patchscope.sweep(source, CAPITAL_CITY, layers=range(0, 11, 2), max_new_tokens=6)
    for cell in profile.cells:
        for capital in ("Paris", "Tokyo", "Rome", "Berlin", "Madrid"):
            assert capital not in cell.text, (cell.layer, cell.text)


def test_another_country_does_not_decode_paris(patchscope):
    profile = patchscope.sweep("Country: Japan", CAPITAL_CITY, layers=range(0, 11), expect="Paris", max_new_tokens=5)
    assert profile.hit_layers == []
