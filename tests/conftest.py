"""Shared fixtures: tiny randomly initialised models (fast unit tests) and the real default model.

The tiny models reuse the default model's tokenizer (so prompts tokenize realistically) and are
built from a config: a RoPE Llama and an absolute-position GPT-2, to cover both position schemes.
"""
from __future__ import annotations

import contextlib
import subprocess
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_patchscope.model.loading import PatchscopeModel, cache_root, dequantized_cache_dir, from_hf, load_model, resolve_model_source
from pytest_patchscope.scope import Patchscope

import hf_reference as ref

# ---- cost classes ------------------------------------------------------------------------------
# Every test gets one marker, from the fixtures it uses (so a new test is classified without anyone
# remembering), most expensive first. A module or test can claim a class itself with the marker
# (one that starts pytest subprocesses without the pytester fixture must): then it is left alone.
#   pytester  runs pytest sessions (pytester, or a subprocess; inner runs often load the default model)
#   real      the default 135M model in this process
#   tiny      tiny random models (and the default model's tokenizer)
#   unit      none of these
# A unit or tiny test that loads the default model or starts pytest fails, naming the marker it
# needs (_cheap_means_cheap). `slow` is separate: tests of a cheap class that still take long
# (the family matrix beyond FAST_FAMILIES, a fuzz); `make test-fast` runs `(unit or tiny) and not slow`.
COST_CLASSES: dict[str, frozenset[str]] = {
    "pytester": frozenset({"pytester"}),
    "real": frozenset({"default_scope", "plain_hf"}),
    "tiny": frozenset({"tiny_model", "tiny_llama", "tiny_llama_dir", "damaged_dir", "tokenizer", "default_model_dir"}),
}
CLASS_ORDER = (*COST_CLASSES, "unit")
FAST_FAMILIES = frozenset({"llama", "gpt2", "mamba"})
"""test_families.py's families in the fast loop: RoPE and absolute positions (packed), a state-space model (general)."""


def cost_class(item: pytest.Item) -> str:
    """The most expensive class whose fixtures `item` uses (a class marker of its own wins)."""
    for name in CLASS_ORDER:
        if item.get_closest_marker(name) is not None:
            return name
    used = set(getattr(item, "fixturenames", ()))
    return next((name for name, fixtures in COST_CLASSES.items() if used & fixtures), "unit")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = cost_class(item)
        if item.get_closest_marker(name) is None:
            item.add_marker(name)
        callspec = getattr(item, "callspec", None)
        family = callspec.params.get("family") if callspec is not None else None
        if family is not None and getattr(family, "name", None) not in FAST_FAMILIES:
            item.add_marker("slow")


