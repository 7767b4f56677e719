"""The general path (engine/general.py) beyond token equality, which tests/test_families.py checks:
how it batches, what it refuses and how, and that results, profiles and baselines say which path ran."""
from __future__ import annotations

import pytest

from pytest_patchscope import Placeholder, Probe
from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.model.loading import from_hf
from pytest_patchscope.model.sites import available_sites, locate_site
from pytest_patchscope.scope import Patchscope

from conftest import active_hooks
from families import GENERAL

LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door"


def general_scope(name: str, tokenizer, **settings) -> Patchscope:
    hf = next(f for f in GENERAL if f.name == name).build()
    return Patchscope(from_hf(hf, tokenizer, name=f"tiny-{name}"), progress=False, **settings)


@pytest.fixture(scope="module")
def jamba(tokenizer) -> Patchscope:
    """Mamba, attention + mixture of experts, Mamba: three kinds of layer in three."""
    return general_scope("jamba", tokenizer)


def prompt_batches(scope: Patchscope) -> tuple[list[tuple[int, int]], object]:
    """(batch, tokens) of every multi-token forward of the model (prompt and capture passes), and the hook handle."""
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            shapes.append(tuple(ids.shape))

    return shapes, scope.model.plain.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("name", ["jamba", "recurrent_gemma", "rwkv"])
def test_rows_batch_as_the_family_allows(name, tokenizer):
    """Two probes on a long and a short target, each with its clean row: one source pass, then the
    prompt passes the family's batching allows. Jamba pads exactly: one left-padded batch of all
    four rows; RecurrentGemma's recurrence would see the padding: one batch per length;
    transformers' RWKV gives a row other tokens in any batch: one row per batch."""
    scope = general_scope(name, tokenizer)
    source, long, short = (len(scope.model.tokenize(text)) for text in ("Tokyo", LONG, "Short x"))
    expected = {
        "jamba": [(1, source), (4, long)],
        "recurrent_gemma": [(1, source), (2, long), (2, short)],
        "rwkv": [(1, source), (1, long), (1, long), (1, short), (1, short)],
    }[name]
    shapes, handle = prompt_batches(scope)
    try:
        results = scope.run([Probe("Tokyo", LONG, layer=1, max_new_tokens=3), Probe("Tokyo", "Short x", layer=1, max_new_tokens=3)])
    finally:
        handle.remove()
    assert sorted(shapes) == sorted(expected)
    assert all(r.path == "general" for r in results)


def test_sites_are_found_per_layer_and_a_missing_one_names_the_layer(jamba):
    model = jamba.model
    assert [available_sites(model, layer=j) for j in range(3)] == [
        ["resid_post", "resid_pre", "mlp_out", "neurons"],
        ["resid_post", "resid_pre", "attn_out", "mlp_out", "heads"],
        ["resid_post", "resid_pre", "mlp_out", "neurons"],
    ]
    assert locate_site(model, "heads", 1).shape == (4, 16)
    with pytest.raises(ProbeConfigError, match=r"site='attn_out' is not valid.*layer 0 of 'tiny-jamba' has; it is JambaMambaDecoderLayer: "
                                               r"JambaMambaMixer, JambaMLP, and it has no attention sublayer.*layers with 'attn_out': \[1\]"):
        jamba.run([Probe("Tokyo", "Short x", layer=1, target_layer=0, site="attn_out")])
    with pytest.raises(ProbeConfigError, match=r"layer 1 of 'tiny-jamba' has; .*its MLP \(JambaSparseMoeBlock\) has no single down projection"):
        jamba.run([Probe("Tokyo", "Short x", layer=0, target_layer=1, site="neurons")])
    assert active_hooks(model) == []


def test_a_family_without_a_site_says_so(tokenizer):
    scope = general_scope("mamba", tokenizer)
    assert available_sites(scope.model) == ["resid_post", "resid_pre"]
    with pytest.raises(ProbeConfigError, match=r"a site that layer 0 of 'tiny-mamba' has; it is MambaBlock: MambaMixer, and it has no "
                                               r"attention sublayer.*no layer has 'heads'"):
        scope.run([Probe("Tokyo", "Short x", layer=0, site="heads")])
    with pytest.raises(ProbeConfigError, match=r"a site that some layer of 'tiny-mamba' \(MambaForCausalLM\) has; none has it"):
        locate_site(scope.model, "mlp_out")


def test_bad_input_is_refused_before_anything_runs(jamba):
    shapes, handle = prompt_batches(jamba)
    try:
        with pytest.raises(ProbeConfigError, match="batch_memory_mb"):
            Patchscope(jamba.model, batch_memory_mb=0.01, progress=False).run([Probe("Tokyo", "Short x", layer=1)])
        with pytest.raises(ProbeConfigError, match=r"mapping=.* is not valid: a map returning a dense real floating-point tensor of shape \(64,\)"):
            jamba.run([Probe("Tokyo", LONG, layer=1, max_new_tokens=2), Probe("Paris", LONG, layer=1, mapping=lambda h: h[:3])])
    finally:
        handle.remove()
    long = len(jamba.model.tokenize(LONG))
    assert shapes and all(tokens < long for _, tokens in shapes)  # only the second job's source passes ran: no row generated
    with pytest.raises(ProbeConfigError, match=r"strength=1000(\.0)? is not valid: a strength and mapping whose patch .*finite in torch.float32"):
        jamba.run([Probe("Tokyo", "Short x", layer=1, strength=1000, mapping=lambda h: h * 1e36)])
    assert active_hooks(jamba.model) == []


