"""Loading models: the weights cache (keyed by hash, atomic, rebuilt when corrupt), untrusted or
damaged checkpoints, device checks and quiet output."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.model import loading as models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_dequantize(monkeypatch, default_model_dir):
    """Copy the already dequantized default model instead of dequantizing again (20-40 s)."""
    calls = []

    def fake(source, directory, dtype):
        calls.append((directory, dtype))
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(default_model_dir / name, directory / name)
        files = {p.name: p.stat().st_size for p in directory.iterdir()}
        (directory / "manifest.json").write_text(json.dumps({"format": models.CACHE_FORMAT, "files": files}))

    monkeypatch.setattr(models, "_dequantize_into", fake)
    return calls


def test_cache_is_keyed_by_hash_and_dtype_built_once_and_rebuilt_when_corrupt(cache, fake_dequantize):
    source = models.resolve_model_source(None)
    first = models.dequantized_cache_dir(source)
    assert first.name == models.weights_hash(source)[:24] + "-float32" and len(fake_dequantize) == 1
    half = models.dequantized_cache_dir(source, "bfloat16")
    assert half.name.endswith("-bfloat16") and half != first and fake_dequantize[-1][1] == "bfloat16"
    del fake_dequantize[1:]
    assert models.dequantized_cache_dir(source) == first and len(fake_dequantize) == 1, "a valid cache is reused"
    with open(first / "model.safetensors", "r+b") as handle:  # truncate: a crashed copy
        handle.truncate(1000)
    assert not models._cache_is_valid(first)
    assert models.dequantized_cache_dir(source) == first and len(fake_dequantize) == 2, "a corrupt cache is rebuilt"
    assert models._cache_is_valid(first)
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith(".")], "no staging directory is left"


def test_a_failed_build_leaves_no_cache_entry(cache, monkeypatch):
    def broken(source, directory, dtype):
        (directory / "model.safetensors").write_bytes(b"half")
        raise models.ModelLoadError("simulated crash while dequantizing")

    monkeypatch.setattr(models, "_dequantize_into", broken)
    with pytest.raises(models.ModelLoadError, match="simulated crash"):
        models.dequantized_cache_dir(models.resolve_model_source(None))
    entries = [p for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")]
    assert entries == []


def test_a_gguf_file_path_is_accepted(default_model_dir):
    gguf = models.default_gguf_path()
    source = models.resolve_model_source(str(gguf))
    assert source.kind == "gguf" and source.path == gguf
    assert models.dequantized_cache_dir(source) == default_model_dir


def test_hash_memo_is_written_with_no_temp_file_left(cache, tiny_llama_dir):
    source = models.resolve_model_source(tiny_llama_dir)
    value = models.weights_hash(source)
    memos = list((cache / "hashes").iterdir())
    assert [p.suffix for p in memos] == [".txt"] and memos[0].read_text() == value
    assert models.weights_hash(source) == value, "the memo is read back"


# ---- untrusted and damaged checkpoints -------------------------------------------------------
EVIL_CODE = '''
from pathlib import Path

from transformers import LlamaForCausalLM

Path({marker!r}).write_text("custom code ran")


class EvilForCausalLM(LlamaForCausalLM):
    pass
'''


@pytest.fixture
def custom_code_dir(tmp_path, tiny_llama_dir):
    """The tiny checkpoint plus an auto_map to a modeling file that leaves a marker when it runs."""
    out = tmp_path / "custom_code"
    shutil.copytree(tiny_llama_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    (out / "modeling_evil.py").write_text(EVIL_CODE.format(marker=str(tmp_path / "marker")))
    return out


def _load_in_subprocess(tmp_path, directory, call: str) -> tuple[int, str]:
    """Run `call` on `directory` in a fresh process whose stdin stays open, as an interactive prompt would need."""
    code = f"import sys\nfrom pytest_patchscope import Patchscope, load_model\n{call}\nprint('loaded')"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the load hung (waiting for an answer on stdin?):\n{output}")
    return process.returncode, output


def test_custom_code_checkpoint_is_refused_without_running_or_prompting(tmp_path, custom_code_dir):
    rc, output = _load_in_subprocess(tmp_path, custom_code_dir, "load_model(sys.argv[1])")
    assert rc != 0 and "ModelLoadError" in output, output
    assert "ships custom code" in output and "auto_map" in output and "was not run" in output
    assert "trust_remote_code=True" in output
    assert not (tmp_path / "marker").exists(), "the checkpoint's code must not run"


def test_trust_remote_code_opt_in_reaches_transformers(tmp_path, custom_code_dir):
    rc, output = _load_in_subprocess(
        tmp_path, custom_code_dir, "scope = Patchscope.load(sys.argv[1], trust_remote_code=True)"
    )
    assert rc == 0 and "loaded" in output, output
    assert (tmp_path / "marker").read_text() == "custom code ran"


def test_the_plugin_runs_custom_code_only_with_its_flag(pytester, tmp_path, custom_code_dir, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    pytester.makepyfile("def test_load(patchscope):\n    assert patchscope.model.n_layers == 4\n")
    args = ["--patchscope-model", str(custom_code_dir), "-p", "no:cacheprovider"]
    refused = pytester.runpytest_subprocess(*args)
    refused.assert_outcomes(failed=1)
    refused.stdout.fnmatch_lines(["*ships custom code*--patchscope-trust-remote-code*"])
    assert not (tmp_path / "marker").exists()
    pytester.runpytest_subprocess(*args, "--patchscope-trust-remote-code").assert_outcomes(passed=1)
    assert (tmp_path / "marker").read_text() == "custom code ran"


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "diverged"
    shutil.copytree(tiny_llama_dir, out)
    weights = load_file(out / "model.safetensors")
    bad = "model.layers.2.mlp.down_proj.weight"
    weights[bad][0, 0] = float("inf")
    weights[bad][1, 3] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(models.ModelLoadError) as info:
        models.load_model(out)
    message = str(info.value)
    assert str(out) in message and repr(bad) in message and "2 NaN/inf value(s)" in message


def test_huge_finite_weights_are_not_mistaken_for_inf():
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(3e38)  # finite, but their sum overflows
    models._refuse_non_finite(models.ModelSource("hf_dir", Path("huge"), "huge"), layer)


# ---- device and output -----------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "gpu", "mps"])
def test_unusable_device_is_a_config_error_naming_device(tiny_llama_dir, device):
    with pytest.raises(ProbeConfigError) as info:
        models.load_model(tiny_llama_dir, device=device)
    assert info.value.field == "device" and info.value.value == device
    assert f"device={device!r}" in str(info.value) and "'cpu'" in str(info.value)
    if device.startswith("cuda"):
        assert "use device='cpu'" in str(info.value).lower()


def test_device_is_checked_before_the_model_path(tmp_path):
    with pytest.raises(ProbeConfigError, match="device='gpu'"):
        models.load_model(tmp_path / "missing", device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU where there is one")
def test_auto_device_falls_back_to_cpu(tiny_llama_dir):
    assert models.load_model(tiny_llama_dir, device="auto").device == "cpu"


def test_load_prints_no_progress_bar_and_restores_the_setting(capfd, tiny_llama_dir):
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    models.load_model(tiny_llama_dir)
    assert "Loading" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled(), "the caller's setting is restored"
    hf_logging.disable_progress_bar()
    try:
        models.load_model(tiny_llama_dir)
        assert not hf_logging.is_progress_bar_enabled(), "a disabled bar stays disabled"
    finally:
        hf_logging.enable_progress_bar()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_llama_dir):
    """A local Hugging Face cache holding the tiny checkpoint as 'acme/tiny-llama', offline."""
    import huggingface_hub.constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / revision


def test_a_hub_id_in_the_local_cache_loads_offline(hub_cache):
    source = models.resolve_model_source("acme/tiny-llama")
    assert (source.kind, source.path, source.name) == ("hf_dir", hub_cache, "acme/tiny-llama")
    model = models.load_model("acme/tiny-llama")
    assert model.name == "acme/tiny-llama" and model.n_layers == 4


def test_a_hub_id_that_is_not_cached_says_where_it_looked_and_how_to_download_it(hub_cache, tmp_path):
    with pytest.raises(models.ModelLoadError) as info:
        models.resolve_model_source("acme/other")
    message = str(info.value)
    assert "model='acme/other' is neither a path nor a hub id in the local Hugging Face cache" in message
    assert f"looked in {tmp_path / 'hub'}" in message and "hf download acme/other" in message


def test_the_model_option_takes_a_hub_id_written_as_one_or_two_words(pytester, hub_cache):
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(
        """
        def test_hub(patchscope):
            assert patchscope.model.name == "acme/tiny-llama"
        """
    )
    for args in (["--patchscope-model=acme/tiny-llama"], ["--patchscope-model", "acme/tiny-llama"]):
        result = pytester.runpytest(*args, "-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["patchscope: model acme/tiny-llama (weights sha256:*)*"])
