"""A worked CI gate: knowledge-localization profiles compared with a committed baseline.

Each test sweeps one fact over the layers where SmolLM2-135M-Instruct decodes it and records the
LocalizationProfile. With --patchscope-baseline=example_suites/ci_gate/baseline.json the recorded
profiles are compared with the release's; a checkpoint that lost a fact (try
damage_checkpoint.py) fails exactly those tests, naming the layers that were lost. The candidate
sweeps gate on scores instead of text: the capital's margin over the other candidates per layer.
"""
import pytest

from pytest_patchscope import TOKEN_IDENTITY, attribute_extraction

CAPITAL_CITY = attribute_extraction("The capital city of x is")
COUNTRIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin")]


@pytest.mark.parametrize("country,capital", COUNTRIES)
def test_capital_by_attribute_extraction(patchscope, country, capital):
    profile = patchscope.sweep(f"Country: {country}", CAPITAL_CITY, layers=range(0, 12), expect=capital, max_new_tokens=5)
    patchscope.record(profile)


@pytest.mark.parametrize("country,capital", COUNTRIES)
def test_capital_by_token_identity(patchscope, country, capital):
    profile = patchscope.sweep(f"The capital of {country} is", TOKEN_IDENTITY, layers=range(18, 30), expect=capital, max_new_tokens=5)
    patchscope.record(profile)


@pytest.mark.parametrize("source,answer", [("The largest planet in the solar system is", "Jupiter"), ("The Eiffel Tower is in", "Paris")])
def test_other_facts(patchscope, source, answer):
    profile = patchscope.sweep(source, TOKEN_IDENTITY, layers=range(18, 30), expect=answer, max_new_tokens=5)
    patchscope.record(profile)


CANDIDATES = {"France": ["Paris", "London", "Rome", "Berlin"], "Japan": ["Tokyo", "Beijing", "Seoul", "Paris"]}


@pytest.mark.parametrize("country", sorted(CANDIDATES))
def test_capital_by_candidate_scores(patchscope, country):
    profile = patchscope.sweep(f"Country: {country}", CAPITAL_CITY, layers=range(0, 12), candidates=CANDIDATES[country], max_new_tokens=0)
    patchscope.record(profile)
