"""Every supported decoder family, token for token against the plain-HF reference (tests/hf_reference.py).

Tiny random models (tests/families.py) with prompts longer than their sliding windows: single
probes, a batch of mixed probes, a layer sweep, an l x l* grid, every site, and candidate scores
with sampled and repetition-controlled decoding. The reference runs on an
independent copy of each model: HF's own masks, caches and `generate`, nothing of the engine.
Families the engine cannot run exactly must be refused at load time with a ModelLoadError.
benchmarks/coverage_table.py turns these results into README's coverage table.
"""
from __future__ import annotations

import copy

import pytest

from pytest_patchscope import Decoding, Probe
from pytest_patchscope.errors import ModelLoadError
from pytest_patchscope.model.backend import VERIFIED_FAMILIES
from pytest_patchscope.model.loading import from_hf
from pytest_patchscope.scope import Patchscope

import hf_reference as ref
from conftest import active_hooks, expected, expected_samples, expected_scores
from families import REFUSED, SUPPORTED, WINDOW

LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door"
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=SUPPORTED, ids=lambda f: f.name)
def family(request, tokenizer):
    """(engine scope, independent reference copy) of one family's tiny model."""
    hf = request.param.build()
    reference = copy.deepcopy(hf)
    scope = Patchscope(from_hf(hf, tokenizer, name=f"tiny-{request.param.name}"))
    scope.model.bridge_hooks_at_load = active_hooks(scope.model)  # some adapters (OPT) keep hooks of their own
    return scope, reference


def probes(n_layers: int) -> list[Probe]:
    last = n_layers - 1
    return [
        Probe(LONG, "Short x", layer=1, target_layer=0, max_new_tokens=NEW_TOKENS),
        Probe("Tokyo", LONG + " x", layer=0, target_layer=last, max_new_tokens=NEW_TOKENS),
        Probe(LONG, LONG, layer=last, target_layer=1, source_position=5, target_position=3, max_new_tokens=NEW_TOKENS),
        Probe("Paris", "cat -> cat\nhello -> hello\n?", layer=last, strength=0.5, max_new_tokens=NEW_TOKENS),
    ]


def test_prompts_are_longer_than_the_sliding_window(tokenizer):
    assert len(tokenizer(LONG)["input_ids"]) > 2 * WINDOW


def test_single_probes(family):
    scope, reference = family
    for probe in probes(scope.model.n_layers):
        result = scope.run([probe])[0]
        assert (list(result.tokens), list(result.clean_tokens)) == expected(reference, result), probe.describe()
    assert active_hooks(scope.model) == scope.model.bridge_hooks_at_load


def test_a_batch_of_mixed_probes(family):
    scope, reference = family
    results = scope.run(probes(scope.model.n_layers))
    for result in results:
        assert (list(result.tokens), list(result.clean_tokens)) == expected(reference, result), result.probe.describe()
    assert any(r.tokens != r.clean_tokens for r in results), "no probe changed the generation: the check proves little"


def test_a_layer_sweep(family):
    scope, reference = family
    profile = scope.sweep(LONG, "Short x", layers=range(scope.model.n_layers), max_new_tokens=NEW_TOKENS)
    for cell in profile.cells:
        rp = scope.run([scope.probe(LONG, "Short x", layer=cell.layer, max_new_tokens=NEW_TOKENS)])[0]
        assert cell.text == scope.model.decode(expected(reference, rp)[0]), cell.layer


def test_an_l_by_l_star_grid(family):
    scope, reference = family
    layers = range(scope.model.n_layers)
    target = LONG + " x"
    profile = scope.sweep("Tokyo", target, layers=layers, target_layers=layers, max_new_tokens=NEW_TOKENS)
    assert len(profile.cells) == len(layers) ** 2
    for cell in profile.cells:
        rp = scope.run([scope.probe("Tokyo", target, layer=cell.layer, target_layer=cell.target_layer, max_new_tokens=NEW_TOKENS)])[0]
        assert cell.text == scope.model.decode(expected(reference, rp)[0]), (cell.layer, cell.target_layer)


def site_probes(site: str, n_layers: int) -> list[Probe]:
    """l = l*, l > l* with units and strength < 1, pairwise several positions with l < l*, and an
    amplified patch on every target token (strength 30): the MLP outputs of some tiny random models
    (Gemma's scaled embeddings, a mixture of experts, BLOOM) are too small next to their residual
    stream to change the text otherwise, and a check whose patch changes nothing proves little."""
    last = n_layers - 1
    return [
        Probe(LONG, "Short x", layer=1, target_layer=1, site=site, max_new_tokens=NEW_TOKENS),
        Probe("Tokyo", "Short x", layer=1, target_layer=1, site=site, target_position=[0, 1], strength=30.0, max_new_tokens=NEW_TOKENS),
        Probe("Tokyo", LONG + " x", layer=last, target_layer=0, site=site, strength=0.5, units=(0, 1), max_new_tokens=NEW_TOKENS),
        Probe(LONG, LONG, layer=0, target_layer=last, site=site, source_position=[3, 4], target_position=[5, 6], max_new_tokens=NEW_TOKENS),
    ]


