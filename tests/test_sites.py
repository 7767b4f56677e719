"""Patch sites, units, several positions and ablation, on the real default model and a tiny Llama.

Every result is compared token for token with tests/hf_reference.py, which hooks the submodules
it names itself (SUBMODULES) on an unbridged HF model; tests/test_families.py does the same on
every supported family.
"""
from __future__ import annotations

import pytest
import torch

from pytest_patchscope import ZERO, Probe, ProbeConfigError, Span, Substring, mean_ablation
from pytest_patchscope.baseline.serializer import Entry, deserialize_cell, serialize_entry
from pytest_patchscope.engine.runner import Engine
from pytest_patchscope.model.sites import SITES, available_sites, locate_site
from pytest_patchscope.scope import Patchscope

import hf_reference as ref
from conftest import active_hooks, expected

CAPITAL = "The capital of France is"
TARGET = "The capital city of x is"


def test_the_default_model_has_every_site_with_its_shapes(default_scope):
    model = default_scope.model
    assert available_sites(model) == list(SITES)
    shapes = {name: locate_site(model, name).shape for name in SITES}
    assert shapes == {
        "resid_post": (576,), "resid_pre": (576,), "attn_out": (576,), "mlp_out": (576,),
        "neurons": (1536,), "heads": (9, 64),
    }
    assert SITES["heads"].hook_name(3) == "blocks.3.attn.hook_z" and SITES["neurons"].hook_name(0) == "blocks.0.mlp.hook_post"


def test_every_site_on_the_default_model_matches_plain_hf(default_scope, plain_hf):
    """Per site: l = l*, l != l*, units, strength < 1 and several positions, as one batch."""
    scope = default_scope
    eos = min(scope.model.eos_token_ids)
    probes = []
    for site in SITES:
        units = (2, 5) if site == "heads" else (tuple(range(0, 1536, 3)) if site == "neurons" else tuple(range(0, 576, 2)))
        probes += [
            scope.probe("France", TARGET, layer=1, target_layer=1, site=site, target_position=Substring("x"), max_new_tokens=8),
            scope.probe(CAPITAL, TARGET, layer=4, target_layer=2, site=site, source_position="France",
                        target_position=Substring("x"), units=units, strength=0.75, max_new_tokens=8),
            scope.probe("Paris, France", "France and Paris", layer=3, target_layer=3, site=site,
                        source_position=[0, 2], target_position=[2, 0], max_new_tokens=8),
        ]
    results = scope.run(probes)
    for result in results:
        assert (list(result.tokens), list(result.clean_tokens)) == expected(plain_hf, result, eos), result.probe.describe()
    changed = {r.probe.site for r in results if r.tokens != r.clean_tokens}
    assert changed == set(SITES), f"no probe changed the text at {set(SITES) - changed}"
    assert active_hooks(scope.model) == []


def test_a_site_sweep_equals_its_single_probes(default_scope):
    scope = default_scope
    for site in ("mlp_out", "heads"):
        profile = scope.sweep("France", TARGET, layers=range(0, 30, 6), site=site, target_position=Substring("x"),
                              expect="Paris", max_new_tokens=6)
        assert profile.probe["site"] == site
        for cell in profile.cells:
            single = scope.generate("France", TARGET, layer=cell.layer, site=site, target_position=Substring("x"), max_new_tokens=6)
            assert cell.text == single.text, (site, cell.layer)


