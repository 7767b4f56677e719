"""The defects of the reliability review (shared/research/reliability-2026-12.md, D1-D10 less D2/D4),
each as a test that holds: its minimal reproduction now gives a project error (or the right result).

D1 a model whose finite weights overflow; D3 broken or absurd config.json; D5 lone surrogates;
D6 numpy and torch arguments; D7 empty and missing probe lists; D8 sampling settings that overflow
the logits; D9 temp files of killed report writes and GGUF dequantizations; D10 long model specs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pytest_patchscope import Placeholder, Probe
from pytest_patchscope.errors import ModelLoadError, ProbeConfigError
from pytest_patchscope.model.loading import from_hf, load_model
from pytest_patchscope.scope import Patchscope

from conftest import active_hooks, tiny_hf_model
from families import Family

pytest_plugins = ["pytester"]

T = "The capital city of x is"
X = Placeholder("x")


# ---- D1: finite weights that overflow ---------------------------------------------------------
@pytest.fixture(scope="module")
def overflowing(tokenizer):
    """The tiny Llama with block 1's down projection at 3e38: finite weights, NaN/inf from layer 1 on."""
    hf = tiny_hf_model("llama", len(tokenizer))
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[:] = 3e38
    return Patchscope(from_hf(hf, tokenizer, name="tiny-overflow"))


@pytest.mark.parametrize("call", [
    pytest.param(lambda s: s.score("Tokyo", T, ["Paris", "London"], layer=0, target_position=-1), id="score"),
    pytest.param(lambda s: s.generate("Tokyo", T, layer=0, target_position=X), id="generate"),
    pytest.param(lambda s: s.sweep("Tokyo", T, layers=[1], expect="Paris", target_position=-1), id="sweep-source-overflows"),
    pytest.param(lambda s: s.sweep("Tokyo", T, layers=[3], target_layers=[0], clean=False, target_position=-1), id="grid-no-clean"),
])
def test_d1_a_model_that_overflows_is_refused_naming_the_layer_never_reported_as_nan(overflowing, call):
    with pytest.raises(ModelLoadError) as info:
        call(overflowing)
    message = str(info.value)
    assert "model='tiny-overflow'" in message and "from layer 1 on (the output of blocks.1)" in message
    assert "before any patch" in message  # the user's mapping and strength are not blamed
    assert active_hooks(overflowing.model) == []


def test_d1_a_patch_that_drives_the_layers_after_it_to_nan_is_the_patch_s_error(tokenizer):
    """A post-norm OPT (OPT-350m style) feeds the raw residual to attention: a finite patch of 1e33
    overflows there. That is the strength's doing, and the error says so."""
    hf = Family("opt", "OPTConfig", "", {"ffn_dim": 128, "word_embed_proj_dim": 64, "do_layer_norm_before": False}).build()
    scope = Patchscope(from_hf(hf, tokenizer, name="tiny-opt-post-norm"))
    at_load = active_hooks(scope.model)  # OPT's adapter keeps hooks of its own
    clean = scope.generate("Tokyo", T, layer=0, target_position=X, max_new_tokens=3)
    with pytest.raises(ProbeConfigError) as info:
        scope.generate("Tokyo", T, layer=0, target_position=X, strength=1000, mapping=lambda h: h * 1e30, max_new_tokens=3)
    assert info.value.field == "strength" and "the patch is finite, but the layers after it overflow" in str(info.value)
    assert active_hooks(scope.model) == at_load
    assert scope.generate("Tokyo", T, layer=0, target_position=X, max_new_tokens=3).tokens == clean.tokens


# ---- D3: broken or absurd config.json ---------------------------------------------------------
def _config(tiny_llama_dir) -> dict:
    return json.loads((tiny_llama_dir / "config.json").read_text())


