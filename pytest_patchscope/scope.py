"""`Patchscope`: the user-facing API bound to one model (generate, run, sweep), no pytest needed.

    from pytest_patchscope import Patchscope, TOKEN_IDENTITY
    scope = Patchscope.load()                      # the embedded default model
    scope.generate("The capital of France is", TOKEN_IDENTITY, layer=27).text   # ' Paris -> Paris'
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from .engine import DEFAULT_BATCH_MEMORY_MB, Engine, PatchResult, ProgressCallback, run_probes
from .errors import ProbeConfigError
from .models import PatchscopeModel, load_model
from .presets import Preset
from .probe import Mapping, Position, Probe
from .profile import LayerCell, LocalizationProfile

DEFAULT_MAX_NEW_TOKENS = 20


def _layer_list(field_name: str, layers: Any, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        values = list(layers)
    except TypeError:
        raise ProbeConfigError(field_name, layers, f"an int, a range or a list of ints from 0 to {n_layers - 1}") from None
    if not values:
        raise ProbeConfigError(field_name, layers, "a non-empty range or list of layers")
    return values


class Patchscope:
    """Patchscopes probes on one loaded model.

    `max_new_tokens` is the default budget of every probe; `batch_memory_mb` bounds the memory
    of one batch (larger sweeps run in chunks); `progress(done, total)` is told how far a run is.
    """

    def __init__(
        self,
        model: PatchscopeModel,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_memory_mb: float = DEFAULT_BATCH_MEMORY_MB,
        progress: ProgressCallback | None = None,
    ) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ProbeConfigError("max_new_tokens", max_new_tokens, "an int >= 1")
        if not isinstance(batch_memory_mb, (int, float)) or not batch_memory_mb > 0:
            raise ProbeConfigError("batch_memory_mb", batch_memory_mb, "a number of megabytes > 0")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.engine = Engine(model, batch_memory_mb=batch_memory_mb)

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None = None, *, device: str = "cpu", **kwargs: Any) -> "Patchscope":
        """Load `model` ('default', a GGUF file or an HF directory) and bind a Patchscope to it."""
        return cls(load_model(model, device=device), **kwargs)

    # ---- building probes -------------------------------------------------------------------
    def probe(
        self,
        source: str,
        target: str | Preset,
        *,
        layer: int,
        target_layer: int | None = None,
        source_position: Position = -1,
        target_position: Position | None = None,
        mapping: Mapping | None = None,
        strength: float = 1.0,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> Probe:
        """A Probe with presets and defaults filled in (target_position None = -1 or the preset's)."""
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
        )

    # ---- running -------------------------------------------------------------------------------
    def generate(
        self,
        source: str,
        target: str | Preset,
        *,
        layer: int,
        target_layer: int | None = None,
        source_position: Position = -1,
        target_position: Position | None = None,
        mapping: Mapping | None = None,
        strength: float = 1.0,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> PatchResult:
        """Patch h(S, i, l) into T at (i*, l*) and generate greedily; the clean continuation comes too."""
        probe = self.probe(
            source, target, layer=layer, target_layer=target_layer, source_position=source_position,
            target_position=target_position, mapping=mapping, strength=strength,
            max_new_tokens=max_new_tokens, stop=stop,
        )
        return self.run([probe])[0]

    def run(self, probes: Sequence[Probe]) -> list[PatchResult]:
        """Run many probes as one batched, prefix-sharing job (results in order)."""
        return run_probes(self.engine, probes, progress=self.progress)

    def expected_token_ids(self, expect: str) -> tuple[int, ...]:
        """Candidate first tokens of an expected answer: as written and with a leading space."""
        candidates = []
        for text in (expect, " " + expect.lstrip()):
            ids = self.model.tokenize(text)
            special = set(self.model.tokenizer.all_special_ids)
            ids = [i for i in ids if i not in special]
            if ids and ids[0] not in candidates:
                candidates.append(ids[0])
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
        **generate_kwargs: Any,
    ) -> LocalizationProfile:
        """One probe per source layer (target_layers None/"same": l* = l, or the preset's rule),
        or per (l, l*) pair when target_layers is a range/list; returns a LocalizationProfile.

        `clean=False` skips the unpatched continuation (one row fewer; `clean_text` is then None)."""
        for forbidden in ("layer", "target_layer"):
            if forbidden in generate_kwargs:
                raise ProbeConfigError(forbidden, generate_kwargs[forbidden], "not given to sweep()", "Use layers=/target_layers= instead.")
        if expect is not None and (not isinstance(expect, str) or not expect.strip()):
            raise ProbeConfigError("expect", expect, "None or a non-empty string")
        source_layers = _layer_list("layers", layers, self.model.n_layers)
        grid = target_layers is not None and target_layers != "same"
        if isinstance(target_layers, str) and target_layers != "same":
            raise ProbeConfigError("target_layers", target_layers, 'None, "same", or a range/list of layers')
        pairs: list[tuple[int, int | None]]
        if grid:
            pairs = [(l, t) for l in source_layers for t in _layer_list("target_layers", target_layers, self.model.n_layers)]
        else:
            pairs = [(l, None) for l in source_layers]
        probes = [self.probe(source, target, layer=l, target_layer=t, **generate_kwargs) for l, t in pairs]
        score_ids = self.expected_token_ids(expect) if expect is not None else ()
        if not isinstance(clean, bool):
            raise ProbeConfigError("clean", clean, "True or False")
        results = run_probes(self.engine, probes, score_ids=[score_ids] * len(probes), progress=self.progress, clean=clean)
        return self.profile_from_results(results, expect=expect, grid=grid)

    def profile_from_results(self, results: Sequence[PatchResult], *, expect: str | None, grid: bool) -> LocalizationProfile:
        """Fold sweep results into a LocalizationProfile (the best-scoring expected first token)."""
        cells = []
        for result in results:
            best = max(result.scores.values(), default=None, key=lambda s: s[0])
            cells.append(
                LayerCell(
                    layer=result.resolved.layer,
                    target_layer=result.resolved.target_layer,
                    text=result.text,
                    hit=None if expect is None else expect.lower() in result.text.lower(),
                    logprob=None if best is None else round(best[0], 6),
                    rank=None if best is None else best[1],
                )
            )
        return LocalizationProfile(
            probe=results[0].probe.identity(),
            cells=tuple(cells),
            expect=expect,
            clean_text=results[0].clean_text,
            model=self.model.name,
            weights_hash=self.model.weights_hash,
            grid=grid,
        )
