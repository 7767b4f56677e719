"""LocalizationProfile: what one sweep found, per layer (or per source x target layer pair).

Plain data with no torch or pytest in it, so that baselines, reports and xdist workers can
move it around as JSON-able dicts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class LayerCell:
    """The outcome of one probe of a sweep: source layer l patched into target layer l*."""

    layer: int
    target_layer: int
    text: str
    hit: bool | None = None
    """Whether ``expect`` appears in ``text`` under the sweep's match rule (case-insensitive unless
    the probe identity names another ``match``); None when the sweep had no ``expect``."""
    logprob: float | None = None
    """Log-probability of the expected answer's first token at the first generated step."""
    rank: int | None = None
    """Rank of that token among all tokens at the first generated step (0 = greedy choice)."""
    unit: int | None = None
    """The one unit (head) this cell patched, in a (layer x head) profile; None otherwise."""
    margin: float | None = None
    """With candidates: the expected candidate's log-probability minus the best other one's
    (> 0: the patched model prefers the expected answer); None for a sweep without candidates."""
    candidate_logprobs: dict[str, float] | None = None
    """With candidates: each candidate's summed log-probability after the patched prompt."""
    degenerate: str | None = None
    """Why ``text`` looks degenerate (a repeated n-gram or token), so that "the model rambled" reads
    differently from "the fact is gone"; None for ordinary text."""


@dataclass(frozen=True)
class LocalizationProfile:
    """Per-layer decodability of one probe: the unit that baselines store and compare."""

    probe: dict[str, Any]
    """The probe's identity without its layers: source, target, positions, mapping, strength, ..."""
    cells: tuple[LayerCell, ...]
    expect: str | None = None
    clean_text: str | None = ""
    """The target's unpatched continuation (None for a sweep run with clean=False)."""
    model: str = ""
    weights_hash: str = ""
    grid: bool = False
    """True when target layers were swept independently of source layers (an l x l* grid)."""
    architecture: dict[str, int] = field(default_factory=dict)
    """The model's shape (n_layers, d_model, vocab_size): a baseline of another shape is refused,
    because its layer indices would not mean the same thing."""
    dtype: str = ""
    """The dtype the model ran in ("float32", "bfloat16", "float16"; "" when not recorded)."""
    candidates: tuple[str, ...] = ()
    """The candidates scored in every cell (``expect`` is one of them); () for a sweep without."""
    clean_candidate_logprobs: dict[str, float] | None = None
    """Each candidate's summed log-probability after the clean target (None when not scored)."""
    path: str = "packed"
    """Which engine ran the sweep: "packed", or "general" (the model's own forward and generate,
    for a family the packed engine cannot run); see PatchscopeModel.path."""

    # ---- derived views -------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted({c.layer for c in self.cells})

    @property
    def target_layers(self) -> list[int]:
        return sorted({c.target_layer for c in self.cells})

    @property
    def per_unit(self) -> bool:
        """True for a (layer x head) profile: one cell per layer and head (sweep(..., units="each"))."""
        return any(c.unit is not None for c in self.cells)

    @property
    def units(self) -> list[int]:
        return sorted({c.unit for c in self.cells if c.unit is not None})

    @property
    def hit_cells(self) -> list[LayerCell]:
        return [c for c in self.cells if c.hit]

    @property
    def hit_layers(self) -> list[int]:
        """Source layers at which the expected text was generated (for any target layer)."""
        return sorted({c.layer for c in self.cells if c.hit})

    @property
    def first_hit(self) -> int | None:
        hits = self.hit_layers
        return hits[0] if hits else None

    @property
    def peak_cell(self) -> LayerCell | None:
        """The cell with the highest expected-token log-probability (ties: the earliest layer)."""
        scored = [c for c in self.cells if c.logprob is not None]
        if not scored:
            return None
        return max(scored, key=lambda c: (c.logprob, -c.layer, -c.target_layer))

    @property
    def peak_layer(self) -> int | None:
        cell = self.peak_cell
        return None if cell is None else cell.layer

    def cell(self, layer: int, target_layer: int | None = None, unit: int | None = None) -> LayerCell:
        for c in self.cells:
            if c.layer == layer and (target_layer is None or c.target_layer == target_layer) and (unit is None or c.unit == unit):
                return c
        raise KeyError((layer, target_layer, unit))

    def score_by_layer(self) -> dict[int, float]:
        """Best expected-token log-probability per source layer (max over target layers)."""
        best: dict[int, float] = {}
        for c in self.cells:
            if c.logprob is not None:
                best[c.layer] = max(best.get(c.layer, float("-inf")), c.logprob)
        return best

    # ---- presentation ----------------------------------------------------------------
    def describe(self) -> str:
        """One line naming the probe: (S, i, l) -> (T, i*, l*)."""
        p = self.probe
        target = p.get("preset") or p.get("target")
        return (
            f"S={p.get('source')!r} i={p.get('source_position')} -> "
            f"T={target!r} i*={p.get('target_position')}"
            + (f", site={p['site']}" if "site" in p else "")
            + (f", units={p['units']}" if "units" in p else "")
            + (f", expect={self.expect!r}" if self.expect is not None else "")
            + (f", match={p['match']}" if "match" in p else "")
            + (f", candidates={list(self.candidates)}" if self.candidates else "")
        )

    def table(self, max_text: int = 40) -> str:
        """A fixed-width table for the terminal: one row per cell."""
        unit = self.per_unit
        margins = any(c.margin is not None for c in self.cells)
        header = (
            f"{'l':>3} {'l*':>3} " + (f"{'head':>4} " if unit else "") + f"{'hit':>3} {'logprob':>8} {'rank':>6} "
            + (f"{'margin':>7} " if margins else "") + " text"
        )
        rows = [self.describe(), header]
        for c in sorted(self.cells, key=lambda c: (c.layer, c.target_layer, -1 if c.unit is None else c.unit)):
            hit = "" if c.hit is None else ("yes" if c.hit else "-")
            lp = "" if c.logprob is None else f"{c.logprob:8.3f}"
            rank = "" if c.rank is None else str(c.rank)
            text = ("(degenerate) " if c.degenerate else "") + c.text.replace("\n", "\\n")
            if len(text) > max_text:
                text = text[: max_text - 1] + "…"
            head = f"{c.unit:>4} " if unit else ""
            margin = (f"{c.margin:7.3f} " if c.margin is not None else " " * 8) if margins else ""
            rows.append(f"{c.layer:>3} {c.target_layer:>3} {head}{hit:>3} {lp:>8} {rank:>6} {margin} {text!s}")
        if margins:
            rows.append(
                f"(hit: the expected candidate {self.expect!r} beats the other candidates, margin > 0; "
                "it does not mean the text contains it)"
            )
        return "\n".join(rows)

    # ---- plain-data round trip (used by serializers and xdist) -----------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cells"] = [asdict(c) for c in self.cells]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LocalizationProfile":
        cells: Iterable[dict[str, Any]] = data.get("cells", [])
        return cls(
            probe=dict(data["probe"]),
            cells=tuple(LayerCell(**c) for c in cells),
            expect=data.get("expect"),
            clean_text=data.get("clean_text", ""),
            model=data.get("model", ""),
            weights_hash=data.get("weights_hash", ""),
            grid=bool(data.get("grid", False)),
            architecture=dict(data.get("architecture", {})),
            dtype=str(data.get("dtype", "")),
            candidates=tuple(data.get("candidates", ())),
            clean_candidate_logprobs=data.get("clean_candidate_logprobs"),
            path=str(data.get("path", "packed")),
        )
