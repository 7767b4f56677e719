"""How probes become rows, and rows' outputs become results.

A probe is a family of rows: its own (patched) row, its extra samples and one teacher-forced row
per candidate, plus (unless clean=False) a clean family shared by every probe with the same target
and budget. The runner executes rows without knowing what a probe is; this module is the mapping
in both directions.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

from pytest_patchscope.engine.resolve import ResolvedProbe
from pytest_patchscope.engine.results import CandidateScore, PatchResult, Sample
from pytest_patchscope.model.sites import SiteLocation
from pytest_patchscope.probes.decoding import GREEDY, Decoding

if TYPE_CHECKING:
    from pytest_patchscope.model.loading import PatchscopeModel


StateKey = tuple[tuple[int, ...], int, str, str]
"""(source ids, source index, site name, source model): one source value, at every layer asked for.
The source model is "" for the engine's own model, else `source_model_key` of another one."""


SourceStates = dict[StateKey, dict[int, Any]]
"""Source values already at hand: StateKey -> {layer: tensor of the site's shape}."""


@dataclass
class Row:
    """One sequence of a batch: a target prompt, at most one patch, and its decoding budget.

    A patched row writes the source value `sources[k]` (or its only one) at target token
    `offsets[k]` past its split, at `location` in block `patch_layer`. A row with a `parent` (a
    sample or a candidate of it) has the parent's target and patch and shares the parent's opening
    pass and keys/values: it branches off only once its tokens differ.
    """

    target_ids: tuple[int, ...]
    split: int  # tokens before this index are the shared prefix
    patch_layer: int | None = None
    sources: tuple[StateKey, ...] = ()  # none: a clean row
    location: SiteLocation | None = None
    offsets: tuple[int, ...] = (0,)
    units: tuple[int, ...] | None = None
    source_layer: int = 0
    mapping: Any = None
    strength: float = 1.0
    max_new_tokens: int = 20
    stop: tuple[str, ...] = ()
    score_ids: tuple[int, ...] = ()
    parent: int | None = None
    forced: tuple[int, ...] = ()
    """Teacher-forced tokens (a candidate): fed instead of chosen, each one's log-probability kept."""
    decoding: Decoding = GREEDY
    sample: int = 0
    """Which sample of its probe this row draws (its generator is seeded decoding.seed + sample)."""

    @property
    def branch_stage(self) -> int | None:
        """The first stage at which this row differs from the clean rows on its target (None: never)."""
        if not self.sources or self.patch_layer is None or self.location is None:
            return None
        return self.location.branch_stage(self.patch_layer)


@dataclass
class RowOutput:
    tokens: list[int]
    text: str
    scores: dict[int, tuple[float, int]]
    forced_logprobs: list[float]
    first_rank: int | None
    degenerate: str | None


def family_roots(rows: Sequence[Row]) -> list[int]:
    """Each row's family root: its parent, or itself."""
    return [r if row.parent is None else row.parent for r, row in enumerate(rows)]


@dataclass
class ProbeRows:
    """Where one probe's rows are: its samples (the first is the probe's own row) and candidates,
    patched and clean (None when run with clean=False)."""

    samples: list[int]
    candidates: list[int]
    clean_samples: list[int] | None
    clean_candidates: list[int] | None


def family_rows(rows: list[Row], main: Row, candidate_ids: Sequence[tuple[int, ...]]) -> tuple[list[int], list[int]]:
    """Append `main` with its extra samples and one forced row per candidate; their indices."""
    rows.append(main)
    root = len(rows) - 1
    samples = [root]
    for sample in range(1, main.decoding.n_samples):
        rows.append(replace(main, parent=root, sample=sample, score_ids=()))
        samples.append(len(rows) - 1)
    candidates = []
    for ids in candidate_ids:
        rows.append(replace(main, parent=root, forced=ids, decoding=GREEDY, max_new_tokens=len(ids), stop=(), score_ids=()))
        candidates.append(len(rows) - 1)
    return samples, candidates


