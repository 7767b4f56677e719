"""Engine behaviour on tiny random models (RoPE Llama and absolute-position GPT-2).

The important properties: a batched, prefix-shared row gives the same greedy tokens as the same
probe alone and as a plain one-pass HF implementation; strength interpolates; hooks never leak.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pytest_patchscope import ENTITY_DESCRIPTION, TOKEN_IDENTITY, Placeholder, Probe, Substring
from pytest_patchscope.engine.rows import Row
from pytest_patchscope.engine.runner import PACK_TOKENS, Engine
from pytest_patchscope.errors import EngineError, ProbeConfigError
from pytest_patchscope.scope import Patchscope

import hf_reference as ref
from conftest import active_hooks, tiny_hf_model

SOURCES = ["The capital of France is", "Tokyo", "A much longer source prompt about the history of the Roman empire"]
TARGETS = [
    "The capital city of x is",
    "cat -> cat\n1135 -> 1135\nhello -> hello\n?",
    "Short x",
]


def probes_mixed(n_layers: int) -> list[Probe]:
    """Probes over several targets of different lengths, layers and positions, incl. position 0."""
    probes = []
    for k, (source, target) in enumerate(zip(SOURCES * 2, TARGETS + TARGETS[::-1])):
        layer = k % n_layers
        probes.append(Probe(source, target, layer=layer, target_layer=(layer + 1) % n_layers, max_new_tokens=6))
    probes.append(Probe(SOURCES[0], TARGETS[0], layer=1, target_position=0, max_new_tokens=5))
    probes.append(Probe(SOURCES[2], TARGETS[1], layer=2, source_position=3, target_position=4, max_new_tokens=7))
    return probes


def run_alone(scope: Patchscope, probe: Probe):
    return scope.run([probe])[0]


def test_batched_rows_equal_the_same_probe_alone(tiny_model):
    scope = Patchscope(tiny_model)
    probes = probes_mixed(tiny_model.n_layers)
    batched = scope.run(probes)
    for probe, result in zip(probes, batched):
        alone = run_alone(scope, probe)
        assert result.tokens == alone.tokens, probe.describe()
        assert result.clean_tokens == alone.clean_tokens


def test_batched_rows_equal_an_independent_hf_implementation(tiny_model):
    """Mixed prompt lengths in one batch: padding, mask and positions are right (RoPE and GPT-2)."""
    scope = Patchscope(tiny_model)
    probes = probes_mixed(tiny_model.n_layers)
    results = scope.run(probes)
    hf = tiny_model.hf
    for result in results:
        rp = result.resolved
        vector = ref.source_state(hf, list(rp.source_ids), rp.source_index, rp.layer)
        expected = ref.patched_generate(hf, list(rp.target_ids), rp.target_index, rp.target_layer, vector, rp.probe.max_new_tokens)
        clean = ref.patched_generate(hf, list(rp.target_ids), rp.target_index, rp.target_layer, None, rp.probe.max_new_tokens)
        assert list(result.tokens) == expected, rp.probe.describe()
        assert list(result.clean_tokens) == clean
    assert any(r.tokens != r.clean_tokens for r in results), "no probe changed the generation: the test is vacuous"


def test_memory_chunking_does_not_change_results(tiny_llama):
    probes = probes_mixed(tiny_llama.n_layers)
    whole = Patchscope(tiny_llama).run(probes)
    seen = []
    # one tiny-llama row is about 0.7 MB (mostly its float32 logits over a 49k vocabulary)
    chunked = Patchscope(tiny_llama, batch_memory_mb=1.5, progress=lambda done, total: seen.append((done, total))).run(probes)
    assert [r.tokens for r in whole] == [r.tokens for r in chunked]
    assert len(seen) > 2 and seen[-1][0] == seen[-1][1], "small memory bound should give several chunks"


def test_packing_into_several_rows_and_shards_does_not_change_results(tiny_model, monkeypatch):
    """With a tiny packing budget the opening pass spreads prefixes and sources over several packed
    rows and splits a prefix's spans into shards, each with its own copy of the prefix."""
    import pytest_patchscope.engine.runner as engine_module

    scope = Patchscope(tiny_model)
    probes = probes_mixed(tiny_model.n_layers) + [
        Probe("Tokyo", TARGETS[1], layer=layer, target_position=3, max_new_tokens=4) for layer in range(tiny_model.n_layers)
    ]
    roomy = scope.run(probes)
    monkeypatch.setattr(engine_module, "PACK_TOKENS", 8)
    packed_rows: list[int] = []
    handle = tiny_model.plain_layers[0].register_forward_pre_hook(lambda module, args: packed_rows.append(args[0].shape[0]))
    try:
        tight = scope.run(probes)
    finally:
        handle.remove()
    assert max(packed_rows) > 2, "the opening pass should have used several packed rows"
    for probe, a, b in zip(probes, roomy, tight):
        assert a.tokens == b.tokens and a.clean_tokens == b.clean_tokens, probe.describe()