BROKEN_CONFIGS = [
    pytest.param(lambda c: json.dumps(c)[:40], "is not valid JSON", id="truncated"),
    pytest.param(lambda c: "[1, 2]", "holds a JSON list", id="a-list"),
    pytest.param(lambda c: '"llama"', "holds a JSON str", id="a-string"),
    pytest.param(lambda c: json.dumps(c)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "RecursionError", id="deep"),
    pytest.param(lambda c: json.dumps(c).replace('"num_hidden_layers": 4', '"num_hidden_layers": ' + "9" * 5000), "ValueError", id="digits"),
    pytest.param(lambda c: json.dumps({**c, "num_attention_heads": 0}), "num_attention_heads=0", id="zero-heads"),
    pytest.param(lambda c: json.dumps({**c, "hidden_size": "64"}), "hidden_size='64'", id="size-as-string"),
    pytest.param(lambda c: json.dumps({**c, "architectures": [1]}), "architectures=[1]", id="architectures"),
    pytest.param(lambda c: json.dumps({**c, "num_hidden_layers": 10**6}), "its weights hold 4 layers", id="a-million-layers"),
]


@pytest.mark.parametrize("write,reason", BROKEN_CONFIGS)
def test_d3_a_broken_config_is_a_quick_model_load_error_naming_the_file(tmp_path, tiny_llama_dir, write, reason):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, checkpoint)
    (checkpoint / "config.json").write_text(write(_config(tiny_llama_dir)))
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model(checkpoint)
    assert time.monotonic() - started < 30  # 10^6 layers took 150 s and 6.6 GB before
    assert str(checkpoint / "config.json") in str(info.value) and reason in str(info.value)


def test_d3_the_report_header_survives_a_broken_config(pytester, tmp_path, tiny_llama_dir):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, checkpoint)
    (checkpoint / "config.json").write_text('{"model_type": "llama", ')
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--patchscope-model", str(checkpoint), "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()  # was INTERNALERROR (rc 3)
    result.stdout.fnmatch_lines(["patchscope: model * not loadable: *config.json is not valid JSON*"])


# ---- D5: lone surrogates ----------------------------------------------------------------------
@pytest.mark.parametrize("call,field", [
    pytest.param(lambda s: s.generate("\ud800", T, layer=0, target_position=X), "source", id="source"),
    pytest.param(lambda s: s.generate("Tokyo", "The x \udfff", layer=0, target_position=X), "target", id="target"),
    pytest.param(lambda s: s.score("France", T, ["Paris", "\ud800"], layer=1, target_position=-1), "candidates", id="candidates"),
    pytest.param(lambda s: s.sweep("France", T, layers=[1], expect="Pa\ud800ris", target_position=-1), "expect", id="expect"),
])
def test_d5_a_lone_surrogate_is_a_probe_config_error_naming_the_field(tiny_llama, call, field):
    with pytest.raises(ProbeConfigError) as info:
        call(Patchscope(tiny_llama))
    assert info.value.field == field and "lone surrogate" in str(info.value)
    assert active_hooks(tiny_llama) == []


# ---- D6: numpy and torch arguments ------------------------------------------------------------
def _text(result):
    return (result.tokens, result.clean_tokens)


