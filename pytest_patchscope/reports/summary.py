"""The session's outcome as data: one ProbeRecord per recorded sweep, gathered in a SessionSummary.

Every report format (terminal, JSON, Markdown, heatmaps, HTML, pytest-html extras) reads this and
nothing else. A SessionSummary travels between xdist workers and the controller as a plain
JSON-able dict. Also the helpers every format shares: JSON-safe values, a cell as data, and the
one way a report file is written (atomically, with a ReportError naming the path).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from pytest_patchscope.baseline.comparator import Comparison
from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.baseline.serializer import round_logprob
from pytest_patchscope.errors import ReportError
from pytest_patchscope.fileio import atomic_write, remove_stale_temps

RECORDED = "recorded"
"""Status of a profile added without a comparison (no baseline was consulted)."""


STATUS_ORDER = ("unchanged", "regressed", "improved", "new", "missing", RECORDED)


@dataclass(frozen=True)
class ProbeRecord:
    """One sweep's outcome in this session: its baseline key, test, worker, and comparison or profile."""

    key: str
    nodeid: str
    worker: str
    profile: LocalizationProfile
    """The current profile."""
    comparison: Comparison | None = None
    test: str = ""
    """The recording test as the baseline names it (``file::name``, file relative to the project root)."""

    @property
    def status(self) -> str:
        return RECORDED if self.comparison is None else self.comparison.status

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "nodeid": self.nodeid,
            "worker": self.worker,
            "test": self.test,
            "profile": None if self.comparison is not None else self.profile.to_dict(),
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbeRecord":
        comparison = None if data.get("comparison") is None else Comparison.from_dict(data["comparison"])
        profile = comparison.current if comparison else LocalizationProfile.from_dict(data["profile"])
        return cls(
            str(data["key"]), str(data["nodeid"]), str(data.get("worker", "")), profile, comparison, str(data.get("test", ""))
        )


class SessionSummary:
    """Collects the session's probe records; merge worker payloads in any order, read them sorted."""

    def __init__(self, records: Iterable[ProbeRecord] = ()) -> None:
        self._records = list(records)
        self.unused: list[str] = []
        """Baseline entries that no probe of this session matched (set by the gate at the end)."""

    def add(
        self, key: str, outcome: Comparison | LocalizationProfile, nodeid: str, worker: str = "", test: str = ""
    ) -> ProbeRecord:
        """Record one sweep; ``worker`` is the xdist worker id (``""`` without xdist)."""
        if isinstance(outcome, Comparison):
            record = ProbeRecord(key, nodeid, worker, outcome.current, outcome, test)
        else:
            record = ProbeRecord(key, nodeid, worker, outcome, None, test)
        self._records.append(record)
        return record

    def merge(self, other: "SessionSummary | Mapping[str, Any]") -> None:
        """Add another summary's records, e.g. ``node.workeroutput[...]`` from an xdist worker."""
        incoming = other if isinstance(other, SessionSummary) else SessionSummary.from_dict(other)
        self._records.extend(incoming.records)

    def added_since(self, count: int) -> list[ProbeRecord]:
        """The records added after the first ``count`` ones, in the order they were added (for
        attaching a test's new records to its report)."""
        return self._records[count:]

    @property
    def records(self) -> list[ProbeRecord]:
        """Sorted by key (then test, worker, status), so output does not depend on merge order."""
        return sorted(self._records, key=lambda r: (r.key, r.nodeid, r.worker, r.status))

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUS_ORDER, 0)
        for record in self._records:
            counts[record.status] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able payload (no Path objects) for xdist's workeroutput."""
        return {"records": [r.to_dict() for r in self.records]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SessionSummary":
        return cls(ProbeRecord.from_dict(r) for r in data.get("records", []))


# ---- terminal --------------------------------------------------------------------------
def counts_line(summary: SessionSummary) -> str:
    """``12 probes: 9 unchanged, 1 regressed, 1 improved, 1 new`` (zero counts left out)."""
    counts = summary.counts()
    total = sum(counts.values())
    parts = [f"{n} {status}" for status, n in counts.items() if n]
    return f"{total} probe{'s' if total != 1 else ''}" + (": " + ", ".join(parts) if parts else "")


# ---- JSON and Markdown ---------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (a -inf log-probability) as None, so the JSON stays strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def cell_dict(cell: LayerCell) -> dict[str, Any]:
    """Every field of a LayerCell as plain JSON data (``LayerCell(**cell_dict(c)) == c`` for finite scores).

    Scores are not rounded (the baseline file rounds them; a report is not diffed); a score that is
    not finite is None.
    """
    return {name: json_safe(value) for name, value in asdict(cell).items()}


def sorted_cells(profile: LocalizationProfile) -> list[LayerCell]:
    """The profile's cells in the order reports list them: by layer, target layer, then unit."""
    return sorted(profile.cells, key=lambda c: (c.layer, c.target_layer, -1 if c.unit is None else c.unit))


def profile_facts(profile: LocalizationProfile | None) -> dict[str, Any] | None:
    """One side of a probe in a report: the summary figures, then everything needed to redraw its
    heatmap (every cell, the clean continuation, the candidates and their clean scores)."""
    if profile is None:
        return None
    peak = profile.peak_cell
    return {
        "model": profile.model,
        "weights_hash": profile.weights_hash,
        "dtype": profile.dtype,
        "path": profile.path,
        "hit_layers": profile.hit_layers,
        "first_hit": profile.first_hit,
        "peak_layer": profile.peak_layer,
        "peak_target_layer": None if peak is None else peak.target_layer,
        "peak_logprob": None if peak is None else round_logprob(peak.logprob),
        "grid": profile.grid,
        "per_unit": profile.per_unit,
        "expect": profile.expect,
        "clean_text": profile.clean_text,
        "candidates": list(profile.candidates),
        "clean_candidate_logprobs": json_safe(profile.clean_candidate_logprobs),
        "cells": [cell_dict(c) for c in sorted_cells(profile)],
    }


def write_report_file(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write a report atomically, first removing the temp files of killed writers of it (their pid
    is gone), so that a SIGKILL mid-write leaves no temp file for good."""
    try:
        remove_stale_temps(path)
        atomic_write(path, data)
    except OSError as exc:
        raise ReportError(
            f"cannot write report {path}: {exc}. Check that the directory is writable."
        ) from exc
    return Path(path)