def test_strength_zero_is_clean_and_strength_interpolates(tiny_llama):
    scope = Patchscope(tiny_llama)
    kwargs = dict(layer=1, target_position=Placeholder("x"), max_new_tokens=6)
    zero = scope.generate("Tokyo", "The capital city of x is", strength=0.0, **kwargs)
    full = scope.generate("Tokyo", "The capital city of x is", strength=1.0, **kwargs)
    half = scope.generate("Tokyo", "The capital city of x is", strength=0.5, **kwargs)
    assert zero.tokens == zero.clean_tokens
    assert full.tokens != full.clean_tokens
    rp = half.resolved
    vector = ref.source_state(tiny_llama.hf, list(rp.source_ids), rp.source_index, 1)
    assert list(half.tokens) == ref.patched_generate(tiny_llama.hf, list(rp.target_ids), rp.target_index, 1, vector, 6, strength=0.5)


def test_mapping_is_applied_to_the_source_state(tiny_llama):
    scope = Patchscope(tiny_llama)
    seen = []

    def negate(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape)
        return -h

    mapped = scope.generate("Tokyo", "The capital city of x is", layer=2, target_position=Placeholder("x"), mapping=negate, max_new_tokens=6)
    rp = mapped.resolved
    vector = ref.source_state(tiny_llama.hf, list(rp.source_ids), rp.source_index, 2)
    assert seen == [torch.Size([tiny_llama.d_model])]
    assert list(mapped.tokens) == ref.patched_generate(tiny_llama.hf, list(rp.target_ids), rp.target_index, 2, -vector, 6)


def double_(h: torch.Tensor) -> torch.Tensor:
    return h.mul_(2)


def test_an_in_place_mapping_gets_its_own_copy_of_the_source_state(tiny_model):
    """The rows of an l x l* grid map one captured source state; each must see it unchanged, so an
    in-place f gives exactly what the out-of-place f gives (not h, 2h, 4h, ... down the grid)."""
    scope = Patchscope(tiny_model)
    kwargs = dict(layers=range(2), target_layers=range(4), target_position=Placeholder("x"), expect="Tokyo", max_new_tokens=4)
    in_place = scope.sweep("Tokyo", "The capital city of x is", mapping=double_, **kwargs)
    out_of_place = scope.sweep("Tokyo", "The capital city of x is", mapping=lambda h: h * 2, **kwargs)
    assert [c.text for c in in_place.cells] == [c.text for c in out_of_place.cells]
    assert [(c.logprob, c.rank) for c in in_place.cells] == [(c.logprob, c.rank) for c in out_of_place.cells]
    assert len({c.text for c in in_place.cells}) > 1, "the grid should not be one repeated text: the test is vacuous"


