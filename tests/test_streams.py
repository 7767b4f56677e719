"""Shared-trunk execution: which rows compute together at each layer, and that sharing changes nothing.

The plan is pure bookkeeping and is tested on plain integers; the sharing itself is checked on the
tiny models against the independent HF implementation, with rows built to agree for a while.
"""
from __future__ import annotations

import pytest
import torch

from pytest_patchscope import Placeholder, Probe
from pytest_patchscope.engine.streams import LayerKV, PackedLayout, StreamPlan
from pytest_patchscope.errors import EngineError
from pytest_patchscope.scope import Patchscope

import hf_reference as ref
from conftest import active_hooks


def test_a_sweep_shares_every_layer_below_each_patch():
    """Rows patched after layers 0..3 (branching at stages 1..4) plus a clean row, one target:
    layer j runs j + 1 streams."""
    plan = StreamPlan(range(5), groups=[0] * 5, branch_stages=[1, 2, 3, 4, None], n_layers=4)
    assert [len(reps) for reps in plan.reps] == [1, 2, 3, 4, 5]
    assert plan.widen(1) == [0, 0] and plan.from_final(3) == [0, 1, 2, 3] and plan.from_final(4) is None
    # a row branches right after its patch layer, and keeps its own stream from there on
    assert plan.stream_of[1][0] != plan.stream_of[1][4] and plan.stream_of[1][1] == plan.stream_of[1][4]
    assert len(set(plan.final.values())) == 5


def test_a_row_patched_inside_block_l_branches_at_block_l():
    """attn_out at layer 1 differs from the trunk in block 1 itself; resid_post at layer 1 only after it."""
    plan = StreamPlan(range(3), groups=[0] * 3, branch_stages=[1, 2, None], n_layers=3)
    assert [len(reps) for reps in plan.reps] == [1, 2, 3, 3]
    assert plan.stream_of[1][0] != plan.stream_of[1][2] and plan.stream_of[1][1] == plan.stream_of[1][2]


def test_rows_that_generated_different_tokens_part_and_the_store_follows():
    first = StreamPlan(range(3), groups=[0, 0, 0], branch_stages=[3, 3, None], n_layers=3)
    # rows 0 and 2 generated one token, row 1 another: row 1 leaves the trunk at every layer
    second = StreamPlan(range(3), groups=[1, 2, 1], branch_stages=[3, 3, None], n_layers=3)
    assert [len(reps) for reps in second.reps] == [2, 2, 2, 3]
    parent = second.from_previous(first, 0)
    assert parent == [0, 0]  # both new streams continue the one old trunk's history
    store = LayerKV(torch.arange(2.0).reshape(1, 1, 2, 1), torch.zeros(1, 1, 2, 1))
    store.select(torch.tensor(parent))
    assert store.keys.shape == (2, 1, 2, 1) and torch.equal(store.keys[0], store.keys[1])
    assert second.from_previous(second, 1) is None  # nothing moved: no copy


def test_finished_rows_leave_their_streams():
    plan = StreamPlan([0, 2], groups=[5, 9, 5], branch_stages=[None, None, 1], n_layers=2)
    assert plan.rows == [0, 2] and [len(reps) for reps in plan.reps] == [1, 2, 2]


def test_each_layer_runs_once_per_stream_in_a_sweep(tiny_llama):
    """The opening pass of an n-layer sweep packs prefix, source and streams into one row: layer j
    sees one more stream (one more copy of T[i*:]) than layer j - 1, i.e. the rows below it plus one trunk."""
    scope = Patchscope(tiny_llama)
    n = tiny_llama.n_layers
    seen: dict[int, list[tuple[int, ...]]] = {j: [] for j in range(n)}
    handles = [
        layer.register_forward_pre_hook(lambda module, args, j=j: seen[j].append(tuple(args[0].shape[:2])))
        for j, layer in enumerate(tiny_llama.plain_layers)
    ]
    try:
        scope.sweep("Tokyo", "The capital city of x is", layers=range(n), target_position=-1, max_new_tokens=3)
    finally:
        for handle in handles:
            handle.remove()
    target = tiny_llama.tokenize("The capital city of x is")
    source = tiny_llama.tokenize("Tokyo")
    opening = [seen[j][0] for j in range(n)]  # calls: [opening pass, decoding...]
    assert all(batch == 1 for batch, _ in opening)
    suffix = opening[1][1] - opening[0][1]
    assert suffix >= 1 and [width for _, width in opening] == [opening[0][1] + j * suffix for j in range(n)]
    assert opening[0][1] == len(target) + len(source)  # prefix + one trunk span + the source prompt
    assert active_hooks(tiny_llama) == []


def test_rows_that_agree_share_and_still_equal_the_reference(tiny_model):
    """Strength-0 rows generate the clean text, so they share trunks through decoding; strength-1
    rows at the same layers part from them. Every row must still equal the one-pass HF reference."""
    scope = Patchscope(tiny_model)
    n = tiny_model.n_layers
    probes = [
        Probe(source, "The capital city of x is", layer=layer, target_layer=layer, strength=strength, max_new_tokens=6)
        for source in ("Tokyo", "A much longer source prompt about Rome")
        for layer in range(n)
        for strength in (0.0, 1.0)
    ]
    results = scope.run(probes)
    hf = tiny_model.hf
    for result in results:
        rp = result.resolved
        if rp.probe.strength == 0.0:
            assert result.tokens == result.clean_tokens
            continue
        vector = ref.source_state(hf, list(rp.source_ids), rp.source_index, rp.layer)
        expected = ref.patched_generate(hf, list(rp.target_ids), rp.target_index, rp.target_layer, vector, 6)
        assert list(result.tokens) == expected, rp.probe.describe()


def test_the_opening_pass_writes_every_patch_of_a_grid_once(tiny_llama, monkeypatch):
    import pytest_patchscope.engine.runner as engine_module
    from pytest_patchscope.engine.streams import forward_opening

    counts = []

    def counting(*args, **kwargs):
        logits, kv, written = forward_opening(*args, **kwargs)
        counts.append(dict(written))
        return logits, kv, written

    monkeypatch.setattr(engine_module, "forward_opening", counting)
    n = tiny_llama.n_layers
    Patchscope(tiny_llama).sweep("Tokyo", "The capital city of x is", layers=range(n), target_layers=range(n),
                                 target_position=Placeholder("x"), max_new_tokens=2)
    patched = [c for c in counts if c]  # an earlier pass may capture sources above their patch layer
    assert len(patched) == 1 and len(patched[0]) == n * n and set(patched[0].values()) == {1}  # the clean row has none


def test_two_patches_on_one_token_are_an_internal_error(tiny_llama, monkeypatch):
    """If the layout ever put two rows' patches on one token, one would silently overwrite the other."""
    scope = Patchscope(tiny_llama)
    monkeypatch.setattr(PackedLayout, "span_token", lambda self, stage, row, index: 0)
    with pytest.raises(EngineError, match=r"internal error: patches of rows \[\d+, \d+\] at blocks\.1\.hook_resid_post share a token"):
        scope.run([Probe("Tokyo", "Short x", layer=1), Probe("Paris", "Short x", layer=1)])
    assert active_hooks(tiny_llama) == []
