"""The knowledge-localization gate: record profiles, compare them, merge xdist workers, report.

`patchscope.record(profile)` compares a sweep's LocalizationProfile with its baseline entry (or
with the same sweep on `--patchscope-compare-model`), fails the test on a regression, and adds it
to the session summary. Only the controller writes the baseline and the reports.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .baseline import (
    BaselineFile,
    Tolerances,
    compare_profiles,
    deserialize_profile,
    profile_key,
    serialize_profile,
    write_baseline,
)
from .errors import PatchscopeError, ProbeConfigError
from .report import (
    SessionSummary,
    junit_properties,
    render_terminal_summary,
    write_heatmaps,
    write_json_report,
    write_markdown_report,
)

if TYPE_CHECKING:
    from .profile import LocalizationProfile

TOLERANCE_MARKER = "patchscope_tolerance"
REPORT_RECORDS_ATTR = "patchscope_records"
"""TestReport attribute: the records a worker made during that phase, streamed to the controller
with the report itself, so a worker that crashes later loses none of them."""
WORKEROUTPUT_KEY = "patchscope_records_streamed"
"""workeroutput key: how many records the worker streamed (present only if it finished)."""
SETUP_OUTPUT_KEY = "patchscope_setup"
"""workeroutput key: the worker's WorkerSetup.summary() line (written by plugin.py)."""
BASELINE_INPUT_KEY = "patchscope_baseline_entries"
"""workerinput key: the controller's baseline entries, so every worker (on any host) compares
against the same baseline, even where the baseline path does not exist or differs on its host."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("patchscope")
    group.addoption("--patchscope-baseline", dest="patchscope_baseline", metavar="PATH", default=None,
                    help="Baseline file of localization profiles to compare against. [ini: patchscope_baseline]")
    parser.addini("patchscope_baseline", help="Baseline file of localization profiles to compare against.")
    group.addoption("--patchscope-update-baseline", action="store_true", default=False,
                    help="Write this run's recorded profiles into the baseline instead of failing on changes.")
    group.addoption("--patchscope-compare-model", dest="patchscope_compare_model", metavar="REF", default=None,
                    help="Reference checkpoint: run every recorded sweep on it too and compare (no baseline file). "
                    "[ini: patchscope_compare_model]")
    parser.addini("patchscope_compare_model", help="Reference checkpoint to compare every recorded sweep against.")
    parser.addini("patchscope_tolerances", type="args",
                  help="Global comparison tolerances, e.g. max_first_hit_shift=2 max_score_drop=2.0.")
    group.addoption("--patchscope-report", dest="patchscope_report", metavar="PATH.json", default=None,
                    help="Write a machine-readable JSON report of the localization results.")
    group.addoption("--patchscope-report-md", dest="patchscope_report_md", metavar="PATH", default=None,
                    help="Write a Markdown summary (for a CI job summary).")
    group.addoption("--patchscope-heatmap", dest="patchscope_heatmap", metavar="DIR", default=None,
                    help="Write a PNG heatmap per recorded sweep into DIR (needs matplotlib).")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{TOLERANCE_MARKER}(**tolerances): per-test comparison tolerances, e.g. max_first_hit_shift=4.",
    )
    try:
        gate = Gate(config)
    except PatchscopeError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[GATE_KEY] = gate
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


def _ini_path(config: pytest.Config, option: str) -> Path | None:
    raw = config.getoption(option, None)
    if raw:
        return Path(raw).expanduser().absolute()
    raw = config.getini(option)
    return (config.rootpath / raw).absolute() if raw else None


class Gate:
    """Per-process gate state: the baseline, tolerances, this process's records."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.update = bool(config.getoption("patchscope_update_baseline", False))
        self.baseline_path = _ini_path(config, "patchscope_baseline")
        compare = config.getoption("patchscope_compare_model", None) or config.getini("patchscope_compare_model")
        self.compare_spec: str | None = None
        if compare:
            self.compare_spec = compare if compare == "default" else str(Path(compare).expanduser().absolute())
        if self.update and self.baseline_path is None:
            raise ProbeConfigError(
                "--patchscope-update-baseline", True, "used together with --patchscope-baseline PATH "
                "(or the ini key patchscope_baseline)",
            )
        shipped = getattr(config, "workerinput", {}).get(BASELINE_INPUT_KEY)
        if shipped is not None:
            entries = {key: deserialize_profile(entry) for key, entry in shipped.items()}
            self.baseline: BaselineFile | None = BaselineFile(Path(self.baseline_path or ""), entries)
        else:
            self.baseline = BaselineFile.read(self.baseline_path) if self.baseline_path else None
        self.tolerances = Tolerances().merged(**_parse_tolerances(config.getini("patchscope_tolerances")))
        self.summary = SessionSummary()
        self.keys_seen: dict[str, str] = {}
        self.reference_profiles: dict[int, tuple["LocalizationProfile", "LocalizationProfile"]] = {}
        self.dead_workers: dict[str, list[str]] = {}
        self.worker_setups: dict[str, str] = {}
        self.crashed_by_worker: dict[str, list[str]] = {}
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        self.unsent: list[Any] = []  # worker side: records not yet attached to a report
        self.streamed = 0
        self.finish_errors: list[str] = []

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
        if key is None:
            path = Path(str(item.path)).resolve().relative_to(self.config.rootpath.resolve()).as_posix()
            key = profile_key(path, item.name, profile.probe)
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
        if self.compare_spec is not None:
            baseline = self.take_reference(profile)
        else:
            baseline = self.baseline.get(key) if self.baseline is not None else None
        outcome = compare_profiles(baseline, profile, tol) if self.active else profile
        record = self.summary.add(key, outcome, item.nodeid, self.worker)
        if _is_worker(self.config):
            self.unsent.append(record)
        for name, value in junit_properties(outcome):
            item.user_properties.append((name, value))
        if getattr(outcome, "regressed", False) and not self.update:
            pytest.fail(outcome.render(), pytrace=False)
        return outcome

    # ---- end of session (controller only) --------------------------------------------------
    def finish(self) -> list[str]:
        """Write the baseline (update mode) and the reports; returns error lines to show."""
        # Within one process record() refuses a key used twice; across xdist workers only here.
        errors = [
            str(ProbeConfigError(
                "key", key, f"unique within a session; {', '.join(nodeids)} all recorded it",
                "Pass key=... to record() to tell the profiles apart.",
            ))
            for key, nodeids in _duplicate_keys(self.summary).items()
        ]
        if self.update and self.baseline_path is not None and self.summary.records and not errors:
            try:
                write_baseline(self.baseline_path, self.summary.profiles())
            except PatchscopeError as exc:
                errors.append(str(exc))
        writers = [
            ("patchscope_report", write_json_report),
            ("patchscope_report_md", write_markdown_report),
            ("patchscope_heatmap", write_heatmaps),
        ]
        for option, writer in writers:
            target = self.config.getoption(option, None)
            if target:
                try:
                    writer(Path(target), self.summary)
                except PatchscopeError as exc:
                    errors.append(str(exc))
        return errors


