"""Paper evaluations: Patchscopes attribute extraction (paper §4.2, Table 2) on the paper's own data.

    patchscope-eval attribute --data ../shared/data/patchscopes-attribute --out attribute-out
    patchscope-eval attribute --data DIR --tasks country_capital_city,substance_phase --layers 0-29:2 --target-layers 0-3

The data are the authors' TSVs (PAIR-code/interpretability, `patchscopes/code/preprocessed_data/
{commonsense,factual}/*.tsv`, Apache-2.0). The project does not ship them: `--data` points at a
folder that holds them (the TSVs directly or one level down), e.g. that folder of your own clone.

The protocol, as in the paper and its released code (`attribute_extraction.ipynb`,
`evaluate_attriburte_exraction_batch`):

- rows: a WikiText snippet S containing the subject, the relation's zero-shot target T ending in
  the placeholder x, the object (the answer) and the verbalised prompt `target_baseline`;
- data filters: rows with an empty or multi-line source are dropped, and the two sentences the
  notebook drops by hand (`PAPER_EXCLUSIONS`);
- the model filter, recomputed on the model under test (GPT-J's `is_correct_baseline` says what
  GPT-J knows): a fact is kept when the model's own greedy continuation (20 tokens) of
  `target_baseline` contains the object under the paper's hit rule;
- S is cut right after the subject (GPT-J's `source_cropped_toks` joined, re-tokenised for this
  model) and i is its last token; T = `prompt_target`, i* = its last token (the x); f = identity;
- every source layer l x target layer l* asked for, only the prompt pass patched, greedy, 10 new
  tokens as in the code (`max_new_tokens=20` as in the paper's text);
- hit: the paper's rule, `contains(..., match="paper")` (the object with spaces removed occurs in
  the generation with spaces removed, case-sensitive);
- Patchscope accuracy at source layer l: the share of datapoints that some l* hits; the table
  reports mean +- std over source layers, per task;
- the probe baseline: a logistic regression per source layer on the subject's last-token state
  (captured by the engine's own pass, the very vectors that are patched), 3-fold cross-validated
  with a fact's sentences in one fold (the probe names objects of facts it never saw, as the
  zero-shot Patchscope does; a probe whose folds mix a fact's sentences is reported beside it),
  classes = the task's distinct objects; tasks with fewer than 15 datapoints are left out of the
  comparison; a paired t-test over source layers, Bonferroni-corrected over the tasks compared.

The probe and the statistics need scikit-learn and scipy: `pip install 'pytest-patchscope[paper]'`.
"""
from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from pytest_patchscope.engine.results import contains
from pytest_patchscope.engine.runner import DEFAULT_BATCH_MEMORY_MB, run_probes, run_unpatched
from pytest_patchscope.errors import PatchscopeError, ProbeConfigError, ReportError
from pytest_patchscope.model.sites import DEFAULT_SITE
from pytest_patchscope.progress import ProgressLog, progress_label
from pytest_patchscope.reports.summary import json_safe
from pytest_patchscope.validation import check_int, closest, describe_layers, parse_layers

if TYPE_CHECKING:
    import numpy as np

    from pytest_patchscope.engine.rows import SourceStates
    from pytest_patchscope.scope import Patchscope

DEFAULT_MAX_NEW_TOKENS = 10
"""New tokens per patched generation, as in the released code (`max_gen_len=10`); the paper's text says 20."""
FILTER_MAX_NEW_TOKENS = 20
"""New tokens of the model's own continuation of `target_baseline` (the "does it know the fact" filter)."""
MIN_DATAPOINTS = 15
"""Tasks with fewer datapoints are left out of the probe comparison, as in the paper."""
CV_FOLDS = 3
DEFAULT_CHUNK = 32
"""Datapoints per batched engine job (each job runs datapoints x source layers x target layers probes)."""
CAPTURE_BATCH = 32
MATCH = "paper"
DEFAULT_OUT = "patchscope-attribute"
REQUIRED_COLUMNS = ("sample_id", "prompt_target", "target_baseline", "object", "subject", "prompt_source", "source_cropped_toks")
PAPER_EXCLUSIONS = {
    "star_constellation": "service",
    "object_superclass": "Swainson ’ s hawk and the prairie",
}
"""Sentences the released notebook drops by hand ("seems to have tokenization issues"): task -> substring of S."""
PAPER_INSTALL_HINT = "pip install 'pytest-patchscope[paper]'"

