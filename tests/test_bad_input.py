"""Every bad input gets a project error naming the field, the value and what is allowed,
and none of them leaves the model hooked or changed."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import active_hooks
from pytest_patchscope import Placeholder, Substring
from pytest_patchscope.errors import ModelLoadError, PatchscopeError, ProbeConfigError
from pytest_patchscope.models import load_model
from pytest_patchscope.scope import Patchscope

T = "The capital city of x is"

BAD_PROBES = [
    pytest.param(dict(layer=4), "layer=4", "from 0 to 3", id="layer-too-high"),
    pytest.param(dict(layer=-1), "layer=-1", "from 0 to 3", id="layer-negative"),
    pytest.param(dict(layer=1, target_layer=9), "target_layer=9", "from 0 to 3", id="target-layer"),
    pytest.param(dict(layer="1"), "layer='1'", "an int", id="layer-not-int"),
    pytest.param(dict(layer=0, source_position=40), "source_position=40", "from -", id="source-position"),
    pytest.param(dict(layer=0, target_position=-99), "target_position=-99", "the prompt has", id="target-position"),
    pytest.param(dict(layer=0, source_position="Berlin"), "source_position='Berlin'", "a substring of the prompt", id="substring-missing"),
    pytest.param(dict(layer=0, source_position="Toky"), "source_position='Toky'", "lost to tokenization", id="substring-lost"),
    pytest.param(dict(layer=0, target_position=Placeholder("q")), "target_position='q'", "is not in", id="placeholder-missing"),
    pytest.param(dict(layer=0, target_position=Placeholder("cit")), "target_position='cit'", "lost to tokenization", id="placeholder-lost"),
    pytest.param(dict(layer=0, source_position=Substring("Tokyo", occurrence=3)), "occurrence=3", "occurrence", id="occurrence"),
    pytest.param(dict(layer=0, max_new_tokens=0), "max_new_tokens=0", "an int >= 1", id="max-new-tokens"),
    pytest.param(dict(layer=0, strength=math.nan), "strength=nan", "a finite number", id="strength-nan"),
    pytest.param(dict(layer=0, strength=math.inf), "strength=inf", "a finite number", id="strength-inf"),
    pytest.param(dict(layer=0, mapping=lambda h: h[:10]), "mapping=", "shape (64,)", id="mapping-shape"),
    pytest.param(dict(layer=0, mapping=lambda h: h.reshape(8, 8)), "mapping=", "(8, 8)", id="mapping-2d"),
    pytest.param(dict(layer=0, mapping=lambda h: h * math.nan), "mapping=", "finite", id="mapping-nan"),
    pytest.param(dict(layer=0, mapping=42), "mapping=42", "callable", id="mapping-not-callable"),
]


@pytest.mark.parametrize("kwargs,field,allowed", BAD_PROBES)
def test_bad_probe_input(tiny_llama, kwargs, field, allowed):
    scope = Patchscope(tiny_llama)
    clean_before = scope.generate("Tokyo", T, layer=0, target_position=Placeholder("x"), max_new_tokens=4).clean_tokens
    kwargs = {"target_position": Placeholder("x"), **kwargs}
    with pytest.raises(ProbeConfigError) as info:
        scope.generate("Tokyo", T, **kwargs)
    assert field in str(info.value) and allowed in str(info.value)
    assert active_hooks(tiny_llama) == []
    after = scope.generate("Tokyo", T, layer=0, target_position=Placeholder("x"), max_new_tokens=4)
    assert after.clean_tokens == clean_before


@pytest.mark.parametrize("source,target,field", [("", T, "source=''"), ("Tokyo", "   ", "target='   '"), (None, T, "source=None")])
def test_empty_prompts(tiny_llama, source, target, field):
    with pytest.raises(ProbeConfigError, match="non-empty string") as info:
        Patchscope(tiny_llama).generate(source, target, layer=0)
    assert field in str(info.value)
    assert active_hooks(tiny_llama) == []


def test_bad_sweep_arguments(tiny_llama):
    scope = Patchscope(tiny_llama)
    with pytest.raises(ProbeConfigError, match=r"layers=\[\]"):
        scope.sweep("Tokyo", T, layers=[])
    with pytest.raises(ProbeConfigError, match="target_layers='diagonal'"):
        scope.sweep("Tokyo", T, layers=[0], target_layers="diagonal")
    with pytest.raises(ProbeConfigError, match="layer=1.*layers="):
        scope.sweep("Tokyo", T, layer=1)
    with pytest.raises(ProbeConfigError, match="layer=7"):
        scope.sweep("Tokyo", T, layers=[0, 7])
    with pytest.raises(ProbeConfigError, match="expect=''"):
        scope.sweep("Tokyo", T, layers=[0], expect="")


def test_bad_scope_settings(tiny_llama):
    with pytest.raises(ProbeConfigError, match="max_new_tokens=0"):
        Patchscope(tiny_llama, max_new_tokens=0)
    with pytest.raises(ProbeConfigError, match="batch_memory_mb=-1"):
        Patchscope(tiny_llama, batch_memory_mb=-1)


def test_model_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(missing)
    assert str(missing) in str(info.value) and "HF-format directory" in str(info.value)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(tmp_path)


def test_directory_that_is_not_a_causal_lm(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(tmp_path)


def test_gguf_that_is_not_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="causal-LM GGUF") as info:
        load_model(bogus)
    assert str(bogus) in str(info.value)
    assert not any((tmp_path / "cache" / "gguf").glob("[!.]*[!k]")), "no half-built cache entry is left"


def test_file_that_is_not_gguf(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(other)


def test_pickle_checkpoint_is_refused_unless_weights_only(tmp_path, tiny_llama_dir):
    import shutil

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, tmp_path / name)

    class Sneaky:
        def __reduce__(self):
            return (print, ("this would run code",))

    torch.save({"weight": Sneaky()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refusing pickle checkpoint pytorch_model.bin"):
        load_model(tmp_path)


def test_all_project_errors_share_one_base():
    assert issubclass(ProbeConfigError, PatchscopeError) and issubclass(ModelLoadError, PatchscopeError)


def test_sharded_safetensors_directory_loads(tmp_path, tokenizer):
    from conftest import tiny_hf_model

    model = tiny_hf_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    tokenizer.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = load_model(tmp_path)
    assert loaded.n_layers == 4 and len(loaded.weights_hash) == 64
    ids = torch.tensor([loaded.tokenize("The capital of France is")])
    with torch.no_grad():
        assert torch.allclose(loaded.hf(ids).logits, model(ids).logits, atol=1e-5)
