"""A gate that never passes in silence, through pytester on hand-built profiles (no model load).

Stable keys however the run is started, missing entries fail, unused entries are listed, interrupted
or partial runs never drop entries, mixed and foreign baselines are refused. The real-model damaged
checkpoint runs in test_ci_gate_e2e.py; SIGKILL and concurrency in test_baseline_survives.py.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import synthetic_project

pytest_plugins = ["pytester"]

SUITE = """
import os

import pytest

from pytest_patchscope import LayerCell, LocalizationProfile


def profile(name):
    model = os.environ.get("SYNTH_MODEL", "ckpt-a")
    n = int(os.environ.get("SYNTH_LAYERS", "4"))
    lost = os.environ.get("SYNTH_LOST", "")
    hits = () if name == lost else (0, 1)
    cells = tuple(LayerCell(l, l, " Paris" if l in hits else " the", l in hits, -0.5 if l in hits else -6.0, 0) for l in range(n))
    return LocalizationProfile({"source": name}, cells, " Paris", model=model, weights_hash=model + "-weights",
                               architecture={"n_layers": n, "d_model": 8, "vocab_size": 10},
                               dtype=os.environ.get("SYNTH_DTYPE", "float32"))


@pytest.mark.parametrize("name", ["france", "japan", "italy"])
def test_fact(patchscope, name):
    patchscope.record(profile(name))