def test_d6_integer_arrays_are_taken_as_the_lists_they_hold(tiny_llama):
    scope = Patchscope(tiny_llama)
    base = dict(layer=1, target_position=X, max_new_tokens=4)
    expected = _text(scope.generate("Tokyo", T, units=[0, 1, 2], **base))
    assert _text(scope.generate("Tokyo", T, units=np.arange(3), **base)) == expected
    assert _text(scope.generate("Tokyo", T, units=torch.arange(3), **base)) == expected
    assert _text(scope.generate("Tokyo", T, units=np.argsort([5, 4, 3, 9])[:3], **base)) == expected  # [2, 1, 0]
    assert _text(scope.generate("Tokyo", T, units=[np.int64(0), np.int64(1), np.int64(2)], **base)) == expected
    assert _text(scope.generate("Tokyo", T, **{**base, "layer": np.int64(1)})) == _text(scope.generate("Tokyo", T, **base))
    assert _text(scope.generate("Tokyo", T, **{**base, "target_position": torch.tensor(-1)})) == _text(
        scope.generate("Tokyo", T, **{**base, "target_position": -1})
    )
    assert _text(scope.generate("Tokyo", T, **{**base, "source_position": np.int64(0)})) == _text(
        scope.generate("Tokyo", T, **{**base, "source_position": 0})
    )
    probe = Probe("Tokyo", T, layer=np.int64(1), target_position=np.array([3, 4]), units=torch.tensor([0, 1]), max_new_tokens=4)
    assert (probe.layer, probe.target_position, probe.units) == (1, [3, 4], (0, 1)) and type(probe.layer) is int
    assert probe == Probe("Tokyo", T, layer=1, target_position=[3, 4], units=(0, 1), max_new_tokens=4)
    sweep = scope.sweep("Tokyo", T, layers=[0, 1], target_layers=[2], target_position=X, max_new_tokens=3)
    assert [c.text for c in scope.sweep("Tokyo", T, layers=np.arange(2), target_layers=torch.tensor(2), target_position=X,
                                        max_new_tokens=3).cells] == [c.text for c in sweep.cells]
    assert active_hooks(tiny_llama) == []


@pytest.mark.parametrize("kwargs,field", [
    pytest.param(dict(units=np.array([0.5, 1.5])), "units", id="float-array-units"),
    pytest.param(dict(units=np.array([True, False])), "units", id="bool-array-units"),
    pytest.param(dict(units=np.zeros((2, 2), dtype=int)), "units", id="2d-units"),
    pytest.param(dict(stop=torch.tensor([1, 2])), "stop", id="tensor-stop"),
    pytest.param(dict(layer=torch.tensor([1, 2])), "layer", id="tensor-layer"),
    pytest.param(dict(target_position=np.array([])), "target_position", id="empty-positions"),
    pytest.param(dict(max_new_tokens=np.array([2, 3])), "max_new_tokens", id="array-budget"),
])
def test_d6_other_arrays_are_probe_config_errors_not_numpy_or_torch_errors(tiny_llama, kwargs, field):
    with pytest.raises(ProbeConfigError) as info:
        Patchscope(tiny_llama).generate("Tokyo", T, **{"layer": 1, "target_position": X, **kwargs})
    assert info.value.field == field
    with pytest.raises(ProbeConfigError):
        Patchscope(tiny_llama).run([Probe("Tokyo", T, **{"layer": 1, "target_position": X, **kwargs})])
    assert active_hooks(tiny_llama) == []


def test_d6_arrays_in_sweeps_and_stop_strings(tiny_llama):
    scope = Patchscope(tiny_llama)
    assert scope.generate("Tokyo", T, layer=0, target_position=X, stop=np.array([" "]), max_new_tokens=4).text == (
        scope.generate("Tokyo", T, layer=0, target_position=X, stop=[" "], max_new_tokens=4).text
    )
    with pytest.raises(ProbeConfigError) as info:
        scope.sweep("Tokyo", T, layers=torch.tensor([[0, 1]]), target_position=X)
    assert info.value.field == "layers"
    with pytest.raises(ProbeConfigError) as info:
        scope.sweep("Tokyo", T, layers=[0], target_layers=np.array([9]), target_position=X)
    assert info.value.field == "target_layers"


# ---- D7: empty and missing probe lists --------------------------------------------------------
def test_d7_an_empty_probe_list_is_an_empty_job_and_none_is_refused(tiny_llama):
    scope = Patchscope(tiny_llama)
    assert scope.run([]) == [] and scope.run(()) == []
    assert scope.check_all([], bool) == []  # a property over no probes holds (Hypothesis may draw [])
    assert scope.run_sweeps([]) == []
    for bad in (None, 3, "Tokyo"):
        with pytest.raises(ProbeConfigError) as info:
            scope.run(bad)
        assert info.value.field == "probes"
    with pytest.raises(ProbeConfigError, match=r"run\(\[probe\]\)"):
        scope.run(scope.probe("Tokyo", T, layer=0, target_position=X))
    assert active_hooks(tiny_llama) == []