def build_rows(
    resolved: Sequence[ResolvedProbe], score_ids: Sequence[tuple[int, ...]] | None = None, *, clean: bool = True
) -> tuple[list[Row], list[ProbeRows]]:
    """Rows for the patched probes plus (if `clean`) one clean family per distinct (target, budget,
    stop, decoding, candidates), each with its samples and candidates."""
    # A clean row shares the prefix of the probes on the same target (the smallest split).
    split_of_target: dict[tuple[int, ...], int] = {}
    for rp in resolved:
        current = split_of_target.get(rp.target_ids, rp.target_index)
        split_of_target[rp.target_ids] = min(current, rp.target_index)

    rows: list[Row] = []
    placed: list[ProbeRows] = []
    clean_index: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {}
    for k, rp in enumerate(resolved):
        site = rp.location.site.name
        probe = rp.probe
        main = Row(
            target_ids=rp.target_ids,
            split=rp.target_index,
            patch_layer=rp.target_layer,
            sources=tuple((rp.source_ids, index, site, source_model_key(rp.source_model)) for index in rp.source_indices),
            location=rp.location,
            offsets=tuple(index - rp.target_index for index in rp.target_indices),
            units=rp.units,
            source_layer=rp.layer,
            mapping=probe.mapping,
            strength=float(probe.strength),
            max_new_tokens=probe.max_new_tokens,
            stop=probe.stop,
            score_ids=tuple(score_ids[k]) if score_ids else (),
            decoding=probe.decoding,
        )
        samples, candidates = family_rows(rows, main, rp.candidate_ids)
        if not clean:
            placed.append(ProbeRows(samples, candidates, None, None))
            continue
        key = (rp.target_ids, probe.max_new_tokens, probe.stop, probe.decoding, rp.candidate_ids)
        if key not in clean_index:
            clean_main = Row(
                target_ids=rp.target_ids, split=split_of_target[rp.target_ids], max_new_tokens=probe.max_new_tokens,
                stop=probe.stop, decoding=probe.decoding,
            )
            clean_index[key] = family_rows(rows, clean_main, rp.candidate_ids)
        placed.append(ProbeRows(samples, candidates, *clean_index[key]))
    return rows, placed


def source_model_key(model: "PatchscopeModel | None") -> str:
    """The StateKey element naming a probe's source model: "" for the engine's own model."""
    return "" if model is None else f"{model.name}#{model.weights_hash or id(model)}"


def probe_result(rp: ResolvedProbe, where: ProbeRows, outputs: Sequence[RowOutput], path: str = "packed") -> PatchResult:
    """One probe's PatchResult from its rows' outputs, run on `path` (the model's, see PatchscopeModel.path)."""

    def samples(indices: list[int]) -> tuple[Sample, ...]:
        return tuple(Sample(outputs[r].text, tuple(outputs[r].tokens), outputs[r].degenerate) for r in indices)

    def scores(indices: list[int]) -> dict[str, CandidateScore]:
        return {
            candidate: CandidateScore(candidate, ids, tuple(outputs[r].forced_logprobs), outputs[r].first_rank or 0)
            for candidate, ids, r in zip(rp.probe.candidates, rp.candidate_ids, indices)
        }

    main = outputs[where.samples[0]]
    clean = None if where.clean_samples is None else outputs[where.clean_samples[0]]
    return PatchResult(
        probe=rp.probe,
        resolved=rp,
        text=main.text,
        clean_text=None if clean is None else clean.text,
        tokens=tuple(main.tokens),
        clean_tokens=None if clean is None else tuple(clean.tokens),
        first_token_scores=main.scores,
        scores=scores(where.candidates),
        clean_scores=None if where.clean_candidates is None else scores(where.clean_candidates),
        samples=samples(where.samples),
        clean_samples=None if where.clean_samples is None else samples(where.clean_samples),
        degenerate=main.degenerate,
        clean_degenerate=None if clean is None else clean.degenerate,
        path=path,
    )
