"""`Patchscope`: the user-facing API bound to one model (generate, run, sweep), no pytest needed.

    from pytest_patchscope import Patchscope, TOKEN_IDENTITY
    scope = Patchscope.load()                      # the embedded default model
    scope.generate("The capital of France is", TOKEN_IDENTITY, layer=27).text   # ' Paris -> Paris'
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Sequence

from .assertions import describe_failure
from .decoding import Decoding
from .engine import DEFAULT_BATCH_MEMORY_MB, DEFAULT_MAX_NEW_TOKENS_LIMIT, Engine, ProgressCallback, run_probes
from .errors import ProbeConfigError, warn_at_caller
from .models import PatchscopeModel, load_model
from .presets import Preset
from .probe import Mapping, Positions, Probe, finite_real
from .profile import LayerCell, LocalizationProfile
from .progress import ProgressSetting, resolve_progress
from .results import PatchResult, contains
from .sites import DEFAULT_SITE, locate_site

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


def _layer_list(field_name: str, layers: Any, n_layers: int) -> list[int]:
    """An int, range or iterable of layers as a list, each checked (a huge range fails at its first bad layer)."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    allowed = f"an int, a range or a list of ints from 0 to {n_layers - 1} (the model has {n_layers} layers)"
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ProbeConfigError(field_name, layers, allowed)
    values = []
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_layers:
            raise ProbeConfigError(
                field_name, layers, f"{allowed}; {value!r} is not",
                "Negative layers are not accepted; use model.n_layers - 1 for the last layer.",
            )
        values.append(value)
    if not values:
        raise ProbeConfigError(field_name, layers, "a non-empty range or list of layers")
    return values


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
        if isinstance(max_new_tokens_limit, bool) or not isinstance(max_new_tokens_limit, int) or max_new_tokens_limit < 1:
            raise ProbeConfigError("max_new_tokens_limit", max_new_tokens_limit, "an int >= 1")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ProbeConfigError("max_new_tokens", max_new_tokens, "an int >= 1")
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
    def probe(
        self,
        source: str,
        target: str | Preset,
        *,
        layer: int,
        target_layer: int | None = None,
        source_position: Positions = -1,
        target_position: Positions | None = None,
        mapping: Mapping | None = None,
        strength: float = 1.0,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        site: str = DEFAULT_SITE,
        units: Sequence[int] | None = None,
        source_model: Any = None,
        candidates: Sequence[str] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        n_samples: int = 1,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
    ) -> Probe:
        """A Probe with presets and defaults filled in (target_position None = -1 or the preset's).

        `site` is what is read and written (see `pytest_patchscope.sites.SITES`: resid_post,
        resid_pre, attn_out, mlp_out, neurons, heads); `units` limits the write to those indices
        of the site's first axis (checked when the probe runs). `source_model` runs S on another
        model (a PatchscopeModel, a Patchscope or a checkpoint spec): the paper's M != M*, with a
        `mapping` from its width to this model's (e.g. AffineMapping.fit on states of both).
        `candidates` are answers scored after the patched and the clean target (see `score`).
        Decoding is greedy unless `do_sample`: then `temperature`, `top_k`, `top_p` shape the
        distribution and sample k of `n_samples` draws from its own generator seeded `seed + k`;
        `repetition_penalty` and `no_repeat_ngram_size` act as in HF `generate`.

        A PatchscopeWarning says when a plain target's placeholder-like x would go unpatched.
        """
        target_position = _default_target_position(target, target_position)
        preset_name = None
        if isinstance(target, Preset):
            preset = target
            preset_name = preset.name
            target = source if preset.target is None else preset.target
            if target_position is None:
                target_position = source_position if preset.target_position is None else preset.target_position
            if target_layer is None and isinstance(layer, int) and not isinstance(layer, bool):
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
            mapping=mapping,
            strength=strength,
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            stop=tuple(stop or ()),
            preset=preset_name,
            site=site,
            units=_units_tuple(units),
            source_model=source_model,
            candidates=_candidates_tuple(candidates),
            decoding=Decoding(
                do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, n_samples=n_samples,
                repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            ),
        )

    # ---- running -------------------------------------------------------------------------------
    def generate(
        self,
        source: str,
        target: str | Preset,
        *,
        layer: int,
        target_layer: int | None = None,
        source_position: Positions = -1,
        target_position: Positions | None = None,
        mapping: Mapping | None = None,
        strength: float = 1.0,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        site: str = DEFAULT_SITE,
        units: Sequence[int] | None = None,
        source_model: Any = None,
        **decoding: Any,
    ) -> PatchResult:
        """Patch the site's value at (S, i, l) into T at (i*, l*) and generate (greedily, unless
        `do_sample=True`: see `probe` for the decoding settings); the clean continuation comes too."""
        probe = self.probe(
            source, target, layer=layer, target_layer=target_layer, source_position=source_position,
            target_position=_default_target_position(target, target_position), mapping=mapping, strength=strength,
            max_new_tokens=max_new_tokens, stop=stop, site=site, units=units, source_model=source_model, **decoding,
        )
        return self.run([probe])[0]

    def score(
        self,
        source: str,
        target: str | Preset,
        candidates: Sequence[str],
        *,
        layer: int,
        max_new_tokens: int = 0,
        **probe_kwargs: Any,
    ) -> PatchResult:
        """Teacher-force each candidate after the patched target, and after the clean one.

        `result.scores[c]` has `.logprob` (summed over c's tokens), `.mean_logprob` and `.rank` (of
        its first token); `result.clean_scores[c]` the same for the clean target. A candidate with
        no leading space after a target that ends without one is scored as " " + c. All candidates
        share the probe's patched prompt pass and its keys/values. `max_new_tokens` > 0 also
        generates (result.text); other keywords are those of `probe`.
        """
        if isinstance(candidates, (list, tuple)) and not candidates:
            raise ProbeConfigError(
                "candidates", candidates, "a non-empty list of distinct strings", "Pass the answers to score, e.g. candidates=['Paris', 'London']."
            )
        probe = self.probe(
            source, target, layer=layer, max_new_tokens=max_new_tokens, candidates=candidates,
            target_position=_default_target_position(target, probe_kwargs.pop("target_position", None)), **probe_kwargs,
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

    def expected_token_ids(self, expect: str) -> tuple[int, ...]:
        """Candidate first tokens of an expected answer, one per spelling that the hit test accepts.

        The hit test is case-insensitive, so "paris" must score like "Paris": the candidates are the
        first (non-special) token of `expect` as written, lower(), upper(), capitalize() and title(),
        each without and with a leading space, deduplicated. A sweep scores the best of them.
        """
        special = set(self.model.tokenizer.all_special_ids)
        candidates: dict[int, None] = {}
        for variant in dict.fromkeys((expect, expect.lower(), expect.upper(), expect.capitalize(), expect.title())):
            for text in (variant.lstrip(), " " + variant.lstrip()):
                ids = [i for i in self.model.tokenize(text) if i not in special]
                if ids:
                    candidates.setdefault(ids[0])
        return tuple(candidates)

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
        **generate_kwargs: Any,
    ) -> LocalizationProfile:
        """One probe per source layer (target_layers None/"same": l* = l, or the preset's rule),
        or per (l, l*) pair when target_layers is a range/list; returns a LocalizationProfile.

        `units="each"` with `site="heads"` runs one probe per head at every layer instead: a
        (layer x head) profile, each cell writing that head alone. `clean=False` skips the
        unpatched continuation (one row fewer; `clean_text` is then None).

        With `candidates`, every cell scores them (see `score`) and carries the margin of the
        expected one (`expect`, default the first candidate) over the best other; a cell is a hit
        when that margin is > 0, and its logprob/rank are the expected candidate's.
        `max_new_tokens=0` then scores without generating."""
        for forbidden in ("layer", "target_layer"):
            if forbidden in generate_kwargs:
                raise ProbeConfigError(forbidden, generate_kwargs[forbidden], "not given to sweep()", "Use layers=/target_layers= instead.")
        if expect is not None and (not isinstance(expect, str) or not expect.strip()):
            raise ProbeConfigError("expect", expect, "None or a non-empty string")
        scored = _candidates_tuple(candidates)
        if scored and isinstance(scored, tuple):
            if expect is None:
                expect = scored[0]
            elif expect not in scored:
                raise ProbeConfigError("expect", expect, f"one of the candidates {list(scored)} (the answer whose margin is kept)")
        if not isinstance(clean, bool):
            raise ProbeConfigError("clean", clean, "True or False")
        source_layers = _layer_list("layers", layers, self.model.n_layers)
        grid = target_layers is not None and target_layers != "same"
        if isinstance(target_layers, str) and target_layers != "same":
            raise ProbeConfigError("target_layers", target_layers, 'None, "same", or a range/list of layers')
        pairs: list[tuple[int, int | None]]
        if grid:
            into = _layer_list("target_layers", target_layers, self.model.n_layers)
            pairs = [(source_layer, t) for source_layer in source_layers for t in into]
        else:
            pairs = [(source_layer, None) for source_layer in source_layers]
        generate_kwargs["target_position"] = _default_target_position(target, generate_kwargs.get("target_position"))
        each: list[Any] = [units]  # a string other than "each" goes on to the probe, which refuses it
        if units == "each":
            site = generate_kwargs.get("site", DEFAULT_SITE)
            if site != "heads":
                raise ProbeConfigError(
                    "units", units, 'None, a list of unit indices, or "each" with site="heads" (one probe per head)',
                    f"site={site!r} has {locate_site(self.model, site).n_units} units; sweep them one at a time with your own list of probes.",
                )
            if grid:
                raise ProbeConfigError("units", units, '"each" with target_layers None or "same" (a layer x head profile)')
            each = [(head,) for head in range(locate_site(self.model, "heads").n_units)]
        probes = [
            self.probe(source, target, layer=source_layer, target_layer=t, units=unit, candidates=candidates, **generate_kwargs)
            for source_layer, t in pairs
            for unit in each
        ]
        score_ids = self.expected_token_ids(expect) if expect is not None and not scored else ()
        results = run_probes(self.engine, probes, score_ids=[score_ids] * len(probes), progress=self.progress, clean=clean)
        return self.profile_from_results(results, expect=expect, grid=grid, per_unit=units == "each")

    def profile_from_results(
        self, results: Sequence[PatchResult], *, expect: str | None, grid: bool, per_unit: bool = False
    ) -> LocalizationProfile:
        """Fold sweep results into a LocalizationProfile.

        Without candidates, a cell's logprob/rank are those of the best-scoring first token of
        `expect` (see `expected_token_ids`: every case and leading-space variant the case-insensitive
        hit test accepts), so "paris" and "Paris" score alike. With candidates they are the expected
        candidate's, and the cell keeps its margin over the best other candidate.
        """
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
                hit = None if expect is None else contains(result.text, expect, case_sensitive=False)
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
            candidates=tuple(results[0].probe.candidates),
            clean_candidate_logprobs=(
                {c: round(s.logprob, 6) for c, s in clean.items()} if (clean := results[0].clean_scores) else None
            ),
        )