PAPER_TABLE2: dict[str, tuple[float, float, float, float, str]] = {
    "fruit_inside_color": (37.4, 6.6, 38.0, 18.7, ""),
    "fruit_outside_color": (35.5, 3.1, 71.0, 13.3, "** Patchscope"),
    "object_superclass": (65.6, 10.5, 54.8, 11.3, "* probe"),
    "substance_phase": (73.8, 3.7, 91.9, 1.7, "** Patchscope"),
    "task_done_by_tool": (10.1, 3.2, 48.1, 13.2, "** Patchscope"),
    "company_ceo": (5.0, 2.6, 47.8, 13.9, "** Patchscope"),
    "country_currency": (17.7, 2.2, 51.0, 8.9, "** Patchscope"),
    "food_from_country": (5.1, 3.7, 63.8, 11.3, "** Patchscope"),
    "person_plays_position_in_sport": (75.9, 9.1, 72.2, 7.2, ""),
    "person_plays_pro_sport": (53.8, 10.3, 46.3, 14.2, ""),
    "product_by_company": (58.9, 7.2, 63.2, 10.7, ""),
    "star_constellation": (17.5, 5.3, 18.4, 5.1, ""),
}
"""GPT-J-6B, paper Table 2: probe mean, std, Patchscope mean, std (% over source layers), and which
side is significantly better (** p < 1e-5, * p < 1e-4, paired t-test, Bonferroni)."""
PAPER_TABLE5 = {
    "task_done_by_person": 62.96,
    "work_location": 13.58,
    "country_capital_city": 61.61,
    "country_largest_city": 67.78,
    "person_father": 25.34,
    "superhero_archnemesis": 41.73,
    "superhero_person": 28.32,
}
"""GPT-J-6B, paper Table 5: Patchscope accuracy (%) of tasks outside Table 2 (the probe scored 0 there)."""

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# ============================================================================================
# data: the paper's TSVs
# ============================================================================================
@dataclass(frozen=True)
class Datapoint:
    """One source sentence of one (subject, relation, object) fact, ready to patch."""

    task: str
    row: int
    """The TSV's own row index (its unnamed first column), or the row's position when it has none."""
    sample_id: str
    """The fact (triplet) within the task; a fact has up to 5 source sentences."""
    subject: str
    object: str
    source: str
    """S: the source sentence cut right after the subject (its last token is i)."""
    target: str
    """T: the zero-shot relation prompt; i* is its last token, the placeholder x."""
    target_baseline: str
    """T with the subject written in: the prompt of the model filter."""
    target_position: int = -1


@dataclass
class Task:
    """One TSV: its datapoints after the data filters, and how many rows each filter dropped."""

    name: str
    path: Path
    datapoints: list[Datapoint]
    counts: dict[str, int]


def find_tasks(data: str | Path) -> dict[str, Path]:
    """The task files in `data` (TSVs in it or one folder down), by task name (the file's stem)."""
    folder = Path(data)
    allowed = (
        "a folder holding the Patchscopes attribute TSVs (e.g. ../shared/data/patchscopes-attribute, or "
        "patchscopes/code/preprocessed_data of a clone of PAIR-code/interpretability)"
    )
    if not folder.is_dir():
        raise ProbeConfigError("data", str(data), allowed, "It does not exist." if not folder.exists() else "It is not a folder.")
    tasks: dict[str, Path] = {}
    for path in sorted(folder.glob("*.tsv")) + sorted(folder.glob("*/*.tsv")):
        if path.stem in tasks:
            raise ProbeConfigError("data", str(data), f"{allowed}, with one file per task", f"Task {path.stem!r} is both {tasks[path.stem]} and {path}.")
        tasks[path.stem] = path
    if not tasks:
        raise ProbeConfigError("data", str(data), allowed, "It has no .tsv file, in it or in its subfolders.")
    return tasks


def select_tasks(available: dict[str, Path], tasks: str | Sequence[str] | None) -> list[str]:
    """The task names asked for ('a,b' or a list; None: all), each checked against `available`."""
    if tasks is None or (isinstance(tasks, str) and tasks.strip() in ("", "all")):
        return sorted(available)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    for name in names:
        if not isinstance(name, str) or name not in available:
            guess = closest(str(name), available)
            raise ProbeConfigError(
                "tasks", name, f"one of the {len(available)} tasks of the data folder: {', '.join(sorted(available))}",
                f"Did you mean {guess!r}?" if guess else None,
            )
    if len(set(names)) < len(names):
        raise ProbeConfigError("tasks", names, "distinct task names")
    return names


def crop_source(prompt_source: str, subject: str, cropped_tokens: str = "") -> str | None:
    """S cut right after the subject: the occurrence of `subject` in `prompt_source` that ends
    nearest to where GPT-J's `source_cropped_toks` end (their joined text is the crop, except where
    byte-level tokens split a character), or its first occurrence without them; None if absent."""
    ends = []
    start = prompt_source.find(subject)
    while start >= 0:
        ends.append(start + len(subject))
        start = prompt_source.find(subject, start + 1)
    if not ends:
        return None
    crop = ends[0]
    if cropped_tokens:
        try:
            tokens = ast.literal_eval(cropped_tokens)
        except (ValueError, SyntaxError):
            tokens = None
        if isinstance(tokens, (list, tuple)) and all(isinstance(t, str) for t in tokens):
            joined = len("".join(tokens))
            crop = min(ends, key=lambda end: (abs(end - joined), end))
    return prompt_source[:crop]