def test_every_site(family):
    """Each site the family has (attention and MLP outputs, neurons, heads, the residual before and
    after the block), batched, against hooks on the submodules that tests/hf_reference.py names."""
    from pytest_patchscope.model.sites import available_sites

    scope, reference = family
    sites = available_sites(scope.model)
    assert set(sites) == {"resid_post", "resid_pre", *ref.SUBMODULES[reference.config.model_type]}
    results = scope.run([probe for site in sites for probe in site_probes(site, scope.model.n_layers)])
    for result in results:
        assert (list(result.tokens), list(result.clean_tokens)) == expected(reference, result), result.probe.describe()
    changed = {r.probe.site for r in results if r.tokens != r.clean_tokens}
    assert changed == set(sites), f"no probe changed the generation at {set(sites) - changed}: the check proves little there"
    assert active_hooks(scope.model) == scope.model.bridge_hooks_at_load


def test_scores_and_decoding(family):
    """Candidates scored after a target longer than the sliding window (multi-token ones decode
    past it), sampled probes with several samples, and greedy decoding with repetition controls,
    in one batch, against a cache-free forward and HF `generate` with the same seeds."""
    scope, reference = family
    last = scope.model.n_layers - 1
    candidates = ("fox", "fox jumps over", "dog sleeps", "cat")
    batch = [
        Probe("Tokyo", LONG + " x", layer=0, target_layer=last, candidates=candidates, max_new_tokens=0),
        Probe(LONG, "Short x", layer=1, target_layer=1, candidates=candidates[:2], max_new_tokens=4, strength=0.5),
        Probe(LONG, LONG, layer=last, target_layer=1, max_new_tokens=NEW_TOKENS, decoding=Decoding(do_sample=True, n_samples=2, seed=4, top_k=40)),
        Probe("Paris", "Short x", layer=1, max_new_tokens=NEW_TOKENS, decoding=Decoding(do_sample=True, seed=9, temperature=0.7, top_p=0.9)),
        Probe("Tokyo", LONG + " x", layer=0, max_new_tokens=NEW_TOKENS, decoding=Decoding(repetition_penalty=1.4, no_repeat_ngram_size=2)),
    ]
    for result in scope.run(batch):
        patched, clean = expected_scores(reference, result)
        for candidate in result.probe.candidates:
            for ours, theirs in ((result.scores[candidate], patched[candidate]), (result.clean_scores[candidate], clean[candidate])):
                assert ours.logprobs == pytest.approx(theirs[0], abs=1e-4), (candidate, result.probe.describe())
                assert theirs[1][0] <= ours.rank <= theirs[1][1], (candidate, result.probe.describe())
        samples, clean_samples = expected_samples(reference, result)
        assert [list(s.tokens) for s in result.samples] == samples, result.probe.describe()
        assert [list(s.tokens) for s in result.clean_samples] == clean_samples, result.probe.describe()
    assert active_hooks(scope.model) == scope.model.bridge_hooks_at_load


@pytest.mark.parametrize("refused", REFUSED, ids=lambda f: f.name)
def test_unsupported_families_are_refused_at_load_time(refused, tokenizer):
    hf = refused.build()
    with pytest.raises(ModelLoadError) as info:
        from_hf(hf, tokenizer, name=f"tiny-{refused.name}")
    message = str(info.value)
    assert f"architecture={hf.config.model_type!r}" in message and "llama, mistral" in message


def test_an_unverified_family_loads_with_a_warning(tokenizer):
    from pytest_patchscope.errors import PatchscopeWarning

    from families import Family

    with pytest.warns(PatchscopeWarning, match=r"architecture='nemotron' loads, but it is not among the families checked"):
        from_hf(Family("nemotron", "NemotronConfig", "").build(), tokenizer, name="tiny-nemotron")


def test_the_bridge_of_grouped_falcon_matches_hf(tokenizer):
    """Falcon-40B/180B style (new decoder architecture, 2 key/value groups): TransformerLens' adapter
    alone reads multi_query as one key/value head and refuses the model; with boot_bridge's fix the
    bridge's own forward (its hook_q/k/v included) equals HF's, and the user's config is untouched."""
    import torch

    hf = next(f for f in SUPPORTED if f.name == "falcon_grouped").build()
    reference = copy.deepcopy(hf)
    model = from_hf(hf, tokenizer, name="tiny-falcon_grouped")
    ids = torch.tensor([tokenizer(LONG)["input_ids"]])
    with torch.no_grad():
        assert (model.bridge(ids) - reference(ids).logits).abs().max() < 1e-4
    assert model.hf.config.multi_query and model.hf.config.num_kv_heads == 2


def test_every_verified_family_is_in_the_matrix():
    """VERIFIED_FAMILIES (what the load-time message calls supported) is exactly what this file checks."""
    import transformers

    built = {getattr(transformers, f.config_class)().model_type for f in SUPPORTED}
    assert built == set(VERIFIED_FAMILIES)
