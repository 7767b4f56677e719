"""pytest-xdist: -n 2 gives the same profiles, baseline file and report as -n 0; only the controller
writes; a crashed worker costs only the probes of the test it crashed in; each worker gets its own GPU; --dist loadfile
keeps a model on one worker; a worker on another host (execnet socket server) works too.

Every run with workers is a subprocess (xdist starts its workers with `python -m`), so each costs
a few seconds of imports per worker. The -n 0 reference runs are in-process, with torch pinned to
one thread like the workers (OMP_NUM_THREADS=1): CPU matmuls with another thread count can differ
in the last digits of a log-probability.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

# Logs, from whichever process runs it, each model load, each Gate.finish and each baseline write,
# and the process's WorkerSetup; restores what it wrapped when its run ends (in-process runs).
LOGGING_CONFTEST = '''
import json, os
from dataclasses import asdict

import pytest
import pytest_patchscope.gate as gate
import pytest_patchscope.model.loading as models

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")
ORIGINAL = (gate.update_baseline, gate.Gate.finish, models.load_model)


def log(event, **data):
    who = os.environ.get("PYTEST_XDIST_WORKER", "controller")
    with open(LOG, "a") as handle:
        handle.write(json.dumps({"event": event, "worker": who, "pid": os.getpid(), **data}) + "\\n")


def update_baseline(path, entries, **kwargs):
    log("write_baseline", keys=sorted(entries))
    return ORIGINAL[0](path, entries, **kwargs)


def finish(self, *args):
    log("finish")
    return ORIGINAL[1](self, *args)


def load_model(spec=None, **kwargs):
    log("load_model", spec=str(spec))
    return ORIGINAL[2](spec, **kwargs)


gate.update_baseline, gate.Gate.finish, models.load_model = update_baseline, finish, load_model


@pytest.hookimpl(trylast=True)  # after the plugin has set up its session
def pytest_configure(config):
    from pytest_patchscope.plugin import _session

    log("setup", **asdict(_session(config).setup))


def pytest_unconfigure(config):
    gate.update_baseline, gate.Gate.finish, models.load_model = ORIGINAL
'''

# Sweeps on the tiny model; `expect` is the clean model's layer-0 decoding, stored by the first run.
TINY_TEST = '''
import pytest

SOURCE = "The capital of {country} is"

@pytest.fixture(scope="module")
def expect(patchscope, pytestconfig):
    stored = pytestconfig.rootpath / "expect.txt"
    if not stored.exists():
        stored.write_text(patchscope.generate("The capital of France is", "Short x", layer=0, max_new_tokens=3).text.split()[0])
    return stored.read_text()

@pytest.mark.parametrize("target", ["Short x", "Another x here", "A third x"])
def test_sweep(patchscope, expect, target):
    profile = patchscope.sweep(SOURCE, target, layers=range(4), expect=expect, max_new_tokens=3)
    patchscope.record(profile)
'''

def tiny_suite() -> dict[str, str]:
    return {"test_one": TINY_TEST.replace("{country}", "France"), "test_two": TINY_TEST.replace("{country}", "Italy")}


# Hand-made profiles: for tests of the merge itself, no model needed.
HAND_MADE = '''
from pytest_patchscope import LayerCell, LocalizationProfile

def profile(name):
    return LocalizationProfile({{"source": name}}, (LayerCell(0, 0, name, True, -0.5, 0),), expect=name, model="hand")
'''


@pytest.fixture(autouse=True)
def rootdir_here(pytester, monkeypatch):
    """An ini file here (rootdir = the pytester dir) and one torch thread in every process."""
    pytester.makeini("[pytest]\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@contextlib.contextmanager
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inline(pytester, *args):
    """A -n 0 run in this process (no start-up cost), with one torch thread like the workers."""
    with one_torch_thread():
        return pytester.runpytest("-p", "no:cacheprovider", "-n", "0", *args)


def workers(pytester, *args, timeout=300):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=timeout)


def section(result, title: str) -> list[str]:
    """The lines of the terminal summary section `title`, up to the next section line."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf"-+ {re.escape(title)} -+", line))
    body = []
    for line in lines[start + 1:]:
        if re.fullmatch(r"[-=]+ .* [-=]+", line):
            break
        body.append(line)
    return body