def read_task(path: str | Path, name: str | None = None) -> Task:
    """One task's TSV, parsed as CSV (cells with newlines are quoted), checked and data-filtered."""
    path = Path(path)
    task = name or path.stem
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            header = list(reader.fieldnames or [])
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ProbeConfigError(
                    f"{path} columns", header, f"a tab-separated header with the columns {', '.join(REQUIRED_COLUMNS)}; it lacks {', '.join(missing)}",
                    "Point --data at the paper's preprocessed_data TSVs (or files with the same columns).",
                )
            rows = list(reader)
    except OSError as exc:
        raise ProbeConfigError("data", str(path), "a readable TSV file", str(exc)) from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ProbeConfigError("data", str(path), "a UTF-8 tab-separated file that parses as CSV", str(exc)) from exc
    if not rows:
        raise ProbeConfigError("data", str(path), f"a TSV with at least one row under its header (task {task!r})")
    counts = {"rows": len(rows), "empty_source": 0, "multiline_source": 0, "paper_exclusion": 0, "subject_not_in_source": 0}
    excluded = PAPER_EXCLUSIONS.get(task)
    datapoints = []
    for number, raw in enumerate(rows):
        row = {key: (value or "") for key, value in raw.items() if key is not None}
        source = row["prompt_source"]
        if not source.strip():
            counts["empty_source"] += 1
            continue
        if "\n" in source:
            counts["multiline_source"] += 1
            continue
        if excluded is not None and excluded in source:
            counts["paper_exclusion"] += 1
            continue
        for column in ("prompt_target", "target_baseline", "object", "subject"):
            if not row[column].strip():
                raise ProbeConfigError(f"{path} row {number + 2} {column}", row[column], "a non-empty cell")
        cropped = crop_source(source, row["subject"], row["source_cropped_toks"])
        if cropped is None:
            counts["subject_not_in_source"] += 1
            continue
        index = row.get("", "").strip()
        position = row.get("position_target", "").strip() or "-1"
        try:
            target_position = int(position)
        except ValueError:
            raise ProbeConfigError(f"{path} row {number + 2} position_target", position, "an integer token index (the paper's: -1, the x)") from None
        datapoints.append(
            Datapoint(
                task=task,
                row=int(index) if index.isdigit() else number,
                sample_id=row["sample_id"],
                subject=row["subject"],
                object=row["object"],
                source=cropped,
                target=row["prompt_target"],
                target_baseline=row["target_baseline"],
                target_position=target_position,
            )
        )
    counts["kept_by_data_filters"] = len(datapoints)
    counts["facts"] = len({d.sample_id for d in datapoints})
    return Task(task, path, datapoints, counts)


def load_tasks(data: str | Path, tasks: str | Sequence[str] | None = None) -> list[Task]:
    """The chosen tasks of a data folder, read and data-filtered (no model needed: bad input fails fast)."""
    available = find_tasks(data)
    return [read_task(available[name], name) for name in select_tasks(available, tasks)]


def paper_hit(generation: str, expected: str) -> bool:
    """The paper's hit rule (see `engine.results.MATCH_RULES["paper"]`)."""
    return contains(generation, expected, MATCH)


# ============================================================================================
# the model filter: facts the model under test knows
# ============================================================================================
def spread(groups: Sequence[Sequence[Datapoint]], limit: int | None) -> list[Datapoint]:
    """At most `limit` datapoints spread over the facts: the first sentence of every fact (in file
    order), then the second, ...; None keeps them all. Back in file order."""
    if limit is None:
        chosen = [d for group in groups for d in group]
    else:
        chosen = []
        depth = 0
        while len(chosen) < limit and any(depth < len(g) for g in groups):
            chosen += [g[depth] for g in groups if depth < len(g)][: limit - len(chosen)]
            depth += 1
    return sorted(chosen, key=lambda d: d.row)


@dataclass
class Filtered:
    """The model filter's outcome for one task."""

    datapoints: list[Datapoint]
    """The datapoints kept (see `spread`)."""
    judged: int
    """Facts whose continuation was generated (all of them, unless a limit stopped the filter early)."""
    known: int
    """Of those, the facts whose continuation contains the object."""
    generations: dict[str, str]
    """The model's continuation of each judged `target_baseline`."""


def known_datapoints(
    scope: "Patchscope", task: Task, *, limit: int | None = None, max_new_tokens: int = FILTER_MAX_NEW_TOKENS, chunk: int = 64
) -> Filtered:
    """The task's datapoints whose fact the model knows: its own greedy continuation of the fact's
    `target_baseline` contains the object under the paper's rule.

    Facts are judged in file order, `chunk` distinct prompts per batched job; with a `limit` the
    filter stops as soon as `limit` facts are known (enough for `spread`, which then picks the same
    datapoints as if every fact had been judged)."""
    facts: dict[tuple[str, str, str], list[Datapoint]] = {}
    for d in task.datapoints:
        facts.setdefault((d.sample_id, d.target_baseline, d.object), []).append(d)
    keys = list(facts)
    prompts = list(dict.fromkeys(key[1] for key in keys))
    generations: dict[str, str] = {}
    known: list[list[Datapoint]] = []
    judged = 0
    for start in range(0, len(prompts), chunk):
        batch = prompts[start: start + chunk]
        texts = run_unpatched(scope.engine, [scope.model.tokenize(p) for p in batch], max_new_tokens=max_new_tokens)
        generations.update(zip(batch, texts))
        done = [key for key in keys[judged:] if key[1] in generations]
        for key in done:
            if paper_hit(generations[key[1]], key[2]):
                known.append(facts[key])
        judged += len(done)
        if limit is not None and len(known) >= limit:
            break
    return Filtered(spread(known, limit), judged, len(known), generations)


