"""Every decoder family, token for token against the plain-HF reference (tests/hf_reference.py).

Tiny random models (tests/families.py) with prompts longer than their sliding windows and chunks:
single probes, a batch of mixed probes, a layer sweep, an l x l* grid, every site, and candidate
scores with sampled and repetition-controlled decoding. The reference runs on an independent copy
of each model: HF's own masks, caches and `generate`, nothing of the engine. The packed engine's
families (SUPPORTED) and the general path's (GENERAL: state-space, recurrent, hybrid, chunked, ...)
run the same checks; what neither path can run must be refused at load time with a ModelLoadError.
tools/coverage_table.py turns these results into the coverage table of docs/architectures.md.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from pytest_patchscope import Decoding, Probe
from pytest_patchscope.engine.resolve import resolve_probe
from pytest_patchscope.errors import ModelLoadError
from pytest_patchscope.model.backend import VERIFIED_FAMILIES
from pytest_patchscope.model.layers import GENERAL_FAMILIES, PADDED_BATCHES, UNBATCHED, last_token_layers
from pytest_patchscope.model.loading import from_hf
from pytest_patchscope.scope import Patchscope

import hf_reference as ref
from conftest import active_hooks, expected, expected_samples, expected_scores
from families import GENERAL, REFUSED, SUPPORTED, WINDOW

LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door"
NEW_TOKENS = 12


GENERAL_NAMES = {f.name for f in GENERAL}


@pytest.fixture(scope="module", params=SUPPORTED + GENERAL, ids=lambda f: f.name)
def family(request, tokenizer):
    """(engine scope, independent reference copy) of one family's tiny model."""
    hf = request.param.build()
    reference = copy.deepcopy(hf)
    scope = Patchscope(from_hf(hf, tokenizer, name=f"tiny-{request.param.name}"))
    scope.model.bridge_hooks_at_load = active_hooks(scope.model)  # some adapters (OPT) keep hooks of their own
    return scope, reference


@pytest.fixture(autouse=True)
def _record_path(request):
    """Each family test's JUnit record names the path its model ran on (tools/coverage_table.py reads it)."""
    if "family" in request.fixturenames:
        scope, _ = request.getfixturevalue("family")
        request.node.user_properties.append(("path", scope.model.path))


def test_the_path_is_chosen_at_load(family):
    """The packed engine's families load on it; the others on the general path, and say so."""
    scope, _ = family
    name = scope.model.name.removeprefix("tiny-")
    assert scope.model.path == ("general" if name in GENERAL_NAMES else "packed")
    result = scope.run([Probe("Tokyo", "Short x", layer=0, max_new_tokens=2)])[0]
    assert result.path == scope.model.path
    assert ("path='general'" in repr(scope.model)) == (scope.model.path == "general")
    if scope.model.path == "general":
        assert scope.model.bridge is None and scope.model.path_reason and "path:    general" in str(result)


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


def resolved(scope, probe):
    """What `expected` needs of a result (its resolved probe), without running the probe."""
    return SimpleNamespace(resolved=resolve_probe(probe, scope.model))


def test_a_layer_sweep(family):
    scope, reference = family
    profile = scope.sweep(LONG, "Short x", layers=range(scope.model.n_layers), max_new_tokens=NEW_TOKENS)
    for cell in profile.cells:
        rp = resolved(scope, scope.probe(LONG, "Short x", layer=cell.layer, max_new_tokens=NEW_TOKENS))
        assert cell.text == scope.model.decode(expected(reference, rp)[0]), cell.layer


def test_an_l_by_l_star_grid(family):
    scope, reference = family
    layers = range(scope.model.n_layers)
    target = LONG + " x"
    profile = scope.sweep("Tokyo", target, layers=layers, target_layers=layers, max_new_tokens=NEW_TOKENS)
    assert len(profile.cells) == len(layers) ** 2
    for cell in profile.cells:
        rp = resolved(scope, scope.probe("Tokyo", target, layer=cell.layer, target_layer=cell.target_layer, max_new_tokens=NEW_TOKENS))
        assert cell.text == scope.model.decode(expected(reference, rp)[0]), (cell.layer, cell.target_layer)


