"""Robustness with Hypothesis: the capital survives any lead-in, early layer and near-full strength.

Hypothesis draws the wording of the source prompt, the layer and the patch strength; the fact
must hold for all of them. The session-scoped `patchscope` fixture works inside @given.
"""
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_patchscope import assert_patched_generation_contains, attribute_extraction

CAPITAL_CITY = attribute_extraction("The capital city of x is")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    lead_in=st.sampled_from(["Country: ", "I visited "]),
    layer=st.integers(0, 8),
    strength=st.floats(0.9, 1.0),
)
def test_capital_is_robust(patchscope, lead_in, layer, strength):
    result = patchscope.generate(lead_in + "France", CAPITAL_CITY, layer=layer, strength=strength, max_new_tokens=5)
    assert_patched_generation_contains(result, "Paris")
