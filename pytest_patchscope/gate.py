"""The knowledge-localization gate: record profiles, compare them, merge xdist workers, report.

`patchscope.record(profile)` compares a sweep's LocalizationProfile with its baseline entry (or
with the same sweep on `--patchscope-compare-model`), fails the test on a regression or a missing
entry, and adds it to the session summary. Only the controller writes the baseline and reports.
A gate is never silent: entries that matched nothing, probes without an entry, a record() with
nothing to compare against, and a baseline from another checkpoint are always said out loud. A
baseline of another checkpoint fails each test that would compare with it, unless
``--patchscope-compare-checkpoint`` asks for that comparison; an update that writes nothing (an
interrupted session, a crashed xdist worker, no probe recorded) is a failing exit.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from pytest_patchscope.baseline.comparator import (
    Comparison,
    Tolerances,
    architecture_mismatch,
    checkpoint_mismatch,
    compare_profiles,
)
from pytest_patchscope.baseline.keys import anchored_test_id, profile_key, project_root, unmarked_anchor
from pytest_patchscope.baseline.render import render_comparison
from pytest_patchscope.baseline.serializer import (
    COMPARE_CHECKPOINT_OPTION,
    REWRITE_OPTION,
    UPDATE_OPTION,
    BaselineFile,
    Entry,
    describe_checkpoint,
    from_json,
    same_checkpoint,
    to_json,
)
from pytest_patchscope.baseline.storage import read_baseline, update_baseline
from pytest_patchscope.errors import BaselineError, PatchscopeError, ProbeConfigError
from pytest_patchscope.options import flag_setting, path_setting
from pytest_patchscope.reports.formats import junit_properties, render_terminal_summary, write_heatmaps, write_json_report, write_markdown_report
from pytest_patchscope.reports.html import HTML_REPORT_OPTION, check_html_report_path, write_html_report
from pytest_patchscope.reports.summary import SessionSummary

if TYPE_CHECKING:
    from pytest_patchscope.baseline.profile import LocalizationProfile

TOLERANCE_MARKER = "patchscope_tolerance"
ALLOW_NEW_OPTION = "--patchscope-allow-new"
REPORT_RECORDS_ATTR = "patchscope_records"
"""TestReport attribute: the records a worker made during that phase, streamed to the controller
with the report itself, so a worker that crashes later loses none of them."""
WORKEROUTPUT_KEY = "patchscope_records_streamed"
"""workeroutput key: how many records the worker streamed (present only if it finished)."""
PARTIAL_OUTPUT_KEY = "patchscope_partial"
"""workeroutput key: why a worker ran only part of the suite (deselection), for the update rules."""
SETUP_OUTPUT_KEY = "patchscope_setup"
"""workeroutput key: the worker's WorkerSetup.summary() line (written by plugin.py)."""
BASELINE_INPUT_KEY = "patchscope_baseline_text"
"""workerinput key: the controller's baseline file text, so every worker (on any host) compares
against the same baseline, even where the baseline path does not exist or differs on its host."""
REFUSED_PROPERTY, REFUSED_KEY_PROPERTY = "patchscope.refused_checkpoint", "patchscope.refused_key"
"""user_properties (and JUnit) names: this run's checkpoint and the key, on a test refused because the
baseline is of another checkpoint; the controller reads them from the reports, which xdist forwards."""
REPORT_OPTIONS = ("patchscope_report", "patchscope_report_md", "patchscope_heatmap", "patchscope_report_html")