def report_of(path: Path) -> dict:
    """The JSON report, checked to carry nothing that depends on which worker ran a test."""
    data = json.loads(path.read_text())
    assert all("worker" not in probe for probe in data["probes"])
    return data


def calls(pytester) -> list[dict]:
    log = pytester.path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_both_ways(pytester, model_args, n2_args=()):
    """The same run with -n 0 and -n 2, each from the same starting baseline file `seed.json` (if any)
    into loc.json; returns {n: (result, baseline text, report path)}."""
    seed, baseline = pytester.path / "seed.json", pytester.path / "loc.json"
    outcomes = {}
    for n in (0, 2):
        baseline.unlink(missing_ok=True)
        if seed.exists():
            shutil.copy(seed, baseline)
        (pytester.path / "calls.jsonl").unlink(missing_ok=True)
        args = [*model_args, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline",
                f"--patchscope-report={pytester.path / 'report.json'}"]
        result = inline(pytester, *args) if n == 0 else workers(pytester, "-n", "2", *n2_args, *args)
        report = pytester.path / f"report-n{n}.json"
        shutil.move(pytester.path / "report.json", report)
        outcomes[n] = (result, baseline.read_text(), report, calls(pytester))
    return outcomes


def test_n2_gives_the_same_baseline_report_and_summary_as_n0_and_only_the_controller_writes(
    pytester, tiny_llama_dir, damaged_dir
):
    pytester.makepyfile(**tiny_suite())
    pytester.makeconftest(LOGGING_CONFTEST)
    seed = pytester.path / "seed.json"
    # The starting baseline is the clean checkpoint's; both runs probe (and update from) a damaged one,
    # so the summary shows regressions with their hit strips, not only counts.
    inline(pytester, f"--patchscope-model={tiny_llama_dir}", f"--patchscope-baseline={seed}",
           "--patchscope-update-baseline").assert_outcomes(passed=6)

    runs = run_both_ways(pytester, [f"--patchscope-model={damaged_dir}"])
    (r0, base0, report0, calls0), (r2, base2, report2, calls2) = runs[0], runs[2]
    r0.assert_outcomes(passed=6)
    r2.assert_outcomes(passed=6)
    assert base2 == base0
    assert len(json.loads(base0)["entries"]) == 6
    assert report_of(report2) == report_of(report0)
    summary = section(r0, "knowledge localization")
    assert section(r2, "knowledge localization") == summary
    assert "regressed: test_one.py::test_sweep[Short x]::probe=" in "\n".join(summary), summary
    assert summary[-1].startswith("baseline written:")

    # The controller (only) merged and wrote the workers' probes.
    writers = [(c["event"], c["worker"]) for c in calls2 if c["event"] in ("finish", "write_baseline")]
    assert writers == [("finish", "controller"), ("write_baseline", "controller")]
    assert [c["worker"] for c in calls0 if c["event"] == "write_baseline"] == ["controller"]
    # One model load per worker (a session-long cache per process), none on the controller.
    assert sorted(c["worker"] for c in calls2 if c["event"] == "load_model") == ["gw0", "gw1"]
    assert section(r2, "patchscope workers") == ["gw0: device cpu", "gw1: device cpu"]


REAL_TEST = '''
import pytest
from pytest_patchscope import attribute_extraction

@pytest.mark.parametrize("country,capital", {pairs})
def test_capital(patchscope, country, capital):
    profile = patchscope.sweep(f"Country: {{country}}", attribute_extraction(), layers=range(0, 12, 3),
                               expect=capital, max_new_tokens=4)
    patchscope.record(profile)
'''


def test_n2_matches_n0_on_the_default_model(pytester):
    """The default model from the session's cache (tests/conftest.py sets PATCHSCOPE_CACHE_DIR for pytester runs)."""
    pytester.makepyfile(
        test_europe=REAL_TEST.format(pairs=[("France", "Paris")]),
        test_asia=REAL_TEST.format(pairs=[("Japan", "Tokyo")]),
    )
    runs = run_both_ways(pytester, ["--patchscope-model=default"], ["--dist=loadfile"])
    (r0, base0, report0, _), (r2, base2, report2, _) = runs[0], runs[2]
    r0.assert_outcomes(passed=2)
    r2.assert_outcomes(passed=2)
    assert base2 == base0
    assert len(json.loads(base0)["entries"]) == 2 and json.loads(base0)["model"] == "SmolLM2-135M-Instruct"
    assert report_of(report2) == report_of(report0)
    assert section(r2, "knowledge localization") == section(r0, "knowledge localization")
    assert section(r2, "patchscope workers") == ["gw0: device cpu", "gw1: device cpu"], "both workers ran probes"


