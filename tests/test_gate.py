"""The localization gate through pytester on tiny models: record, baseline file, compare, reports."""
from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import pytest

SOURCE = "The capital of France is"

@pytest.fixture(scope="module")
def expect(patchscope, pytestconfig):
    # The first run's (clean model's) layer-0 decoding, kept in a file so later runs expect the same.
    stored = pytestconfig.rootpath / "expect.txt"
    if not stored.exists():
        stored.write_text(patchscope.generate(SOURCE, "Short x", layer=0, max_new_tokens=3).text.split()[0])
    return stored.read_text()

@pytest.mark.parametrize("target", ["Short x", "Another x here"])
def test_sweep(patchscope, expect, target):
    profile = patchscope.sweep(SOURCE, target, layers=range(4), expect=expect, max_new_tokens=3)
    patchscope.record(profile)
"""


@pytest.fixture(autouse=True)
def rootdir_here(pytester):
    """An ini file in the test directory: it marks the project root, where the baseline keys start."""
    pytester.makeini("[pytest]\n")


def run(pytester, model_dir, *args):
    return pytester.runpytest(f"--patchscope-model={model_dir}", "-p", "no:cacheprovider", *args)


def test_update_then_compare_unchanged(pytester, tiny_llama_dir):
    pytester.makepyfile(test_suite=SUITE)
    baseline = pytester.path / "loc.json"
    first = run(pytester, tiny_llama_dir, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline")
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["*knowledge localization*", "2 probes: 2 new", f"baseline written: {baseline} (2 probes)"])
    data = json.loads(baseline.read_text())
    assert data["format"] == "pytest-patchscope-baseline" and data["model"] == "tiny_llama0"
    keys = sorted(data["entries"])
    assert keys[0].startswith("test_suite.py::test_sweep[Another x here]::probe=") and len(keys) == 2
    assert all(len(json.loads(line.strip().rstrip(","))) == 6 for line in baseline.read_text().splitlines() if '"layer":' in line)
    assert baseline.read_text().endswith("\n") and list(data["entries"]) == keys

    second = run(pytester, tiny_llama_dir, f"--patchscope-baseline={baseline}")
    second.assert_outcomes(passed=2)
    second.stdout.fnmatch_lines(["2 probes: 2 unchanged"])
    assert json.loads(baseline.read_text()) == data


def test_a_damaged_checkpoint_fails_with_a_readable_report(pytester, tiny_llama_dir, damaged_dir):
    pytester.makepyfile(test_suite=SUITE)
    baseline = pytester.path / "loc.json"
    run(pytester, tiny_llama_dir, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=2)
    report, markdown, junit = pytester.path / "r.json", pytester.path / "r.md", pytester.path / "junit.xml"
    heatmaps = pytester.path / "heatmaps"
    result = run(
        pytester, damaged_dir, f"--patchscope-baseline={baseline}", "--patchscope-compare-checkpoint", f"--patchscope-heatmap={heatmaps}",
        f"--patchscope-report={report}", f"--patchscope-report-md={markdown}", f"--junitxml={junit}",
    )
    pngs = sorted(heatmaps.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1
    result.stdout.fnmatch_lines(["*regressed*", "*knowledge localization*"])
    data = json.loads(report.read_text())
    statuses = [p["status"] for p in data["probes"]] if "probes" in data else [r["status"] for r in data["records"]]
    assert "regressed" in statuses
    assert "regressed" in markdown.read_text()
    assert "patchscope.status" in junit.read_text()


def test_compare_model_without_a_baseline(pytester, tiny_llama_dir, damaged_dir):
    pytester.makepyfile(test_suite=SUITE)
    same = run(pytester, tiny_llama_dir, f"--patchscope-compare-model={tiny_llama_dir}")
    same.assert_outcomes(passed=2)
    same.stdout.fnmatch_lines(["2 probes: 2 unchanged"])
    different = run(pytester, damaged_dir, f"--patchscope-compare-model={tiny_llama_dir}")
    assert different.parseoutcomes().get("failed", 0) >= 1
    different.stdout.fnmatch_lines(["*regressed*"])


def test_kept_entries_and_per_test_tolerance_marker(pytester, tiny_llama_dir):
    pytester.makepyfile(test_suite=SUITE)
    baseline = pytester.path / "loc.json"
    run(pytester, tiny_llama_dir, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline")
    data = json.loads(baseline.read_text())
    data["entries"]["other/test_gone.py::test_old::probe=000000000000"] = next(iter(data["entries"].values()))
    baseline.write_text(json.dumps(data))
    run(pytester, tiny_llama_dir, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "-k", "Short")
    assert "other/test_gone.py::test_old::probe=000000000000" in json.loads(baseline.read_text())["entries"]
    pytester.makepyfile(
        test_marker="""
        import pytest

        @pytest.mark.patchscope_tolerance(no_such_tolerance=1)
        def test_bad(patchscope):
            patchscope.record(patchscope.sweep("a b", "Short x", layers=[0], expect="x", max_new_tokens=2))
        """
    )
    bad = run(pytester, tiny_llama_dir, f"--patchscope-baseline={baseline}", "test_marker.py")
    bad.assert_outcomes(failed=1)
    bad.stdout.fnmatch_lines(["*no_such_tolerance=1 is not valid: not a tolerance*"])


@pytest.mark.parametrize(
    "content,message",
    [("{not json", "is not valid JSON"), ('{"format": "other"}', "is not a pytest-patchscope baseline")],
)
def test_corrupt_or_foreign_baseline_is_a_usage_error(pytester, tiny_llama_dir, content, message):
    pytester.makepyfile(test_suite=SUITE)
    baseline = pytester.path / "loc.json"
    baseline.write_text(content)
    result = run(pytester, tiny_llama_dir, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])
    assert baseline.read_text() == content


def test_update_needs_a_baseline_path(pytester, tiny_llama_dir):
    pytester.makepyfile(test_suite=SUITE)
    result = run(pytester, tiny_llama_dir, "--patchscope-update-baseline")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--patchscope-update-baseline=True is not valid: used together with --patchscope-baseline*"])