"""


@pytest.fixture
def project(pytester, monkeypatch):
    """A checkout with a pyproject.toml and the suite in tests/; the synthetic checkpoint is 'ckpt-a'."""
    for name in ("SYNTH_MODEL", "SYNTH_LAYERS", "SYNTH_LOST", "SYNTH_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    return synthetic_project(pytester, SUITE)


def run(pytester, *args):
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def entries_of(path):
    return json.loads(path.read_text())["entries"]


def recorded_with_a_stale_entry(pytester, baseline):
    """Record the suite, then add the entry of a test that no longer exists; returns its key."""
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    data = json.loads(baseline.read_text())
    gone = "tests/test_facts.py::test_renamed::probe=000000000000"
    data["entries"][gone] = {**next(iter(data["entries"].values())), "test": "tests/test_facts.py::test_renamed"}
    baseline.write_text(json.dumps(data))
    return gone


def test_keys_are_the_same_with_one_or_two_word_options_any_cwd_and_baseline_anywhere(pytester, project, tmp_path_factory, monkeypatch):
    outside = tmp_path_factory.mktemp("elsewhere") / "base.json"
    inside = project / "base.json"
    run(pytester, f"--patchscope-baseline={inside}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    run(pytester, "--patchscope-baseline", str(outside), "--patchscope-update-baseline").assert_outcomes(passed=3)
    keys = sorted(entries_of(inside))
    assert keys == sorted(entries_of(outside))
    assert all(key.startswith("tests/test_facts.py::test_fact[") for key in keys)
    # The gate written the other way round, and from the test's own folder: every probe matches.
    monkeypatch.chdir(project / "tests")
    result = run(pytester, "--patchscope-baseline", str(inside), "test_facts.py")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["3 probes: 3 unchanged"])
    (project / "pytest.ini").write_text("[pytest]\n")  # an ini file added later changes nothing
    run(pytester, f"--patchscope-baseline={outside}", str(project / "tests")).stdout.fnmatch_lines(["3 probes: 3 unchanged"])


def test_a_moved_checkout_keeps_its_keys(pytester, project, tmp_path_factory, monkeypatch):
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    moved = tmp_path_factory.mktemp("moved") / "checkout"
    shutil.copytree(project, moved)
    monkeypatch.chdir(moved)
    result = run(pytester, "--patchscope-baseline", "base.json", "tests")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["3 probes: 3 unchanged"])


def test_the_damaged_fact_fails_whichever_way_the_options_are_written(pytester, project, monkeypatch):
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    monkeypatch.setenv("SYNTH_LOST", "japan")
    for args in ([f"--patchscope-baseline={baseline}"], ["--patchscope-baseline", str(baseline)]):
        result = run(pytester, *args)
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines_random(["*FAILED*test_fact[[]japan[]]*", "*lost hits at layers 0, 1 (decodable nowhere now)*"])


def test_a_probe_missing_from_the_baseline_fails_unless_new_probes_are_allowed(pytester, project):
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "-k", "not italy").assert_outcomes(passed=2)
    result = run(pytester, f"--patchscope-baseline={baseline}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "patchscope missing: S='italy'*",
        f"  - no entry for key 'tests/test_facts.py::test_fact[[]italy[]]::probe=*' in baseline {baseline}."
        " Record the probe with --patchscope-update-baseline, or pass --patchscope-allow-new*",
        "3 probes: 2 unchanged, 1 missing",
        "missing from the baseline: tests/test_facts.py::test_fact[[]italy[]]::probe=*",
    ])
    allowed = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-allow-new")
    allowed.assert_outcomes(passed=3)
    allowed.stdout.fnmatch_lines(["3 probes: 2 unchanged, 1 new"])
    pytester.makeini("[pytest]\npatchscope_allow_new = true\n")
    run(pytester, f"--patchscope-baseline={baseline}").assert_outcomes(passed=3)


def test_a_gate_on_a_baseline_that_does_not_exist_is_refused(pytester, project):
    result = run(pytester, f"--patchscope-baseline={project / 'typo.json'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*typo.json does not exist, so this gate would compare nothing*--patchscope-allow-new*"])


def test_unused_entries_are_listed_and_removed_only_by_a_whole_update(pytester, project):
    baseline = project / "base.json"
    gone = recorded_with_a_stale_entry(pytester, baseline)
    report, markdown = project / "r.json", project / "r.md"
    result = run(pytester, f"--patchscope-baseline={baseline}", f"--patchscope-report={report}", f"--patchscope-report-md={markdown}")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"1 baseline entry unused: {gone}"])
    assert json.loads(report.read_text())["unused_baseline_entries"] == [gone]
    assert "### 1 baseline entry unused" in markdown.read_text() and gone in markdown.read_text()

    partial = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "-k", "france")
    partial.stdout.fnmatch_lines(["kept 3 baseline entries that nothing recorded: this session ran part of the suite (2 deselected test(s); -k 'france')"])
    assert gone in entries_of(baseline)
    whole = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline")
    whole.stdout.fnmatch_lines([f"removed 1 baseline entry that nothing recorded: {gone}"])
    assert gone not in entries_of(baseline) and len(entries_of(baseline)) == 3


def test_entries_of_skipped_or_failing_tests_are_kept_by_a_whole_update(pytester, project):
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    pytester.makeconftest(
        """
        import pytest

        def pytest_runtest_setup(item):
            if "japan" in item.name:
                pytest.skip("no GPU here")
            if "italy" in item.name:
                raise RuntimeError("broken fixture")
        """
    )
    result = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline")
    result.assert_outcomes(passed=1, skipped=1, errors=1)
    result.stdout.fnmatch_lines(["kept 2 baseline entries that nothing recorded: their tests did not run, did not pass, or lie outside the collected paths"])
    assert len(entries_of(baseline)) == 3


def test_an_interrupted_or_stopped_update_writes_nothing(pytester, project, monkeypatch):
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    before = baseline.read_bytes()
    monkeypatch.setenv("SYNTH_MODEL", "ckpt-a")
    monkeypatch.setenv("SYNTH_LOST", "france")
    pytester.makeconftest(
        """
        import pytest

        def pytest_runtest_call(item):
            if "japan" in item.name:
                raise KeyboardInterrupt
        """
    )
    interrupted = pytester.runpytest(
        "-p", "no:cacheprovider", f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", no_reraise_ctrlc=True
    )
    assert interrupted.ret == pytest.ExitCode.INTERRUPTED
    interrupted.stdout.fnmatch_lines(["error: baseline not written: the session was interrupted*"])
    assert baseline.read_bytes() == before
    pytester.makeconftest(
        """
        def pytest_runtest_call(item):
            if "france" in item.name:
                raise AssertionError("a failing test")
        """
    )
    stopped = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "-x")
    stopped.stdout.fnmatch_lines(["error: baseline not written: the session stopped early (stopping after 1 failures)*"])
    assert baseline.read_bytes() == before


def test_a_partial_update_on_another_checkpoint_is_refused(pytester, project, monkeypatch):
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    before = baseline.read_bytes()
    monkeypatch.setenv("SYNTH_MODEL", "ckpt-b")
    mixed = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "-k", "france")
    assert mixed.ret == pytest.ExitCode.TESTS_FAILED
    mixed.stdout.fnmatch_lines(["*not written: it would mix two checkpoints*--patchscope-rewrite-baseline*"])
    assert baseline.read_bytes() == before
    gate = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-compare-checkpoint")
    gate.assert_outcomes(passed=3)
    gate.stdout.fnmatch_lines([
        f"baseline: {baseline} (3 entries, ckpt-a @ ckpt-a-weigh in float32)",
        "the baseline comes from another checkpoint (ckpt-a @ ckpt-a-weigh) than this run (ckpt-b @ ckpt-b-weigh)*",
    ])
    whole = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline")
    whole.assert_outcomes(passed=3)
    whole.stdout.fnmatch_lines(["the baseline comes from another checkpoint (ckpt-a @ ckpt-a-weigh) than this run (ckpt-b @ ckpt-b-weigh): "
                                "this update records this run's checkpoint"])
    assert json.loads(baseline.read_text())["model"] == "ckpt-b"


def test_a_baseline_of_another_dtype_is_compared_and_said_but_never_mixed(pytester, project, monkeypatch):
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    assert json.loads(baseline.read_text())["dtype"] == "float32"
    before = baseline.read_bytes()
    monkeypatch.setenv("SYNTH_DTYPE", "bfloat16")
    gate = run(pytester, f"--patchscope-baseline={baseline}")
    gate.assert_outcomes(passed=3)
    gate.stdout.fnmatch_lines([
        f"baseline: {baseline} (3 entries, ckpt-a @ ckpt-a-weigh in float32)",
        "the baseline was recorded in float32, this run is in bfloat16: tokens whose top two logits are near-tied*",
    ])
    mixed = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "-k", "france")
    mixed.stdout.fnmatch_lines(["*not written: it would mix two checkpoints (or dtypes)*ckpt-a @ ckpt-a-weigh in bfloat16*"])
    assert baseline.read_bytes() == before


def test_a_baseline_of_another_architecture_is_refused(pytester, project, monkeypatch):
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    monkeypatch.setenv("SYNTH_LAYERS", "6")
    result = run(pytester, f"--patchscope-baseline={baseline}")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*another architecture (d_model 8, n_layers 4, vocab_size 10) than this one (d_model 8, n_layers 6*"])


@pytest.mark.parametrize("content", ['{"format": "pytest-patchscope-baseline", "vers', '{"format": "pytest-patchscope-baseline", "version": 1, "entries": {}}'])
def test_an_unreadable_or_old_baseline_names_a_way_out_that_works(pytester, project, content):
    baseline = project / "base.json"
    baseline.write_text(content)
    for mode in ([], ["--patchscope-update-baseline"]):
        refused = run(pytester, f"--patchscope-baseline={baseline}", *mode)
        assert refused.ret == pytest.ExitCode.USAGE_ERROR
        refused.stderr.fnmatch_lines([f"*{baseline}*--patchscope-rewrite-baseline*"])
        assert baseline.read_text() == content
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-rewrite-baseline").assert_outcomes(passed=3)
    assert len(entries_of(baseline)) == 3
    partial = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-rewrite-baseline", "-k", "japan")
    partial.stdout.fnmatch_lines(["*not rewritten: --patchscope-rewrite-baseline replaces the whole file*"])
    assert len(entries_of(baseline)) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--patchscope-baseline=b.json", "--patchscope-update-baseline", "--patchscope-compare-model=default"], "used without --patchscope-compare-model"),
        (["--patchscope-baseline=/no/such/folder/base.json", "--patchscope-update-baseline"], "its folder /no/such/folder does not exist"),
        (["--patchscope-baseline=b.json", "--patchscope-compare-model=default"], "used without --patchscope-baseline"),
        (["--patchscope-update-baseline", "--patchscope-rewrite-baseline", "--patchscope-baseline=b.json"], "pass one of the two"),
    ],
)
def test_bad_gate_options_are_refused_before_any_test_runs(pytester, project, args, message):
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])



IDENTITY_SUITE = """
import torch