def configure_reports(config: pytest.Config, gate: "Gate") -> None:
    """At configure time: refuse an HTML report path that cannot be written (the controller writes it),
    and add each recorded sweep to its row of a pytest-html report when pytest-html is active."""
    target = path_setting(config, "patchscope_report_html")
    if target and not _is_worker(config):
        check_html_report_path(Path(target))
    if config.pluginmanager.hasplugin("html") and config.getoption("htmlpath", None):
        from pytest_patchscope.html_extras import HtmlExtras  # imports pytest_html; only reached when its plugin is active

        config.pluginmanager.register(HtmlExtras(gate.summary), "patchscope-html-extras")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("patchscope")
    group.addoption("--patchscope-baseline", dest="patchscope_baseline", metavar="PATH", default=None,
                    help="Baseline file of localization profiles to compare against (relative to the working "
                    "directory; the ini key is relative to the ini file). [ini: patchscope_baseline]")
    parser.addini("patchscope_baseline", help="Baseline file of localization profiles (relative to this ini file).")
    group.addoption(UPDATE_OPTION, dest="patchscope_update_baseline", action="store_true", default=False,
                    help="Merge this run's recorded profiles into the baseline instead of failing on changes. Entries "
                    "nothing recorded are removed only when the whole suite ran and their test passed.")
    group.addoption(REWRITE_OPTION, dest="patchscope_rewrite_baseline", action="store_true", default=False,
                    help="Replace the baseline with exactly this run's profiles (also an unreadable, older-format or "
                    "other-checkpoint file). Refused unless the whole suite ran.")
    group.addoption(ALLOW_NEW_OPTION, dest="patchscope_allow_new", action="store_true", default=False,
                    help="Let probes without a baseline entry pass (reported 'new') instead of failing. "
                    "[ini: patchscope_allow_new]")
    parser.addini("patchscope_allow_new", type="bool", default=False,
                  help="Let probes without a baseline entry pass (reported 'new').")
    group.addoption("--patchscope-compare-model", dest="patchscope_compare_model", metavar="REF", default=None,
                    help="Reference checkpoint: run every recorded sweep on it too and compare (no baseline file). "
                    "[ini: patchscope_compare_model]")
    parser.addini("patchscope_compare_model", help="Reference checkpoint to compare every recorded sweep against.")
    group.addoption(COMPARE_CHECKPOINT_OPTION, dest="patchscope_compare_checkpoint", action="store_true", default=False,
                    help="Gate this run's checkpoint against a baseline recorded on another checkpoint (of the same "
                    "architecture) instead of refusing to; the summary says so. [ini: patchscope_compare_checkpoint]")
    parser.addini("patchscope_compare_checkpoint", type="bool", default=False,
                  help="Compare with a baseline recorded on another checkpoint instead of refusing to.")
    parser.addini("patchscope_tolerances", type="args",
                  help="Global comparison tolerances, e.g. max_first_hit_shift=2 max_score_drop=2.0.")
    group.addoption("--patchscope-report", dest="patchscope_report", metavar="PATH.json", default=None,
                    help="Write a machine-readable JSON report of the localization results.")
    group.addoption("--patchscope-report-md", dest="patchscope_report_md", metavar="PATH", default=None,
                    help="Write a Markdown summary (for a CI job summary).")
    group.addoption("--patchscope-heatmap", dest="patchscope_heatmap", metavar="DIR", default=None,
                    help="Write a PNG heatmap per recorded sweep into DIR (needs matplotlib).")
    group.addoption(HTML_REPORT_OPTION, dest="patchscope_report_html", metavar="PATH.html", default=None,
                    help="Write one self-contained HTML page (counts, every probe with baseline and current heatmaps, "
                    "cell details, a status filter) for a CI artifact. Its folder must exist.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{TOLERANCE_MARKER}(**tolerances): per-test comparison tolerances, e.g. max_first_hit_shift=4.",
    )
    try:
        gate = Gate.from_config(config)
        configure_reports(config, gate)
    except PatchscopeError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[GATE_KEY] = gate
    config.pluginmanager.register(SessionWatch(gate), "patchscope-session-watch")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistMerge(gate), "patchscope-xdist-merge")


def _parse_tolerances(raw: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in raw:
        name, sep, text = item.partition("=")
        if not sep:
            raise ProbeConfigError("patchscope_tolerances", item, "name=value pairs, e.g. max_first_hit_shift=2")
        try:
            values[name] = int(text)
        except ValueError:
            try:
                values[name] = float(text)
            except ValueError:
                raise ProbeConfigError(f"patchscope_tolerances {name}", text, "a number") from None
    return values


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _check_writable_folder(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise BaselineError(
            f"--patchscope-baseline={path}: its folder {folder} does not exist. Create it (mkdir -p {folder}) "
            "or point the option at an existing folder."
        )
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.R_OK)):
        raise BaselineError(f"--patchscope-baseline={path}: {folder} is not writable here. Choose a writable path.")


@dataclass
class SessionScope:
    """What part of the suite this session ran, for deciding which unrecorded entries may go."""

    partial: list[str] = field(default_factory=list)
    """Why the session did not run the whole suite (-k, -m, deselection, collection errors, ...)."""
    not_passed: set[str] = field(default_factory=set)
    """Test ids (see keys.anchored_test_id) that failed, errored or were skipped: their entries are kept."""
    roots: list[Path] = field(default_factory=list)
    """The files and folders the session collected from: entries of tests outside them are kept."""


