"""The pytest plugin: options, ini keys, markers, fixtures and the report header.

Thin on purpose: everything it does is a call into the engine (scope.py, model/) or into
the baseline/report modules; it only decides which model a test uses and where results go.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Iterator, ParamSpec, TypeVar

import pytest

pytest.register_assert_rewrite("pytest_patchscope.assertions")

from pytest_patchscope.baseline.keys import project_root  # noqa: E402
from pytest_patchscope.engine.runner import DEFAULT_BATCH_MEMORY_MB, DEFAULT_MAX_NEW_TOKENS_LIMIT  # noqa: E402
from pytest_patchscope.errors import PatchscopeError, ProbeConfigError  # noqa: E402
from pytest_patchscope.model.devices import dtype_name  # noqa: E402
from pytest_patchscope.options import flag_setting, int_setting, model_spec, path_setting, setting  # noqa: E402
from pytest_patchscope.progress import ProgressLog, TerminalBar, combine, is_terminal, under_xdist_worker  # noqa: E402
from pytest_patchscope.scope import Patchscope  # noqa: E402

# The localization gate (baseline, comparison, reports, xdist merge) and the fact-table collector
# (*.patchscope.yaml files as tests) are their own plugin modules.
pytest_plugins = ["pytest_patchscope.gate", "pytest_patchscope.fact_tables"]

if TYPE_CHECKING:
    from pytest_patchscope.baseline.comparator import Comparison
    from pytest_patchscope.baseline.profile import LocalizationProfile
    from pytest_patchscope.model.loading import PatchscopeModel
    from pytest_patchscope.progress import ProgressCallback
    from pytest_patchscope.workers import WorkerSetup

LOGGER = logging.getLogger("pytest_patchscope")
R = TypeVar("R")
P = ParamSpec("P")

MODEL_MARKER = "patchscope_model"
GPU_MARKER = "patchscope_requires_gpu"


# ---- options, ini keys, markers -----------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("patchscope", "Patchscopes probes (pytest-patchscope)")

    def option(name: str, help: str, **kwargs: Any) -> None:
        ini_name = name.replace("-", "_")
        group.addoption(f"--{name}", dest=ini_name, default=None, help=help + f" [ini: {ini_name}]", **kwargs)
        parser.addini(ini_name, help=help, default=kwargs.get("ini_default"))

    option("patchscope-model", "Model to probe: 'default' (embedded SmolLM2-135M-Instruct), an HF directory, a .gguf file, "
           "or a hub id (org/name) in the local Hugging Face cache.",
           metavar="PATH")
    option("patchscope-device", "Device: auto (cuda when present, else cpu), cpu, cuda or cuda:N.", metavar="DEVICE")
    option("patchscope-dtype", "Weights dtype: auto (the checkpoint's own on a GPU, float32 on a CPU), float32, bfloat16 or float16.",
           metavar="DTYPE")
    option("patchscope-device-map", "Spread the model's layers over devices through accelerate: auto, balanced, sequential, "
           'or a JSON object of module name -> device (e.g. \'{"model.layers.0": "cuda:0", ...}\'). Replaces --patchscope-device.',
           metavar="MAP")
    option("patchscope-trust-remote-code", "Let checkpoints that ship Python code (config.json auto_map) run it; off by default.",
           action="store_true")
    option("patchscope-max-new-tokens", "Default number of tokens each probe generates (default 20).", metavar="N")
    option("patchscope-max-new-tokens-limit", "Largest max_new_tokens a probe may ask for; more is refused (default 1024).", metavar="N")
    option("patchscope-batch-memory-mb", "Memory bound of one batch of probes; bigger sweeps run in chunks (default 512).", metavar="MB")
    option("patchscope-max-models", "How many models one process (xdist worker) keeps loaded at once, LRU (default 2).", metavar="N")
    option("patchscope-progress", "Live progress bar of each batched job on the terminal, through the output capture: auto "
           "(default: when the session's output is a terminal, not on xdist workers nor with live logging), on, or off.",
           metavar="WHEN")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MODEL_MARKER}(path): probe this test or module with another model (an HF directory or .gguf file).",
    )
    config.addinivalue_line("markers", f"{GPU_MARKER}: skip this test when no CUDA GPU is available.")
    from pytest_patchscope.workers import configure_worker

    config.option.patchscope_device = setting(config, "patchscope_device") or "auto"
    try:
        setup = configure_worker(config)
    except PatchscopeError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_SESSION_KEY] = PatchscopeSession(config, setup)


# ---- the session: which model each test uses ----------------------------------------------------
class PatchscopeSession:
    """Per-process state: the models loaded so far (an LRU) and the test being run."""

    def __init__(self, config: pytest.Config, setup: "WorkerSetup") -> None:
        from pytest_patchscope.workers import ModelCache

        self.config = config
        self.setup = setup
        self.max_new_tokens = int_setting(config, "patchscope_max_new_tokens", 20)
        self.max_new_tokens_limit = int_setting(config, "patchscope_max_new_tokens_limit", DEFAULT_MAX_NEW_TOKENS_LIMIT)
        self.batch_memory_mb = int_setting(config, "patchscope_batch_memory_mb", DEFAULT_BATCH_MEMORY_MB)
        self.trust_remote_code = flag_setting(config, "patchscope_trust_remote_code")
        try:
            self.dtype = dtype_name(setting(config, "patchscope_dtype") or "auto", "--patchscope-dtype")
            self.device_map = _device_map_setting(setting(config, "patchscope_device_map"))
        except PatchscopeError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.models: ModelCache["Patchscope"] = ModelCache(int_setting(config, "patchscope_max_models", 2))
        self._check_model_setting()
        self.progress_mode = _progress_mode(config)
        # pytest's own output stream, looked at now: during a test its file descriptor is captured too.
        self.terminal_stream = sys.stdout
        self.on_terminal = is_terminal(sys.stdout)
        self.bars: list[TerminalBar] = []
        self.current_item: pytest.Item | None = None
        self.load_failures: dict[str, str] = {}
        """Model specs that failed to load this session, with their message (shown in full once)."""

    def _check_model_setting(self) -> None:
        """A model named by --patchscope-model or the ini key is found now, before any test runs: a
        missing path or an uncached hub id is one usage error, not a failure in every test."""
        from pytest_patchscope.model.loading import resolve_model_source

        spec = self.default_spec()
        if spec is None:
            return
        try:
            resolve_model_source(spec)
        except PatchscopeError as exc:
            raise pytest.UsageError(str(exc)) from None

    def default_spec(self) -> str | None:
        """--patchscope-model (relative to the working directory) or the ini key (relative to the ini file)."""
        return path_setting(self.config, "patchscope_model", model=True)

    def spec_for(self, item: pytest.Item | None) -> str | None:
        marker = item.get_closest_marker(MODEL_MARKER) if item is not None else None
        if marker is None:
            return self.default_spec()
        if len(marker.args) != 1 or not isinstance(marker.args[0], (str, Path)):
            raise pytest.UsageError(str(ProbeConfigError(f"@pytest.mark.{MODEL_MARKER}", marker.args, "one model argument: a path, a GGUF file or a hub id")))
        raw = str(marker.args[0])
        if raw == "default":
            return None
        root = project_root(Path(str(item.path)).parent) or self.config.rootpath  # type: ignore[union-attr]
        return model_spec(raw, root)

    def scope(self, spec: str | None) -> "Patchscope":
        """The Patchscope for `spec`, loading the model the first time it is asked for."""
        from pytest_patchscope.model.loading import load_model

        name = spec or "default"

        def load() -> Patchscope:
            started = time.perf_counter()
            try:
                model = load_model(
                    spec, device=self.setup.device, dtype=self.dtype, device_map=self.device_map,
                    trust_remote_code=self.trust_remote_code,
                )
            except PatchscopeError as exc:
                self.load_failures[name] = str(exc)
                model = None
            if model is None:  # failed outside the except block, so the message is not printed twice (chained)
                pytest.fail(self.load_failures[name], pytrace=False)
            LOGGER.info("loaded %s in %.1f s", model, time.perf_counter() - started)
            return Patchscope(
                model,
                max_new_tokens=self.max_new_tokens,
                max_new_tokens_limit=self.max_new_tokens_limit,
                batch_memory_mb=self.batch_memory_mb,
                progress=_log_progress(self),
            )

        if name in self.load_failures:  # tried once this session: say so in one line, not the whole message again
            first = self.load_failures[name].splitlines()[0]
            pytest.fail(f"model {name!r} could not be loaded (the first test that used it shows why): {first[:200]}", pytrace=False)
        return self.models.get_or_load(name, load)


def _device_map_setting(raw: str | None) -> str | dict[str, Any] | None:
    """--patchscope-device-map: a strategy name or a JSON object, checked against this machine's devices."""
    import json

    from pytest_patchscope.model.devices import check_device_map

    if raw in (None, ""):
        return None
    assert raw is not None
    value: Any = raw
    if raw.lstrip().startswith("{"):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProbeConfigError("--patchscope-device-map", raw, f"valid JSON ({exc})") from None
    check_device_map(value, "--patchscope-device-map")
    return value