@pytest.mark.parametrize("fault", ["dropped", "written-twice"])
def test_a_patch_that_is_not_written_exactly_once_is_an_internal_error(tiny_llama, monkeypatch, fault):
    """A lost patch would pass for a probe that decodes nothing (nnsight #143/#502/#607)."""
    import pytest_patchscope.engine.runner as engine_module
    from pytest_patchscope.engine.streams import forward_opening

    def faulty(model, layout, captures, states, patches, locations, layer_done=None):
        patches = list(patches)
        patches = patches[1:] if fault == "dropped" else patches + [dataclasses.replace(patches[0], layer=2)]
        return forward_opening(model, layout, captures, states, patches, locations, layer_done)

    scope = Patchscope(tiny_llama)
    before = scope.generate("Tokyo", "Short x", layer=1, max_new_tokens=3)
    monkeypatch.setattr(engine_module, "forward_opening", faulty)
    times = 0 if fault == "dropped" else 2
    with pytest.raises(EngineError, match=rf"internal error: the patch of row 0 \(at blocks\.1\.hook_resid_post\) was written {times} times.*report"):
        scope.generate("Tokyo", "Short x", layer=1, max_new_tokens=3)
    monkeypatch.undo()
    assert active_hooks(tiny_llama) == []
    assert scope.generate("Tokyo", "Short x", layer=1, max_new_tokens=3).tokens == before.tokens


def test_row_memory_counts_the_model_dtype_and_the_opening_masks(tiny_llama):
    """Values take the model's element size (logits stay float32); every stage of the opening pass
    keeps a float (W x W) mask, so a long prompt costs at least (n_layers + 1) T^2 elements."""
    from types import SimpleNamespace

    from pytest_patchscope.model.backend import Architecture

    def engine(dtype: torch.dtype, windows: tuple[int | None, ...] = (None,) * 4) -> Engine:
        hf = SimpleNamespace(config=tiny_llama.hf.config, parameters=lambda: iter([torch.zeros(1, dtype=dtype)]))
        model = SimpleNamespace(hf=hf, n_layers=tiny_llama.n_layers, d_model=tiny_llama.d_model, architecture=Architecture(windows))
        return Engine(model)

    short = Row(target_ids=tuple(range(8)), split=7, sources=(((5, 6, 7), 2, "resid_post"),), max_new_tokens=4)
    logits = 4 * 3 * tiny_llama.hf.config.vocab_size
    full, half = engine(torch.float32)._row_bytes(short), engine(torch.bfloat16)._row_bytes(short)
    assert full - logits == 2 * (half - logits) > 0
    masks = (tiny_llama.n_layers + 1) * 11 * PACK_TOKENS * 4
    assert full - logits > masks
    long = Row(target_ids=tuple(range(2000)), split=0, max_new_tokens=4)
    assert engine(torch.float32)._row_bytes(long) > (tiny_llama.n_layers + 1) * 2000**2 * 4
    alternating = engine(torch.float32, (8, None, 8, None))._row_bytes(long)  # a mask per stage and window
    assert alternating > 2 * (tiny_llama.n_layers + 1) * 2000**2 * 4


def test_affine_mapping_round_trips_through_a_file(tmp_path, tiny_llama):
    from pytest_patchscope import AffineMapping

    torch.manual_seed(1)
    x = torch.randn(200, tiny_llama.d_model)
    w, b = torch.randn(tiny_llama.d_model, tiny_llama.d_model) * 0.1, torch.randn(tiny_llama.d_model)
    fitted = AffineMapping.fit(x, x @ w + b, name="test-affine")
    assert torch.allclose(fitted.weight, w, atol=1e-3) and torch.allclose(fitted.bias, b, atol=1e-3)
    fitted.save(tmp_path / "map.safetensors")
    loaded = AffineMapping.load(tmp_path / "map.safetensors")
    assert loaded.name == "test-affine" and torch.equal(loaded.weight, fitted.weight)
    result = Patchscope(tiny_llama).generate("Tokyo", "Short x", layer=0, mapping=loaded, max_new_tokens=3)
    assert result.probe.identity()["mapping"].startswith("test-affine")  # plus a hash of its weights (mapping_identity)


