"""`Patchscope`: the user-facing API bound to one model (generate, run, sweep), no pytest needed.

    from pytest_patchscope import Patchscope, TOKEN_IDENTITY
    scope = Patchscope.load()                      # the embedded default model
    scope.generate("The capital of France is", TOKEN_IDENTITY, layer=27).text   # ' Paris -> Paris'
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.engine.results import DEFAULT_MATCH, PatchResult, check_match, contains, describe_failure
from pytest_patchscope.engine.runner import DEFAULT_BATCH_MEMORY_MB, DEFAULT_MAX_NEW_TOKENS_LIMIT, Engine, run_probes
from pytest_patchscope.errors import ProbeConfigError, warn_at_caller
from pytest_patchscope.model.loading import PatchscopeModel, load_model
from pytest_patchscope.model.sites import DEFAULT_SITE, locate_site
from pytest_patchscope.probes.options import PatchOptions, decoding_of, keywords_checked
from pytest_patchscope.probes.presets import Preset
from pytest_patchscope.probes.probe import Positions, Probe
from pytest_patchscope.progress import ProgressCallback, ProgressSetting, resolve_progress
from pytest_patchscope.validation import as_int, check_int, check_text, finite_real, layer_list

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_MAX_NEW_TOKENS = 20
_INNER_PLACEHOLDER = re.compile(r"(^|\s)x\s+\S")
"""A standalone x with more text after it: the paper's placeholder, which i* = -1 does not patch."""


def _default_target_position(target: Any, target_position: Positions | None) -> Positions | None:
    """target_position with a plain-string target's default (-1) made explicit.

    A target such as "The capital city of x is" without target_position patches its last token,
    not the x; that is valid but rarely meant, so it warns (once, at the caller's line).
    """
    if isinstance(target, Preset) or target_position is not None:
        return target_position
    if isinstance(target, str) and _INNER_PLACEHOLDER.search(target):
        warn_at_caller(
            f"target {target!r} has a placeholder-like 'x', but without target_position the patch goes to "
            "its LAST token, not the x. Pass target_position=Placeholder('x') to patch the x "
            "(or target_position=-1 to keep the last token and silence this warning)."
        )
    return -1


def _candidates_tuple(candidates: Any) -> Any:
    """A list of candidates as the tuple a Probe holds (None: none); anything else for resolve_probe to refuse."""
    if candidates is None:
        return ()
    if isinstance(candidates, (list, tuple)):
        if not candidates:
            raise ProbeConfigError("candidates", candidates, "None, or a non-empty list of distinct strings")
        return tuple(candidates)
    return candidates


def _units_tuple(units: Any) -> Any:
    """A list or range of units as the tuple a Probe holds; anything else unchanged, for resolve_probe to refuse."""
    return tuple(units) if isinstance(units, (list, tuple, range)) else units


@dataclass(frozen=True)
class ProbePlan:
    """Probes to run as part of a batched job, and how a sweep folds their results into a profile.

    `Patchscope.plan_sweep` builds a sweep's; a generate/score call is a plan of one probe
    (`ProbePlan((probe,))`). `score_ids` are the first tokens whose log-probability every probe
    of the plan keeps (a sweep's `expect`, see `Patchscope.expected_token_ids`).
    """

    probes: tuple[Probe, ...]
    score_ids: tuple[int, ...] = ()
    clean: bool = True
    expect: str | None = None
    grid: bool = False
    per_unit: bool = False
    match: str = DEFAULT_MATCH
    """How a cell's text is judged a hit of `expect` (a rule of `engine.results.MATCH_RULES`)."""