# ============================================================================================
# results
# ============================================================================================
@dataclass
class TaskResult:
    """One task's outcome: counts, per-layer accuracies, the l x l* hit rates and the statistics."""

    task: str
    target: str
    counts: dict[str, int]
    datapoints: int
    classes: int
    layers: list[int]
    target_layers: list[int]
    patchscope: list[float]
    """Per source layer: the share of datapoints that some target layer hits (empty: no datapoint)."""
    hit_rate: list[list[float]]
    """hit_rate[a][b]: the share of datapoints hit at (layers[a], target_layers[b])."""
    probe: list[float] | None = None
    """Per source layer: the probe's accuracy on held-out facts (3 folds by fact; see `probe_accuracy`);
    None when the task has too few datapoints (or facts)."""
    probe_by_sentence: list[float] | None = None
    """The same probe with folds that mix a fact's sentences: it can learn which subject it sees
    (up to 5 sentences a fact), so it reads as an upper bound; not used in the statistics."""
    clean_generation: str = ""
    """T's own continuation, unpatched (the literal placeholder x): a control, not part of the score."""
    clean_hits: int = 0
    """Datapoints whose object the unpatched continuation already contains (they hit with no information)."""
    t_statistic: float | None = None
    p_value: float | None = None
    p_bonferroni: float | None = None
    significance: str = ""
    """'**' (p < 1e-5) or '*' (p < 1e-4) after Bonferroni, with the better side, as in the paper's Table 2."""
    note: str = ""

    @property
    def excluded(self) -> bool:
        return self.probe is None

    @property
    def patchscope_mean(self) -> float:
        return _mean(self.patchscope)

    @property
    def patchscope_std(self) -> float:
        return _std(self.patchscope)

    @property
    def probe_mean(self) -> float | None:
        return _maybe_mean(self.probe)

    @property
    def probe_std(self) -> float | None:
        return _maybe_std(self.probe)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    """The population standard deviation (ddof=0) over source layers."""
    if not values:
        return math.nan
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _maybe_mean(values: Sequence[float] | None) -> float | None:
    return None if values is None else _mean(values)


def _maybe_std(values: Sequence[float] | None) -> float | None:
    return None if values is None else _std(values)


def _pct(mean: float | None, std: float | None) -> str:
    return "—" if mean is None or math.isnan(mean) else f"{100 * mean:.1f}±{100 * (std or 0.0):.1f}"