class _ExpensiveFirst:
    @pytest.hookimpl(trylast=True)  # after pytest has grouped the items by their fixtures' parameters
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Most expensive class first (a stable sort: modules and parameter groups stay together),
        so that xdist hands the long tests out early and the run ends on short ones."""
        items.sort(key=lambda item: CLASS_ORDER.index(cost_class(item)))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_ExpensiveFirst(), "patchscope-tests-expensive-first")


# ---- xdist: `make test` runs --dist loadscope, with the scopes below ------------------------------
# (pytest 9 derives a node id from its parents, so --dist loadgroup's xdist_group suffix no longer
# groups anything). A scope is one work unit, run on one worker; xdist knows only node ids here.
ONE_WORKER_MODULES = frozenset({"tests/test_ci_gate_e2e.py", "tests/test_eval.py"})
"""Modules whose module-scoped fixtures load or build a model (the damaged default checkpoint,
a report on the default model): built once, on one worker."""


def xdist_scope(nodeid: str) -> str:
    """A documentation page (its examples share one namespace, in order) or a module of
    ONE_WORKER_MODULES as a whole; the tests of one module with the same parameters together (so a
    module-scoped parametrized fixture, e.g. one family's model in test_families.py, is built once);
    any other test alone, so that the two workers stay evenly loaded."""
    path, _, name = nodeid.partition("::")
    if path.endswith(".md") or path in ONE_WORKER_MODULES:
        return path
    if "[" in name:
        return f"{path}::[{name.split('[', 1)[1]}"
    return nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class CostScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return CostScopes(config, log)


@contextlib.contextmanager
def _cheap_means_cheap(item: pytest.Item) -> Iterator[None]:
    """A unit or tiny test that loads weights from the dequantized default model (say through a
    fixture of its own module) or starts pytest in a subprocess fails, naming the marker it needs."""
    which = cost_class(item)
    if which not in ("unit", "tiny"):
        yield
        return
    from transformers import AutoModelForCausalLM

    load, start = AutoModelForCausalLM.from_pretrained, subprocess.Popen.__init__
    cached = (cache_root() / "gguf").resolve()

    def guarded_load(cls: type, directory: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(directory).resolve().is_relative_to(cached):
            pytest.fail(f"{item.nodeid} loads the default model ({directory}) but is classed {which!r}: "
                        "mark it @pytest.mark.real (cost classes: tests/conftest.py)", pytrace=False)
        return load(directory, *args, **kwargs)

    def guarded_start(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
        if argv[1:3] == ["-m", "pytest"] or (argv and Path(argv[0]).name in ("pytest", "py.test")):
            pytest.fail(f"{item.nodeid} runs pytest in a subprocess but is classed {which!r}: "
                        "mark it @pytest.mark.pytester (cost classes: tests/conftest.py)", pytrace=False)
        start(self, args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(guarded_load))
        patch.setattr(subprocess.Popen, "__init__", guarded_start)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _cheap_means_cheap(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _cheap_means_cheap(item):
        return (yield)


# When this suite runs under xdist, its workers' environment names them (PYTEST_XDIST_WORKER, ...).
# Inner pytester sessions and pytest subprocesses inherit that and would behave as xdist workers
# (no baseline written, no progress bar): each test starts from a plain, non-worker environment.
XDIST_ENVIRONMENT = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")
USER_CACHE = cache_root()
"""The model cache as this session started. pytester points HOME at a new folder, where an inner
run would dequantize the default model again (~30 s of CPU and 0.5 GB written, per test)."""


@pytest.fixture(autouse=True)
def _plain_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """No xdist worker's variables; pytest sessions (pytester class) use the session's model cache
    (a test that sets PATCHSCOPE_CACHE_DIR itself still wins: its fixtures and body run later)."""
    for name in XDIST_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    if cost_class(request.node) == "pytester":
        monkeypatch.setenv("PATCHSCOPE_CACHE_DIR", str(USER_CACHE))


@pytest.fixture(autouse=True)
def _imported_before_pytester(request: pytest.FixtureRequest) -> None:
    """Import, outside any pytester run, what an inner run's model load imports. pytester removes
    the modules an in-process run imported when it ends, and some cannot be imported twice in one
    process: torch.distributed's operator library (RuntimeError: Only a single TORCH_LIBRARY ...),
    pyarrow's types (through TransformerLens and `datasets`); and a model module imported afresh
    gives new classes, under which transformers' output recorders no longer find the layers of
    models built before (an empty `hidden_states`)."""
    if "pytester" not in request.fixturenames:
        return
    import torch.distributed.tensor  # noqa: F401
    import transformer_lens.model_bridge  # noqa: F401
    import transformers.core_model_loading  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


@pytest.fixture(scope="session")
def default_model_dir():
    """The HF directory of the default model (dequantized once into the user cache)."""
    return dequantized_cache_dir(resolve_model_source(None))


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def tiny_hf_model(kind: str, vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        )
        model = GPT2LMHeadModel(config)
    # Scale up the weights a little so that greedy decoding is not one repeated token.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_model(request, tokenizer) -> PatchscopeModel:
    """A 4-layer random model: 'llama' (RoPE) and 'gpt2' (absolute positions)."""
    return from_hf(tiny_hf_model(request.param, len(tokenizer)), tokenizer, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> PatchscopeModel:
    return from_hf(tiny_hf_model("llama", len(tokenizer)), tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """The tiny llama saved as an HF directory (safetensors), as a user's checkpoint would be."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_model("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def damaged_dir(tmp_path, tiny_llama_dir):
    """The tiny checkpoint with its first two blocks' MLPs scaled: the same shapes, other answers."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "damaged"
    shutil.copytree(tiny_llama_dir, out)
    weights = load_file(out / "model.safetensors")
    for name in list(weights):
        if name.startswith(("model.layers.0.", "model.layers.1.")) and "mlp" in name:
            weights[name] = weights[name] * -4.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def default_scope() -> Patchscope:
    """The real default model (SmolLM2-135M-Instruct), loaded once for the session."""
    return Patchscope(load_model(None))


@pytest.fixture(scope="session")
def plain_hf(default_model_dir):
    """An unbridged HF copy of the default model, for the independent reference implementation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


def active_hooks(model: PatchscopeModel) -> list[str]:
    """Bridge hook points and plain-twin modules that still carry a hook (must be none between probes)."""
    hook_points = {} if model.bridge is None else model.bridge.hook_dict  # a general-path model has no bridge
    bridge = [name for name, hp in hook_points.items() if hp.fwd_hooks or hp.bwd_hooks]
    twin = [f"plain.{name}" for name, m in model.plain.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    return bridge + twin


_REFERENCE_RUNS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
"""Per reference model: its clean continuations and source states, each computed once (a grid asks for
the same clean target and the same source states many times)."""


def _once(reference, key: tuple, compute: Any) -> Any:
    runs = _REFERENCE_RUNS.setdefault(reference, {})
    if key not in runs:
        runs[key] = compute()
    return runs[key]


def expected(reference, result, eos: int = 2) -> tuple[list[int], list[int]]:
    """The reference's (patched, clean) greedy tokens for one engine result's resolved probe: any
    site, units, strength and list of positions (one source value per target token, or one for all)."""
    rp = result.resolved
    args = (list(rp.target_ids), list(rp.target_indices), rp.target_layer)
    patched = ref.patched_generate(
        reference, *args, reference_vectors(reference, rp), rp.probe.max_new_tokens,
        strength=rp.probe.strength, eos=eos, site=rp.location.site.name, units=rp.units,
    )
    clean = _once(reference, ("clean", rp.target_ids, rp.probe.max_new_tokens, eos),
                  lambda: ref.patched_generate(reference, *args, None, rp.probe.max_new_tokens, eos=eos))
    return patched, list(clean)


def reference_vectors(reference, rp):
    """The reference's source values for a resolved probe: one tensor, or a list of one per target token."""
    site = rp.location.site.name
    vectors = [
        _once(reference, ("state", rp.source_ids, index, rp.layer, site),
              lambda index=index: ref.source_state(reference, list(rp.source_ids), index, rp.layer, site))
        for index in rp.source_indices
    ]
    return vectors if len(vectors) > 1 else vectors[0]


def expected_scores(reference, result) -> tuple[dict, dict]:
    """The reference's (patched, clean) {candidate: (per-token logprobs, first-token rank)} for a result."""
    rp = result.resolved
    args = (list(rp.target_ids), list(rp.target_indices), rp.target_layer)
    vector = reference_vectors(reference, rp)
    site = rp.location.site.name
    patched, clean = {}, {}
    for candidate, ids in zip(rp.probe.candidates, rp.candidate_ids):
        patched[candidate] = ref.candidate_logprobs(reference, *args, vector, ids, strength=rp.probe.strength, site=site, units=rp.units)
        clean[candidate] = ref.candidate_logprobs(reference, *args, None, ids)
    return patched, clean


def expected_samples(reference, result, eos: int = 2) -> tuple[list[list[int]], list[list[int]]]:
    """The reference's (patched, clean) token lists, one per sample, drawn by HF generate with seed + k."""
    rp = result.resolved
    decoding = rp.probe.decoding
    settings = {
        "do_sample": decoding.do_sample, "repetition_penalty": decoding.repetition_penalty,
        "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
    }
    if decoding.do_sample:
        settings.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k or 0)
    args = (list(rp.target_ids), list(rp.target_indices), rp.target_layer)
    vector = reference_vectors(reference, rp)
    site = rp.location.site.name
    patched, clean = [], []
    if rp.probe.max_new_tokens == 0:  # scored only: nothing generated
        return [[]], [[]]
    for k in range(decoding.n_samples):
        seed = decoding.seed + k if decoding.do_sample else None
        patched.append(ref.patched_generate(
            reference, *args, vector, rp.probe.max_new_tokens, strength=rp.probe.strength, eos=eos, site=site,
            units=rp.units, seed=seed, **settings,
        ))
        clean.append(ref.patched_generate(reference, *args, None, rp.probe.max_new_tokens, eos=eos, seed=seed, **settings))
    return patched, clean


def synthetic_project(pytester, suite: str):
    """A checkout (a pyproject.toml) with `suite` as tests/test_facts.py, for pytester runs of the gate."""
    (pytester.path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    tests = pytester.mkpydir("tests")
    (tests / "test_facts.py").write_text(suite)
    return pytester.path