from pytest_patchscope import AffineMapping, LayerCell, LocalizationProfile, Probe


def profile(probe):
    cells = (LayerCell(0, 0, " Paris", True, -0.5, 0),)
    return LocalizationProfile(probe.identity(), cells, " Paris", model="m", weights_hash="w",
                               architecture={"n_layers": 1, "d_model": 2, "vocab_size": 3})


def base(**kwargs):
    return Probe("France", "x is", layer=0, **kwargs)


def test_stop_strings_and_mapping_weights_are_part_of_the_key(patchscope):
    eye, double = AffineMapping(torch.eye(2), torch.zeros(2)), AffineMapping(2 * torch.eye(2), torch.zeros(2))
    for probe in (base(), base(stop=("\\\\n",)), base(mapping=eye), base(mapping=double), base(strength=0.5)):
        patchscope.record(profile(probe))


def test_a_lambda_mapping_is_refused(patchscope):
    patchscope.record(profile(base(mapping=lambda h: 2 * h)))
"""


def test_everything_a_probe_computes_is_in_its_key(pytester, project):
    (project / "tests" / "test_identity.py").write_text(IDENTITY_SUITE)
    baseline = project / "base.json"
    result = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "tests/test_identity.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*mapping='<lambda>' is not valid: a mapping with a stable identity to record()."
        " A lambda, a local function or a functools.partial has none*f.name = 'double'*",
    ])
    keys = entries_of(baseline)
    assert len(keys) == 5, "five probes that compute different things have five keys"
    mappings = sorted(entry["probe"]["mapping"] for entry in keys.values())
    assert mappings[0].startswith("affine#") and mappings[1].startswith("affine#") and mappings[0] != mappings[1]


def test_under_xdist_the_controller_merges_what_every_worker_recorded(pytester, project):
    baseline = project / "base.json"
    gone = recorded_with_a_stale_entry(pytester, baseline)
    (project / "tests" / "test_more.py").write_text(SUITE.replace("def test_fact", "def test_other"))
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "tests/test_more.py").assert_outcomes(passed=3)
    result = run(pytester, f"--patchscope-baseline={baseline}", "-n", "2", "--dist=loadfile")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["6 probes: 6 unchanged", f"1 baseline entry unused: {gone}"])


# ---- issue 22: D2, D4, D11, keys without a marker; issue 21: record() with nothing to compare -------
def test_an_update_skipped_because_a_worker_died_after_every_test_passed_fails_the_run(pytester, project):
    """D2: gw0 kills itself in its session finish, when no test is left to fail, so before the fix
    the only trace was a summary line and the exit status was 0."""
    pytester.makeconftest(
        """
        import os, signal

        def pytest_sessionfinish(session):
            if os.environ.get("PYTEST_XDIST_WORKER") == "gw0":
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    baseline = project / "base.json"
    for restarts in ([], ["--max-worker-restart=0"]):
        result = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline",
                     "-n", "2", "--dist=loadfile", *restarts)
        result.stdout.fnmatch_lines(["error: baseline not written: worker(s) gw0 crashed. Rerun the update to completion."])
        assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
        assert result.parseoutcomes().get("failed", 0) == 0, "no test failed: only the skipped update fails the run"
        assert not baseline.exists()