class Patchscope:
    """Patchscopes probes on one loaded model.

    `max_new_tokens` is the default budget of every probe and `max_new_tokens_limit` the most any
    probe may ask for (a sanity bound: a typo such as 10**7 fails at once instead of running for
    days); `batch_memory_mb` bounds the memory of one batch (larger sweeps run in chunks);
    `progress` shows how far each run is: "auto" (the default) draws a live bar on stderr when it is
    a terminal and not on an xdist worker, True always, False never, and a callable
    `progress(done, total)` is told the probes done of the run's total instead.
    """

    def __init__(
        self,
        model: PatchscopeModel,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
        batch_memory_mb: float = DEFAULT_BATCH_MEMORY_MB,
        progress: ProgressSetting = "auto",
    ) -> None:
        check_int("max_new_tokens_limit", max_new_tokens_limit, 1)
        check_int("max_new_tokens", max_new_tokens, 1)
        if max_new_tokens > max_new_tokens_limit:
            if max_new_tokens_limit == DEFAULT_MAX_NEW_TOKENS_LIMIT:  # the budget was raised past the default bound
                raise ProbeConfigError(
                    "max_new_tokens", max_new_tokens, f"an int from 1 to {max_new_tokens_limit} (max_new_tokens_limit)",
                    "Raise max_new_tokens_limit too.",
                )
            raise ProbeConfigError(
                "max_new_tokens_limit", max_new_tokens_limit,
                f"an int >= max_new_tokens ({max_new_tokens}), the default budget of every probe",
                "Lower max_new_tokens too.",
            )
        memory = finite_real(batch_memory_mb)
        if memory is None or not memory > 0:
            raise ProbeConfigError("batch_memory_mb", batch_memory_mb, "a finite number of megabytes > 0")
        callback = resolve_progress(progress)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.progress: ProgressCallback | None = callback
        self.engine = Engine(model, batch_memory_mb=memory, max_new_tokens_limit=max_new_tokens_limit)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        dtype: Any = "auto",
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> "Patchscope":
        """Load `model` ('default', a GGUF file, an HF directory, or a hub id in the local HF cache)
        and bind a Patchscope to it.

        `dtype` is 'auto' (the checkpoint's own on a GPU, float32 on a CPU), 'float32', 'bfloat16' or
        'float16' (or the torch dtype); `device_map="auto"` spreads a model too big for one device
        over several, through accelerate. `trust_remote_code=True` lets a checkpoint's own Python
        files run. See `load_model`. Other keywords go to `Patchscope(...)`: `progress="auto"` (the
        default) shows a live bar of long sweeps when stderr is a terminal, `progress=False` hides it.
        """
        loaded = load_model(model, device=device, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
        return cls(loaded, **kwargs)

    # ---- building probes -------------------------------------------------------------------
    @keywords_checked
    def probe(
        self,
        source: str,
        target: str | Preset,
        *,
        layer: int,
        target_layer: int | None = None,
        max_new_tokens: int | None = None,
        units: Sequence[int] | None = None,
        candidates: Sequence[str] | None = None,
        **options: Unpack[PatchOptions],
    ) -> Probe:
        """A Probe with presets and defaults filled in (target_position None = -1 or the preset's).

        `site` is what is read and written (see `pytest_patchscope.model.sites.SITES`: resid_post,
        resid_pre, attn_out, mlp_out, neurons, heads); `units` limits the write to those indices
        of the site's first axis (checked when the probe runs). `source_model` runs S on another
        model (a PatchscopeModel, a Patchscope or a checkpoint spec): the paper's M != M*, with a
        `mapping` from its width to this model's (e.g. AffineMapping.fit on states of both).
        `candidates` are answers scored after the patched and the clean target (see `score`).
        Decoding is greedy unless `decoding=Decoding(do_sample=True, ...)` (or its shorthands, see
        `PatchOptions`).

        A PatchscopeWarning says when a plain target's placeholder-like x would go unpatched.
        """
        decoding = decoding_of(options)
        source_position = options.get("source_position", -1)
        target_position = _default_target_position(target, options.get("target_position"))
        stop = options.get("stop")
        preset_name = None
        if isinstance(target, Preset):
            preset = target
            preset_name = preset.name
            target = source if preset.target is None else preset.target
            if target_position is None:
                target_position = source_position if preset.target_position is None else preset.target_position
            if target_layer is None and as_int(layer) is not None:
                target_layer = preset.resolve_target_layer(layer, self.model.n_layers)
            if stop is None:
                stop = preset.stop
        if stop is not None and (isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable)):
            raise ProbeConfigError("stop", stop, "None or a list/tuple of non-empty strings", "Use stop=[...] for one string.")
        return Probe(
            source=source,
            target=target,
            layer=layer,
            target_layer=target_layer,
            source_position=source_position,
            target_position=-1 if target_position is None else target_position,
            mapping=options.get("mapping"),
            strength=options.get("strength", 1.0),
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            stop=tuple(stop or ()),
            preset=preset_name,
            site=options.get("site", DEFAULT_SITE),
            units=_units_tuple(units),
            source_model=options.get("source_model"),
            candidates=_candidates_tuple(candidates),
            decoding=decoding,
        )

    # ---- running -------------------------------------------------------------------------------
    @keywords_checked
    def generate(
        self,
        source: str,
        target: str | Preset,
        *,
        layer: int,
        target_layer: int | None = None,
        max_new_tokens: int | None = None,
        units: Sequence[int] | None = None,
        candidates: Sequence[str] | None = None,
        **options: Unpack[PatchOptions],
    ) -> PatchResult:
        """Patch the site's value at (S, i, l) into T at (i*, l*) and generate (greedily, unless
        decoding says to sample: see `probe`); the clean continuation comes too."""
        options["target_position"] = _default_target_position(target, options.get("target_position"))
        probe = self.probe(
            source, target, layer=layer, target_layer=target_layer, max_new_tokens=max_new_tokens, units=units,
            candidates=candidates, **options,
        )
        return self.run([probe])[0]

    @keywords_checked
    def score(
        self,
        source: str,
        target: str | Preset,
        candidates: Sequence[str],
        *,
        layer: int,
        target_layer: int | None = None,
        max_new_tokens: int = 0,
        units: Sequence[int] | None = None,
        **options: Unpack[PatchOptions],
    ) -> PatchResult:
        """Teacher-force each candidate after the patched target, and after the clean one.

        `result.scores[c]` has `.logprob` (summed over c's tokens), `.mean_logprob` and `.rank` (of
        its first token); `result.clean_scores[c]` the same for the clean target. A candidate with
        no leading space after a target that ends without one is scored as " " + c. All candidates
        share the probe's patched prompt pass and its keys/values. `max_new_tokens` > 0 also
        generates (result.text); the other keywords are those of `probe`.
        """
        if isinstance(candidates, (list, tuple)) and not candidates:
            raise ProbeConfigError(
                "candidates", candidates, "a non-empty list of distinct strings", "Pass the answers to score, e.g. candidates=['Paris', 'London']."
            )
        options["target_position"] = _default_target_position(target, options.get("target_position"))
        probe = self.probe(
            source, target, layer=layer, target_layer=target_layer, max_new_tokens=max_new_tokens, units=units,
            candidates=candidates, **options,
        )
        return self.run([probe])[0]

    def run(self, probes: Sequence[Probe]) -> list[PatchResult]:
        """Run many probes as one batched, prefix-sharing job (results in order)."""
        return run_probes(self.engine, probes, progress=self.progress)

    def check_all(self, probes: Sequence[Probe], predicate: Callable[[PatchResult], Any]) -> list[PatchResult]:
        """Run `probes` as one batched job and check `predicate` on every result.

        For a property that is a pure function of probes: `@given(st.lists(strategies.probes(...)))`
        then `patchscope.check_all(batch, predicate)` evaluates a whole drawn list in one engine job,
        and Hypothesis shrinks a failing list to its one failing probe. The predicate returns a
        truth value or raises AssertionError (e.g. an assert_patched_* call); the failure names how
        many probes failed and shows the first in full.
        """
        __tracebackhide__ = True
        if not callable(predicate):
            raise ProbeConfigError("predicate", predicate, "a callable predicate(result) -> bool (or one that raises AssertionError)")
        results = self.run(probes)
        failures: list[str] = []
        for result in results:
            try:
                held = predicate(result)
            except AssertionError as exc:
                failures.append(str(exc))
                continue
            if not held:
                name = getattr(predicate, "__name__", type(predicate).__name__)
                failures.append(describe_failure(result, f"{name}(result) is {held!r}"))
        if failures:
            raise AssertionError(f"{len(failures)} of {len(results)} probes fail the property; the first:\n{failures[0]}")
        return results

    def expected_token_ids(self, expect: str, match: str = DEFAULT_MATCH) -> tuple[int, ...]:
        """Candidate first tokens of an expected answer, one per spelling that the hit test accepts.

        The default hit test is case-insensitive, so "paris" must score like "Paris": the candidates
        are the first (non-special) token of `expect` as written, lower(), upper(), capitalize() and
        title(), each without and with a leading space, deduplicated. Under a case-sensitive `match`
        rule only `expect` as written counts. A sweep scores the best of them.
        """
        special = set(self.model.tokenizer.all_special_ids)
        candidates: dict[int, None] = {}
        spellings = (expect,) if match != "ignore_case" else (expect, expect.lower(), expect.upper(), expect.capitalize(), expect.title())
        for variant in dict.fromkeys(spellings):
            for text in (variant.lstrip(), " " + variant.lstrip()):
                ids = [i for i in self.model.tokenize(text) if i not in special]
                if ids:
                    candidates.setdefault(ids[0])
        return tuple(candidates)

    @keywords_checked
    def sweep(
        self,
        source: str,
        target: str | Preset,
        *,
        layers: Iterable[int] | int | None = None,
        target_layers: Iterable[int] | str | None = None,
        expect: str | None = None,
        clean: bool = True,
        units: Sequence[int] | str | None = None,
        candidates: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        match: str = DEFAULT_MATCH,
        **options: Unpack[PatchOptions],
    ) -> LocalizationProfile:
        """One probe per source layer (target_layers None/"same": l* = l, or the preset's rule),
        or per (l, l*) pair when target_layers is a range/list; returns a LocalizationProfile.

        `units="each"` with `site="heads"` runs one probe per head at every layer instead: a
        (layer x head) profile, each cell writing that head alone. `clean=False` skips the
        unpatched continuation (one row fewer; `clean_text` is then None).

        With `candidates`, every cell scores them (see `score`) and carries the margin of the
        expected one (`expect`, default the first candidate) over the best other; a cell is a hit
        when that margin is > 0, and its logprob/rank are the expected candidate's.
        `max_new_tokens=0` then scores without generating. Without candidates, a cell is a hit when
        its text contains `expect` under `match` (see `engine.results.MATCH_RULES`: "ignore_case" by
        default, "case_sensitive", or "paper" for the Patchscopes paper's space-insensitive,
        case-sensitive rule). (`plan_sweep` then `run_sweeps` is the same sweep, batched with others.)"""
        plan = self.plan_sweep(
            source, target, layers=layers, target_layers=target_layers, expect=expect, clean=clean, units=units,
            candidates=candidates, max_new_tokens=max_new_tokens, match=match, **options,
        )
        return self.run_sweeps([plan])[0]

    @keywords_checked
    def plan_sweep(
        self,
        source: str,
        target: str | Preset,
        *,
        layers: Iterable[int] | int | None = None,
        target_layers: Iterable[int] | str | None = None,
        expect: str | None = None,
        clean: bool = True,
        units: Sequence[int] | str | None = None,
        candidates: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        match: str = DEFAULT_MATCH,
        **options: Unpack[PatchOptions],
    ) -> ProbePlan:
        """The probes of `sweep(...)` with these arguments, checked and built but not run.

        Plans of many sweeps run as one batched job with `run_sweeps` (or `run_plans`): a suite of
        sweeps then shares its passes over the model instead of paying for each on its own.
        """
        if expect is not None:
            check_text("expect", expect, "None or a non-empty string")
        scored = _candidates_tuple(candidates)
        if scored and isinstance(scored, tuple):
            if expect is None:
                expect = scored[0]
            elif expect not in scored:
                raise ProbeConfigError("expect", expect, f"one of the candidates {list(scored)} (the answer whose margin is kept)")
        check_match(match)
        if scored and match != DEFAULT_MATCH:
            raise ProbeConfigError(
                "match", match, f"{DEFAULT_MATCH!r} (the default) in a sweep with candidates, whose hit is the expected candidate's margin > 0"
            )
        if not isinstance(clean, bool):
            raise ProbeConfigError("clean", clean, "True or False")
        source_layers = layer_list("layers", layers, self.model.n_layers)
        grid = target_layers is not None and target_layers != "same"
        if isinstance(target_layers, str) and target_layers != "same":
            raise ProbeConfigError("target_layers", target_layers, 'None, "same", or a range/list of layers')
        pairs: list[tuple[int, int | None]]
        if grid:
            into = layer_list("target_layers", target_layers, self.model.n_layers)
            pairs = [(source_layer, t) for source_layer in source_layers for t in into]
        else:
            pairs = [(source_layer, None) for source_layer in source_layers]
        options["target_position"] = _default_target_position(target, options.get("target_position"))
        each: list[Any] = [units]  # a string other than "each" goes on to the probe, which refuses it
        if units == "each":
            site = options.get("site", DEFAULT_SITE)
            if site != "heads":
                raise ProbeConfigError(
                    "units", units, 'None, a list of unit indices, or "each" with site="heads" (one probe per head)',
                    f"site={site!r} has {locate_site(self.model, site).n_units} units; sweep them one at a time with your own list of probes.",
                )
            if grid:
                raise ProbeConfigError("units", units, '"each" with target_layers None or "same" (a layer x head profile)')
            each = [(head,) for head in range(locate_site(self.model, "heads").n_units)]
        probes = [
            self.probe(
                source, target, layer=source_layer, target_layer=t, max_new_tokens=max_new_tokens, units=unit, candidates=candidates,
                **options,
            )
            for source_layer, t in pairs
            for unit in each
        ]
        score_ids = self.expected_token_ids(expect, match) if expect is not None and not scored else ()
        return ProbePlan(tuple(probes), score_ids, clean=clean, expect=expect, grid=grid, per_unit=units == "each", match=match)

    def run_plans(self, plans: Sequence[ProbePlan]) -> list[list[PatchResult]]:
        """Every plan's probes as one batched, prefix-sharing job (one per `clean` setting used);
        each plan's results, in order. A probe that is invalid fails the whole job before it runs."""
        results: list[list[PatchResult]] = [[] for _ in plans]
        for clean in (True, False):
            chosen = [k for k, plan in enumerate(plans) if plan.clean is clean]
            if not chosen:
                continue
            probes = [probe for k in chosen for probe in plans[k].probes]
            score_ids = [plans[k].score_ids for k in chosen for _ in plans[k].probes]
            ran = iter(run_probes(self.engine, probes, score_ids=score_ids, progress=self.progress, clean=clean))
            for k in chosen:
                results[k] = [next(ran) for _ in plans[k].probes]
        return results

    def run_sweeps(self, plans: Sequence[ProbePlan]) -> list[LocalizationProfile]:
        """The LocalizationProfile of each sweep plan (see `plan_sweep`), all run as one batched job."""
        return [self.plan_profile(plan, results) for plan, results in zip(plans, self.run_plans(plans))]

    def plan_profile(self, plan: ProbePlan, results: Sequence[PatchResult]) -> LocalizationProfile:
        """A sweep plan's results folded into its LocalizationProfile (see `profile_from_results`)."""
        return self.profile_from_results(results, expect=plan.expect, grid=plan.grid, per_unit=plan.per_unit, match=plan.match)

    def profile_from_results(
        self, results: Sequence[PatchResult], *, expect: str | None, grid: bool, per_unit: bool = False, match: str = DEFAULT_MATCH
    ) -> LocalizationProfile:
        """Fold sweep results into a LocalizationProfile.

        Without candidates, a cell's logprob/rank are those of the best-scoring first token of
        `expect` (see `expected_token_ids`: every case and leading-space variant the case-insensitive
        hit test accepts), so "paris" and "Paris" score alike, and a cell is a hit when its text
        contains `expect` under `match`. With candidates they are the expected candidate's, and the
        cell keeps its margin over the best other candidate.
        """
        check_match(match)
        cells = []
        for result in results:
            logprob: float | None
            rank: int | None
            if result.scores:
                expected = result.scores[expect] if expect in result.scores else next(iter(result.scores.values()))
                others = [s.logprob for c, s in result.scores.items() if c != expected.candidate]
                margin = expected.logprob - max(others) if others else None
                logprob, rank = expected.logprob, expected.rank
                hit = None if margin is None else margin > 0
            else:
                best = max(result.first_token_scores.values(), default=None, key=lambda s: s[0])
                logprob, rank = (None, None) if best is None else best
                margin = None
                hit = None if expect is None else contains(result.text, expect, match)
            cells.append(
                LayerCell(
                    layer=result.resolved.layer,
                    target_layer=result.resolved.target_layer,
                    text=result.text,
                    hit=hit,
                    logprob=None if logprob is None else round(logprob, 6),
                    rank=rank,
                    unit=result.probe.units[0] if per_unit and result.probe.units else None,
                    margin=None if margin is None else round(margin, 6),
                    candidate_logprobs={c: round(s.logprob, 6) for c, s in result.scores.items()} or None,
                    degenerate=result.degenerate,
                )
            )
        identity = results[0].probe.identity()
        if per_unit:
            identity["units"] = "each"
        if match != DEFAULT_MATCH and expect is not None:  # another question than the default's: another key
            identity["match"] = match
        return LocalizationProfile(
            probe=identity,
            cells=tuple(cells),
            expect=expect,
            clean_text=results[0].clean_text,
            model=self.model.name,
            weights_hash=self.model.weights_hash,
            grid=grid,
            architecture={
                "n_layers": self.model.n_layers,
                "d_model": self.model.d_model,
                "vocab_size": int(self.model.hf.config.vocab_size),
            },
            dtype=self.model.dtype,
            path=self.model.path,
            candidates=tuple(results[0].probe.candidates),
            clean_candidate_logprobs=(
                {c: round(s.logprob, 6) for c, s in clean.items()} if (clean := results[0].clean_scores) else None
            ),
        )