def test_several_target_positions_take_one_source_value(default_scope, plain_hf):
    """SelfIE: one vector written at every placeholder; a Substring(token="all") is every token of it."""
    scope = default_scope
    target = "x, x and x are"
    result = scope.generate(CAPITAL, target, layer=2, source_position="France",
                            target_position=Substring("x", token="all", occurrence=0), max_new_tokens=6)
    assert len(result.resolved.target_indices) == 1
    many = scope.generate(CAPITAL, target, layer=2, source_position="France", target_position=[0, 2, 4], max_new_tokens=6)
    assert many.resolved.target_indices == (0, 2, 4) and many.resolved.source_indices == (scope.model.tokenize(CAPITAL).index(
        scope.model.tokenize(" France")[0]),)
    assert list(many.tokens) == expected(plain_hf, many, min(scope.model.eos_token_ids))[0]
    whole = scope.probe("Albert Einstein was", "Albert Einstein was", layer=3, source_position=Substring("Albert Einstein", token="all"),
                        target_position=Span(0, len("Albert Einstein"), token="all"))
    resolved = scope.run([whole])[0].resolved
    assert resolved.source_indices == resolved.target_indices and len(resolved.target_indices) >= 2


def test_head_ablation_is_zero_on_one_head(tiny_llama):
    """ZERO with units=(h,) at site heads knocks out head h alone: the reference writes zeros there."""
    scope = Patchscope(tiny_llama)
    prompt = "The quick brown fox jumps over the lazy dog"
    results = scope.run([Probe(prompt, prompt, layer=1, site="heads", units=(h,), mapping=ZERO, max_new_tokens=8) for h in range(4)])
    for h, result in enumerate(results):
        rp = result.resolved
        zeros = torch.zeros(locate_site(tiny_llama, "heads").shape)
        assert list(result.tokens) == ref.patched_generate(
            tiny_llama.hf, list(rp.target_ids), rp.target_index, 1, zeros, 8, site="heads", units=(h,)
        )
    assert results[0].probe.identity()["mapping"] == "zero" and results[0].probe.identity()["units"] == [0]


def test_mean_ablation_writes_the_mean(tiny_llama):
    scope = Patchscope(tiny_llama)
    prompts = ["The cat sat", "A dog ran far", "Birds fly south"]
    states = [scope.engine.capture(tiny_llama.tokenize(p), -1, [2], site="mlp_out")[2] for p in prompts]
    mean = mean_ablation(states)
    assert torch.allclose(mean.value, torch.stack(states).mean(0))
    result = scope.generate("anything", "The quick brown fox", layer=2, site="mlp_out", mapping=mean, max_new_tokens=6)
    rp = result.resolved
    assert list(result.tokens) == ref.patched_generate(tiny_llama.hf, list(rp.target_ids), rp.target_index, 2, mean.value, 6, site="mlp_out")
    other = mean_ablation(states[:2])
    assert mean.name == other.name and result.probe.identity()["mapping"] != Probe("a", "b", 0, mapping=other).identity()["mapping"]


def test_a_sweep_over_heads_one_at_a_time_is_a_layer_by_head_profile(tiny_llama, tmp_path):
    scope = Patchscope(tiny_llama)
    profile = scope.sweep("Tokyo", "Short x", site="heads", units="each", expect="Tokyo", max_new_tokens=5)
    n_heads = locate_site(tiny_llama, "heads").n_units
    assert profile.per_unit and profile.units == list(range(n_heads)) and profile.probe["units"] == "each"
    assert len(profile.cells) == tiny_llama.n_layers * n_heads
    for cell in profile.cells[:: 3]:
        single = scope.generate("Tokyo", "Short x", layer=cell.layer, site="heads", units=[cell.unit], max_new_tokens=5)
        assert cell.text == single.text, (cell.layer, cell.unit)
    assert " head " in profile.table().splitlines()[1]
    # the baseline keeps each cell's head, and an old cell without one still reads
    data = serialize_entry(Entry(profile=profile, test="t"))
    assert [deserialize_cell("c", c).unit for c in data["cells"]] == [c.unit for c in sorted(profile.cells, key=lambda c: (c.layer, c.target_layer, c.unit))]
    assert deserialize_cell("c", {"layer": 0, "target_layer": 0, "text": ""}).unit is None


