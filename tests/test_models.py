"""The default model's weights cache: keyed by the GGUF's hash, written atomically, rebuilt when corrupt."""
from __future__ import annotations

import json
import shutil

import pytest

from pytest_patchscope import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_dequantize(monkeypatch, default_model_dir):
    """Copy the already dequantized default model instead of dequantizing again (20-40 s)."""
    calls = []

    def fake(source, directory):
        calls.append(directory)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(default_model_dir / name, directory / name)
        files = {p.name: p.stat().st_size for p in directory.iterdir()}
        (directory / "manifest.json").write_text(json.dumps({"format": models.CACHE_FORMAT, "files": files}))

    monkeypatch.setattr(models, "_dequantize_into", fake)
    return calls


def test_cache_is_keyed_by_hash_built_once_and_rebuilt_when_corrupt(cache, fake_dequantize):
    source = models.resolve_model_source(None)
    first = models.dequantized_cache_dir(source)
    assert first.name == models.weights_hash(source)[:24] and len(fake_dequantize) == 1
    assert models.dequantized_cache_dir(source) == first and len(fake_dequantize) == 1, "a valid cache is reused"
    with open(first / "model.safetensors", "r+b") as handle:  # truncate: a crashed copy
        handle.truncate(1000)
    assert not models._cache_is_valid(first)
    assert models.dequantized_cache_dir(source) == first and len(fake_dequantize) == 2, "a corrupt cache is rebuilt"
    assert models._cache_is_valid(first)
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith(".")], "no staging directory is left"


def test_a_failed_build_leaves_no_cache_entry(cache, monkeypatch):
    def broken(source, directory):
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