def test_positions_resolve_to_tokenizer_indices(tiny_llama):
    from pytest_patchscope.engine.resolve import resolve_positions

    def resolve_position(field, position, prompt, model):
        (index,) = resolve_positions(field, position, prompt, model)
        return index

    prompt = "The capital of France is in France"
    ids, offsets = tiny_llama.tokenize_with_offsets(prompt)
    assert ids == tiny_llama.tokenizer(prompt)["input_ids"]
    last_france = max(k for k, (s, e) in enumerate(offsets) if prompt[s:e].strip() == "France")
    first_france = min(k for k, (s, e) in enumerate(offsets) if prompt[s:e].strip() == "France")
    assert resolve_position("p", -1, prompt, tiny_llama) == len(ids) - 1
    assert resolve_position("p", "France", prompt, tiny_llama) == first_france
    assert resolve_position("p", Substring("France", occurrence=-1), prompt, tiny_llama) == last_france
    assert resolve_position("p", Substring("capital of", token="first"), prompt, tiny_llama) == 1
    assert resolve_position("p", Substring("capital of"), prompt, tiny_llama) == 2
    start = prompt.rindex("France")
    assert resolve_position("p", (start, start + 6), prompt, tiny_llama) == last_france
    assert resolve_position("p", Placeholder("x"), "The capital city of x is", tiny_llama) == 4


def test_bos_convention_is_the_tokenizers_own(tiny_llama):
    """TransformerBridge.to_tokens prepends BOS; the engine does not, so index k is the tokenizer's k-th token."""
    prompt = "The capital of France is"
    bridge_tokens = tiny_llama.bridge.to_tokens(prompt)[0].tolist()
    ours = tiny_llama.tokenize(prompt)
    assert bridge_tokens[0] == tiny_llama.tokenizer.bos_token_id and bridge_tokens[1:] == ours
    result = Patchscope(tiny_llama).generate(prompt, "Short x", layer=1, source_position=3, max_new_tokens=3)
    assert result.resolved.source_ids == tuple(ours) and result.resolved.source_index == 3
    captured = Engine(tiny_llama).capture(ours, 3, [1])[1]
    # the same state up to float rounding (SDPA on the twin vs eager attention in the bridge)
    assert torch.allclose(captured, ref.source_state(tiny_llama.hf, ours, 3, 1), atol=1e-5)
    assert not torch.allclose(captured, ref.source_state(tiny_llama.hf, ours, 4, 1), atol=1e-3)


