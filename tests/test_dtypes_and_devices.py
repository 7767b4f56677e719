"""Loading in bfloat16 and float16, and spreading a model over devices with a device_map.

bf16 cannot be bit-identical to fp32, nor a packed batch to a probe alone (another summation order):
the real default model's batched bf16 rows are held to single probes and to an fp32 run by top-1
agreement and a log-probability tolerance, the figures README's "Dtypes" section states.
A device_map is tested on the CPU by offloading half a tiny model's layers to disk: accelerate then
loads those weights at each call, through the hooks the engine's unwrapped twin must carry.
"""
from __future__ import annotations

import pytest
import torch

from pytest_patchscope import TOKEN_IDENTITY, Patchscope, Placeholder, Probe, attribute_extraction
from pytest_patchscope.engine.runner import run_probes
from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.model.devices import check_dtype_runs, dtype_name, resolve_dtype

from conftest import active_hooks


def test_dtype_names_and_what_auto_means():
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(" Float16 ") == "float16"
    assert resolve_dtype("auto", "cpu", "bfloat16") == "float32", "auto is float32 on a CPU"
    assert resolve_dtype("auto", "cuda:0", "bfloat16") == "bfloat16", "auto is the checkpoint's own dtype on a GPU"
    assert resolve_dtype("auto", "cuda", None) == "float32"
    assert resolve_dtype(torch.float16, "cpu", "bfloat16") == "float16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_a_checkpoint_loads_and_probes_in_half_precision(tiny_llama_dir, dtype):
    scope = Patchscope.load(tiny_llama_dir, dtype=dtype)
    name = dtype_name(dtype)
    assert scope.model.dtype == name
    assert {p.dtype for p in scope.model.hf.parameters() if p.is_floating_point()} == {getattr(torch, name)}
    profile = scope.sweep("Tokyo", "The capital city of x is", layers=range(4), target_position=Placeholder("x"), expect="Tokyo", max_new_tokens=4)
    assert profile.dtype == name and len(profile.cells) == 4
    assert all(c.logprob is not None and c.logprob <= 0 for c in profile.cells)


@pytest.mark.parametrize("bad", ["int8", "float64", "half-ish", 16, torch.int32, None])
def test_an_unknown_dtype_is_refused_before_anything_loads(tiny_llama_dir, bad):
    with pytest.raises(ProbeConfigError, match=r"dtype=.* is not valid: one of auto, float32, bfloat16, float16"):
        Patchscope.load(tiny_llama_dir, dtype=bad)


def test_float16_where_torch_has_no_cpu_kernels_is_refused(tiny_llama_dir, monkeypatch):
    """Older torch CPU builds lack fp16 kernels (layer_norm, matmul); simulated here by removing one."""
    real = torch.nn.functional.layer_norm

    def no_half(x, *args, **kwargs):
        if x.dtype == torch.float16:
            raise RuntimeError('"LayerNormKernelImpl" not implemented for \'Half\'')
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", no_half)
    with pytest.raises(ProbeConfigError, match=r"dtype='float16' is not valid: a dtype that this torch build computes in on cpu.*Use float32"):
        Patchscope.load(tiny_llama_dir, dtype="float16")
    check_dtype_runs("bfloat16", "cpu")


@pytest.fixture(scope="module")
def bf16_and_fp32(default_scope):
    return Patchscope.load(None, dtype="bfloat16"), default_scope


def test_default_model_in_bfloat16_agrees_with_single_probes_and_with_float32(bf16_and_fp32):
    half, full = bf16_and_fp32
    assert half.model.dtype == "bfloat16"
    capital_city = attribute_extraction()
    probes = [half.probe("The capital of France is", TOKEN_IDENTITY, layer=l, max_new_tokens=4) for l in range(0, 30, 3)]
    probes += [half.probe(f"Country: {c}", capital_city, layer=l, max_new_tokens=4) for c in ("France", "Japan") for l in (0, 1, 3)]
    reference = run_probes(full.engine, probes, clean=False)
    top = [r.tokens[:1] for r in reference]
    reference = run_probes(full.engine, probes, score_ids=top, clean=False)
    batched = run_probes(half.engine, probes, score_ids=top, clean=False)
    single = [run_probes(half.engine, [p], score_ids=[t], clean=False)[0] for p, t in zip(probes, top)]
    n = len(probes)
    with_single = sum(b.tokens[:1] == s.tokens[:1] for b, s in zip(batched, single))
    with_fp32 = sum(b.tokens[:1] == r.tokens[:1] for b, r in zip(batched, reference))
    gap_single = max(abs(b.first_token_scores[t[0]][0] - s.first_token_scores[t[0]][0]) for b, s, t in zip(batched, single, top))
    gap_fp32 = max(abs(b.first_token_scores[t[0]][0] - r.first_token_scores[t[0]][0]) for b, r, t in zip(batched, reference, top))
    print(f"bf16 batched vs single: top-1 {with_single}/{n}, max |d log p| {gap_single:.3f}; vs fp32: top-1 {with_fp32}/{n}, {gap_fp32:.3f}")
    assert with_single >= n - 1 and gap_single < 0.25
    assert with_fp32 >= n - 2 and gap_fp32 < 0.25
    paris = half.generate("The capital of France is", TOKEN_IDENTITY, layer=27)
    assert "Paris" in paris.text, "the fact README quotes is still decoded in bf16"


