"""Baselines: serialize, key, store and compare LocalizationProfiles.

Four separate pieces, as in syrupy: serializing (profile <-> plain entry), keying (test + probe ->
stable key), storing (one JSON file, atomic merge-writes) and comparing (baseline vs current ->
Comparison). Reporting lives in ``report.py``. No pytest import here: the plugin calls these.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Mapping

from .errors import BaselineError, ProbeConfigError
from .profile import LayerCell, LocalizationProfile

FORMAT = "pytest-patchscope-baseline"
VERSION = 1
LOGPROB_DECIMALS = 4
UPDATE_OPTION = "--patchscope-update-baseline"
"""The command-line option named in error messages as the way to rewrite a baseline."""

HIT_MARK, MISS_MARK, NO_MARK = "■", "·", " "

Status = Literal["unchanged", "regressed", "improved", "new"]


# ---- atomic writes (shared with report.py) ---------------------------------------------
def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that readers (and crashes) see the old or the new file, never half.

    Writes a temp file in the same directory, fsyncs it, ``os.replace``s it over ``path`` and fsyncs
    the directory. On any failure the temp file is removed and ``path`` is untouched. Raises OSError.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        # os.open with 0o666 lets the umask decide permissions, as for an ordinary new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # Windows cannot open a directory; NTFS journals the rename itself.
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---- serializing ---------------------------------------------------------------------
def serialize_profile(profile: LocalizationProfile) -> dict[str, Any]:
    """One baseline entry: what comparisons need, logprobs rounded so that reruns do not churn diffs."""
    return {
        "probe": profile.probe,
        "expect": profile.expect,
        "model": profile.model,
        "weights_hash": profile.weights_hash,
        "grid": profile.grid,
        "cells": [
            {
                "layer": c.layer,
                "target_layer": c.target_layer,
                "text": c.text,
                "hit": c.hit,
                "logprob": None if c.logprob is None else round(c.logprob, LOGPROB_DECIMALS),
                "rank": c.rank,
            }
            for c in sorted(profile.cells, key=lambda c: (c.layer, c.target_layer))
        ],
    }


def deserialize_profile(entry: Mapping[str, Any]) -> LocalizationProfile:
    """Rebuild a profile from :func:`serialize_profile`'s entry; BaselineError names any bad field."""
    if not isinstance(entry, Mapping):
        raise BaselineError(f"entry is a {type(entry).__name__}, expected a JSON object")
    for name, kind in (("probe", dict), ("cells", list)):
        if not isinstance(entry.get(name), kind):
            raise BaselineError(f"field {name!r} is {entry.get(name)!r}, expected a JSON {kind.__name__}")
    cells = []
    for index, cell in enumerate(entry["cells"]):
        try:
            cells.append(
                LayerCell(
                    layer=int(cell["layer"]),
                    target_layer=int(cell["target_layer"]),
                    text=str(cell["text"]),
                    hit=cell.get("hit"),
                    logprob=cell.get("logprob"),
                    rank=cell.get("rank"),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BaselineError(f"cells[{index}] = {cell!r} is not a valid cell ({exc!r})") from exc
    return LocalizationProfile(
        probe=dict(entry["probe"]),
        cells=tuple(cells),
        expect=entry.get("expect"),
        model=str(entry.get("model", "")),
        weights_hash=str(entry.get("weights_hash", "")),
        grid=bool(entry.get("grid", False)),
    )


# ---- keying ----------------------------------------------------------------------------
def probe_hash(probe: Mapping[str, Any]) -> str:
    """12 hex digits identifying a probe's identity dict, independent of key order."""
    try:
        text = json.dumps(probe, sort_keys=True)
    except TypeError as exc:
        raise ProbeConfigError(
            "probe",
            probe,
            f"its identity must be JSON-serializable ({exc})",
            "Convert tensors, paths and callables to plain strings or numbers.",
        ) from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def profile_key(test_path: str, test_name: str, probe: Mapping[str, Any], extra: str | None = None) -> str:
    """The baseline key of one sweep: ``<file>::<test name with param id>::probe=<hash>[::<extra>]``.

    Built from pieces rather than the node id, which xdist and rootdir changes may rewrite.
    ``test_path`` is relative to the rootdir; pass ``extra`` (e.g. the expected answer) when one test
    sweeps the same probe more than once.
    """
    posix = test_path.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ProbeConfigError(
            "test_path",
            test_path,
            "must be relative to the rootdir",
            "Absolute paths differ between machines, so baseline keys would never match.",
        )
    parts = [str(PurePosixPath(posix)), test_name, f"probe={probe_hash(probe)}"]
    if extra is not None:
        parts.append(extra)
    return "::".join(parts)


# ---- storing ---------------------------------------------------------------------------
def _dumps(value: Any, level: int = 0) -> str:
    """JSON with sorted keys where every container of scalars (a cell, a flat probe) stays on one line.

    One line per cell keeps a baseline diff to the cells that changed.
    """
    compact = json.dumps(value, sort_keys=True, ensure_ascii=False)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not any(isinstance(v, (dict, list)) for v in items):
        return compact
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(value, dict):
        body = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dumps(v, level + 1)}"
            for k, v in sorted(value.items())
        ]
        return "{\n" + ",\n".join(body) + f"\n{pad}}}"
    return "[\n" + ",\n".join(f"{inner}{_dumps(v, level + 1)}" for v in value) + f"\n{pad}]"