# ---- D8: sampling settings that overflow the logits -------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    pytest.param(dict(do_sample=True, temperature=1e-45), "temperature", id="temperature-tiny"),
    pytest.param(dict(do_sample=True, temperature=1e300), "temperature", id="temperature-huge"),
    pytest.param(dict(do_sample=True, repetition_penalty=1e-300), "repetition_penalty", id="penalty-tiny-sampled"),
    pytest.param(dict(repetition_penalty=1e-300), "repetition_penalty", id="penalty-tiny-greedy"),
    pytest.param(dict(repetition_penalty=1e300), "repetition_penalty", id="penalty-huge"),
])
def test_d8_sampling_settings_that_overflow_are_refused_before_any_hook(tiny_llama, kwargs, field):
    with pytest.raises(ProbeConfigError) as info:
        Patchscope(tiny_llama).generate("France", T, layer=1, target_position=X, **kwargs)
    assert info.value.field == field and "overflow" in str(info.value)
    assert active_hooks(tiny_llama) == []


def test_d8_the_smallest_temperature_allowed_samples_the_greedy_tokens(tiny_llama):
    scope = Patchscope(tiny_llama)
    greedy = scope.generate("France", T, layer=1, target_position=X, max_new_tokens=6)
    cold = scope.generate("France", T, layer=1, target_position=X, max_new_tokens=6, do_sample=True, temperature=1e-10, seed=3)
    assert _text(cold) == _text(greedy)


# ---- D9: temp files of killed writers ---------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_d9_a_report_write_removes_the_temp_files_of_killed_writers(tmp_path):
    from pytest_patchscope.reports.summary import write_report_file

    target = tmp_path / "out" / "r.json"
    target.parent.mkdir()
    stale = target.parent / f".r.json.{_dead_pid()}.0123abcd.tmp"
    live = target.parent / f".r.json.{os.getpid()}.89abcdef.tmp"  # a writer that is still running
    other = target.parent / f".other.json.{_dead_pid()}.0123abcd.tmp"  # another file's: not ours to judge
    for path in (stale, live, other):
        path.write_text("half a report")
    write_report_file(target, "{}")
    assert target.read_text() == "{}"
    assert not stale.exists() and live.exists() and other.exists()


def test_d9_a_gguf_build_removes_the_staging_dirs_of_killed_builds(tmp_path, monkeypatch):
    from pytest_patchscope.model import loading

    monkeypatch.setenv("PATCHSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF not really")
    source = loading.ModelSource("gguf", gguf, "m")
    name = f"{loading.weights_hash(source)[:24]}-float32"
    stale = tmp_path / "cache" / "gguf" / f".{name}.k1ll3d"  # what a SIGKILL mid-dequantization leaves
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)

    def dequantize(source, directory, dtype):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(directory / "model.safetensors"))
        files = {p.name: p.stat().st_size for p in directory.iterdir()}
        (directory / "manifest.json").write_text(json.dumps({"format": loading.CACHE_FORMAT, "files": files}))

    monkeypatch.setattr(loading, "_dequantize_into", dequantize)
    built = loading.dequantized_cache_dir(source)
    assert built.name == name and (built / "manifest.json").is_file()
    assert not stale.exists() and [p.name for p in built.parent.iterdir() if p.name.startswith(".")] == []


# ---- D10: long model specs --------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["a" * 5000, "x/" * 3000], ids=["long-name", "long-path"])
def test_d10_a_model_spec_too_long_for_a_path_is_a_model_load_error(spec):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert "cannot be looked up as a path" in str(info.value) and len(str(info.value)) < 1000
