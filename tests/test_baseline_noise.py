"""Re-recording on the real default model does not churn the baseline (issue 22, point 1).

A first update records a small suite with 2 torch threads and no workers; re-recording it with 1
thread, and with ``-n 2 --dist loadfile`` (one thread per worker), must rewrite the file byte for
byte. The JSON reports (which keep unrounded scores) show that the runs really differ in the last
digits, and by less than the stated tolerance. Each run is a subprocess that loads the default
model (about 30-60 s each on 2 shared cores).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_patchscope.baseline.serializer import LOGPROB_DECIMALS, NOISE_TOLERANCE
from pytest_patchscope.model.loading import cache_root

pytestmark = pytest.mark.pytester  # pytest subprocesses (cost classes: tests/conftest.py)

CANDIDATES = '''
from pytest_patchscope import attribute_extraction


def test_capital_by_candidate_scores(patchscope):
    profile = patchscope.sweep("Country: Japan", attribute_extraction("The capital city of x is"), layers=range(0, 12),
                               candidates=["Tokyo", "Beijing", "Seoul", "Paris"], max_new_tokens=0)
    patchscope.record(profile)
'''

EXTRACTION = '''
from pytest_patchscope import attribute_extraction


def test_capital_by_attribute_extraction(patchscope):
    profile = patchscope.sweep("Country: France", attribute_extraction("The capital city of x is"), layers=range(0, 12),
                               expect="Paris", max_new_tokens=2)
    patchscope.record(profile)
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_candidates.py").write_text(CANDIDATES)
    (tmp_path / "tests" / "test_extraction.py").write_text(EXTRACTION)
    return tmp_path


def update(project: Path, baseline: Path, report: Path, *extra: str, threads: int | None) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "OMP_NUM_THREADS"))}
    env.update(PATCHSCOPE_CACHE_DIR=str(cache_root()), PYTHONDONTWRITEBYTECODE="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "tests",
               f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", f"--patchscope-report={report}", *extra]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "2 passed" in done.stdout and "baseline written" in done.stdout, done.stdout[-2000:]


def numbers(report: Path) -> dict[tuple, float]:
    """Every unrounded score of the report, by (key, layer, what)."""
    found: dict[tuple, float] = {}
    for probe in json.loads(report.read_text())["probes"]:
        for cell in probe["current"]["cells"]:
            where = (probe["key"], cell["layer"], cell["target_layer"])
            for name in ("logprob", "margin"):
                if cell[name] is not None:
                    found[(*where, name)] = cell[name]
            for candidate, value in (cell["candidate_logprobs"] or {}).items():
                found[(*where, candidate)] = value
    return found


def test_rerecording_with_other_thread_counts_and_under_xdist_rewrites_the_file_byte_for_byte(project, tmp_path):
    first, report = tmp_path / "first.json", tmp_path / "first-report.json"
    update(project, first, report, threads=2)
    recorded = first.read_bytes()
    reference = numbers(report)
    assert len(reference) > 50

    runs = {"1 thread, -n 0": ([], 1), "-n 2 --dist loadfile (1 thread per worker)": (["-n", "2", "--dist=loadfile"], None)}
    flips: dict[str, int] = {}
    widest: dict[str, float] = {}
    for name, (extra, threads) in runs.items():
        baseline, rerun_report = tmp_path / f"{len(flips)}.json", tmp_path / f"{len(flips)}-report.json"
        shutil.copy(first, baseline)
        update(project, baseline, rerun_report, *extra, threads=threads)
        assert baseline.read_bytes() == recorded, f"{name}: the re-record changed the baseline"
        rerun = numbers(rerun_report)
        assert rerun.keys() == reference.keys()
        gaps = [abs(rerun[k] - reference[k]) for k in reference]
        assert max(gaps) < NOISE_TOLERANCE, f"{name}: a gap of {max(gaps):.2e} nats is not float noise"
        widest[name] = max(gaps)
        flips[name] = sum(round(rerun[k], LOGPROB_DECIMALS) != round(reference[k], LOGPROB_DECIMALS) for k in reference)
        if name.startswith("1 thread"):
            assert max(gaps) > 0, "1 and 2 threads gave identical scores: this run does not exercise the tolerance"
    print(f"{len(reference)} numbers; largest gap: {widest}; 4th-decimal flips without settling: {flips}")