def test_the_heatmap_of_a_layer_by_head_profile_has_heads_across(tiny_llama, tmp_path):
    pytest.importorskip("matplotlib")
    from pytest_patchscope.reports.formats import write_heatmaps
    from pytest_patchscope.reports.summary import SessionSummary

    scope = Patchscope(tiny_llama)
    profile = scope.sweep("Tokyo", "Short x", site="heads", units="each", expect="Tokyo", max_new_tokens=3)
    summary = SessionSummary()
    summary.add("tests/test_x.py::test_heads", profile, "tests/test_x.py::test_heads")
    (written,) = write_heatmaps(tmp_path, summary)
    assert written.stat().st_size > 1000


# ---- bad input: a ProbeConfigError naming the field, before any hook -------------------------
@pytest.mark.parametrize(
    ("kwargs", "field", "says"),
    [
        (dict(site="mlp"), "site", "one of 'resid_post', 'resid_pre', 'attn_out', 'mlp_out', 'neurons', 'heads'"),
        (dict(site="heads", units=(4,)), "units", "ints from 0 to 3 (attention heads"),
        (dict(site="neurons", units=[1, 1]), "units", "[1] appear more than once"),
        (dict(units=[]), "units", "non-empty list"),
        (dict(units="each"), "units", 'units="each" is for sweep'),
        (dict(units=[0.5]), "units", "0.5 is not"),
        (dict(target_position=[0, 1], source_position=[0, 1, 0]), "source_position", "as many as target_position"),
        (dict(target_position=[1, 1]), "target_position", "writes one token twice"),
        (dict(site="heads", mapping=lambda h: h.flatten()), "mapping", "shape (4, 16)"),
        (dict(site="neurons", mapping=lambda h: h[:64]), "mapping", "shape (128,)"),
    ],
)
def test_bad_site_input_is_refused_before_any_hook(tiny_llama, kwargs, field, says):
    scope = Patchscope(tiny_llama)
    with pytest.raises(ProbeConfigError) as info:
        scope.run([Probe("Tokyo", "Short text x", layer=1, **kwargs)])
    assert info.value.field == field and says in str(info.value), str(info.value)
    assert active_hooks(tiny_llama) == []


def test_a_site_the_architecture_lacks_is_refused(tokenizer):
    from pytest_patchscope.model.loading import from_hf

    from families import SUPPORTED

    mixtral = next(f for f in SUPPORTED if f.name == "mixtral")
    scope = Patchscope(from_hf(mixtral.build(), tokenizer, name="tiny-mixtral"))
    with pytest.raises(ProbeConfigError, match=r"site='neurons'.*no single down projection.*Sites it has: 'resid_post'"):
        scope.generate("Tokyo", "Short x", layer=1, site="neurons")
    assert active_hooks(scope.model) == []


def test_units_each_needs_site_heads(tiny_llama):
    with pytest.raises(ProbeConfigError, match=r"units.*\"each\" with site=\"heads\""):
        Patchscope(tiny_llama).sweep("Tokyo", "Short x", units="each")