PROGRESS_MODES = ("auto", "on", "off")


def _progress_mode(config: pytest.Config) -> str:
    """--patchscope-progress / ini patchscope_progress: auto, on or off."""
    raw = setting(config, "patchscope_progress") or "auto"
    if raw.strip().lower() not in PROGRESS_MODES:
        raise pytest.UsageError(str(ProbeConfigError("--patchscope-progress", raw, "auto, on or off")))
    return raw.strip().lower()


def _live_logging(config: pytest.Config) -> bool:
    """Whether pytest logs live to the terminal (--log-cli-level, ini log_cli), by pytest's own rule."""
    return config.getoption("log_cli_level", None) is not None or bool(config.getini("log_cli"))


def _log_progress(session: PatchscopeSession) -> "ProgressCallback":
    """A few INFO lines per job (start, each quarter or 30 s, end), in probes: captured with the test,
    live with --log-cli-level=INFO; plus the live bar when the session shows one."""
    config = session.config
    log = ProgressLog(lambda message: LOGGER.info("%s", message))
    mode = session.progress_mode
    if mode == "off" or under_xdist_worker():
        return log
    if mode == "auto" and (not session.on_terminal or _live_logging(config)):
        return log
    capman = config.pluginmanager.getplugin("capturemanager")
    suspended = capman.global_and_fixture_disabled if capman is not None else contextlib.nullcontext

    def writer() -> Any:
        """pytest's TerminalWriter (the width of its current line), or None with -p no:terminal."""
        return config.get_terminal_writer() if config.pluginmanager.get_plugin("terminalreporter") is not None else None

    bar = TerminalBar(session.terminal_stream, suspended, writer, session.on_terminal)
    session.bars.append(bar)
    both = combine(log, bar)
    assert both is not None
    return both


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """A bar cut short by an error in the test is erased before pytest writes the test's outcome."""
    for bar in _session(item.config).bars:
        bar.close()