def test_a_crashed_worker_loses_only_the_crashed_tests_probes_and_is_named(pytester, tiny_llama_dir):
    pytester.makepyfile(
        helpers=HAND_MADE.format(),
        test_ok="""
        from helpers import profile

        def test_ok_1(patchscope):
            patchscope.record(profile("ok 1"))

        def test_ok_2(patchscope):
            patchscope.record(profile("ok 2"))
        """,
        test_crash="""
        import os
        from helpers import profile

        def test_before(patchscope):
            patchscope.record(profile("before"))

        def test_crash(patchscope):
            patchscope.record(profile("crash"))
            os._exit(1)

        def test_never_run(patchscope):
            patchscope.record(profile("never"))
        """,
    )
    baseline, report = pytester.path / "loc.json", pytester.path / "report.json"
    result = workers(
        pytester, f"--patchscope-model={tiny_llama_dir}", "-n", "2", "--dist=loadfile", "--max-worker-restart=0",
        f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", f"--patchscope-report={report}",
    )
    crashed = re.search(r"worker '(gw\d)' crashed while running 'test_crash.py::test_crash'", result.stdout.str())
    assert crashed, result.stdout.str()
    result.stdout.fnmatch_lines([
        "*knowledge localization*",
        "3 probes: 3 new",
        f"worker {crashed.group(1)} crashed; its probes have no result: test_crash.py::test_crash",
        f"error: baseline not written: worker(s) {crashed.group(1)} crashed. Rerun the update to completion.",
    ])
    assert not baseline.exists(), "a session with a crashed worker writes no baseline"
    keys = [probe["key"] for probe in json.loads(report.read_text())["probes"]]
    # test_before finished before its worker crashed: its record came back with its report
    assert [key.split("::probe=")[0] for key in keys] == ["test_crash.py::test_before", "test_ok.py::test_ok_1", "test_ok.py::test_ok_2"]
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_key_recorded_on_two_workers_is_an_error_as_it_is_in_one_process(pytester, tiny_llama_dir):
    body = """
        from helpers import profile

        def test_{name}(patchscope):
            patchscope.record(profile("{name}"), key="shared")
        """
    pytester.makepyfile(helpers=HAND_MADE.format(), test_a=body.format(name="a"), test_b=body.format(name="b"))
    baseline = pytester.path / "loc.json"
    args = [f"--patchscope-model={tiny_llama_dir}", f"--patchscope-baseline={baseline}", "--patchscope-update-baseline"]
    single = inline(pytester, *args)
    single.assert_outcomes(passed=1, failed=1)
    single.stdout.fnmatch_lines(["*key='shared' is not valid: unique within a session; test_a.py::test_a already recorded it*"])
    baseline.unlink()
    result = workers(pytester, "-n", "2", "--dist=loadfile", *args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "error: key='shared' is not valid: unique within a session; test_a.py::test_a, test_b.py::test_b all recorded it.*"
    ])
    assert result.ret == pytest.ExitCode.TESTS_FAILED and not baseline.exists()


def test_workers_share_out_the_callers_cuda_devices_and_say_so(pytester, monkeypatch, tiny_llama_dir):
    """No GPU here (torch is CPU-only): the pinning still happens, and device auto falls back to the CPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_load(patchscope_model, n):
            pass
        """
    )
    result = workers(pytester, f"--patchscope-model={tiny_llama_dir}", "-n", "2")
    result.assert_outcomes(passed=4)
    setups = {c["worker"]: c for c in calls(pytester) if c["event"] == "setup"}
    assert {w: s["visible_devices"] for w, s in setups.items()} == {"controller": "3,5", "gw0": "3", "gw1": "5"}
    assert {s["device"] for s in setups.values()} == {"cpu"}
    assert section(result, "patchscope workers") == ["gw0: device cpu, CUDA_VISIBLE_DEVICES=3", "gw1: device cpu, CUDA_VISIBLE_DEVICES=5"]


