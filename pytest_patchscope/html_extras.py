"""pytest-html integration: each test that recorded a sweep shows it in its row of the pytest-html report.

Registered by ``gate.configure_reports`` only when pytest-html's plugin is active and ``--html`` was
given, so this is the one module that imports ``pytest_html``; pytest-html stays an optional extra.
Under xdist the extras are made on the worker and travel to the controller with the test's
report, like the records themselves.
"""
from __future__ import annotations

import html
from typing import Any

import pytest
from pytest_html import extras

from pytest_patchscope.reports.html import probe_fragment
from pytest_patchscope.reports.summary import SessionSummary

STATUS_ATTR = "patchscope_status"
"""TestReport attribute: the statuses of the sweeps recorded in that phase (the row's patchscope column)."""


class HtmlExtras:
    """Adds a ``patchscope`` column (the recorded sweeps' statuses) and, as html extras, each recorded
    sweep's figures and baseline/current heatmaps."""

    def __init__(self, summary: SessionSummary) -> None:
        self.summary = summary
        self.attached = 0
        """How many of this process's records already went into a report."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        new = self.summary.added_since(self.attached)
        self.attached += len(new)
        if new:
            report.extras = list(getattr(report, "extras", [])) + [extras.html(probe_fragment(r)) for r in new]
            setattr(report, STATUS_ATTR, ", ".join(r.status for r in new))
        return report

    def pytest_html_results_table_header(self, cells: list[str]) -> None:
        cells.insert(2, '<th class="patchscope">patchscope</th>')

    def pytest_html_results_table_row(self, report: pytest.TestReport, cells: list[str]) -> None:
        cells.insert(2, f'<td class="col-patchscope">{html.escape(getattr(report, STATUS_ATTR, ""))}</td>')
