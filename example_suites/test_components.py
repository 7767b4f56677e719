"""Which component carries a fact: sites, units and ablation on the default model.

Each claim was probed before it was written (the numbers are the default model's, fp32, CPU):

- Attribute extraction of "France" into "The capital city of x is" works at layers 0-1 with the
  block output (resid_post). At layer 0 the MLP's output alone carries it (" Paris.", log p
  -1.36), and so do the MLP neurons that feed it; the attention output alone does not (log p -4.57).
- Germany's layer-0 MLP output gives " Berlin.", not Paris (negative control).
- "The capital of France is" continues " Paris" (log p -0.26). Zeroing every head of layer 23 at
  every token turns it into " New York City"; zeroing layer 23's head 4 alone keeps " Paris" but
  lowers its log-probability to -1.96. No single head, at any layer, removes Paris by itself.
"""
from pytest_patchscope import (
    ZERO,
    assert_patched_generation_contains,
    assert_patched_generation_not_contains,
    attribute_extraction,
)

CAPITAL_CITY = attribute_extraction("The capital city of x is")
FACT = "The capital of France is"


def test_the_layer_0_mlp_output_carries_the_capital(patchscope):
    result = patchscope.generate("France", CAPITAL_CITY, layer=0, site="mlp_out", max_new_tokens=6)
    assert_patched_generation_contains(result, "Paris")


def test_so_do_the_neurons_that_feed_it(patchscope):
    result = patchscope.generate("France", CAPITAL_CITY, layer=0, site="neurons", max_new_tokens=6)
    assert_patched_generation_contains(result, "Paris")


def test_the_layer_0_attention_output_alone_does_not(patchscope):
    profile = patchscope.sweep("France", CAPITAL_CITY, layers=[0, 1], site="attn_out", expect="Paris", max_new_tokens=6)
    assert not profile.hit_layers, profile.table()


def test_another_country_gives_its_own_capital_not_paris(patchscope):
    result = patchscope.generate("Germany", CAPITAL_CITY, layer=0, site="mlp_out", max_new_tokens=6)
    assert_patched_generation_contains(result, "Berlin")
    assert_patched_generation_not_contains(result, "Paris")


def _every_token(patchscope, prompt):
    return list(range(len(patchscope.model.tokenize(prompt))))


def test_knocking_out_layer_23s_attention_removes_the_fact(patchscope):
    result = patchscope.generate(FACT, FACT, layer=23, site="heads", mapping=ZERO,
                                 target_position=_every_token(patchscope, FACT), max_new_tokens=6)
    assert result.clean_text is not None and "Paris" in result.clean_text
    assert_patched_generation_not_contains(result, "Paris")
    assert_patched_generation_contains(result, "New York")


def test_no_single_head_carries_it_alone(patchscope):
    """One probe per (layer, head), each zeroing that head at every token: a (layer x head) profile."""
    profile = patchscope.sweep(FACT, FACT, site="heads", units="each", mapping=ZERO,
                               target_position=_every_token(patchscope, FACT), expect="Paris", max_new_tokens=4)
    assert profile.per_unit and len(profile.cells) == 30 * 9
    assert len(profile.hit_cells) == len(profile.cells), [(c.layer, c.unit, c.text) for c in profile.cells if not c.hit]
    weakest = min(profile.cells, key=lambda c: c.logprob)
    assert (weakest.layer, weakest.unit) == (23, 4) and weakest.logprob < -1.5, profile.table()