def _duplicate_keys(summary: SessionSummary) -> dict[str, list[str]]:
    nodeids: dict[str, list[str]] = {}
    for record in summary.records:
        nodeids.setdefault(record.key, []).append(record.nodeid)
    return {key: tests for key, tests in nodeids.items() if len(tests) > 1}


GATE_KEY = pytest.StashKey[Gate]()


def gate_of(config: pytest.Config) -> Gate:
    return config.stash[GATE_KEY]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


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
        return
    gate.finish_errors = gate.finish()
    if gate.finish_errors and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _is_worker(config):
        return
    gate = gate_of(config)
    if gate.worker_setups:
        terminalreporter.write_sep("-", "patchscope workers")
        for worker, line in sorted(gate.worker_setups.items(), key=lambda item: (len(item[0]), item[0])):
            terminalreporter.write_line(line)
    lines = render_terminal_summary(gate.summary)
    errors = gate.finish_errors
    if not lines and not errors and not gate.dead_workers:
        return
    terminalreporter.write_sep("-", "knowledge localization")
    for line in lines:
        terminalreporter.write_line(line)
    if gate.update and gate.baseline_path is not None and gate.summary.records and not errors:
        terminalreporter.write_line(f"baseline written: {gate.baseline_path} ({len(gate.summary.records)} probes)")
    for worker, nodeids in sorted(gate.dead_workers.items()):
        terminalreporter.write_line(f"worker {worker} crashed; its probes have no result: " + (", ".join(sorted(nodeids)) or "unknown"), red=True)
    for error in errors:
        terminalreporter.write_line(f"error: {error}", red=True)


class XdistMerge:
    """Controller-side xdist hooks, registered only when xdist is active."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def pytest_configure_node(self, node: Any) -> None:
        if self.gate.baseline is not None:
            node.workerinput[BASELINE_INPUT_KEY] = {
                key: serialize_profile(profile) for key, profile in self.gate.baseline.entries.items()
            }

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
        if WORKEROUTPUT_KEY not in output:
            # The same list object: xdist reports the crashed test only after this hook.
            self.gate.dead_workers[worker] = self.gate.crashed_by_worker.setdefault(worker, [])