def test_an_update_that_recorded_nothing_fails_the_run(pytester, project):
    baseline = project / "base.json"
    result = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", "-k", "no_such_test")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines([f"error: baseline not written: this run recorded no probe ({baseline} is unchanged)."])


DAMAGES = {
    "5,000-digit int": (lambda text: text.replace('"layer": 0', '"layer": ' + "9" * 5000, 1), "holds a number too long to parse"),
    "100k-deep nesting": (lambda text: text.replace('"layer": 0', '"layer": ' + "[" * 100_000 + "]" * 100_000, 1), "nests too deep to parse"),
    "NaN in probe": (lambda text: text.replace('{"source": "japan"}', '{"source": "japan", "strength": NaN}', 1),
                     "probe.strength=nan is not valid: a finite number"),
    "Infinity in probe": (lambda text: text.replace('{"source": "japan"}', '{"source": "japan", "strength": Infinity}', 1),
                          "probe.strength=inf is not valid: a finite number"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_baseline_that_used_to_crash_pytest_is_a_usage_error_naming_the_file(pytester, project, damage):
    """D4: the reader refuses what it cannot parse or write back, before any test runs, in a gate,
    an update of a subset and under xdist (which ships the baseline to the workers)."""
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    edit, message = DAMAGES[damage]
    damaged = edit(baseline.read_text())
    assert damaged != baseline.read_text()
    baseline.write_text(damaged)
    modes = [[], ["--patchscope-update-baseline", "-k", "france"]] + ([["-n", "2"]] if damage == "NaN in probe" else [])
    for mode in modes:
        result = run(pytester, f"--patchscope-baseline={baseline}", *mode)
        output = result.stdout.str() + result.stderr.str()
        assert result.ret == pytest.ExitCode.USAGE_ERROR, output[-2000:]
        assert "INTERNALERROR" not in output and "Traceback" not in output
        result.stderr.fnmatch_lines([f"ERROR: baseline {baseline}*{message}*--patchscope-rewrite-baseline*"])
        assert baseline.read_text() == damaged
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-rewrite-baseline").assert_outcomes(passed=3)


def test_a_baseline_of_another_checkpoint_is_refused_unless_the_comparison_is_asked_for(pytester, project, monkeypatch):
    """D11: the same shape, other weights: each test that would compare fails, naming both checkpoints
    and the option; with it (or its ini key) the run compares and the summary says so."""
    baseline = project / "base.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=3)
    before = baseline.read_bytes()
    monkeypatch.setenv("SYNTH_MODEL", "ckpt-b")
    refused_line = ("the baseline comes from another checkpoint (ckpt-a @ ckpt-a-weigh) than this run (ckpt-b @ ckpt-b-weigh): "
                    "refused, nothing compared (3 tests failed); pass --patchscope-compare-checkpoint to gate this checkpoint against it")
    for workers in ([], ["-n", "2"]):
        refused = run(pytester, f"--patchscope-baseline={baseline}", *workers)
        refused.assert_outcomes(failed=3)
        refused.stdout.fnmatch_lines_random([
            f"patchscope: baseline {baseline}: the baseline was recorded on another checkpoint (ckpt-a @ ckpt-a-weigh) than "
            "this run's (ckpt-b @ ckpt-b-weigh), so nothing is compared: a pass would say that two checkpoints agree. Pass "
            "--patchscope-compare-checkpoint (ini patchscope_compare_checkpoint = true) to gate this checkpoint against it*",
            refused_line,
        ])
        assert "unused" not in refused.stdout.str(), "refused entries matched their probes: they are not unused"
    asked = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-compare-checkpoint")
    asked.assert_outcomes(passed=3)
    asked.stdout.fnmatch_lines([
        "the baseline comes from another checkpoint (ckpt-a @ ckpt-a-weigh) than this run (ckpt-b @ ckpt-b-weigh): "
        "compared anyway, as --patchscope-compare-checkpoint asks: a pass says that the two checkpoints agree within the tolerances",
        "3 probes: 3 unchanged",
    ])
    (project / "pytest.ini").write_text("[pytest]\npatchscope_compare_checkpoint = true\n")
    monkeypatch.setenv("SYNTH_LOST", "italy")
    by_ini = run(pytester, f"--patchscope-baseline={baseline}")
    by_ini.assert_outcomes(passed=2, failed=1)
    by_ini.stdout.fnmatch_lines(["*compared anyway, as --patchscope-compare-checkpoint asks*", "3 probes: 2 unchanged, 1 regressed"])
    assert baseline.read_bytes() == before


def test_record_without_any_baseline_option_says_that_nothing_was_compared(pytester, project):
    result = run(pytester)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([
        "*knowledge localization*",
        "nothing was compared: no --patchscope-baseline (ini patchscope_baseline) was given, so each probe was only "
        "recorded. Record a baseline with --patchscope-baseline=PATH --patchscope-update-baseline, then gate on it with "
        "--patchscope-baseline=PATH",
        "3 probes: 3 recorded",
    ])


@pytest.mark.parametrize("where", ["beside the tests", "in another folder"])
def test_without_a_project_marker_keys_ignore_option_form_working_directory_and_whether_the_file_exists(
    pytester, monkeypatch, where
):
    """Issue 22, point 2: no .git, pyproject, setup.cfg or ini file anywhere above the tests, so
    pytest's rootdir moves with every variation below; the keys must not."""
    from pytest_patchscope.baseline.keys import project_root

    if project_root(pytester.path) is not None:
        pytest.skip(f"a project marker lies above {pytester.path}: {project_root(pytester.path)}")
    for name in ("SYNTH_MODEL", "SYNTH_LAYERS", "SYNTH_LOST", "SYNTH_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    suite = pytester.path / "suite"
    suite.mkdir()
    (suite / "test_facts.py").write_text(SUITE)
    folder = suite if where == "beside the tests" else pytester.path / "baselines"
    folder.mkdir(exist_ok=True)
    prefix = "test_facts.py" if where == "beside the tests" else "../suite/test_facts.py"
    expected = [f"{prefix}::test_fact[{name}]" for name in ("france", "italy", "japan")]
    rootdirs = set()
    for cwd in (pytester.path, suite):
        for form in ("one word", "two words"):
            monkeypatch.chdir(cwd)
            baseline = folder / f"base-{cwd.name}-{form.replace(' ', '-')}.json"
            relative = os.path.relpath(baseline, cwd)
            option = [f"--patchscope-baseline={relative}"] if form == "one word" else ["--patchscope-baseline", relative]
            tests = os.path.relpath(suite, cwd)
            for step, mode in (("record (no file yet)", ["--patchscope-update-baseline"]), ("gate (file exists)", []),
                               ("update (file exists)", ["--patchscope-update-baseline"])):
                result = run(pytester, tests, *option, *mode)
                result.assert_outcomes(passed=3)
                rootdirs.add(next(line for line in result.stdout.lines if line.startswith("rootdir:")))
                keys = sorted(entries_of(baseline))
                assert [key.split("::probe=")[0] for key in keys] == expected, (where, cwd, form, step, keys)
                if not mode:
                    result.stdout.fnmatch_lines(["3 probes: 3 unchanged"])
    assert len(rootdirs) > 1, f"the variations should move pytest's rootdir: {rootdirs}"