def _joined(values: set[str]) -> str:
    return ", ".join(sorted(values))


@dataclass
class BaselineFile:
    """The contents of one baseline file: entries by :func:`profile_key`."""

    path: Path
    entries: dict[str, LocalizationProfile] = field(default_factory=dict)
    model: str = ""
    weights_hash: str = ""

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "BaselineFile":
        """Load ``path``; a missing file is an empty baseline, anything unreadable a BaselineError."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise BaselineError(
                f"cannot read baseline {path}: {exc}. Delete it or pass {UPDATE_OPTION} to rewrite it."
            ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BaselineError(
                f"baseline {path} is not valid JSON ({exc}); it may be truncated or hand-edited. "
                f"Delete it or pass {UPDATE_OPTION} to rewrite it."
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            marker = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise BaselineError(
                f"{path} is not a pytest-patchscope baseline (format={marker!r}, expected {FORMAT!r}). "
                "Point the baseline option at another path, or delete the file."
            )
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BaselineError(
                f"baseline {path} has version={version!r}, expected an integer from 1 to {VERSION}. "
                f"Delete it or pass {UPDATE_OPTION} to rewrite it."
            )
        if version > VERSION:
            raise BaselineError(
                f"baseline {path} has version={version}, newer than this pytest-patchscope reads "
                f"(up to {VERSION}). Upgrade: pip install -U pytest-patchscope."
            )
        raw_entries = data.get("entries")
        if not isinstance(raw_entries, dict):
            raise BaselineError(
                f"baseline {path}: 'entries' is {type(raw_entries).__name__}, expected a JSON object. "
                f"Delete it or pass {UPDATE_OPTION} to rewrite it."
            )
        entries = {}
        for key, entry in raw_entries.items():
            try:
                entries[key] = deserialize_profile(entry)
            except BaselineError as exc:
                raise BaselineError(
                    f"baseline {path}, entry {key!r}: {exc}. Fix or delete that entry, "
                    f"or pass {UPDATE_OPTION} to rewrite the file."
                ) from exc
        return cls(path, entries, str(data.get("model", "")), str(data.get("weights_hash", "")))

    def get(self, key: str) -> LocalizationProfile | None:
        return self.entries.get(key)

    def to_json(self) -> str:
        """The file's text: deterministic, sorted, one cell per line, trailing newline."""
        document = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "weights_hash": self.weights_hash,
            "entries": {key: serialize_profile(p) for key, p in self.entries.items()},
        }
        return _dumps(document) + "\n"