@dataclass
class AttributeReport:
    """The outcome of `evaluate_attribute`: settings, per-task results, timings and notes."""

    model: str
    weights_hash: str
    n_layers: int
    data: str
    layers: list[int]
    target_layers: list[int]
    max_new_tokens: int
    filter_max_new_tokens: int
    max_per_task: int | None
    tasks: list[TaskResult]
    match: str = MATCH
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def task(self, name: str) -> TaskResult:
        for result in self.tasks:
            if result.task == name:
                return result
        raise KeyError(f"task {name!r} was not evaluated (tasks: {[t.task for t in self.tasks]})")

    @property
    def compared(self) -> list[TaskResult]:
        """Tasks with enough datapoints for the probe comparison (the paper's table)."""
        return [t for t in self.tasks if not t.excluded]

    def to_json(self) -> str:
        data = asdict(self)
        for entry, result in zip(data["tasks"], self.tasks):
            entry.update(
                patchscope_mean=result.patchscope_mean, patchscope_std=result.patchscope_std,
                probe_mean=result.probe_mean, probe_std=result.probe_std, excluded=result.excluded,
                probe_by_sentence_mean=_maybe_mean(result.probe_by_sentence),
                paper_gptj=paper_numbers(result.task),
            )
        return json.dumps(json_safe(data), indent=1, ensure_ascii=False)

    def to_markdown(self) -> str:
        head = (
            f"# Attribute extraction (Patchscopes §4.2): {self.model}\n\n"
            f"Source layers {describe_layers(self.layers)}, target layers {describe_layers(self.target_layers)} "
            f"(of 0-{self.n_layers - 1}); datapoints: facts whose own {self.filter_max_new_tokens}-token greedy continuation of "
            f"target_baseline contains the object{'' if self.max_per_task is None else f' (at most {self.max_per_task} per task)'}; "
            f"{self.max_new_tokens} new tokens, greedy, only the prompt pass patched; "
            f"hit = the paper's rule (match={self.match!r}). Accuracy per source layer: a datapoint counts if any "
            f"target layer hits; mean ± std (%) over source layers. Probe: logistic regression on the subject's "
            f"last-token state, {CV_FOLDS}-fold cross-validated on held-out facts (\"sentence folds\": folds that mix a "
            f"fact's sentences, so the probe may recognise the subject). ** p < 1e-5, * p < 1e-4 (paired t-test over source "
            f"layers, Bonferroni over {len(self.compared)} tasks), on the better side.\n"
        )
        lines = [
            head,
            "| Task | Probe | Patchscope | # datapoints | # classes | Probe, sentence folds | GPT-J probe (paper) | GPT-J Patchscope (paper) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in self.compared:
            mark_probe = t.significance.split(" ")[0] if t.significance.endswith("probe") else ""
            mark_ps = t.significance.split(" ")[0] if t.significance.endswith("Patchscope") else ""
            paper = paper_numbers(t.task)
            paper_probe = paper_ps = "—"
            if paper and paper.get("probe_mean") is not None:
                paper_probe = f"{paper['probe_mean']:.1f}±{paper['probe_std']:.1f}" + _mark(paper["significance"], "probe")
                paper_ps = f"{paper['patchscope_mean']:.1f}±{paper['patchscope_std']:.1f}" + _mark(paper["significance"], "Patchscope")
            elif paper:
                paper_ps = f"{paper['patchscope_mean']:.2f} (Table 5)"
            lines.append(
                f"| {t.task} | {_pct(t.probe_mean, t.probe_std)}{mark_probe} | {_pct(t.patchscope_mean, t.patchscope_std)}{mark_ps} "
                f"| {t.datapoints} | {t.classes} | {_pct(_maybe_mean(t.probe_by_sentence), _maybe_std(t.probe_by_sentence))} "
                f"| {paper_probe} | {paper_ps} |"
            )
        if not self.compared:
            lines[1:] = [f"No task has {MIN_DATAPOINTS} datapoints the model knows: nothing to compare with the probe."]
        few = [t for t in self.tasks if t.excluded]
        if few:
            lines += [
                "",
                f"Fewer than {MIN_DATAPOINTS} datapoints (no probe, not compared): "
                + ", ".join(f"{t.task} ({t.datapoints}; Patchscope {_pct(t.patchscope_mean, t.patchscope_std)})" for t in few)
                + ".",
            ]
        lines += ["", "| Task | rows | kept by data filters | facts | facts the model knows | datapoints | unpatched T hits |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for t in self.tasks:
            c = t.counts
            lines.append(
                f"| {t.task} | {c.get('rows', 0)} | {c.get('kept_by_data_filters', 0)} | {c.get('facts', 0)} | "
                f"{c.get('known_facts', 0)} | {t.datapoints} | {t.clean_hits} |"
            )
        if self.seconds:
            lines += ["", f"Run time: {self.seconds.get('total', 0):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in self.seconds.items() if k != 'total')})."]
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def to_text(self) -> str:
        """The table as the CLI prints it."""
        lines = [f"{'task':<32} {'probe':>11} {'patchscope':>11} {'datapoints':>10} {'classes':>7}"]
        for t in self.tasks:
            probe = "(none known)" if not t.datapoints else "(too few)" if t.excluded else _pct(t.probe_mean, t.probe_std)
            ps = _pct(t.patchscope_mean, t.patchscope_std) + (f" {t.significance}" if t.significance else "")
            lines.append(f"{t.task:<32} {probe:>11} {ps:>11} {t.datapoints:>10} {t.classes:>7}")
        return "\n".join(lines)


def _mark(significance: str, side: str) -> str:
    return significance.split(" ")[0] if significance.endswith(side) else ""


def paper_numbers(task: str) -> dict[str, Any] | None:
    """The paper's GPT-J-6B numbers for `task` (Table 2, else Table 5), in %; None if it has none."""
    if task in PAPER_TABLE2:
        probe_mean, probe_std, mean, std, significance = PAPER_TABLE2[task]
        return {"table": 2, "probe_mean": probe_mean, "probe_std": probe_std, "patchscope_mean": mean, "patchscope_std": std,
                "significance": significance}
    if task in PAPER_TABLE5:
        return {"table": 5, "probe_mean": None, "probe_std": None, "patchscope_mean": PAPER_TABLE5[task], "patchscope_std": None,
                "significance": ""}
    return None


# ============================================================================================
# the probe baseline and the statistics (scikit-learn, scipy: the [paper] extra)
# ============================================================================================
def _paper_extra(what: str) -> None:
    try:
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ReportError(f"{what} needs scikit-learn and scipy, which are not installed. Install them with: {PAPER_INSTALL_HINT}") from exc


def probe_accuracy(
    features: "np.ndarray", labels: Sequence[str], groups: Sequence[str] | None = None, *, folds: int = CV_FOLDS, seed: int = 0
) -> float:
    """Out-of-fold accuracy of a logistic-regression probe (standardised features) predicting
    `labels` from `features` ((n, d)): every datapoint is predicted once, by a probe fitted on the
    other folds. With `groups` (the fact of each datapoint) a fact's sentences stay in one fold, so
    the probe names the object of facts it never saw (stratified by class as far as the groups
    allow); without, folds are stratified by class where some class has `folds` members, else
    plain. A training fold with one class predicts that class."""
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    if len(y) < folds:
        raise ProbeConfigError("labels", len(y), f"at least {folds} datapoints for {folds}-fold cross-validation")
    if groups is not None and len(set(groups)) < folds:
        raise ProbeConfigError("groups", len(set(groups)), f"at least {folds} facts for {folds}-fold cross-validation held out by fact")
    _, counts = np.unique(y, return_counts=True)
    if groups is not None:
        splits = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, y, np.asarray(groups))
    else:
        splits = (StratifiedKFold if counts.max() >= folds else KFold)(n_splits=folds, shuffle=True, random_state=seed).split(features, y)
    correct = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The least populated class")
        for train, test in splits:
            classes = np.unique(y[train])
            if len(classes) == 1:
                predicted = np.full(len(test), classes[0])
            else:
                model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
                predicted = model.fit(features[train], y[train]).predict(features[test])
            correct += int((predicted == y[test]).sum())
    return correct / len(y)


def paired_test(patchscope: Sequence[float], probe: Sequence[float]) -> tuple[float | None, float | None]:
    """(t, p) of a paired two-sided t-test over source layers; (None, None) when the differences
    do not vary (the test is undefined)."""
    from scipy.stats import ttest_rel

    differences = [a - b for a, b in zip(patchscope, probe)]
    if len(differences) < 2 or max(differences) == min(differences):
        return None, None
    result = ttest_rel(patchscope, probe)
    return float(result.statistic), float(result.pvalue)


def add_statistics(results: Sequence[TaskResult]) -> None:
    """The paired t-test per compared task, Bonferroni-corrected over them, and the paper's marks."""
    compared = [r for r in results if r.probe is not None]
    for r in compared:
        assert r.probe is not None  # narrowed above
        r.t_statistic, r.p_value = paired_test(r.patchscope, r.probe)
        if r.p_value is None:
            continue
        r.p_bonferroni = min(1.0, r.p_value * len(compared))
        stars = "**" if r.p_bonferroni < 1e-5 else "*" if r.p_bonferroni < 1e-4 else ""
        if stars:
            r.significance = f"{stars} {'Patchscope' if (r.t_statistic or 0) > 0 else 'probe'}"


# ============================================================================================
# the evaluation
# ============================================================================================
@dataclass
class _Run:
    """What one task's engine jobs produced, per datapoint / layer / target layer."""

    datapoints: list[Datapoint]
    hits: "np.ndarray"
    generations: list[list[list[str]]]
    source_positions: list[int]
    target_positions: list[int]
    features: dict[int, "np.ndarray"]
    clean_generation: str


def _run_task(
    scope: "Patchscope", points: Sequence[Datapoint], layers: Sequence[int], target_layers: Sequence[int], *,
    max_new_tokens: int, chunk: int, log: Log,
) -> _Run:
    """Capture every S's states (the engine's own opening pass, batched), then run the probes of
    `chunk` datapoints x layers x target layers as one batched job at a time."""
    import numpy as np
    import torch

    model = scope.model
    ids = [tuple(model.tokenize(d.source)) for d in points]
    states: SourceStates = {}
    for start in range(0, len(ids), CAPTURE_BATCH):
        prompts = ids[start: start + CAPTURE_BATCH]
        for prompt, captured in zip(prompts, scope.engine.capture_many([(p, len(p) - 1) for p in prompts], layers)):
            states[(prompt, len(prompt) - 1, DEFAULT_SITE, "")] = captured
    features = {
        layer: torch.stack([states[(p, len(p) - 1, DEFAULT_SITE, "")][layer] for p in ids]).to("cpu", torch.float32).numpy()
        for layer in layers
    }
    hits = np.zeros((len(points), len(layers), len(target_layers)), dtype=bool)
    generations: list[list[list[str]]] = []
    source_positions: list[int] = []
    target_positions: list[int] = []
    clean = ""
    progress = scope.progress or ProgressLog(log, every_s=60.0, announce=False)
    per_point = len(layers) * len(target_layers)
    for start in range(0, len(points), chunk):
        batch = points[start: start + chunk]
        probes = [
            scope.probe(
                d.source, d.target, layer=layer, target_layer=target_layer, source_position=-1,
                target_position=d.target_position, max_new_tokens=max_new_tokens, stop=(),
            )
            for d in batch for layer in layers for target_layer in target_layers
        ]
        known = {key: states[key] for key in {(p, len(p) - 1, DEFAULT_SITE, "") for p in ids[start: start + chunk]}}
        results = run_probes(scope.engine, probes, source_states=known, progress=progress, clean=start == 0)
        if start == 0:
            clean = results[0].clean_text or ""
        for k, d in enumerate(batch):
            mine = results[k * per_point: (k + 1) * per_point]
            texts = [[mine[a * len(target_layers) + b].text for b in range(len(target_layers))] for a in range(len(layers))]
            generations.append(texts)
            hits[start + k] = [[paper_hit(text, d.object) for text in row] for row in texts]
            source_positions.append(mine[0].resolved.source_index)
            target_positions.append(mine[0].resolved.target_index)
    return _Run(list(points), hits, generations, source_positions, target_positions, features, clean)


def evaluate_attribute(
    scope: "Patchscope",
    data: str | Path,
    *,
    tasks: str | Sequence[str] | None = None,
    layers: str | Iterable[int] | None = None,
    target_layers: str | Iterable[int] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_per_task: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    probe: bool = True,
    out: str | Path | None = None,
    plot: bool = True,
    log: Log = _quiet,
) -> AttributeReport:
    """Run the attribute-extraction experiment on `scope`'s model; see the module docstring.

    data: the folder of TSVs; tasks: 'a,b' or a list (default all); layers / target_layers: source
    and target layers ('0-29:2', a list; default all); max_per_task: at most that many datapoints
    per task, spread over its known facts (`spread`); probe=False skips the probe baseline and the
    statistics (no scikit-learn or scipy needed). With `out`, writes samples.jsonl, attribute.json,
    attribute.md and (plot=True, needs matplotlib) attribute_layers.png and attribute_heatmaps.png.
    """
    model = scope.model
    chosen = parse_layers(layers, model.n_layers, "layers")
    into = parse_layers(target_layers, model.n_layers, "target_layers")
    check_int("max_new_tokens", max_new_tokens, 1, scope.engine.max_new_tokens_limit)
    if max_per_task is not None:
        check_int("max_per_task", max_per_task, 1, hint="None keeps every datapoint the model knows.")
    check_int("chunk", chunk, 1)
    if probe:
        _paper_extra("the probe baseline and its t-test (probe=True, the CLI's default)")
    loaded = load_tasks(data, tasks)
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - clock, 2)
        clock = now

    log(f"{len(loaded)} tasks from {data}; source layers {describe_layers(chosen)}, target layers {describe_layers(into)} of 0-{model.n_layers - 1}")
    selected: dict[str, list[Datapoint]] = {}
    for task in loaded:
        filtered = known_datapoints(scope, task, limit=max_per_task)
        task.counts.update(judged_facts=filtered.judged, known_facts=filtered.known)
        selected[task.name] = filtered.datapoints
        log(f"{task.name}: the model knows {filtered.known} of {filtered.judged} facts judged -> {len(filtered.datapoints)} datapoints "
            f"({task.counts['kept_by_data_filters']} rows of {task.counts['facts']} facts kept by the data filters)")
    lap("filter")
    if not any(selected.values()):
        raise ReportError(
            "no datapoint passes the model filter in any task asked for ("
            + ", ".join(f"{t.name}: 0 of {t.counts['facts']} facts known" for t in loaded)
            + f"): {model.name}'s own greedy continuation of target_baseline ({FILTER_MAX_NEW_TOKENS} tokens) never "
            "contains the object under the paper's rule. Choose other tasks (--tasks) or a larger model."
        )
    results: list[TaskResult] = []
    notes: list[str] = []
    samples: list[dict[str, Any]] = []
    for task in loaded:
        points = selected[task.name]
        if not points:
            notes.append(f"{task.name}: the model knows none of its {task.counts['facts']} facts; nothing to patch.")
            results.append(TaskResult(task.name, task.datapoints[0].target if task.datapoints else "", task.counts, 0, 0, chosen, into,
                                      [], [], note="no known fact"))
            continue
        log(f"{task.name}: {len(points) * len(chosen) * len(into)} probes in jobs of {chunk} datapoints")
        with progress_label(task.name):
            run = _run_task(scope, points, chosen, into, max_new_tokens=max_new_tokens, chunk=chunk, log=log)
        lap("patchscope")
        objects = [d.object for d in points]
        accuracy = run.hits.any(axis=2).mean(axis=0).tolist()
        result = TaskResult(
            task=task.name, target=points[0].target, counts=task.counts, datapoints=len(points), classes=len(set(objects)),
            layers=chosen, target_layers=into, patchscope=[float(a) for a in accuracy],
            hit_rate=run.hits.mean(axis=0).tolist(), clean_generation=run.clean_generation,
            clean_hits=sum(paper_hit(run.clean_generation, o) for o in objects),
        )
        facts = [d.sample_id for d in points]
        if probe and len(points) >= MIN_DATAPOINTS and len(set(facts)) >= CV_FOLDS:
            result.probe = [probe_accuracy(run.features[layer], objects, facts) for layer in chosen]
            result.probe_by_sentence = [probe_accuracy(run.features[layer], objects) for layer in chosen]
            lap("probe")
        elif probe:
            result.note = (f"{len(points)} datapoints of {len(set(facts))} facts (fewer than {MIN_DATAPOINTS} datapoints or "
                           f"{CV_FOLDS} facts): no probe, not compared (as in the paper)")
        results.append(result)
        for k, d in enumerate(points):
            for a, layer in enumerate(chosen):
                for b, target_layer in enumerate(into):
                    samples.append({
                        "task": task.name, "sample_id": d.sample_id, "row": d.row, "subject": d.subject,
                        "source_prompt": d.source, "source_position": run.source_positions[k],
                        "target_prompt": d.target, "target_position": run.target_positions[k], "object": d.object,
                        "layer": layer, "target_layer": target_layer, "max_new_tokens": max_new_tokens,
                        "generation": run.generations[k][a][b], "hit": bool(run.hits[k, a, b]),
                    })
        log(f"{task.name}: Patchscope {_pct(result.patchscope_mean, result.patchscope_std)}, "
            f"probe {'-' if result.probe is None else _pct(result.probe_mean, result.probe_std)}")
    if probe:
        add_statistics(results)
        lap("probe")
    for r in results:
        if r.clean_hits:
            notes.append(
                f"{r.task}: the unpatched target's own continuation ({r.clean_generation!r}) already contains the object of "
                f"{r.clean_hits} of {r.datapoints} datapoints; such hits need no information from the source."
            )
    seconds["total"] = round(time.perf_counter() - started, 2)
    report = AttributeReport(
        model=model.name, weights_hash=model.weights_hash, n_layers=model.n_layers, data=str(data), layers=chosen,
        target_layers=into, max_new_tokens=max_new_tokens, filter_max_new_tokens=FILTER_MAX_NEW_TOKENS,
        max_per_task=max_per_task, tasks=results, seconds=seconds, notes=notes,
    )
    if out is not None:
        write_outputs(report, samples, out, plot=plot, log=log)
    return report


