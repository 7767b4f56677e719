"""The baseline survives: SIGKILL at any moment of an update, and two concurrent update runs.

Real pytest subprocesses on a multi-MB baseline of hand-built profiles (no model load), so that
writing it takes long enough to be killed in the middle of it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_patchscope.baseline.storage import read_baseline

pytestmark = pytest.mark.pytester  # pytest subprocesses (cost classes: tests/conftest.py)

SUITE = """
import os

import pytest

from pytest_patchscope import LayerCell, LocalizationProfile

VARIANT = os.environ.get("SYNTH_VARIANT", "old")
HITS = (0, 1) if VARIANT == "old" else (2, 3)


@pytest.mark.parametrize("name", [("odd" if k % 2 else "even") + str(k) for k in range(int(os.environ["SYNTH_N"]))])
def test_fact(patchscope, name):
    cells = tuple(
        LayerCell(l, l, f"{VARIANT} continuation of {name} at layer {l} " * 3, l in HITS, -0.5 if l in HITS else -6.0, 0)
        for l in range(30)
    )
    profile = LocalizationProfile({"source": name}, cells, " Paris", model="ckpt", weights_hash="w",
                                  architecture={"n_layers": 30, "d_model": 8, "vocab_size": 10})
    patchscope.record(profile)
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_many.py").write_text(SUITE)
    return tmp_path


def command(baseline: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "tests",
            f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", *extra]


def environment(variant: str, n: int) -> dict[str, str]:
    return {**os.environ, "SYNTH_VARIANT": variant, "SYNTH_N": str(n), "PYTHONDONTWRITEBYTECODE": "1"}


def complete(project: Path, baseline: Path, variant: str, n: int, *extra: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(command(baseline, *extra), cwd=project, env=environment(variant, n), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return time.perf_counter() - started


def temp_files(baseline: Path) -> list[str]:
    return [name for name in os.listdir(baseline.parent) if name.startswith(f".{baseline.name}.") and name.endswith(".tmp")]


def test_sigkill_at_any_moment_of_an_update_leaves_the_old_or_the_new_file(project):
    n = 200  # 200 probes of 30 layers: a baseline of several MB
    baseline = project / "base.json"
    complete(project, baseline, "old", n)
    old = baseline.read_bytes()
    assert len(old) > 1_000_000
    reference = project / "new.json"
    shutil.copy(baseline, reference)
    # A reference run, timed: when its temp file first appears (the write) and when it ends.
    started = time.perf_counter()
    process = subprocess.Popen(command(reference), cwd=project, env=environment("new", n),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    write_at = None
    while process.poll() is None:
        if write_at is None and temp_files(reference):
            write_at = time.perf_counter() - started
    assert process.returncode == 0 and write_at is not None
    new = reference.read_bytes()
    assert new != old and read_baseline(reference) is not None

    def kill_at(moment: float | str) -> tuple[float | str, bool, str, bool]:
        """Start an update over the old file, SIGKILL it at `moment`; (moment, was alive, file state, temp left)."""
        baseline.write_bytes(old)
        process = subprocess.Popen(command(baseline), cwd=project, env=environment("new", n),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if moment == "writing":  # the moment the temp file of the new baseline exists
            deadline = time.perf_counter() + 4 * write_at + 30
            while process.poll() is None and not temp_files(baseline) and time.perf_counter() < deadline:
                pass
        else:
            time.sleep(float(moment))
        alive = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        content = baseline.read_bytes()
        assert content in (old, new), f"a kill at {moment} left a partial baseline of {len(content)} bytes"
        return moment, alive, "old" if content == old else "new", bool(temp_files(baseline))

    # From start-up and collection through the tests and the merge to the write and just after it.
    # The reference run's timing only estimates the others' (the machine's load changes under
    # xdist), so a kill that finds the run already finished shrinks the time scale (bounded).
    fractions = [0.2, 0.4, 0.6, 0.75, 0.85, 0.92, 0.97, 1.0, 1.03, 1.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95]
    outcomes = []
    scale = write_at
    for attempt in range(3 * len(fractions)):
        outcomes.append(kill_at(scale * fractions[attempt % len(fractions)]))
        if not outcomes[-1][1]:
            scale *= 0.8
        if sum(alive for _, alive, _, _ in outcomes) >= 10:
            break
    for _ in range(6):  # inside the write itself
        outcomes.append(kill_at("writing"))
        if outcomes[-1][1] and outcomes[-1][3]:
            break
    killed = [o for o in outcomes if o[1]]
    assert len(killed) >= 11, outcomes
    assert any(o[0] == "writing" and o[1] and o[3] for o in outcomes), f"no kill landed inside a write: {outcomes}"
    # The next run finishes the job and clears the temp files that killed writers left behind.
    complete(project, baseline, "new", n)
    assert baseline.read_bytes() == new and temp_files(baseline) == []


def test_two_concurrent_updates_of_subsets_lose_nothing(project):
    n = 150
    baseline = project / "base.json"
    complete(project, baseline, "old", n)
    for attempt in range(3):
        runs = [
            subprocess.Popen(command(baseline, "-k", kind), cwd=project, env=environment(f"new{attempt}", n),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for kind in ("even", "odd")
        ]
        outputs = [run.communicate(timeout=300)[0] for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        texts = {entry.profile.cells[0].text.split()[0] for entry in read_baseline(baseline).entries.values()}
        assert texts == {f"new{attempt}"}, f"attempt {attempt}: entries of one run were lost: {texts}"
        assert len(read_baseline(baseline).entries) == n