def site_probes(site: str, sources: list[int], targets: list[int]) -> list[Probe]:
    """l = l*, l > l* with units and strength < 1, pairwise several positions with l < l*, and an
    amplified patch on every target token (strength 30): the MLP outputs of some tiny random models
    (Gemma's scaled embeddings, a mixture of experts, BLOOM) are too small next to their residual
    stream to change the text otherwise, and a check whose patch changes nothing proves little.
    `sources` / `targets` are the layers that have the site (and, for targets, can be patched there)."""
    second, source_second = targets[min(1, len(targets) - 1)], sources[min(1, len(sources) - 1)]
    return [
        Probe(LONG, "Short x", layer=source_second, target_layer=second, site=site, max_new_tokens=NEW_TOKENS),
        Probe("Tokyo", "Short x", layer=source_second, target_layer=second, site=site, target_position=[0, 1], strength=30.0,
              max_new_tokens=NEW_TOKENS),
        Probe("Tokyo", LONG + " x", layer=sources[-1], target_layer=targets[0], site=site, strength=0.5, units=(0, 1), max_new_tokens=NEW_TOKENS),
        Probe(LONG, LONG, layer=sources[0], target_layer=targets[-1], site=site, source_position=[3, 4], target_position=[5, 6],
              max_new_tokens=NEW_TOKENS),
    ]


def _site_layers(scope, reference) -> dict[str, tuple[list[int], list[int]]]:
    """Each site's (source layers, target layers) for site_probes: every layer on the packed path;
    on the general path the layers that have it (the reference's own list, per layer, must agree
    with the engine's), of one shape (Gemma 4's heads differ by layer), and as targets only layers
    whose prompt pass computes every token."""
    from pytest_patchscope.model.sites import available_sites, locate_site

    model = scope.model
    everything = list(range(model.n_layers))
    if model.path == "packed":
        sites = available_sites(model)
        assert set(sites) == {"resid_post", "resid_pre", *ref.SUBMODULES[reference.config.model_type]}
        return {site: (everything, everything) for site in sites}
    by_layer = [set(available_sites(model, layer=j)) for j in everything]
    assert by_layer == [ref.layer_sites(reference, j) for j in everything]
    full = last_token_layers(model.hf.config) or model.n_layers
    found = {}
    for site in sorted(set().union(*by_layer)):
        having = [j for j in everything if site in by_layer[j]]
        targets = [j for j in having if j < full]
        shape = locate_site(model, site, targets[0]).shape
        found[site] = ([j for j in having if locate_site(model, site, j).shape == shape], [j for j in targets if locate_site(model, site, j).shape == shape])
    return found


def test_every_site(family):
    """Each site the family has (attention and MLP outputs, neurons, heads, the residual before and
    after the block), batched, against hooks on the submodules that tests/hf_reference.py names
    (per layer for a hybrid, whose layers differ)."""
    scope, reference = family
    layers = _site_layers(scope, reference)
    results = scope.run([probe for site, (sources, targets) in layers.items() for probe in site_probes(site, sources, targets)])
    for result in results:
        assert (list(result.tokens), list(result.clean_tokens)) == expected(reference, result), result.probe.describe()
    changed = {r.probe.site for r in results if r.tokens != r.clean_tokens}
    assert changed == set(layers), f"no probe changed the generation at {set(layers) - changed}: the check proves little there"
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
    """Encoders and the decoder halves of encoder-decoder models: neither path can run them."""
    hf = refused.build()
    with pytest.raises(ModelLoadError) as info:
        from_hf(hf, tokenizer, name=f"tiny-{refused.name}")
    message = str(info.value)
    assert f"architecture={hf.config.model_type!r} ({type(hf).__name__}) cannot be probed: it is " in message
    assert "Allowed: a decoder-only causal language model" in message


def test_a_model_without_a_language_model_head_is_refused(tokenizer):
    from transformers import LlamaConfig, LlamaModel

    with pytest.raises(ModelLoadError, match=r"architecture='llama' \(LlamaModel\) cannot be probed: it is no language-model head"):
        from_hf(LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)), tokenizer, name="base")


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
    assert model.path == "packed" and model.bridge is not None  # not the general path's fallback
    ids = torch.tensor([tokenizer(LONG)["input_ids"]])
    with torch.no_grad():
        assert (model.bridge(ids) - reference(ids).logits).abs().max() < 1e-4
    assert model.hf.config.multi_query and model.hf.config.num_kv_heads == 2


