"""Every bad input gets a project error naming the field, the value and what is allowed,
and none of them leaves the model hooked or changed."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from pytest_patchscope import TOKEN_IDENTITY, Placeholder, Substring, attribute_extraction
from pytest_patchscope.errors import ModelLoadError, PatchscopeError, PatchscopeWarning, ProbeConfigError
from pytest_patchscope.model.loading import load_model
from pytest_patchscope.scope import Patchscope

from conftest import active_hooks

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
    pytest.param(dict(layer=0, source_position=Placeholder(None)), "source_position.text=None", "a string", id="placeholder-text"),
    pytest.param(dict(layer=0, source_position=Substring("Tokyo", occurrence=0.5)), "occurrence=0.5", "an int", id="occurrence-float"),
    pytest.param(dict(layer=0, max_new_tokens=0), "max_new_tokens=0", "an int >= 1", id="max-new-tokens"),
    pytest.param(dict(layer=0, max_new_tokens=10**7), "max_new_tokens=10000000", "max_new_tokens_limit", id="max-new-tokens-huge"),
    pytest.param(dict(layer=0, max_new_tokens=255), "max_new_tokens=255", "position limit is 256", id="past-position-limit"),
    pytest.param(dict(layer=0, strength=math.nan), "strength=nan", "a finite number", id="strength-nan"),
    pytest.param(dict(layer=0, strength=math.inf), "strength=inf", "a finite number", id="strength-inf"),
    pytest.param(dict(layer=0, strength=10**400), "strength=1000000", "from -1000 to 1000", id="strength-huge-int"),
    pytest.param(dict(layer=0, strength=3.5e38), "strength=3.5e+38", "from -1000 to 1000", id="strength-huge-float"),
    pytest.param(dict(layer=0, strength=True), "strength=True", "a finite number", id="strength-bool"),
    pytest.param(
        dict(layer=0, strength=1000, mapping=lambda h: h * 1e36), "strength=1000", "finite in torch.float32", id="patch-overflows"
    ),
    pytest.param(dict(layer=0, mapping=lambda h: h[:10]), "mapping=", "shape (64,)", id="mapping-shape"),
    pytest.param(dict(layer=0, mapping=lambda h: h.reshape(8, 8)), "mapping=", "(8, 8)", id="mapping-2d"),
    pytest.param(dict(layer=0, mapping=lambda h: h * math.nan), "mapping=", "finite", id="mapping-nan"),
    pytest.param(
        dict(layer=0, mapping=lambda h: h.double() * 1e300), "mapping=", "finite values in torch.float32", id="mapping-inf-in-dtype"
    ),
    pytest.param(dict(layer=0, mapping=lambda h: h.to("meta")), "mapping=", "on meta", id="mapping-meta"),
    pytest.param(dict(layer=0, mapping=lambda h: h.to_sparse()), "mapping=", "layout torch.sparse_coo", id="mapping-sparse"),
    pytest.param(dict(layer=0, mapping=lambda h: h.to(torch.complex64)), "mapping=", "torch.complex64", id="mapping-complex"),
    pytest.param(dict(layer=0, mapping=lambda h: h.long()), "mapping=", "torch.int64", id="mapping-int"),
    pytest.param(dict(layer=0, mapping=lambda h: None), "mapping=", "it returned a NoneType", id="mapping-none"),
    pytest.param(dict(layer=0, mapping=42), "mapping=42", "callable", id="mapping-not-callable"),
    pytest.param(dict(layer=0, stop="ab"), "stop='ab'", "list/tuple", id="stop-string"),
    pytest.param(dict(layer=0, stop=5), "stop=5", "list/tuple", id="stop-int"),
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
        Patchscope(tiny_llama).generate(source, target, layer=0, target_position=-1)
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
    with pytest.raises(ProbeConfigError, match=r"layers=\[0, 7\].*from 0 to 3.*; 7 is not"):
        scope.sweep("Tokyo", T, layers=[0, 7])
    with pytest.raises(ProbeConfigError, match=r"layers=range\(0, 10+\).*; 4 is not"):
        scope.sweep("Tokyo", T, layers=range(10**30))  # fails at its first bad layer, not by listing it
    with pytest.raises(ProbeConfigError, match=r"target_layers=\['0'\].*'0' is not"):
        scope.sweep("Tokyo", T, layers=[0], target_layers=["0"])
    with pytest.raises(ProbeConfigError, match="expect=''"):
        scope.sweep("Tokyo", T, layers=[0], expect="")
    assert active_hooks(tiny_llama) == []


def test_a_generator_of_target_layers_covers_every_source_layer(tiny_llama):
    grid = Patchscope(tiny_llama).sweep(
        "Tokyo", T, layers=[0, 1], target_layers=(t for t in (2, 3)), target_position=Placeholder("x"), max_new_tokens=1
    )
    assert [(c.layer, c.target_layer) for c in grid.cells] == [(0, 2), (0, 3), (1, 2), (1, 3)]


@pytest.mark.parametrize(
    "settings,field",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=True), "max_new_tokens=True"),
        (dict(max_new_tokens=30, max_new_tokens_limit=10), "max_new_tokens_limit=10 is not valid: an int >= max_new_tokens (30)"),
        (dict(max_new_tokens_limit=10), "max_new_tokens_limit=10 is not valid: an int >= max_new_tokens (20)"),
        (dict(max_new_tokens=2000), "max_new_tokens=2000 is not valid: an int from 1 to 1024 (max_new_tokens_limit)"),
        (dict(max_new_tokens_limit=0), "max_new_tokens_limit=0"),
        (dict(max_new_tokens_limit=True), "max_new_tokens_limit=True"),
        (dict(max_new_tokens_limit="1024"), "max_new_tokens_limit='1024'"),
        (dict(batch_memory_mb=-1), "batch_memory_mb=-1"),
        (dict(batch_memory_mb=True), "batch_memory_mb=True"),
        (dict(batch_memory_mb=math.nan), "batch_memory_mb=nan"),
        (dict(batch_memory_mb=math.inf), "batch_memory_mb=inf"),
        (dict(batch_memory_mb=10**400), "batch_memory_mb=1000000"),
        (dict(progress="loud"), "progress='loud'"),
    ],
)
def test_bad_scope_settings(tiny_llama, settings, field):
    with pytest.raises(ProbeConfigError) as info:
        Patchscope(tiny_llama, **settings)
    assert str(info.value).startswith(field)


def test_max_new_tokens_limit_bounds_every_probe(tiny_llama):
    scope = Patchscope(tiny_llama, max_new_tokens=2, max_new_tokens_limit=3)
    assert len(scope.generate("Tokyo", "Short x", layer=0, max_new_tokens=3).tokens) <= 3
    bound = r"max_new_tokens=4 .*from 1 to 3 \(the max_new_tokens_limit setting\).*max_new_tokens_limit=N"
    with pytest.raises(ProbeConfigError, match=bound):
        scope.generate("Tokyo", "Short x", layer=0, max_new_tokens=4)
    assert active_hooks(tiny_llama) == []


def test_generation_that_would_pass_the_position_limit_is_refused(tiny_model):
    """GPT-2's position table has n_positions rows (an IndexError past them); RoPE models extrapolate.
    A probe whose T plus max_new_tokens passes the limit is refused; exactly at the limit it runs."""
    scope = Patchscope(tiny_model)
    room = 256 - len(tiny_model.tokenize("Short x"))
    past = rf"max_new_tokens={room + 1} .*from 1 to {room}: the target prompt has 2 tokens.*position limit is 256"
    with pytest.raises(ProbeConfigError, match=past):
        scope.generate("Tokyo", "Short x", layer=0, max_new_tokens=room + 1)
    with pytest.raises(ProbeConfigError, match=r"source=.*at most 256 tokens \(the model's position limit\); it has \d+"):
        scope.generate("word " * 300, "Short x", layer=0)
    assert active_hooks(tiny_model) == []
    assert len(scope.generate("Tokyo", "Short x", layer=0, max_new_tokens=room).tokens) <= room


def test_a_row_larger_than_batch_memory_mb_is_refused_before_any_hook(tiny_llama, monkeypatch):
    import pytest_patchscope.engine.runner as engine_module

    def no_pass(*args, **kwargs):
        raise AssertionError("the opening pass ran")

    monkeypatch.setattr(engine_module, "forward_opening", no_pass)
    with pytest.raises(ProbeConfigError, match=r"batch_memory_mb=0.1 is not valid: at least 0\.\d\d MB: one row") as info:
        Patchscope(tiny_llama, batch_memory_mb=0.1).generate("Tokyo", "Short x", layer=0, max_new_tokens=3)
    needed = float(str(info.value).split("at least ")[1].split(" MB")[0])
    assert needed > 0.1
    assert active_hooks(tiny_llama) == []


@pytest.mark.parametrize("call", ["probe", "generate", "sweep"])
def test_a_placeholder_that_would_go_unpatched_warns(tiny_llama, call):
    scope = Patchscope(tiny_llama)
    kwargs = dict(layers=[0]) if call == "sweep" else dict(layer=0)
    with pytest.warns(PatchscopeWarning, match=r"LAST token, not the x.*target_position=Placeholder\('x'\)") as record:
        getattr(scope, call)("Tokyo", T, max_new_tokens=1, **kwargs)
    assert len(record) == 1 and record[0].filename == __file__, "one warning, at the caller's line"


@pytest.mark.parametrize(
    "target,extra",
    [
        (T, dict(target_position=Placeholder("x"))),
        (T, dict(target_position=-1)),
        ("Short x", {}),  # the x is the last token: -1 patches it
        ("The capital city of Xanadu is", {}),
        (TOKEN_IDENTITY, {}),
        (attribute_extraction(), {}),
    ],
)
def test_no_placeholder_warning_when_the_x_is_patched_or_asked_for(tiny_llama, target, extra):
    scope = Patchscope(tiny_llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchscopeWarning)
        scope.generate("Tokyo", target, layer=0, max_new_tokens=1, **extra)
        scope.sweep("Tokyo", target, layers=[0], max_new_tokens=1, **extra)


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


def test_an_error_shows_a_huge_value_shortened_and_never_breaks():
    huge = ProbeConfigError("strength", 10**5000, "a finite number")  # past Python's int-to-str digit limit
    long_prompt = ProbeConfigError("source", "word " * 100_000, "a shorter prompt")
    assert len(str(huge)) < 200 and str(huge).startswith("strength=")
    assert len(str(long_prompt)) < 200 and "..." in str(long_prompt)