def test_progress_counts_every_probe(jamba):
    seen: list[tuple[float, int]] = []
    scope = Patchscope(jamba.model, progress=lambda done, total: seen.append((done, total)))
    scope.sweep("Tokyo", "Short x", layers=range(3), target_layers=range(3), max_new_tokens=4)
    assert seen[0] == (0, 9) and seen[-1] == (9, 9)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_profiles_and_baselines_say_which_path_ran(jamba, tiny_llama):
    """A general-path sweep's profile, report facts and baseline entry name the path; a packed one's
    baseline entry has no such field, so files written before the general path read unchanged."""
    from pathlib import Path

    from pytest_patchscope.baseline.serializer import BaselineFile, Entry, deserialize_entry, serialize_entry
    from pytest_patchscope.reports.summary import profile_facts

    profile = jamba.sweep("Tokyo", "Short x", layers=[0, 2], expect="Tokyo", max_new_tokens=3)
    assert profile.path == "general" and profile_facts(profile)["path"] == "general"
    assert type(profile).from_dict(profile.to_dict()) == profile
    entry = serialize_entry(Entry(profile, "tests/test_x.py::test_y"))
    assert entry["path"] == "general"
    header = BaselineFile(Path("baseline.json"), model=profile.model, weights_hash=profile.weights_hash)
    assert deserialize_entry("entry", entry, header).profile.path == "general"
    packed = Patchscope(tiny_llama, progress=False).sweep("Tokyo", "Short x", layers=[0], max_new_tokens=2)
    assert packed.path == "packed" and "path" not in serialize_entry(Entry(packed, "tests/test_x.py::test_y"))
    assert deserialize_entry("entry", serialize_entry(Entry(packed, "t.py::t")), header).profile.path == "packed"


def test_a_patch_that_drives_later_layers_to_nan_is_refused(tokenizer):
    """A finite patch whose later layers overflow (MPT's LayerNorm over 1e33-sized values) would give
    NaN logits, and their argmax a text: a ProbeConfigError instead, with no hook left behind."""
    scope = general_scope("mpt", tokenizer)
    with pytest.raises(ProbeConfigError, match=r"strength=1000(\.0)? is not valid: .*keeps the layers after it finite in torch.float32"):
        scope.run([Probe("Tokyo", "Short x", layer=0, strength=1000, mapping=lambda h: h * 1e30, max_new_tokens=3)])
    assert active_hooks(scope.model) == []


T = "The capital city of x is"


@pytest.fixture(scope="module")
def overflowing_mamba(tokenizer) -> Patchscope:
    """A Mamba whose layer 1 writes 3e38-scaled values: finite weights, NaN/inf from layer 1 on
    (as tests/test_reliability.py's Llama on the packed path)."""
    import torch

    hf = next(f for f in GENERAL if f.name == "mamba").build()
    with torch.no_grad():
        hf.backbone.layers[1].mixer.out_proj.weight[:] = 3e38
    return Patchscope(from_hf(hf, tokenizer, name="tiny-overflow"), progress=False)


@pytest.mark.parametrize("call", [
    pytest.param(lambda s: s.score("Tokyo", T, ["Paris", "London"], layer=0, target_position=-1), id="score"),
    pytest.param(lambda s: s.generate("Tokyo", T, layer=0, target_position=Placeholder("x")), id="generate"),
    pytest.param(lambda s: s.sweep("Tokyo", T, layers=[1], expect="Paris", target_position=-1), id="sweep-source-overflows"),
    pytest.param(lambda s: s.sweep("Tokyo", T, layers=[2], target_layers=[0], clean=False, target_position=-1), id="grid-no-clean"),
    pytest.param(lambda s: s.generate("Tokyo", T, layer=0, target_layer=2, strength=0.5, target_position=-1), id="target-overflows-there"),
])
def test_a_model_that_overflows_is_refused_naming_the_layer_as_on_the_packed_path(overflowing_mamba, call):
    """D1 (shared/research/reliability-2026-12.md) on the general path: NaN/inf logits, a NaN source
    value, or a NaN value where the patch goes, are the model's own overflow when a plain forward
    overflows too: a ModelLoadError naming the layer it starts from, never the user's mapping or
    strength, and no hook left behind (it is told once generate's hooks are gone)."""
    from pytest_patchscope.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as info:
        call(overflowing_mamba)
    message = str(info.value)
    assert "model='tiny-overflow'" in message and "from layer 1 on (the output of blocks.1)" in message
    assert "before any patch" in message
    assert active_hooks(overflowing_mamba.model) == []


def test_the_next_token_evaluation_refuses_hyper_connection_streams(tokenizer):
    """DeepSeek-V4's layers carry hc_mult residual streams that only its head merges: the logit lens
    and the affine maps of `patchscope-eval nexttoken` would read them as one, so it is refused by name."""
    from pytest_patchscope.eval import evaluate_nexttoken

    scope = general_scope("deepseek_v4", tokenizer)
    with pytest.raises(ProbeConfigError, match=r"^model='tiny-deepseek_v4' is not valid: a model with one residual stream per token.*"
                                               r"carries 2 hyper-connection streams"):
        evaluate_nexttoken(scope, ["some text " * 20], n=2, n_train=0, plot=False)
    assert active_hooks(scope.model) == []