def test_every_verified_family_is_in_the_matrix():
    """VERIFIED_FAMILIES and GENERAL_FAMILIES (what loads without a warning on each path) are exactly
    what this file checks, and the families batched with padding are general-path ones."""
    import transformers

    built = {getattr(transformers, f.config_class)().model_type for f in SUPPORTED}
    assert built == set(VERIFIED_FAMILIES)
    general = [getattr(transformers, f.config_class)().model_type for f in GENERAL]
    assert sorted(general) == sorted(GENERAL_FAMILIES) and PADDED_BATCHES | UNBATCHED <= set(GENERAL_FAMILIES)


@pytest.mark.parametrize(("name", "lengths"), [
    ("rwkv", (6, 6)), ("recurrent_gemma", (6, 20)), ("xlstm", (6, 20)), ("deepseek_v4", (6, 20)), ("minimax", (6, 22)),
])
def test_where_transformers_batches_are_not_exact(name, lengths):
    """Why UNBATCHED and PADDED_BATCHES leave these out: transformers' own batched generate gives a
    row other tokens than the row alone (RWKV even for two prompts of one length; RecurrentGemma's
    and xLSTM's recurrences run through left padding, DeepSeek-V4's compressors pool it, MiniMax's
    decoding steps attend to it). If this starts to fail, they batch exactly now."""
    import torch

    hf = next(f for f in GENERAL if f.name == name).build()
    rows = [[1, *range(100 + 7 * k, 100 + 7 * k + n - 1)] for k, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, width:].tolist()
        alone = [hf.generate(torch.tensor([r]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(r):].tolist() for r in rows]
    assert batched != alone
    assert (name in UNBATCHED) == (lengths[0] == lengths[1]) and name not in PADDED_BATCHES


def test_a_layer_that_computes_only_the_last_token_is_patched_there_only(tokenizer):
    """Gemma 4's key/value-sharing layers keep only the prompt's last token under generate: a patch
    at any other token there would never be read, so it is refused before anything runs."""
    from pytest_patchscope.errors import ProbeConfigError

    scope = Patchscope(from_hf(next(f for f in GENERAL if f.name == "gemma4_text").build(), tokenizer, name="tiny-gemma4"))
    first = last_token_layers(scope.model.hf.config)
    assert first == 2
    with pytest.raises(ProbeConfigError, match=r"target_position=3 is not valid.*the target's last token .* at target_layer=2: from layer 2 on"):
        scope.run([Probe("Tokyo", LONG, layer=0, target_layer=first, target_position=3, max_new_tokens=2)])
    assert active_hooks(scope.model) == []


def test_a_source_from_another_model_on_either_path(tokenizer):
    """source_model across the paths (the paper's M != M*): a packed Llama's state into a Mamba, a
    Mamba's into a Jamba, each against the reference (the source state from the source's own copy)."""
    from conftest import tiny_hf_model

    llama = tiny_hf_model("llama", len(tokenizer))
    mamba, jamba = (next(f for f in GENERAL if f.name == name).build() for name in ("mamba", "jamba"))
    references = {id(m): copy.deepcopy(m) for m in (llama, mamba, jamba)}
    models = {id(m): from_hf(m, tokenizer, name=f"tiny-{k}") for k, m in enumerate((llama, mamba, jamba))}
    for source, target in ((llama, mamba), (mamba, jamba)):
        scope = Patchscope(models[id(target)])
        result = scope.run([Probe(LONG, "Short x", layer=1, target_layer=2, source_model=models[id(source)], max_new_tokens=NEW_TOKENS)])[0]
        rp = result.resolved
        vector = ref.source_state(references[id(source)], list(rp.source_ids), rp.source_index, 1)
        patched = ref.patched_generate(references[id(target)], list(rp.target_ids), list(rp.target_indices), 2, vector, NEW_TOKENS, eos=2)
        assert list(result.tokens) == patched and result.tokens != result.clean_tokens and result.path == "general"