# ---- another source model (the paper's M != M*) -----------------------------------------------
def test_a_source_from_another_model_through_a_fitted_affine_map(tiny_llama, tokenizer):
    """A 2-layer, 32-wide source model into the tiny Llama: identity is refused (widths differ),
    AffineMapping.fit on states of both models maps d to d*, and the result equals the reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pytest_patchscope import AffineMapping
    from pytest_patchscope.model.loading import from_hf

    torch.manual_seed(1)
    small_hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )).eval()
    small = from_hf(small_hf, tokenizer, name="tiny-narrow")
    scope = Patchscope(tiny_llama)
    with pytest.raises(ProbeConfigError, match=r"mapping='identity'.*from the source's \(32,\) to the target's \(64,\)"):
        scope.generate("Tokyo", "Short x", layer=1, source_model=small)
    assert active_hooks(tiny_llama) == [] and active_hooks(small) == []
    texts = ["The cat sat on the mat", "A dog ran far away", "Birds fly south in winter", "Rain falls on the town"] * 3
    ids = [tiny_llama.tokenize(t) for t in texts]
    requests = [(i, k) for i in ids for k in range(len(i))]
    source_states = torch.stack([s[1] for s in Engine(small).capture_many(requests, [1])])
    target_states = torch.stack([s[2] for s in Engine(tiny_llama).capture_many(requests, [2])])
    mapping = AffineMapping.fit(source_states, target_states, name="narrow-to-tiny")
    result = scope.generate("Tokyo", "Short x", layer=1, target_layer=2, source_model=small, mapping=mapping, max_new_tokens=6)
    rp = result.resolved
    vector = mapping(ref.source_state(small_hf, list(rp.source_ids), rp.source_index, 1))
    assert list(result.tokens) == ref.patched_generate(tiny_llama.hf, list(rp.target_ids), rp.target_index, 2, vector, 6)
    assert result.tokens != result.clean_tokens
    assert result.probe.identity()["source_model"] == "tiny-narrow"
    with pytest.raises(ProbeConfigError, match=r"layer=3 .*from 0 to 1 \(the model has 2 layers\)"):
        scope.generate("Tokyo", "Short x", layer=3, target_layer=2, source_model=small, mapping=mapping)


def test_a_source_model_given_as_a_checkpoint_path(tiny_llama_dir, damaged_dir):
    """Does the checkpoint read the damaged checkpoint's representation? A spec loads once per process."""
    from pytest_patchscope.model.loading import load_cached, load_model

    scope = Patchscope(load_model(tiny_llama_dir))
    damaged = load_cached(damaged_dir)
    assert load_cached(damaged_dir) is damaged
    by_path = scope.generate("Tokyo", "Short x", layer=1, source_model=str(damaged_dir), max_new_tokens=6)
    by_model = scope.generate("Tokyo", "Short x", layer=1, source_model=damaged, max_new_tokens=6)
    own = scope.generate("Tokyo", "Short x", layer=1, max_new_tokens=6)
    assert by_path.tokens == by_model.tokens and by_path.resolved.source_model is damaged
    rp = by_model.resolved
    vector = ref.source_state(damaged.hf, list(rp.source_ids), rp.source_index, 1)
    assert list(by_model.tokens) == ref.patched_generate(scope.model.hf, list(rp.target_ids), rp.target_index, 1, vector, 6)
    assert by_model.tokens != own.tokens, "the damaged layers 0-1 should give another state at layer 1"
    with pytest.raises(ProbeConfigError, match="source_model=3"):
        scope.generate("Tokyo", "Short x", layer=1, source_model=3)


def test_an_l_by_l_star_grid_at_a_site_inside_the_block(tiny_llama):
    """Rows of a grid at attn_out branch at their target block; each cell equals its probe alone."""
    scope = Patchscope(tiny_llama)
    layers = range(tiny_llama.n_layers)
    profile = scope.sweep("Tokyo", "Short x", layers=layers, target_layers=layers, site="attn_out", units=[0, 5, 9], max_new_tokens=5)
    assert profile.grid and len(profile.cells) == len(layers) ** 2 and profile.probe["units"] == [0, 5, 9]
    for cell in profile.cells:
        single = scope.generate("Tokyo", "Short x", layer=cell.layer, target_layer=cell.target_layer, site="attn_out",
                                units=[0, 5, 9], max_new_tokens=5)
        assert cell.text == single.text, (cell.layer, cell.target_layer)
    assert len({c.text for c in profile.cells}) > 1, "every cell alike: the check proves little"


def test_a_units_string_other_than_each_is_refused_by_sweep(tiny_llama):
    with pytest.raises(ProbeConfigError, match=r"units='all' is not valid"):
        Patchscope(tiny_llama).sweep("Tokyo", "Short x", site="heads", units="all")