_SESSION_KEY = pytest.StashKey[PatchscopeSession]()


def _session(config: pytest.Config) -> PatchscopeSession:
    return config.stash[_SESSION_KEY]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    session = _session(item.config)
    session.current_item = item
    try:
        return (yield)
    finally:
        session.current_item = None


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On an xdist worker that loaded a model: send its device line for the controller's summary."""
    from pytest_patchscope.gate import SETUP_OUTPUT_KEY

    patchscope = _session(session.config)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and len(patchscope.models):
        workeroutput[SETUP_OUTPUT_KEY] = patchscope.setup.summary()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker(GPU_MARKER) is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"{GPU_MARKER}: no CUDA GPU available")


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pytest_patchscope.model.loading import load_dtype, resolve_model_source, weights_hash

    session = _session(config)
    spec = session.default_spec()
    dtype = session.dtype
    try:
        source = resolve_model_source(spec)
        model = f"{source.name} (weights sha256:{weights_hash(source)[:16]})"
        dtype = load_dtype(source, session.dtype, session.setup.device)
    except PatchscopeError as exc:
        model = f"{spec or 'default'} — not loadable: {str(exc).splitlines()[0]}"
    except Exception as exc:  # a header never ends the session: loading the model reports it in full
        model = f"{spec or 'default'} — not loadable: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    where = f"device map {session.device_map}" if session.device_map is not None else f"device {session.setup.device}"
    return [f"patchscope: model {model}, {where}, dtype {dtype}, max_new_tokens {session.max_new_tokens}"]


