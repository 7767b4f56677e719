"""Comparing a current LocalizationProfile with its baseline: unchanged, regressed, improved or new.

Pure functions over plain profiles (no files, no pytest): the tolerances say how far a profile
may drift, and a Comparison says what moved and why that does or does not regress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Mapping

from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.baseline.serializer import (
    COMPARE_CHECKPOINT_OPTION,
    UPDATE_OPTION,
    describe_checkpoint,
    same_checkpoint,
)
from pytest_patchscope.errors import ProbeConfigError

Status = Literal["unchanged", "regressed", "improved", "new", "missing"]
"""``missing``: a gate run found no baseline entry for the probe (the test fails unless new probes
are allowed, which reports them ``new``)."""


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
    max_margin_drop: float = 1.0
    """With candidates: at each cell where the baseline preferred the expected candidate (margin
    > 0), its margin over the best other candidate may fall by this many nats."""
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
    margin_drop: float | None = None
    """With candidates: the largest fall of a cell's margin where the baseline's was > 0; None if none compared."""
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return self.status == "regressed"

    @property
    def failed(self) -> bool:
        """Whether the probe's test fails: a regression, or an entry missing from the baseline."""
        return self.status in ("regressed", "missing")

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
            "margin_drop": self.margin_drop,
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
            first_hit=tuple(data.get("first_hit", (None, None))),
            peak=tuple(data.get("peak", (None, None))),
            score_drop=data.get("score_drop"),
            margin_drop=data.get("margin_drop"),
            reasons=list(data.get("reasons", [])),
            notes=list(data.get("notes", [])),
        )


def architecture_mismatch(baseline: LocalizationProfile, current: LocalizationProfile) -> str | None:
    """Why two profiles cannot be compared at all (another number of layers, d_model or vocabulary), or None."""
    if not baseline.architecture or not current.architecture or baseline.architecture == current.architecture:
        return None
    def shape(p: LocalizationProfile) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(p.architecture.items()))
    return (
        f"the baseline comes from a model of another architecture ({shape(baseline)}) than this one "
        f"({shape(current)}), so its layer indices do not mean the same thing and nothing is compared. "
        "Gate each architecture against a baseline of its own (another --patchscope-baseline file)."
    )


def checkpoint_mismatch(baseline: LocalizationProfile, current: LocalizationProfile) -> str | None:
    """Why a baseline profile is not compared with this run's unless the user asks: it comes from
    another checkpoint (another weights hash, or another name where a hash is unknown), so a pass
    would say that two checkpoints agree, not that this one kept what it had. None when it is the same."""
    if same_checkpoint(baseline.model, baseline.weights_hash, current.model, current.weights_hash):
        return None
    stored = describe_checkpoint(baseline.model, baseline.weights_hash)
    now = describe_checkpoint(current.model, current.weights_hash)
    return (
        f"the baseline was recorded on another checkpoint ({stored}) than this run's ({now}), so nothing is "
        f"compared: a pass would say that two checkpoints agree. Pass {COMPARE_CHECKPOINT_OPTION} (ini "
        "patchscope_compare_checkpoint = true) to gate this checkpoint against it, or record this checkpoint's "
        f"own baseline with {UPDATE_OPTION}"
    )


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
    margin_drop = _compare_margins(baseline, current, tol, regressions, notes)
    if not base_hits and not cur_hits and base_score is None and cur_score is None:
        notes.append("no expect on either side: only texts were recorded, nothing was compared")

    if baseline.dtype and current.dtype and baseline.dtype != current.dtype:
        notes.append(f"baseline recorded in {baseline.dtype}, this run in {current.dtype}: near-tied tokens can flip between dtypes")
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
    return Comparison(status, current, baseline, tol, lost, gained, first, peak, drop, margin_drop, reasons, notes)


def _cell_name(cell: LayerCell, grid: bool) -> str:
    where = f"layer {cell.layer}" + (f" -> {cell.target_layer}" if grid else "")
    return where + ("" if cell.unit is None else f" head {cell.unit}")


def _compare_margins(
    baseline: LocalizationProfile, current: LocalizationProfile, tol: Tolerances, regressions: list[str], notes: list[str]
) -> float | None:
    """The largest margin drop over cells where the baseline preferred the expected candidate
    (negative when every such margin rose); drops past max_margin_drop are regressions, the worst
    three named."""
    if baseline.candidates != current.candidates and baseline.candidates and current.candidates:
        notes.append(f"candidates changed from {list(baseline.candidates)} to {list(current.candidates)}: margins compared anyway")
    now = {(c.layer, c.target_layer, c.unit): (c, c.margin) for c in current.cells if c.margin is not None}
    drops: list[tuple[float, LayerCell, LayerCell]] = []
    for base in baseline.cells:
        match = now.get((base.layer, base.target_layer, base.unit))
        if base.margin is not None and base.margin > 0 and match is not None:
            drops.append((base.margin - match[1], base, match[0]))
    if not drops:
        return None
    drops.sort(key=lambda d: -d[0])
    worst = drops[0][0]
    past = [d for d in drops if d[0] > tol.max_margin_drop]
    if past:
        shown = "; ".join(
            f"{_cell_name(base, current.grid)} from {base.margin:.2f} to {cur.margin:.2f}" for _, base, cur in past[:3]
        )
        more = f" and {len(past) - 3} more" if len(past) > 3 else ""
        regressions.append(
            f"margin of {current.expect!r} over the best other candidate fell by up to {worst:.2f} nats at "
            f"{len(past)} cell{'s' if len(past) != 1 else ''} (> max_margin_drop={tol.max_margin_drop}): {shown}{more}"
        )
    return worst
