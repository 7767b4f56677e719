"""Token-for-token agreement with an independent implementation, on the real default model.

The reference (tests/hf_reference.py) shares no code with the engine: an unbridged HF model,
plain forward hooks, the whole prompt in one pass and `model.generate`. The engine runs all
probes as one batch with shared prefixes, so this also checks batching on the real model.
"""
from __future__ import annotations

from pytest_patchscope import ENTITY_DESCRIPTION, TOKEN_IDENTITY, Placeholder, Substring, attribute_extraction

import hf_reference as ref

CAPITAL = "The capital of France is"


def test_engine_matches_plain_hf_hooks_over_layers_and_positions(default_scope, plain_hf):
    scope = default_scope
    n = scope.model.n_layers
    probes = [scope.probe(CAPITAL, TOKEN_IDENTITY, layer=l, max_new_tokens=10, stop=()) for l in (0, 9, 18, 27, n - 1)]
    probes += [
        scope.probe("France", attribute_extraction(), layer=l, target_layer=t, max_new_tokens=10, stop=())
        for l, t in ((0, 0), (1, 1), (1, 0), (5, 3))
    ]
    probes += [
        scope.probe(CAPITAL, TOKEN_IDENTITY, layer=3, source_position=Substring("France"), max_new_tokens=10, stop=()),
        scope.probe(CAPITAL, "Tell me about x. It is", layer=2, source_position=2, target_position=Placeholder("x"), max_new_tokens=10),
        scope.probe("Albert Einstein", ENTITY_DESCRIPTION, layer=4, max_new_tokens=10, stop=()),
    ]
    results = scope.run(probes)
    changed = 0
    for result in results:
        rp = result.resolved
        vector = ref.source_state(plain_hf, list(rp.source_ids), rp.source_index, rp.layer)
        eos = min(scope.model.eos_token_ids)
        expected = ref.patched_generate(plain_hf, list(rp.target_ids), rp.target_index, rp.target_layer, vector, 10, eos=eos)
        clean = ref.patched_generate(plain_hf, list(rp.target_ids), rp.target_index, rp.target_layer, None, 10, eos=eos)
        assert list(result.tokens) == expected, (rp.probe.describe(), result.text, scope.model.decode(expected))
        assert list(result.clean_tokens) == clean
        changed += result.tokens != result.clean_tokens
    assert changed >= len(results) - 2, "most probes should change the generation, else the check proves little"


def test_known_facts_of_the_default_model(default_scope):
    """The facts the README and example suites rely on, decoded by the engine."""
    paris = default_scope.generate(CAPITAL, TOKEN_IDENTITY, layer=27)
    assert "Paris" in paris.text and "Paris" not in paris.clean_text
    tokyo = default_scope.generate("Japan", attribute_extraction(), layer=0)
    assert "Tokyo" in tokyo.text and "Tokyo" not in tokyo.clean_text


def test_batched_sweep_rows_equal_each_probe_alone(default_scope):
    """The example suites' probes over several layers: one batched job == one probe at a time."""
    scope = default_scope
    capital_city = attribute_extraction()
    probes = [scope.probe(f"The capital of {c} is", TOKEN_IDENTITY, layer=l, max_new_tokens=6) for c in ("France", "Japan") for l in (20, 23, 27)]
    probes += [scope.probe(f"Country: {c}", capital_city, layer=l, max_new_tokens=6) for c in ("Italy", "Germany") for l in (0, 5, 10)]
    probes += [scope.probe("Albert Einstein", ENTITY_DESCRIPTION, layer=l, max_new_tokens=6) for l in (0, 4)]
    probes += [scope.probe("The weather today is", TOKEN_IDENTITY, layer=26, max_new_tokens=6)]
    batched = scope.run(probes)
    for probe, result in zip(probes, batched):
        alone = scope.run([probe])[0]
        assert result.tokens == alone.tokens, probe.describe()
        assert result.clean_tokens == alone.clean_tokens
    profile = scope.sweep("The capital of France is", TOKEN_IDENTITY, layers=range(21, 25), expect="Paris", max_new_tokens=6)
    assert [c.text for c in profile.cells] == [
        scope.generate("The capital of France is", TOKEN_IDENTITY, layer=l, max_new_tokens=6).text for l in range(21, 25)
    ]