# ---- fixtures -------------------------------------------------------------------------------------
def _delegate(method: Callable[Concatenate["Patchscope", P], R]) -> Callable[Concatenate["PatchscopeFixture", P], R]:
    """A fixture method with the signature of the Patchscope method it calls on the test's model.

    A source_model given as a spec comes from the session's cache, like the test's own model, and
    bad input is raised from the user's own line (see `_user_facing`).
    """

    @functools.wraps(method)
    def call(self: "PatchscopeFixture", *args: P.args, **kwargs: P.kwargs) -> R:
        __tracebackhide__ = True
        spec = kwargs.get("source_model")
        if isinstance(spec, (str, os.PathLike)):
            kwargs["source_model"] = self.model_for(spec)
        return _user_facing(getattr(self.current, method.__name__), *args, **kwargs)

    return call


class PatchscopeFixture:
    """The `patchscope` fixture's object: a Patchscope for whichever model the running test uses.

    Its methods have `Patchscope`'s signatures (annotate a test's argument with this type for
    completion and type checks). Session-scoped, so it works inside Hypothesis @given tests, it
    looks up the current test's `patchscope_model` marker at each call.
    """

    def __init__(self, session: PatchscopeSession) -> None:
        self._session = session

    @property
    def current(self) -> Patchscope:
        """The Patchscope of the running test's model (its marker's, or the session's)."""
        return self._session.scope(self._session.spec_for(self._session.current_item))

    @property
    def model(self) -> "PatchscopeModel":
        return self.current.model

    def model_for(self, spec: str | os.PathLike[str]) -> "PatchscopeModel":
        """Another model from the session's cache, loaded the first time: e.g. a probe's source_model."""
        return self._session.scope(str(spec)).model

    probe = _delegate(Patchscope.probe)
    generate = _delegate(Patchscope.generate)
    score = _delegate(Patchscope.score)
    run = _delegate(Patchscope.run)
    check_all = _delegate(Patchscope.check_all)
    _sweep = _delegate(Patchscope.sweep)

    @functools.wraps(Patchscope.sweep)
    def sweep(self, *args: Any, **kwargs: Any) -> LocalizationProfile:
        """Patchscope.sweep; with --patchscope-compare-model it also runs on the reference model."""
        __tracebackhide__ = True
        from pytest_patchscope.gate import gate_of

        profile = self._sweep(*args, **kwargs)
        gate = gate_of(self._session.config)
        if gate.compare_spec is not None:
            gate.remember_reference(profile, _user_facing(self._session.scope(gate.compare_spec).sweep, *args, **kwargs))
        return profile

    def record(self, profile: LocalizationProfile, key: str | None = None, **tolerances: Any) -> "Comparison | LocalizationProfile":
        """Record a LocalizationProfile against a stable key, compare it with the baseline (or the
        reference model) under the tolerances, and fail this test on a regression or a missing entry."""
        __tracebackhide__ = True
        from pytest_patchscope.gate import gate_of

        item = self._session.current_item
        if item is None:
            raise ProbeConfigError("record", profile, "called from inside a running test")
        return _user_facing(gate_of(self._session.config).record, item, profile, key, tolerances)


T = TypeVar("T")


def _user_facing(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run an engine call; a PatchscopeError (bad input) is raised from the user's own line.

    Its message says everything, so the engine frames behind it are dropped from the traceback;
    a chained cause (an exception raised inside the user's mapping) is kept. Other exceptions,
    which would be bugs, keep their full traceback.
    """
    __tracebackhide__ = True
    try:
        return call(*args, **kwargs)
    except PatchscopeError as exc:
        raise exc.with_traceback(None)  # noqa: B904 - the same exception, without engine frames


@pytest.fixture(scope="session")
def patchscope_model(pytestconfig: pytest.Config) -> "PatchscopeModel":
    """The session's model (--patchscope-model / ini patchscope_model / the default), loaded once."""
    session = _session(pytestconfig)
    return session.scope(session.default_spec()).model


@pytest.fixture(scope="session")
def patchscope(pytestconfig: pytest.Config) -> PatchscopeFixture:
    """Patchscopes probes bound to the test's model: .generate(), .score(), .sweep(), .run(), .probe()."""
    return PatchscopeFixture(_session(pytestconfig))