def test_last_layer_state_is_pre_final_norm(tiny_llama):
    ids = tiny_llama.tokenize("The capital of France is")
    last = tiny_llama.n_layers - 1
    captured = Engine(tiny_llama).capture(ids, -1, [last])[last]
    # A plain HF twin (the same seed, so the same weights), built here: the session's model may predate a
    # re-import of the Llama module (pytester's), under which transformers' output recorders find none of its layers.
    plain = tiny_hf_model("llama", len(tiny_llama.tokenizer))
    with torch.no_grad():
        post_norm = plain(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        pre_norm = ref.source_state(plain, ids, len(ids) - 1, last)
        assert torch.allclose(post_norm, plain.model.norm(pre_norm), atol=1e-5)
    assert torch.allclose(captured, pre_norm, atol=1e-5)
    assert not torch.allclose(captured, post_norm, atol=1e-3)


def test_presets_are_data_over_the_one_operator(tiny_llama):
    from pytest_patchscope import LOGIT_LENS, attribute_extraction

    scope = Patchscope(tiny_llama)
    ti = scope.probe("Tokyo", TOKEN_IDENTITY, layer=2)
    assert (ti.target, ti.target_layer, ti.target_position, ti.stop) == (TOKEN_IDENTITY.target, 2, -1, ("\n",))
    ll = scope.probe("The capital of France is", LOGIT_LENS, layer=1, source_position=3)
    assert (ll.target, ll.target_layer, ll.target_position) == ("The capital of France is", tiny_llama.n_layers - 1, 3)
    ed = scope.probe("Tokyo", ENTITY_DESCRIPTION, layer=0)
    assert ed.target_position == Placeholder("x")
    ae = scope.probe("Tokyo", attribute_extraction("The currency of x is"), layer=0)
    assert ae.target == "The currency of x is"
    results = scope.run([ti, ll, ed, ae])
    assert [r.probe.preset for r in results] == ["token_identity", "logit_lens", "entity_description", ae.preset]


def test_stop_strings_and_max_new_tokens(tiny_llama):
    scope = Patchscope(tiny_llama)
    long = scope.generate("Tokyo", "Short x", layer=0, max_new_tokens=12)
    assert len(long.tokens) <= 12
    assert len(long.text) > 1, "the tiny model should generate some text"
    stop = long.text[len(long.text) // 2]
    cut = scope.generate("Tokyo", "Short x", layer=0, max_new_tokens=12, stop=[stop])
    assert stop not in cut.text and long.text.startswith(cut.text)


@pytest.mark.parametrize("fail_at_call", [1, 2, 4], ids=["in-the-opening-pass", "first-decoding-step", "later-decoding-step"])
def test_no_hook_is_left_after_a_probe_raises_mid_generation(tiny_llama, fail_at_call):
    """Forward calls: 1 the opening pass (source, prefix and patched span packed; capture, patch and
    stream hooks on), 2+ decoding (stream hooks on). Every pass runs on the plain twin; the failure
    is injected into the final norm of both models."""
    scope = Patchscope(tiny_llama)
    before = scope.generate("Tokyo", "The capital city of x is", layer=1, target_position=Placeholder("x"), max_new_tokens=5)
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            raise RuntimeError("boom in the middle of generation")

    handles = [m.model.norm.register_forward_hook(explode) for m in (tiny_llama.hf, tiny_llama.plain)]
    try:
        with pytest.raises(RuntimeError, match="boom"):
            scope.generate("Tokyo", "The capital city of x is", layer=1, target_position=Placeholder("x"), max_new_tokens=5)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["n"] == fail_at_call
    assert active_hooks(tiny_llama) == []
    after = scope.generate("Tokyo", "The capital city of x is", layer=1, target_position=Placeholder("x"), max_new_tokens=5)
    assert after.tokens == before.tokens and after.clean_tokens == before.clean_tokens


def test_a_raising_mapping_leaves_no_hook(tiny_llama):
    def broken(h):
        raise ValueError("bad map")

    with pytest.raises(ProbeConfigError, match="mapping"):
        Patchscope(tiny_llama).generate("Tokyo", "Short x", layer=1, mapping=broken)
    assert active_hooks(tiny_llama) == []


def test_sweep_profile_and_grid(tiny_llama):
    scope = Patchscope(tiny_llama)
    target_text = scope.generate("Tokyo", "Short x", layer=0, max_new_tokens=4).text
    expect = target_text.strip().split()[0] if target_text.strip() else "x"
    profile = scope.sweep("Tokyo", "Short x", layers=range(4), expect=expect, max_new_tokens=4)
    assert profile.layers == [0, 1, 2, 3] and not profile.grid
    assert 0 in profile.hit_layers and profile.first_hit == 0
    assert all(c.logprob is not None and c.rank is not None for c in profile.cells)
    assert profile.peak_layer in profile.layers
    singles = [scope.generate("Tokyo", "Short x", layer=l, max_new_tokens=4).text for l in range(4)]
    assert [c.text for c in profile.cells] == singles
    assert profile.clean_text == scope.generate("Tokyo", "Short x", layer=0, max_new_tokens=4).clean_text
    lean = scope.sweep("Tokyo", "Short x", layers=range(4), expect=expect, max_new_tokens=4, clean=False)
    assert lean.clean_text is None and [c.text for c in lean.cells] == singles
    assert [c.logprob for c in lean.cells] == pytest.approx([c.logprob for c in profile.cells], abs=1e-4)
    with pytest.raises(ProbeConfigError, match="clean"):
        scope.sweep("Tokyo", "Short x", layers=range(4), clean="no")
    grid = scope.sweep("Tokyo", "Short x", layers=[0, 1], target_layers=range(3), expect=expect, max_new_tokens=3)
    assert grid.grid and len(grid.cells) == 6
    assert {(c.layer, c.target_layer) for c in grid.cells} == {(l, t) for l in (0, 1) for t in range(3)}
    assert "l*" in grid.table()


def test_the_expected_answer_scores_in_any_case(default_scope):
    """The hit test is case-insensitive, so the score is too: "paris" is scored on its best-scoring
    spelling (" Paris"), not on the first token of "paris" ("par", far down the ranks)."""
    from pytest_patchscope.probes.presets import TOKEN_IDENTITY

    def cell(expect: str):
        return default_scope.sweep("The capital of France is", TOKEN_IDENTITY, layers=[27], expect=expect, max_new_tokens=4).cells[0]

    lower, written = cell("paris"), cell("Paris")
    assert lower.hit and written.hit
    assert (lower.logprob, lower.rank) == (written.logprob, written.rank)
    assert written.rank == 0 and written.logprob > -0.5
    paris = default_scope.model.tokenize(" Paris")[-1]
    assert paris in default_scope.expected_token_ids("paris") and paris in default_scope.expected_token_ids("PARIS")


def test_plain_twin_shares_the_weights_and_computes_the_same(tiny_model):
    """Hook-free passes run on an unwrapped twin of the HF model that aliases every tensor."""
    twin = tiny_model.plain
    assert twin is not tiny_model.hf and type(twin) is type(tiny_model.hf)
    wrapped = {t.data_ptr() for t in tiny_model.hf.parameters()}
    assert {t.data_ptr() for t in twin.parameters()} <= wrapped
    ids = torch.tensor([tiny_model.tokenize("The capital of France is")])
    with torch.no_grad():
        assert torch.allclose(twin(ids).logits, tiny_model.hf(ids).logits, atol=1e-5)


def test_engine_imports_no_pytest_and_the_plugin_no_torch():
    """The engine runs under `python -c`; loading the plugin stays cheap for unrelated test runs."""
    import subprocess
    import sys

    engine = "import sys, pytest_patchscope.scope, pytest_patchscope.engine, pytest_patchscope.eval; assert 'pytest' not in sys.modules"
    plugin = "import sys, pytest_patchscope.plugin; assert 'transformers' not in sys.modules and 'transformer_lens' not in sys.modules"
    probes = (
        "import sys, pytest_patchscope.probes.probe, pytest_patchscope.probes.decoding, pytest_patchscope.probes.presets, "
        "pytest_patchscope.probes.options; assert 'torch' not in sys.modules"
    )
    for code in (engine, plugin, probes):
        subprocess.run([sys.executable, "-c", code], check=True)


PEAK_SCRIPT = """
import re, sys
from pytest_patchscope import Patchscope

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

scope = Patchscope.load(sys.argv[1], batch_memory_mb=float(sys.argv[2]))
long = " ".join(["the history of the roman empire and its long decline"] * 20)
scope.sweep(long, long + " x", layers=[0], max_new_tokens=2)  # warm-up: lazy kernel and allocator set-up
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
scope.sweep(long, long + " x", layers=range(4), target_layers=range(4), max_new_tokens=8)
print(status("VmHWM") - before)
"""


@pytest.mark.slow  # a subprocess that measures its own peak memory
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_measured_peak_memory_stays_under_the_bound(tiny_llama_dir):
    """A 4 x 4 grid of 200-token prompts, in a fresh process whose large allocations go back to the
    OS when freed (MALLOC_MMAP_THRESHOLD_), so that the high-water mark sees every transient."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    peaks = {}
    for bound in (8, 128):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tiny_llama_dir), str(bound)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[bound] = float(out.stdout.split()[-1])
    print(f"peak memory added by the grid: {peaks} (MB, by batch_memory_mb)")
    assert all(peak <= bound for bound, peak in peaks.items()), peaks
    assert peaks[128] > peaks[8], "one big batch should need more than small chunks, else the measurement sees nothing"