class Gate:
    """Per-process gate state: the settings, the baseline, and this process's records."""

    def __init__(
        self,
        config: pytest.Config,
        *,
        baseline_path: Path | None,
        baseline: BaselineFile | None,
        update: bool,
        rewrite: bool,
        allow_new: bool,
        compare_spec: str | None,
        tolerances: Tolerances,
        replacing: bool = False,
        compare_checkpoint: bool = False,
    ) -> None:
        self.config = config
        self.baseline_path = baseline_path
        self.baseline = baseline
        self.update = update or rewrite
        self.rewrite = rewrite
        self.allow_new = allow_new
        self.compare_spec = compare_spec
        self.tolerances = tolerances
        self.replacing = replacing
        self.compare_checkpoint = compare_checkpoint
        """Compare with a baseline of another checkpoint instead of refusing to (COMPARE_CHECKPOINT_OPTION)."""
        self.key_anchor = unmarked_anchor(baseline_path, config.rootpath)
        """Where test paths in keys start when no project marker lies above a test (baseline/keys.py)."""
        self.refused: dict[str, set[str]] = {}
        """This run's checkpoint -> the keys of the tests refused because the baseline is of another checkpoint."""
        """The baseline file is unreadable or of an older format, and the rewrite replaces it."""
        self.summary = SessionSummary()
        self.keys_seen: dict[str, str] = {}
        self.reference_profiles: dict[int, tuple["LocalizationProfile", "LocalizationProfile"]] = {}
        self.dead_workers: dict[str, list[str]] = {}
        self.worker_setups: dict[str, str] = {}
        self.crashed_by_worker: dict[str, list[str]] = {}
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        self.unsent: list[Any] = []  # worker side: records not yet attached to a report
        self.streamed = 0
        self.scope = SessionScope()
        self.header_lines: list[str] = []
        """What the run compared with (shown first in the summary)."""
        self.finish_lines: list[str] = []
        """What the end of the session did to the baseline (shown after the probes)."""
        self.finish_errors: list[str] = []

    @classmethod
    def from_config(cls, config: pytest.Config) -> "Gate":
        """Read and check every gate setting; raise PatchscopeError before any test runs."""
        update = bool(config.getoption("patchscope_update_baseline", False))
        rewrite = bool(config.getoption("patchscope_rewrite_baseline", False))
        raw_path = path_setting(config, "patchscope_baseline")
        baseline_path = None if raw_path is None else Path(raw_path)
        compare_spec = path_setting(config, "patchscope_compare_model", model=True)
        if update and rewrite:
            raise ProbeConfigError(UPDATE_OPTION, True, f"used without {REWRITE_OPTION}: pass one of the two")
        writing = UPDATE_OPTION if update else REWRITE_OPTION if rewrite else None
        if writing and baseline_path is None:
            raise ProbeConfigError(
                writing, True, "used together with --patchscope-baseline PATH (or the ini key patchscope_baseline)"
            )
        if writing and compare_spec is not None:
            raise ProbeConfigError(
                writing, True, "used without --patchscope-compare-model",
                "A comparison with a reference model writes no baseline; run the two separately.",
            )
        if baseline_path is not None and compare_spec is not None:
            raise ProbeConfigError(
                "--patchscope-compare-model", compare_spec, "used without --patchscope-baseline",
                "Gate against either a baseline file or a reference model, not both.",
            )
        allow_new = flag_setting(config, "patchscope_allow_new")
        compare_checkpoint = flag_setting(config, "patchscope_compare_checkpoint")
        baseline: BaselineFile | None = None
        replacing = False
        shipped = getattr(config, "workerinput", {}).get(BASELINE_INPUT_KEY)
        if shipped is not None:
            baseline = from_json(shipped, baseline_path or Path("baseline"))
        elif baseline_path is not None and not _is_worker(config):
            if writing:
                _check_writable_folder(baseline_path)
            try:
                baseline = read_baseline(baseline_path)
            except BaselineError:
                if not rewrite:
                    raise
                replacing = True
            if baseline is None and not writing and not allow_new:
                raise BaselineError(
                    f"baseline {baseline_path} does not exist, so this gate would compare nothing. Record it first "
                    f"with {UPDATE_OPTION}, check the path, or pass {ALLOW_NEW_OPTION} to report every probe as new."
                )
        tolerances = Tolerances().merged(**_parse_tolerances(config.getini("patchscope_tolerances")))
        return cls(
            config, baseline_path=baseline_path, baseline=baseline, update=update, rewrite=rewrite,
            allow_new=allow_new, compare_spec=compare_spec, tolerances=tolerances, replacing=replacing,
            compare_checkpoint=compare_checkpoint,
        )

    @property
    def active(self) -> bool:
        return self.baseline_path is not None or self.compare_spec is not None

    def remember_reference(self, current: "LocalizationProfile", reference: "LocalizationProfile") -> None:
        """Keep the reference model's profile of a sweep until the test records it."""
        self.reference_profiles[id(current)] = (current, reference)

    def take_reference(self, profile: "LocalizationProfile") -> "LocalizationProfile":
        pair = self.reference_profiles.pop(id(profile), None)
        if pair is None or pair[0] is not profile:
            raise ProbeConfigError(
                "profile", profile.describe(), "a profile returned by patchscope.sweep() in this test",
                "With --patchscope-compare-model, record() compares the sweep it ran on both models.",
            )
        return pair[1]

    def record(self, item: pytest.Item, profile: "LocalizationProfile", key: str | None, tolerances: dict[str, Any]) -> Any:
        """Compare `profile` with its baseline (or reference) entry; fail the test on a regression."""
        __tracebackhide__ = True
        if profile.probe.get("mapping", "identity") is None:
            raise ProbeConfigError(
                "mapping", profile.probe.get("unstable_mapping"), "a mapping with a stable identity to record()",
                "A lambda, a local function or a functools.partial has none: two different ones would share one "
                "baseline entry. Define it with def at module level, give it a name (f.name = 'double'), or use "
                "an AffineMapping or another torch.nn.Module (identified by its weights).",
            )
        test = anchored_test_id(item.path, item.nodeid, self.key_anchor)
        if key is None:
            key = profile_key(test, profile.probe)
        elif not isinstance(key, str) or not key.strip():
            raise ProbeConfigError("key", key, "None (derived from the test) or a non-empty string")
        if key in self.keys_seen:
            raise ProbeConfigError(
                "key", key, f"unique within a session; {self.keys_seen[key]} already recorded it",
                "Pass key=... to record() to tell the two profiles apart.",
            )
        self.keys_seen[key] = item.nodeid
        marker = item.get_closest_marker(TOLERANCE_MARKER)
        tol = self.tolerances.merged(**(marker.kwargs if marker else {}), **tolerances)
        baseline = self._baseline_for(key, profile)
        if baseline is not None:
            mismatch = architecture_mismatch(baseline, profile)
            if mismatch:
                where = f"reference model {self.compare_spec}" if self.compare_spec else f"baseline {self.baseline_path}"
                pytest.fail(f"patchscope: {where}: {mismatch}", pytrace=False)
            other = None if self.compare_spec or self.update or self.compare_checkpoint else checkpoint_mismatch(baseline, profile)
            if other:
                item.user_properties += [(REFUSED_PROPERTY, describe_checkpoint(profile.model, profile.weights_hash)),
                                         (REFUSED_KEY_PROPERTY, key)]
                pytest.fail(f"patchscope: baseline {self.baseline_path}: {other}.", pytrace=False)
        outcome: Comparison | LocalizationProfile = compare_profiles(baseline, profile, tol) if self.active else profile
        if isinstance(outcome, Comparison) and outcome.status == "new" and not self.compare_spec:
            if not (self.update or self.allow_new):
                outcome.status = "missing"
                outcome.reasons = [
                    f"no entry for key {key!r} in baseline {self.baseline_path}. Record the probe with "
                    f"{UPDATE_OPTION}, or pass {ALLOW_NEW_OPTION} (ini patchscope_allow_new) for a change that adds tests"
                ]
        record = self.summary.add(key, outcome, item.nodeid, self.worker, test)
        if _is_worker(self.config):
            self.unsent.append(record)
        for name, value in junit_properties(outcome):
            item.user_properties.append((name, value))
        if isinstance(outcome, Comparison) and outcome.failed and not self.update:
            pytest.fail(render_comparison(outcome), pytrace=False)
        return outcome

    def _baseline_for(self, key: str, profile: "LocalizationProfile") -> "LocalizationProfile | None":
        if self.compare_spec is not None:
            return self.take_reference(profile)
        return self.baseline.profile(key) if self.baseline is not None else None

    # ---- collecting what ran (controller) ----------------------------------------------------
    def note_report(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        """Remember failed collections and tests that did not pass (their entries are never removed)."""
        if isinstance(report, pytest.CollectReport):
            if report.failed:
                self.scope.partial.append(f"collection error in {report.nodeid or 'the session'}")
            return
        if report.failed or report.skipped:
            path = self.config.rootpath / report.nodeid.split("::", 1)[0]
            self.scope.not_passed.add(anchored_test_id(path, report.nodeid, self.key_anchor))
        properties = dict(report.user_properties)  # every later phase's report repeats them
        if REFUSED_PROPERTY in properties:
            self.refused.setdefault(str(properties[REFUSED_PROPERTY]), set()).add(str(properties.get(REFUSED_KEY_PROPERTY)))

    def _session_partial(self, session: pytest.Session, exitstatus: int) -> tuple[list[str], list[str]]:
        """(why no baseline may be written at all, why the session ran only part of the suite)."""
        stop: list[str] = []
        dsession = self.config.pluginmanager.getplugin("dsession")
        for reason in (session.shouldfail, session.shouldstop, getattr(dsession, "shouldstop", False)):
            if reason:
                stop.append(f"the session stopped early ({reason})")
        if exitstatus == pytest.ExitCode.INTERRUPTED and not stop:
            stop.append("the session was interrupted")
        if self.dead_workers:
            stop.append(f"worker(s) {', '.join(sorted(self.dead_workers))} crashed")
        partial = list(self.scope.partial)
        option = self.config.option
        if getattr(option, "keyword", ""):
            partial.append(f"-k {option.keyword!r}")
        if getattr(option, "markexpr", ""):
            partial.append(f"-m {option.markexpr!r}")
        partial += [f"the test id {arg}" for arg in self.config.args if "::" in arg]
        return stop, partial

    def _collected_roots(self) -> list[Path]:
        """The files and folders this session collected from (its path arguments, or testpaths)."""
        from_testpaths = self.config.args_source == pytest.Config.ArgsSource.TESTPATHS
        base = self.config.rootpath if from_testpaths else self.config.invocation_params.dir
        return [Path(os.path.abspath(base / arg)) for arg in self.config.args if "::" not in arg]

    def _may_remove(self, key: str, entry: Entry) -> bool:
        """An unrecorded entry goes only if its test passed (or no longer exists) within the collected paths."""
        if entry.test in self.scope.not_passed:
            return False
        file_part = entry.test.split("::", 1)[0]
        for root in self.scope.roots:
            project = project_root(root if root.is_dir() else root.parent) or self.key_anchor
            absolute = Path(os.path.abspath(project / file_part))
            if absolute == root or root in absolute.parents:
                return True
        return False

    # ---- end of session (controller only) --------------------------------------------------
    def finish(self, session: pytest.Session, exitstatus: int) -> None:
        """Write the baseline (update mode) and the reports; fills finish_lines and finish_errors."""
        # Within one process record() refuses a key used twice; across xdist workers only here.
        errors = [
            str(ProbeConfigError(
                "key", key, f"unique within a session; {', '.join(nodeids)} all recorded it",
                "Pass key=... to record() to tell the profiles apart.",
            ))
            for key, nodeids in _duplicate_keys(self.summary).items()
        ]
        self.header_lines = self._checkpoint_lines() + self._path_lines()
        lines: list[str] = []
        entries = {r.key: Entry(r.profile, r.test) for r in self.summary.records}
        if self.baseline is not None and self.compare_spec is None:
            refused = set().union(*self.refused.values())  # matched, but not compared: not unused
            self.summary.unused = sorted(set(self.baseline.entries) - set(entries) - refused)
        if self.update and self.baseline_path is not None:
            stop, partial = self._session_partial(session, exitstatus)
            if errors:
                errors.append(f"baseline {self.baseline_path} not written: fix the duplicate keys first.")
            # A skipped update is always a failing exit, even when every test that ran passed.
            elif stop:
                errors.append(f"baseline not written: {'; '.join(stop)}. Rerun the update to completion.")
            elif not entries:
                errors.append(f"baseline not written: this run recorded no probe ({self.baseline_path} is unchanged).")
            elif self.rewrite and partial:
                errors.append(
                    f"baseline {self.baseline_path} not rewritten: {REWRITE_OPTION} replaces the whole file, but this "
                    f"session ran only part of the suite ({'; '.join(partial)}). Run the whole suite, or use {UPDATE_OPTION}."
                )
            else:
                self.scope.roots = self._collected_roots()
                try:
                    result = update_baseline(
                        self.baseline_path, entries, rewrite=self.rewrite,
                        may_remove=(lambda key, entry: False) if partial else self._may_remove,
                    )
                except PatchscopeError as exc:
                    errors.append(str(exc))
                else:
                    lines.append(f"baseline written: {self.baseline_path} ({result.recorded} probe{'s' if result.recorded != 1 else ''})")
                    if result.removed:
                        lines.append(f"removed {_entries(len(result.removed))} that nothing recorded: {', '.join(result.removed)}")
                    if result.kept_unused:
                        why = f"this session ran part of the suite ({'; '.join(partial)})" if partial else (
                            "their tests did not run, did not pass, or lie outside the collected paths")
                        lines.append(f"kept {_entries(len(result.kept_unused))} that nothing recorded: {why}")
                    if result.stale_temps:
                        lines.append(f"removed {len(result.stale_temps)} temp file(s) left by a killed writer")
        writers: tuple[Callable[[Path, SessionSummary], object], ...] = (
            write_json_report, write_markdown_report, write_heatmaps,
            functools.partial(write_html_report, context=self.header_lines + lines),
        )
        for option, writer in zip(REPORT_OPTIONS, writers):
            target = path_setting(self.config, option)
            if target:
                try:
                    writer(Path(target), self.summary)
                except PatchscopeError as exc:
                    errors.append(str(exc))
        self.finish_lines, self.finish_errors = lines, errors

    def _checkpoint_lines(self) -> list[str]:
        """Always say what the run compares with (or that it compares nothing), and when that is
        another checkpoint: refused, compared on request, or recorded over."""
        if self.compare_spec is not None:
            return [f"reference model: {self.compare_spec}"]
        if self.baseline is None:
            if self.baseline_path is None:
                return [NOTHING_COMPARED] if self.summary.records else []
            state = f"unreadable or of an older format; {REWRITE_OPTION} replaces it" if self.replacing else "no file yet"
            return [f"baseline: {self.baseline_path} ({state})"]
        baseline = self.baseline
        recorded_in = f" in {baseline.dtype}" if baseline.dtype else ""
        lines = [f"baseline: {self.baseline_path} ({len(baseline.entries)} entries, {baseline.checkpoint}{recorded_in})"]
        runs = {(r.profile.model, r.profile.weights_hash) for r in self.summary.records}
        others = {describe_checkpoint(*run) for run in runs if not same_checkpoint(baseline.model, baseline.weights_hash, *run)}
        if others or self.refused:
            if self.update:
                how = "this update records this run's checkpoint"
            elif self.compare_checkpoint:
                how = (f"compared anyway, as {COMPARE_CHECKPOINT_OPTION} asks: a pass says that the two checkpoints "
                       "agree within the tolerances")
            else:
                refused = len(set().union(*self.refused.values()))
                how = (f"refused, nothing compared ({refused} test{'s' if refused != 1 else ''} failed); pass "
                       f"{COMPARE_CHECKPOINT_OPTION} to gate this checkpoint against it")
            lines.append(
                f"the baseline comes from another checkpoint ({baseline.checkpoint}) than this run "
                f"({', '.join(sorted(others | set(self.refused)))}): {how}"
            )
        dtypes = sorted({r.profile.dtype for r in self.summary.records if r.profile.dtype and r.profile.dtype != baseline.dtype})
        if baseline.dtype and dtypes:
            lines.append(
                f"the baseline was recorded in {baseline.dtype}, this run is in {', '.join(dtypes)}: tokens whose top two "
                "logits are near-tied can flip between dtypes (docs/architectures.md, Dtypes)"
            )
        return lines

    def _path_lines(self) -> list[str]:
        """Say when probes ran on the general path (the model's own forward and generate), not the packed engine."""
        general = sum(1 for r in self.summary.records if r.profile.path != "packed")
        if not general:
            return []
        return [f"engine path: general (the model's own forward and generate; its family is not one the packed engine "
                f"runs) for {general} of {len(self.summary.records)} probes"]

    @functools.cached_property
    def baseline_text(self) -> str | None:
        """The baseline as sent to every xdist worker (serialized once, however many workers start)."""
        return None if self.baseline is None else to_json(self.baseline)


NOTHING_COMPARED = (
    "nothing was compared: no --patchscope-baseline (ini patchscope_baseline) was given, so each probe was "
    f"only recorded. Record a baseline with --patchscope-baseline=PATH {UPDATE_OPTION}, then gate on it "
    "with --patchscope-baseline=PATH"
)
"""The summary's first line when record() ran without a baseline or a reference model."""


def _entries(n: int) -> str:
    return f"{n} baseline entr{'y' if n == 1 else 'ies'}"


def _duplicate_keys(summary: SessionSummary) -> dict[str, list[str]]:
    nodeids: dict[str, list[str]] = {}
    for record in summary.records:
        nodeids.setdefault(record.key, []).append(record.nodeid)
    return {key: tests for key, tests in nodeids.items() if len(tests) > 1}


GATE_KEY = pytest.StashKey[Gate]()


def gate_of(config: pytest.Config) -> Gate:
    return config.stash[GATE_KEY]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a worker, attach the phase's new records to its report (xdist sends it at once)."""
    report = yield
    gate = gate_of(item.config)
    if gate.unsent:
        setattr(report, REPORT_RECORDS_ATTR, [record.to_dict() for record in gate.unsent])
        gate.streamed += len(gate.unsent)
        gate.unsent.clear()
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gate = gate_of(session.config)
    if _is_worker(session.config):
        session.config.workeroutput[WORKEROUTPUT_KEY] = gate.streamed  # type: ignore[attr-defined]
        session.config.workeroutput[PARTIAL_OUTPUT_KEY] = list(gate.scope.partial)  # type: ignore[attr-defined]
        return
    gate.finish(session, exitstatus)
    if gate.finish_errors and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _is_worker(config):
        return
    gate = gate_of(config)
    if gate.worker_setups:
        terminalreporter.write_sep("-", "patchscope workers")
        for _, line in sorted(gate.worker_setups.items(), key=lambda item: (len(item[0]), item[0])):
            terminalreporter.write_line(line)
    lines = render_terminal_summary(gate.summary) + gate.finish_lines
    if not lines and not gate.finish_errors and not gate.dead_workers and not gate.refused:
        return
    lines = gate.header_lines + lines
    terminalreporter.write_sep("-", "knowledge localization")
    for line in lines:
        terminalreporter.write_line(line)
    for worker, nodeids in sorted(gate.dead_workers.items()):
        tests = ", ".join(sorted(nodeids)) or "unknown"
        terminalreporter.write_line(f"worker {worker} crashed; its probes have no result: {tests}", red=True)
    for error in gate.finish_errors:
        terminalreporter.write_line(f"error: {error}", red=True)


class SessionWatch:
    """Hooks that note which part of the suite ran: deselections, collection errors, tests that did not pass."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        if items:
            self.gate.scope.partial.append(f"{len(items)} deselected test(s)")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self.gate.note_report(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.gate.note_report(report)


class XdistMerge:
    """Controller-side xdist hooks, registered only when xdist is active."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def pytest_configure_node(self, node: Any) -> None:
        text = self.gate.baseline_text
        if text is not None:
            node.workerinput[BASELINE_INPUT_KEY] = text

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        records = getattr(report, REPORT_RECORDS_ATTR, None)
        if records:
            self.gate.summary.merge({"records": records})
        node = getattr(report, "node", None)
        # "???": the report xdist makes for the test a worker crashed in (sent after testnodedown).
        if node is not None and report.when == "???":
            self.gate.crashed_by_worker.setdefault(node.gateway.id, []).append(report.nodeid)

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {})
        worker = node.gateway.id
        if output.get(SETUP_OUTPUT_KEY):
            self.gate.worker_setups[worker] = output[SETUP_OUTPUT_KEY]
        self.gate.scope.partial.extend(output.get(PARTIAL_OUTPUT_KEY, ()))
        if WORKEROUTPUT_KEY not in output:
            # The same list object: xdist reports the crashed test only after this hook.
            self.gate.dead_workers[worker] = self.gate.crashed_by_worker.setdefault(worker, [])