OFFLOADED = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu",
}


def test_a_model_spread_by_a_device_map_gives_the_same_tokens(tiny_llama_dir):
    whole = Patchscope.load(tiny_llama_dir)
    spread = Patchscope.load(tiny_llama_dir, device_map=OFFLOADED)
    offloaded = [n for n, p in spread.model.hf.named_parameters() if p.device.type == "meta"]
    assert offloaded and all(".layers.1." in n or ".layers.2." in n for n in offloaded), "layers 1-2 live on disk"
    probes = [Probe("The capital of France is", "Short x", layer=l, target_layer=t, max_new_tokens=6) for l in range(4) for t in range(4)]
    for a, b in zip(whole.run(probes), spread.run(probes)):
        assert (a.tokens, a.clean_tokens) == (b.tokens, b.clean_tokens), a.probe.describe()
    assert sum(a.tokens != a.clean_tokens for a in whole.run(probes)) > 4
    assert not [n for n, m in spread.model.plain.named_modules() if m._forward_hooks or m._forward_pre_hooks]


@pytest.mark.parametrize("device_map, allowed", [
    ({"model.layers.0": "cuda:3"}, r"device_map=.* is not valid: one of 'auto'.*Entry 'model.layers.0': 'cuda:3' is not a device here"),
    ("everywhere", r"device_map='everywhere' is not valid: one of 'auto', 'balanced'"),
    ({"model.embed_tokens": "cpu"}, r"device_map=.* is not valid: a placement that fits this model: it places no device for 'model.layers.0"),
    ({**OFFLOADED, "transformer.h.0": "cpu"}, r"device_map=.* is not valid: a placement that fits this model: it names no module 'transformer.h.0'"),
])
def test_a_device_map_that_does_not_fit_is_refused(tiny_llama_dir, device_map, allowed):
    with pytest.raises(ProbeConfigError, match=allowed):
        Patchscope.load(tiny_llama_dir, device_map=device_map)


def test_plugin_options_name_the_dtype_and_refuse_bad_values(pytester, tiny_llama_dir):
    pytester.makepyfile(
        """
        def test_dtype(patchscope):
            assert patchscope.model.dtype == "bfloat16"
        """
    )
    args = ["--patchscope-model", str(tiny_llama_dir), "-p", "no:cacheprovider"]
    ok = pytester.runpytest(*args, "--patchscope-dtype=bfloat16")
    ok.assert_outcomes(passed=1)
    ok.stdout.fnmatch_lines(["patchscope: model tiny_llama0 *, device cpu, dtype bfloat16, max_new_tokens 20"])
    bad = pytester.runpytest(*args, "--patchscope-dtype=int4")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--patchscope-dtype='int4' is not valid: one of auto, float32, bfloat16, float16*"])
    far = pytester.runpytest(*args, '--patchscope-device-map={"model.layers.0": "cuda:7"}')
    assert far.ret == pytest.ExitCode.USAGE_ERROR
    far.stderr.fnmatch_lines(["*--patchscope-device-map=* is not valid*'cuda:7' is not a device here*"])


def test_nothing_is_left_hooked_after_bad_dtype_or_map(tiny_llama):
    before = active_hooks(tiny_llama)
    for bad in ({"dtype": "int8"}, {"device_map": "everywhere"}):
        with pytest.raises(ProbeConfigError):
            Patchscope.load(None, **bad)
    assert active_hooks(tiny_llama) == before