def write_baseline(
    path: str | os.PathLike[str], profiles: Mapping[str, LocalizationProfile], *, force: bool = False
) -> BaselineFile:
    """Merge ``profiles`` into the baseline at ``path`` and write it atomically.

    Same keys are replaced; entries of tests that did not run are kept. A corrupt, foreign or newer
    file is never overwritten unless ``force`` (then its old entries are dropped). The top-level
    ``model``/``weights_hash`` describe the profiles written by this call (kept when there are none).
    Call it from one process only (the xdist controller): concurrent merges would lose entries.
    """
    try:
        existing = BaselineFile.read(path)
    except BaselineError:
        if not force:
            raise
        existing = BaselineFile(Path(path))
    merged = BaselineFile(
        existing.path,
        {**existing.entries, **profiles},
        _joined({p.model for p in profiles.values()}) if profiles else existing.model,
        _joined({p.weights_hash for p in profiles.values()}) if profiles else existing.weights_hash,
    )
    try:
        atomic_write(merged.path, merged.to_json())
    except OSError as exc:
        raise BaselineError(
            f"cannot write baseline {merged.path}: {exc}. The previous file, if any, is unchanged; "
            "check that the directory exists and is writable."
        ) from exc
    return merged


# ---- comparing -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerances:
    """How far a current profile may drift from its baseline before the probe counts as regressed.

    Layers are source layers (``l``); a grid's layer hits if any target layer ``l*`` hits. "Score" is
    the peak cell's expected-token log-probability (``LocalizationProfile.peak_cell``), in nats.
    """

    max_first_hit_shift: int = 2
    """The first hit layer may move this many layers deeper; moving shallower is an improvement."""
    max_peak_shift: int = 3
    """The peak layer may move this many layers in either direction."""
    peak_tie_margin: float = 0.5
    """A peak move only counts when the current profile scores the baseline's peak layer more than
    this many nats below its own peak: near-ties between layers are noise, not a move."""
    max_score_drop: float = 2.0
    """The peak log-probability may fall by this many nats."""
    min_score_gain: float = 1.0
    """The peak log-probability must rise by more than this many nats to report an improvement."""
    allow_lost_layers: int = 0
    """This many baseline hit layers may stop hitting (never all of them: a fact that was decodable
    somewhere and is decodable nowhere always regresses)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            is_int_field = isinstance(f.default, int)
            ok_type = isinstance(value, int) if is_int_field else isinstance(value, (int, float))
            if not ok_type or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                kind = "an integer" if is_int_field else "a number"
                raise ProbeConfigError(
                    f"Tolerances.{f.name}", value, f"must be {kind} >= 0 (default {f.default})"
                )

    def merged(self, **overrides: Any) -> "Tolerances":
        """A copy with per-test ``overrides`` (e.g. from a marker); unknown names are an error."""
        names = [f.name for f in fields(self)]
        for name, value in overrides.items():
            if name not in names:
                raise ProbeConfigError(name, value, "not a tolerance", f"Use one of: {', '.join(names)}.")
        return replace(self, **overrides)


def best_cells_by_layer(profile: LocalizationProfile) -> dict[int, LayerCell]:
    """One representative cell per source layer: a hit if any, else the highest log-probability.

    For a plain sweep that is the layer's only cell; for a grid it summarizes the row of targets.
    """

    def preference(cell: LayerCell) -> tuple[bool, float, int]:
        return bool(cell.hit), -math.inf if cell.logprob is None else cell.logprob, -cell.target_layer

    best: dict[int, LayerCell] = {}
    for cell in profile.cells:
        if cell.layer not in best or preference(cell) > preference(best[cell.layer]):
            best[cell.layer] = cell
    return dict(sorted(best.items()))


def hit_mark(hit: bool | None) -> str:
    """One character for a cell: hit, miss, or unknown (no expect / not swept)."""
    return NO_MARK if hit is None else HIT_MARK if hit else MISS_MARK


def _layers(layers: list[int]) -> str:
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))


def _peak_score(profile: LocalizationProfile) -> float | None:
    cell = profile.peak_cell
    return None if cell is None else cell.logprob


@dataclass
class Comparison:
    """What changed between a baseline profile and the current one, and whether that regresses.

    ``reasons`` say why the status is what it is (empty when unchanged); ``notes`` carry everything
    else worth showing (drift within tolerance, gains next to a regression, changed weights).
    """

    status: Status
    current: LocalizationProfile
    baseline: LocalizationProfile | None = None
    tolerances: Tolerances = field(default_factory=Tolerances)
    lost_layers: list[int] = field(default_factory=list)
    gained_layers: list[int] = field(default_factory=list)
    first_hit: tuple[int | None, int | None] = (None, None)
    """(baseline, current) first hit layer."""
    peak: tuple[int | None, int | None] = (None, None)
    """(baseline, current) peak source layer."""
    score_drop: float | None = None
    """Baseline peak log-probability minus current (negative: it rose); None if a side has none."""
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return self.status == "regressed"

    def render(self) -> str:
        """A failure message: what moved from where to where, then both profiles side by side."""
        lines = [f"patchscope {self.status}: {self.current.describe()}"]
        lines += [f"  - {r}" for r in self.reasons]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(side_by_side(self.baseline, self.current))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for xdist workeroutput and reports)."""
        return {
            "status": self.status,
            "current": self.current.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "tolerances": {f.name: getattr(self.tolerances, f.name) for f in fields(self.tolerances)},
            "lost_layers": list(self.lost_layers),
            "gained_layers": list(self.gained_layers),
            "first_hit": list(self.first_hit),
            "peak": list(self.peak),
            "score_drop": self.score_drop,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Comparison":
        baseline = data.get("baseline")
        return cls(
            status=data["status"],
            current=LocalizationProfile.from_dict(data["current"]),
            baseline=None if baseline is None else LocalizationProfile.from_dict(baseline),
            tolerances=Tolerances(**data.get("tolerances", {})),
            lost_layers=list(data.get("lost_layers", [])),
            gained_layers=list(data.get("gained_layers", [])),
            first_hit=tuple(data.get("first_hit", (None, None))),  # type: ignore[arg-type]
            peak=tuple(data.get("peak", (None, None))),  # type: ignore[arg-type]
            score_drop=data.get("score_drop"),
            reasons=list(data.get("reasons", [])),
            notes=list(data.get("notes", [])),
        )


def _side(cell: LayerCell | None, grid: bool, text_width: int) -> str:
    if cell is None:
        return "(not swept)"
    lp = "" if cell.logprob is None else f"{cell.logprob:.4f}"
    text = repr(cell.text)
    if len(text) > text_width:
        text = text[: text_width - 1] + "…"
    where = f"l*={cell.target_layer:<3} " if grid else ""
    return f"{hit_mark(cell.hit)} {lp:>9} {where}{text}"


def side_by_side(
    baseline: LocalizationProfile | None, current: LocalizationProfile, text_width: int = 28
) -> str:
    """``layer | baseline | current`` table, one row per source layer (a grid shows each layer's best cell)."""
    base = best_cells_by_layer(baseline) if baseline is not None else {}
    cur = best_cells_by_layer(current)
    grid = current.grid or (baseline is not None and baseline.grid)
    left = {
        layer: "(no baseline)" if baseline is None else _side(base.get(layer), grid, text_width)
        for layer in sorted({*base, *cur})
    }
    width = max([len("baseline"), *map(len, left.values())])
    rows = [f"{'layer':>5} | {'baseline':<{width}} | current"]
    rows += [
        f"{layer:>5} | {left[layer]:<{width}} | {_side(cur.get(layer), grid, text_width)}" for layer in left
    ]
    return "\n".join(rows)


def compare_profiles(
    baseline: LocalizationProfile | None, current: LocalizationProfile, tol: Tolerances | None = None
) -> Comparison:
    """Decide unchanged / regressed / improved / new for one probe (see :class:`Tolerances`)."""
    tol = tol or Tolerances()
    if baseline is None:
        return Comparison(
            "new",
            current,
            None,
            tol,
            first_hit=(None, current.first_hit),
            peak=(None, current.peak_layer),
            reasons=["no baseline entry for this probe yet"],
        )
    regressions: list[str] = []
    improvements: list[str] = []
    notes: list[str] = []

    if baseline.expect != current.expect:
        regressions.append(
            f"expect changed from {baseline.expect!r} to {current.expect!r}: the baseline answers another "
            f"question; rerun with {UPDATE_OPTION} to record the new one"
        )

    base_hits, cur_hits = set(baseline.hit_layers), set(current.hit_layers)
    lost, gained = sorted(base_hits - cur_hits), sorted(cur_hits - base_hits)
    if lost and not cur_hits:
        regressions.append(f"lost hits at {_layers(lost)} (decodable nowhere now)")
    elif len(lost) > tol.allow_lost_layers:
        regressions.append(
            f"lost hits at {_layers(lost)} ({len(lost)} > allow_lost_layers={tol.allow_lost_layers})"
        )
    elif lost:
        notes.append(f"lost hits at {_layers(lost)} (within allow_lost_layers={tol.allow_lost_layers})")
    if gained:
        improvements.append(f"gained hits at {_layers(gained)}")
    unswept = sorted(set(baseline.layers) - set(current.layers))
    if unswept:
        notes.append(f"{_layers(unswept)} swept in the baseline but not now")

    first = (baseline.first_hit, current.first_hit)
    if first[0] is not None and first[1] is not None and first[1] - first[0] > tol.max_first_hit_shift:
        regressions.append(
            f"first hit moved from layer {first[0]} to layer {first[1]} ({first[1] - first[0]} layers deeper "
            f"> max_first_hit_shift={tol.max_first_hit_shift})"
        )
    elif first[0] is not None and first[1] is not None and first[1] > first[0]:
        notes.append(
            f"first hit moved from layer {first[0]} to layer {first[1]} "
            f"(within max_first_hit_shift={tol.max_first_hit_shift})"
        )

    peak = (baseline.peak_layer, current.peak_layer)
    if peak[0] is not None and peak[1] is not None and peak[0] != peak[1]:
        shift = abs(peak[1] - peak[0])
        cur_scores = current.score_by_layer()
        if peak[0] in cur_scores:
            behind = cur_scores[peak[1]] - cur_scores[peak[0]]
            why = f"layer {peak[0]} now scores {behind:.2f} nats below the peak"
        else:
            behind, why = math.inf, f"layer {peak[0]} has no score now"
        if shift > tol.max_peak_shift and behind > tol.peak_tie_margin:
            regressions.append(
                f"peak moved from layer {peak[0]} to layer {peak[1]} ({shift} layers > "
                f"max_peak_shift={tol.max_peak_shift}; {why})"
            )
        else:
            notes.append(
                f"peak moved from layer {peak[0]} to layer {peak[1]} (within max_peak_shift="
                f"{tol.max_peak_shift} or a near-tie within peak_tie_margin={tol.peak_tie_margin})"
            )

    base_score, cur_score = _peak_score(baseline), _peak_score(current)
    drop = None if base_score is None or cur_score is None else base_score - cur_score
    if drop is not None and drop > tol.max_score_drop:
        regressions.append(
            f"peak log-probability dropped by {drop:.2f} nats, from {base_score:.4f} to {cur_score:.4f} "
            f"(> max_score_drop={tol.max_score_drop})"
        )
    elif drop is not None and -drop > tol.min_score_gain:
        improvements.append(
            f"peak log-probability rose by {-drop:.2f} nats, from {base_score:.4f} to {cur_score:.4f}"
        )
    if not base_hits and not cur_hits and base_score is None and cur_score is None:
        notes.append("no expect on either side: only texts were recorded, nothing was compared")

    if (baseline.model, baseline.weights_hash) != (current.model, current.weights_hash):
        notes.append(
            f"baseline from {baseline.model or '?'} @ {baseline.weights_hash or '?'}, "
            f"current {current.model or '?'} @ {current.weights_hash or '?'}"
        )

    if regressions:
        status: Status = "regressed"
        reasons, notes = regressions, notes + improvements
    elif improvements:
        status, reasons = "improved", improvements
    else:
        status, reasons = "unchanged", []
    return Comparison(status, current, baseline, tol, lost, gained, first, peak, drop, reasons, notes)