# ============================================================================================
# outputs
# ============================================================================================
def _panels(report: AttributeReport, width: float, height: float) -> tuple[Any, list[tuple[TaskResult, Any]], Any]:
    """A figure of small multiples, up to 4 a row: (figure, [(task, its axes)], every axes) for the
    tasks that have datapoints; unused panels are hidden."""
    from pytest_patchscope.reports.formats import _matplotlib

    shown = [t for t in report.tasks if t.datapoints]
    columns = min(4, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k in range(len(shown), rows * columns):
        axes[k // columns][k % columns].set_visible(False)
    return fig, [(t, axes[k // columns][k % columns]) for k, t in enumerate(shown)], axes


def _save(fig: Any, path: Path) -> Path:
    from pytest_patchscope.fileio import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())
    return path


def plot_layers(report: AttributeReport, path: str | Path) -> Path:
    """Per task: Patchscope and probe accuracy over source layers (small multiples)."""
    fig, panels, _ = _panels(report, 3.4, 2.6)
    for k, (t, ax) in enumerate(panels):
        ax.plot(t.layers, t.patchscope, color="tab:blue", marker="o", markersize=3, label="Patchscope")
        if t.probe is not None:
            ax.plot(t.layers, t.probe, color="tab:orange", marker="s", markersize=3, label="probe (held-out facts)")
        if t.probe_by_sentence is not None:
            ax.plot(t.layers, t.probe_by_sentence, color="tab:orange", linestyle=":", linewidth=1, label="probe (sentence folds)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{t.task} (n={t.datapoints})", fontsize="small")
        ax.set_xlabel("source layer l", fontsize="small")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.set_ylabel("accuracy")
    # One legend for the figure, from the panel that drew the most lines (a task without a probe draws one).
    fullest = max((ax for _, ax in panels), key=lambda ax: len(ax.get_lines()), default=None)
    if fullest is not None:
        fig.legend(*fullest.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize="small")
    fig.suptitle(f"Attribute extraction by source layer\n{report.model}, any target layer {describe_layers(report.target_layers)}",
                 fontsize="medium")
    return _save(fig, Path(path))


def plot_heatmaps(report: AttributeReport, path: str | Path) -> Path:
    """Per task: the hit rate of every (source layer l, target layer l*) cell."""
    fig, panels, axes = _panels(report, 3.2, 3.2)
    image = None
    for t, ax in panels:
        image = ax.imshow(t.hit_rate, cmap="viridis", vmin=0, vmax=1, origin="lower", aspect="auto")
        ax.set_xticks(range(len(t.target_layers)), [str(x) for x in t.target_layers], fontsize="x-small")
        step = max(1, len(t.layers) // 8)
        ax.set_yticks(range(0, len(t.layers), step), [str(x) for x in t.layers[::step]], fontsize="x-small")
        ax.set_xlabel("target layer l*", fontsize="small")
        ax.set_ylabel("source layer l", fontsize="small")
        ax.set_title(f"{t.task} (n={t.datapoints})", fontsize="small")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="hit rate", shrink=0.8)
    fig.suptitle(f"Attribute extraction hit rate, l x l*\n{report.model}", fontsize="medium")
    return _save(fig, Path(path))


def write_outputs(report: AttributeReport, samples: Sequence[dict[str, Any]], out: str | Path, *, plot: bool = True, log: Log = _quiet) -> dict[str, str]:
    """samples.jsonl, attribute.json, attribute.md and (plot=True) the two figures, into `out`."""
    from pytest_patchscope.fileio import atomic_write

    directory = Path(out)
    files = {"samples": directory / "samples.jsonl", "json": directory / "attribute.json", "markdown": directory / "attribute.md"}
    try:
        atomic_write(files["samples"], "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        atomic_write(files["markdown"], report.to_markdown())
        if plot:
            try:
                files["layers_png"] = plot_layers(report, directory / "attribute_layers.png")
                files["heatmaps_png"] = plot_heatmaps(report, directory / "attribute_heatmaps.png")
            except ReportError as exc:
                report.notes.append(f"No figures: {exc}")
                log(f"warning: {exc} (--no-plot skips the figures)")
        report.files = {key: str(path) for key, path in files.items()}
        atomic_write(files["json"], report.to_json())
    except OSError as exc:
        raise ReportError(f"--out {str(out)!r}: cannot write the results there ({exc}). Pass a writable directory.") from exc
    return report.files


# ============================================================================================
# CLI (a subcommand of patchscope-eval, see eval.build_parser)
# ============================================================================================
def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The `attribute` subcommand's options, on patchscope-eval's subparsers."""
    parser = commands.add_parser(
        "attribute",
        help="attribute extraction on the paper's TSVs: Patchscope vs a linear probe by layer (paper §4.2, Table 2)",
        description=(
            "The Patchscopes attribute-extraction experiment on the authors' data: facts the model knows "
            "(its own continuation contains the object), each subject's state patched from every source layer "
            "into the zero-shot target at every target layer, scored by the paper's hit rule, against a "
            "logistic-regression probe. Writes samples.jsonl, attribute.json, attribute.md and two PNG figures."
        ),
    )
    parser.add_argument("--data", required=True, help="folder of the paper's TSVs (e.g. ../shared/data/patchscopes-attribute)")
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), an HF directory or a .gguf file")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: every TSV in --data)")
    parser.add_argument("--layers", default="all", help="source layers: all (default), '0-29', '0-29:2', '0,5,10-12'")
    parser.add_argument("--target-layers", default="all", help="target layers, as --layers (default all)")
    parser.add_argument("--max-per-task", type=int, default=None, help="at most N datapoints per task, spread over its known facts")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"new tokens per patched generation (default {DEFAULT_MAX_NEW_TOKENS}, as the paper's code; 20 as its text)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help=f"datapoints per batched job (default {DEFAULT_CHUNK})")
    parser.add_argument("--no-probe", action="store_true", help="skip the probe baseline and the t-test (no scikit-learn/scipy needed)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    parser.add_argument(
        "--batch-memory-mb", type=float, default=DEFAULT_BATCH_MEMORY_MB, help=f"memory bound of one probe batch (default {DEFAULT_BATCH_MEMORY_MB})"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG figures")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar (it is drawn only when stderr is a terminal)")
    return parser


def main(args: argparse.Namespace, load: Callable[[], "Patchscope"], log: Log) -> int:
    """Run the subcommand: the data are read and checked before the model loads."""
    try:
        load_tasks(args.data, args.tasks)
        if not args.no_probe:
            _paper_extra("the probe baseline (pass --no-probe to skip it)")
        scope = load()
        report = evaluate_attribute(
            scope, args.data, tasks=args.tasks, layers=args.layers, target_layers=args.target_layers,
            max_new_tokens=args.max_new_tokens, max_per_task=args.max_per_task, chunk=args.chunk, probe=not args.no_probe,
            out=args.out, plot=not args.no_plot, log=log,
        )
    except PatchscopeError as exc:
        print(f"patchscope-eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"# {report.model}: attribute extraction, source layers {describe_layers(report.layers)} x target layers "
          f"{describe_layers(report.target_layers)}, {report.max_new_tokens} new tokens, match={report.match!r}")
    print(report.to_text())
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote: {', '.join(report.files.values())}  ({report.seconds.get('total', 0):.0f} s)")
    return 0