def test_tx_env_gives_each_worker_the_device_it_names(pytester, tiny_llama_dir):
    """`--tx popen//env:CUDA_VISIBLE_DEVICES=N` is kept as given; workers that load no model add no
    "patchscope workers" lines (the plugin is installed for every suite in the environment)."""
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = workers(pytester, f"--patchscope-model={tiny_llama_dir}", "--dist=each",
                     "--tx=popen//env:CUDA_VISIBLE_DEVICES=7", "--tx=popen//env:CUDA_VISIBLE_DEVICES=2")
    result.assert_outcomes(passed=2)
    setups = {c["worker"]: c["visible_devices"] for c in calls(pytester) if c["event"] == "setup"}
    assert setups == {"controller": None, "gw0": "7", "gw1": "2"}
    assert "patchscope workers" not in result.stdout.str()


def test_loadfile_keeps_each_model_on_one_worker(pytester, tiny_llama_dir, damaged_dir):
    pytester.makeconftest(LOGGING_CONFTEST)
    for name, model in (("test_clean", tiny_llama_dir), ("test_damaged", damaged_dir)):
        pytester.makepyfile(**{name: f"""
            import pytest

            pytestmark = pytest.mark.patchscope_model({str(model)!r})

            @pytest.mark.parametrize("target", ["Short x", "Another x", "Third x", "Fourth x"])
            def test_sweep(patchscope, target):
                patchscope.record(patchscope.sweep("The capital of France is", target, layers=range(2), max_new_tokens=2))
            """})
    result = workers(pytester, f"--patchscope-model={tiny_llama_dir}", "-n", "2", "--dist=loadfile",
                     "--patchscope-max-models=1")
    result.assert_outcomes(passed=8)
    loads = sorted((c["worker"], c["spec"]) for c in calls(pytester) if c["event"] == "load_model")
    assert [worker for worker, _ in loads] == ["gw0", "gw1"]
    assert {spec for _, spec in loads} == {str(tiny_llama_dir), str(damaged_dir)}


SOCKET_SERVER = Path(__import__("execnet").__file__).parent / "script" / "socketserver.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def socket_server(home: Path):
    """execnet's socket server on loopback, run from `home` (the other host's directory)."""
    if not SOCKET_SERVER.is_file():
        pytest.skip(f"execnet ships no socket server at {SOCKET_SERVER}")
    port = free_port()
    log = (home / "server.log").open("w")
    server = subprocess.Popen([sys.executable, str(SOCKET_SERVER), f"127.0.0.1:{port}"], cwd=home,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                pytest.skip(f"execnet's socket server exited with {server.returncode}: {(home / 'server.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                pytest.skip("execnet's socket server did not listen on 127.0.0.1 within 30 s")
            time.sleep(0.2)
        yield port, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_a_worker_on_another_host_sends_its_profiles_back(pytester, tiny_llama_dir, tmp_path):
    """The "other host" is a directory with its own checkout of the suite, served by execnet's
    socket server (same machine, same venv). Its worker compares against the controller's baseline,
    which does not exist at the relative path on that host."""
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile(**tiny_suite())
    inline(pytester, f"--patchscope-model={tiny_llama_dir}", "--patchscope-baseline=loc.json",
           "--patchscope-update-baseline").assert_outcomes(passed=6)
    home = tmp_path / "host2"
    checkout = home / "checkout"
    checkout.mkdir(parents=True)
    for name in ("tox.ini", "conftest.py", "test_one.py", "test_two.py", "expect.txt"):
        shutil.copy(pytester.path / name, checkout / name)
    (pytester.path / "calls.jsonl").unlink()

    with socket_server(home) as (port, server):
        result = workers(
            pytester, f"--tx=socket=127.0.0.1:{port}//chdir={checkout}", "--dist=load",
            f"--patchscope-model={tiny_llama_dir}", "--patchscope-baseline=loc.json",
            f"--patchscope-report={pytester.path / 'report.json'}", timeout=240,
        )
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*knowledge localization*", "6 probes: 6 unchanged"])
    assert not (checkout / "loc.json").exists()
    remote = [json.loads(line) for line in (checkout / "calls.jsonl").read_text().splitlines()]
    assert {(c["event"], c["worker"], c["pid"]) for c in remote if c["event"] == "load_model"} == {
        ("load_model", "gw0", server.pid)
    }
    assert [c["event"] for c in calls(pytester)] == ["setup", "finish"]
    probes = json.loads((pytester.path / "report.json").read_text())["probes"]
    assert len(probes) == 6
