"""The general path: probes through the model's own forward and `generate`, with its own cache.

For a model the packed engine cannot run (state-space, recurrent, hybrid, chunked or per-layer
attention, ...: `PatchscopeModel.path == "general"`), rows run as the paper's own code runs them,
on the model as transformers runs it:
1. Each source prompt runs once through the model's forward; hooks on its decoder layers (or on
   their submodules, per site) keep the source values asked for, and the pass stops after the
   highest layer needed.
2. Rows run in batches through `generate`, with the model's own cache, masks and position ids. A
   hook writes each row's patch in the prompt pass (generate's first forward call): later tokens
   see it only through what the family carries forward (keys/values, a recurrent or convolution
   state). A model without a cache (GPT-1) computes the prompt again at every step, and gets the
   patch at every step, as a cache would have carried it.
3. Each step's token is chosen as the packed path chooses it (`decode.next_token`: greedy, or
   sampled with the row's own generator; candidates teacher-forced, their log-probabilities kept):
   a hook on the model's forward keeps its own logits of the step, and a logits processor makes
   the chosen token the only one generate can pick, so no setting of generate's changes a choice.
Rows of one prompt length batch without padding. A family in `PADDED_BATCHES` also batches
prompts of different lengths, left-padded with the model's own attention mask (generate derives
the position ids from it); any other runs each length as its own batch.
"""
from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pytest_patchscope.engine.decode import degeneration, first_step_scores, next_token, row_generator, token_rank
from pytest_patchscope.engine.finite import finite, first_non_finite, model_overflow, source_overflow
from pytest_patchscope.engine.resolve import apply_mapping
from pytest_patchscope.engine.rows import Row, RowOutput, SourceStates, StateKey
from pytest_patchscope.engine.streams import overflow_error
from pytest_patchscope.errors import EngineError, ModelLoadError, ProbeConfigError
from pytest_patchscope.model.layers import PADDED_BATCHES, UNBATCHED, last_token_layers, residual_streams
from pytest_patchscope.model.sites import SiteLocation, locate_site
from pytest_patchscope.probes.probe import mapping_name
from pytest_patchscope.progress import ProgressCallback

if TYPE_CHECKING:
    import torch

    from pytest_patchscope.model.loading import PatchscopeModel


class _StopForward(Exception):
    """Raised by the hook after the highest layer a capture pass needs: nothing above it is computed."""


class _NonFinite(Exception):
    """Raised inside generate (by the logits processor, or by a patch writer whose clean value is
    already NaN/inf) for batch row `row` at `step`; told once generate's hooks are gone, since telling
    the model's own overflow from the patch's runs the model again (see `_non_finite_error`)."""

    def __init__(self, row: int, step: int, hook_name: str = "") -> None:
        super().__init__(row, step)
        self.row, self.step, self.hook_name = row, step, hook_name


def _value(args: tuple, kwargs: dict) -> Any:
    """A module's first input: positional, or the hidden_states keyword (how some layers are called)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise EngineError("a hooked module was called without its hidden states (neither positional nor hidden_states=)")


def _hook(module: Any, side: str, edit: Callable[[Any], Any]) -> Any:
    """Register `edit(value) -> value` on a module's input or output; `value` is (batch, tokens, ...)."""
    if side == "output":
        def after(module: Any, args: tuple, output: Any) -> Any:
            if isinstance(output, (tuple, list)):  # GPT-1's blocks return a list
                return type(output)([edit(output[0]), *output[1:]])
            return edit(output)

        return module.register_forward_hook(after)

    def before(module: Any, args: tuple, kwargs: dict) -> tuple:
        value = edit(_value(args, kwargs))
        if args:
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}

    return module.register_forward_pre_hook(before, with_kwargs=True)


def _by_token(value: Any, batch: int, location: SiteLocation, layer: int) -> Any:
    """A hooked value as (batch, tokens, width): a mixture of experts hands its MLP output over
    flattened to (batch * tokens, width), a layer or projection as (batch, tokens, ...) (DeepSeek-V4's
    layers as (batch, tokens, hc_mult, d_model)). A width other than the site's is an EngineError:
    a patch or a captured value would be cut or spread across tokens."""
    flat = value.reshape(batch, -1, value.shape[-1]) if value.dim() == 2 else value.reshape(value.shape[0], value.shape[1], -1)
    if flat.shape[-1] != location.width:
        raise EngineError(
            f"the value at {location.site.hook_name(layer)} ({location.path or 'the decoder layer'}'s {location.side}) holds "
            f"{flat.shape[-1]} numbers per token, not the {location.width} of the site's shape {location.shape}"
        )
    return flat


def _site_module(model: "PatchscopeModel", layer: int, location: SiteLocation) -> Any:
    block = model.plain_layers[layer]
    return block.get_submodule(location.path) if location.path else block


def _accepts(model: "PatchscopeModel", argument: str) -> bool:
    return argument in inspect.signature(model.plain.forward).parameters


def _row_bytes(model: "PatchscopeModel", width: int, new_tokens: int) -> int:
    """A generous estimate of one row's peak memory in a batch whose prompts are `width` tokens.

    The family's cache is counted as a full-width key/value cache on every layer plus a recurrent
    state allowance (64 values per residual dimension and layer); the prompt pass's activations and
    eager attention scores, and its logits: every position's where the forward cannot keep only the last."""
    config = model.hf.config
    element = next(model.hf.parameters()).dtype.itemsize
    d = model.d_model * residual_streams(config)  # hyper-connection layers carry hc_mult streams
    length = width + new_tokens
    cache = model.n_layers * d * (2 * length + 64)
    inter = getattr(config, "intermediate_size", None) or 4 * d
    heads = getattr(config, "num_attention_heads", None) or 1
    activations = width * (8 * d + 3 * int(inter)) + 2 * int(heads) * width * width
    logits = 4 * int(config.vocab_size) * (3 if _accepts(model, "logits_to_keep") else width + 2)
    return element * (cache + activations) + logits


def _batches(model: "PatchscopeModel", rows: Sequence[Row], budget: float) -> list[list[int]]:
    """Row indices in batches: one prompt length per batch unless the family pads exactly (one row
    per batch for a family in UNBATCHED), each batch's estimated memory under `budget` bytes (a
    row that alone needs more is a ProbeConfigError, raised before anything runs)."""
    model_type = str(getattr(model.hf.config, "model_type", ""))
    padded = model_type in PADDED_BATCHES
    groups: dict[int, list[int]] = {}
    for k, row in enumerate(rows):
        groups.setdefault(-k - 1 if model_type in UNBATCHED else 0 if padded else len(row.target_ids), []).append(k)
    batches: list[list[int]] = []
    for members in groups.values():
        members.sort(key=lambda k: len(rows[k].target_ids))
        current: list[int] = []
        budget_steps = 0  # the most new tokens of a row in the current batch
        for k in members:
            row = rows[k]
            steps = max(len(row.forced), row.max_new_tokens)
            alone = _row_bytes(model, len(row.target_ids), steps)
            if alone > budget:
                raise ProbeConfigError(
                    "batch_memory_mb", budget / 2**20,
                    f"at least {alone / 2**20:.2f} MB: one row of this probe (a {len(row.target_ids)}-token target, "
                    f"max_new_tokens={row.max_new_tokens}) needs that much on {model.name!r}",
                    "Raise batch_memory_mb, or shorten the prompts or max_new_tokens.",
                )
            widest = max(budget_steps, steps)  # rows sorted by length: this one is the batch's longest prompt
            if current and (len(current) + 1) * _row_bytes(model, len(row.target_ids), widest) > budget:
                batches.append(current)
                current, widest = [], steps
            current.append(k)
            budget_steps = widest
        if current:
            batches.append(current)
    return batches


# ---- source values ----------------------------------------------------------------------------
def capture_states(model: "PatchscopeModel", wanted: dict[StateKey, set[int]], states: SourceStates, batch_memory_mb: float) -> None:
    """Fill `states[key][layer]` for every key and layer in `wanted`: each source prompt runs once
    (prompts of one length together, unpadded) through the model's forward, up to the highest layer asked for."""
    prompts: dict[tuple[int, ...], list[tuple[StateKey, int]]] = {}
    for key, layers in wanted.items():
        for layer in layers:
            prompts.setdefault(key[0], []).append((key, layer))
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for ids in prompts:
        by_length.setdefault(len(ids), []).append(ids)
    budget = batch_memory_mb * 2**20
    for length, members in by_length.items():
        size = max(1, int(budget // _row_bytes(model, length, 0)))
        for start in range(0, len(members), size):
            batch = members[start: start + size]
            requests = {(b, key, layer) for b, ids in enumerate(batch) for key, layer in prompts[ids]}
            _capture_batch(model, batch, requests, states)


def _capture_batch(model: "PatchscopeModel", batch: list[tuple[int, ...]], requests: set[tuple[int, StateKey, int]], states: SourceStates) -> None:
    import torch

    by_site: dict[tuple[int, str], list[tuple[int, StateKey]]] = {}
    for b, key, layer in requests:
        by_site.setdefault((layer, key[2]), []).append((b, key))
    top = max(layer for layer, _ in by_site)

    def keeper(layer: int, location: SiteLocation, entries: list[tuple[int, StateKey]]) -> Callable[[Any], Any]:
        def keep(value: Any) -> Any:
            flat = _by_token(value, len(batch), location, layer)
            for b, key in entries:
                states.setdefault(key, {})[layer] = flat[b, key[1]].detach().clone().view(location.shape)
            return value

        return keep

    def stop(module: Any, args: tuple, output: Any) -> None:
        raise _StopForward

    handles = []
    try:
        for (layer, site), entries in by_site.items():
            location = locate_site(model, site, layer)
            handles.append(_hook(_site_module(model, layer, location), location.side, keeper(layer, location, entries)))
        handles.append(model.plain_layers[top].register_forward_hook(stop))
        ids = torch.tensor([list(ids) for ids in batch], device=model.device)
        with torch.no_grad():
            try:
                model.plain(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [(key, layer) for b, key, layer in requests if layer not in states.get(key, {})]
    if missing:
        raise EngineError(f"the capture pass of {model.name!r} did not reach the site of {missing[0][0][2]!r} at layer {missing[0][1]}")


def capture_many(
    model: "PatchscopeModel", requests: Sequence[tuple[Sequence[int], int]], layers: Sequence[int] | set[int], site: str,
    batch_memory_mb: float,
) -> list[dict[int, "torch.Tensor"]]:
    """`Engine.capture_many` on the general path: the site's values at `layers` for each (prompt ids, token index)."""
    keys = [(tuple(ids), index % len(ids), site, "") for ids, index in requests]
    for layer in layers:
        locate_site(model, site, layer)
    states: SourceStates = {}
    capture_states(model, {key: set(layers) for key in keys}, states, batch_memory_mb)
    return [states[key] for key in keys]


# ---- generation -------------------------------------------------------------------------------
class _Choices:
    """The logits processor of one batch: picks each row's token from the model's own logits of
    the step (`logits`, set by a hook on the forward) and leaves generate no other choice."""

    def __init__(self, model: "PatchscopeModel", rows: Sequence[Row], step_done: Callable[[float], None], steps: int) -> None:
        self.model, self.rows, self.step_done, self.steps = model, rows, step_done, steps
        self.logits: Any = None
        self.step = 0
        n = len(rows)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.scores: list[dict[int, tuple[float, int]]] = [{} for _ in range(n)]
        self.forced_logprobs: list[list[float]] = [[] for _ in range(n)]
        self.first_rank: list[int | None] = [None] * n
        self.stopped_text: dict[int, str] = {}
        self.done = [not (row.forced or row.max_new_tokens > 0) for row in rows]
        self.generators: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits, rows, model = self.logits, self.rows, self.model
        active = [r for r in range(len(rows)) if not self.done[r] or self.step == 0]
        if not finite(logits[active]):
            raise _NonFinite(next(r for r in active if not finite(logits[r])), self.step)
        if self.step == 0:
            self.generators = [row_generator(row.decoding, row.sample, logits.device) for row in rows]
            self.scores = [first_step_scores(logits[r], row.score_ids) for r, row in enumerate(rows)]
            active = [r for r in active if not self.done[r]]
        plain = any(not rows[r].forced and not rows[r].decoding.processes_logits for r in active)
        best = logits.argmax(dim=-1).tolist() if plain else []
        logprobs = torch.log_softmax(logits, dim=-1) if any(rows[r].forced for r in active) else None
        chosen = [model.pad_token_id] * len(rows)
        for r in active:
            row, tokens = rows[r], self.tokens[r]
            if row.forced:  # a candidate: feed its next token, keep that token's log-probability
                assert logprobs is not None  # computed whenever a forced row is active
                token = row.forced[len(tokens)]
                self.forced_logprobs[r].append(float(logprobs[r, token]))
                if self.first_rank[r] is None:
                    self.first_rank[r] = token_rank(logprobs[r], token)
                tokens.append(token)
                chosen[r] = token
                self.done[r] = len(tokens) >= len(row.forced)
                continue
            if row.decoding.processes_logits:
                token = next_token(logits[r], [*row.target_ids, *tokens], row.decoding, self.generators[r])
            else:
                token = best[r]
            chosen[r] = token
            finished = token in model.eos_token_ids
            if not finished:
                tokens.append(token)
                if row.stop:  # decode only rows that can stop on text
                    text = model.decode(tokens)
                    cut = min((text.find(s) for s in row.stop if s in text), default=-1)
                    if cut >= 0:
                        self.stopped_text[r], finished = text[:cut], True
                finished = finished or len(tokens) >= row.max_new_tokens
            self.done[r] = finished
        self.step += 1
        self.step_done(self.step / (self.steps + 1))
        only = torch.full_like(scores, -math.inf)
        only[torch.arange(len(rows), device=scores.device), torch.tensor(chosen, device=scores.device)] = 0.0
        return only

    def finished(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        """generate's stopping criterion: the rows this processor has finished."""
        import torch

        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def outputs(self) -> list[RowOutput]:
        model = self.model
        out = []
        for r, row in enumerate(self.rows):
            text = self.stopped_text[r] if r in self.stopped_text else model.decode(self.tokens[r])
            flag = None if row.forced else degeneration(self.tokens[r], model.decode)
            out.append(RowOutput(self.tokens[r], text, self.scores[r], self.forced_logprobs[r], self.first_rank[r], flag))
        return out


class _Passes:
    """Which forward call of generate is running: the prompt pass (the first), or a later one that
    computes the whole prompt again (a model without a cache, GPT-1, recomputes it at every step:
    the patch is written there too, as a cache would carry it), or a step of new tokens only."""

    def __init__(self, width: int) -> None:
        self.width, self.calls, self.tokens = width, 0, 0

    def enter(self, module: Any, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        self.calls, self.tokens = self.calls + 1, int(inputs.shape[1])

    @property
    def prompt(self) -> bool:
        return self.calls == 1

    @property
    def writes(self) -> bool:
        return self.prompt or self.tokens > self.width


def _patch_writer(
    entries: list[tuple[int, list[int], Any, Row]], written: dict[int, int], passes: _Passes, location: SiteLocation, layer: int,
    batch: int,
) -> Callable[[Any], Any]:
    """The edit that writes `entries` (batch row, token positions in the padded prompt,
    (len(positions), width) values, its row) at `location` in `layer`, into a value of `batch` rows
    wherever a pass computes the prompt (see `_Passes`); refuses non-finite results. `written`
    counts the prompt pass's writes."""
    import torch

    hook_name = location.site.hook_name(layer)

    def write(value: Any) -> Any:
        if not passes.writes:
            return value
        flat = _by_token(value, batch, location, layer).clone()
        # A layer that computes only the prompt's last tokens (see layers.last_token_layers) sees its end.
        shift = passes.width - flat.shape[1] if passes.prompt else 0
        for b, positions, vectors, row in entries:
            at = torch.tensor(positions, device=flat.device) - shift
            clean = flat[b, at]
            patched = clean + torch.tensor(row.strength, dtype=flat.dtype, device=flat.device) * (vectors.to(flat) - clean)
            columns = row.location.columns(row.units) if row.location is not None else None
            if columns is not None:
                keep = torch.zeros(flat.shape[-1], dtype=torch.bool, device=flat.device)
                keep[list(columns)] = True
                patched = torch.where(keep, patched, clean)
            if not finite(patched):
                if not finite(clean):  # the model's own value there is NaN/inf already: no patch is to blame
                    raise _NonFinite(b, 0 if passes.prompt else passes.calls - 1, hook_name)
                raise overflow_error(row.strength, mapping_name(row.mapping), hook_name, flat.dtype)
            flat[b, at] = patched
            if passes.prompt:
                written[b] = written.get(b, 0) + 1
        return flat.view(value.shape)

    return write


def _generate(
    model: "PatchscopeModel", rows: Sequence[Row], vectors: Sequence[Any], step_done: Callable[[float], None]
) -> list[RowOutput]:
    """One batch through the model's `generate`: left-padded to its longest prompt, each patched
    row's patch written in the prompt pass, every token chosen by `_Choices`."""
    import torch

    width = max(len(row.target_ids) for row in rows)
    lead = [width - len(row.target_ids) for row in rows]
    pad = model.pad_token_id
    ids = torch.tensor([[pad] * lead[r] + list(row.target_ids) for r, row in enumerate(rows)], device=model.device)
    mask = torch.tensor([[0] * lead[r] + [1] * len(row.target_ids) for r, row in enumerate(rows)], device=model.device)
    steps = max(1, *(max(len(row.forced), row.max_new_tokens) for row in rows))
    choices = _Choices(model, rows, step_done, steps)
    passes = _Passes(width)
    written: dict[int, int] = {}
    by_site: dict[tuple[int, str], list[tuple[int, list[int], Any, Row]]] = {}
    for r, row in enumerate(rows):
        if row.sources and row.patch_layer is not None and row.location is not None:
            positions = [lead[r] + row.split + offset for offset in row.offsets]
            by_site.setdefault((row.patch_layer, row.location.site.name), []).append((r, positions, vectors[r], row))

    def logits_of_step(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        choices.logits = output.logits[:, -1].float()

    handles = [model.plain.register_forward_pre_hook(passes.enter, with_kwargs=True)]
    failed: _NonFinite | None = None
    try:
        for (layer, _), entries in by_site.items():
            location = entries[0][3].location
            assert location is not None  # only patched rows have entries
            writer = _patch_writer(entries, written, passes, location, layer, len(rows))
            handles.append(_hook(_site_module(model, layer, location), location.side, writer))
        handles.append(model.plain.register_forward_hook(logits_of_step, with_kwargs=True))
        with torch.no_grad():
            try:
                model.plain.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=None, do_sample=False, num_beams=1,
                    pad_token_id=pad, eos_token_id=None, logits_processor=[choices], stopping_criteria=[choices.finished],
                    repetition_penalty=None, no_repeat_ngram_size=None, use_cache=True,
                )
            except _NonFinite as bad:
                failed = bad
    finally:
        for handle in handles:
            handle.remove()
    if failed is not None:  # told here, once generate's hooks are gone
        raise _non_finite_error(model, rows[failed.row], choices.tokens[failed.row], failed) from None
    # A patch that is silently not written (or written twice) would pass for a probe that found nothing.
    for r, row in enumerate(rows):
        if row.sources and row.location is not None and row.patch_layer is not None and written.get(r, 0) != 1:
            raise EngineError(
                f"the patch of a row (at {row.location.site.hook_name(row.patch_layer)}) was written {written.get(r, 0)} "
                f"times in {model.name!r}'s prompt pass instead of once"
            )
    return choices.outputs()


def _non_finite_error(model: "PatchscopeModel", row: Row, tokens: Sequence[int], bad: _NonFinite) -> Exception:
    """Why a row's values went NaN/inf in generate, as the packed path tells it: a plain forward of the
    model over the row's tokens so far (no patch) that overflows too is the model's doing (a
    ModelLoadError naming the layer from which it does); otherwise the row's patch drives the layers
    after it there (a ProbeConfigError naming its strength or mapping)."""
    ids = (*row.target_ids, *tokens)
    where = first_non_finite(model, ids)
    if where is not None or bad.hook_name:
        return model_overflow(model, ids, where or f"at {bad.hook_name}", locate=False)
    if row.sources and row.location is not None and row.patch_layer is not None:
        hook_name = row.location.site.hook_name(row.patch_layer)
        return overflow_error(row.strength, mapping_name(row.mapping), hook_name, next(model.hf.parameters()).dtype, downstream=True)
    return ModelLoadError(
        f"model={model.name!r} computes NaN/inf logits at step {bad.step} of its own generate for an unpatched "
        f"{len(row.target_ids)}-token prompt, though a plain forward over the same tokens stays finite: its cached "
        f"passes overflow in {model.dtype}. No result is reported. Allowed: a model whose generate stays finite; "
        "load it in float32 if it runs in float16 or bfloat16."
    )


def _check_non_finite_sources(model: "PatchscopeModel", rows: Sequence[Row], states: SourceStates) -> None:
    """A NaN/inf source value is the source model's own overflow (nothing is patched when it is
    captured): a ModelLoadError naming where, before any mapping or patch could take the blame."""
    for row in rows:
        if row.location is None:
            continue
        for key in row.sources:
            if not finite(states[key][row.source_layer]):
                raise source_overflow(model, key, row.location.site.hook_name(row.source_layer))


def _check_last_token_layers(model: "PatchscopeModel", rows: Sequence[Row]) -> None:
    """A patch in a layer whose prompt pass computes only the last token must be at the last token
    (a ProbeConfigError before anything runs): anywhere else the model would never read it."""
    first = last_token_layers(model.hf.config)
    if first is None:
        return
    for row in rows:
        if row.sources and row.patch_layer is not None and row.patch_layer >= first:
            positions = [row.split + offset for offset in row.offsets]
            if positions != [len(row.target_ids) - 1]:
                raise ProbeConfigError(
                    "target_position", positions if len(positions) > 1 else positions[0],
                    f"the target's last token ({len(row.target_ids) - 1}) at target_layer={row.patch_layer}: from layer {first} on, "
                    f"{model.name!r} reuses earlier layers' keys and values, and its prompt pass computes only the last token there",
                    f"Patch the last token, or a target_layer below {first}.",
                )


def run_rows(
    model: "PatchscopeModel", rows: list[Row], states: SourceStates, progress: ProgressCallback | None, batch_memory_mb: float
) -> list[RowOutput]:
    """`Engine.run_rows` on the general path: batches are planned, every missing source value
    captured and every mapping applied (and checked) before any row generates."""
    _check_last_token_layers(model, rows)
    batches = _batches(model, rows, batch_memory_mb * 2**20)
    wanted: dict[StateKey, set[int]] = {}
    for row in rows:
        for key in row.sources:
            if row.source_layer not in states.get(key, {}):
                wanted.setdefault(key, set()).add(row.source_layer)
    if wanted:
        capture_states(model, wanted, states, batch_memory_mb)
    _check_non_finite_sources(model, rows, states)
    mapped: dict[int, Any] = {}
    vectors: list[Any] = []
    for k, row in enumerate(rows):
        if not row.sources or row.location is None:
            vectors.append(None)
            continue
        root = k if row.parent is None else row.parent
        if root not in mapped:
            import torch

            values = [apply_mapping(row.mapping, states[key][row.source_layer], row.location.shape) for key in row.sources]
            flat = torch.stack([value.reshape(-1) for value in values])
            mapped[root] = flat.expand(len(row.offsets), -1) if len(values) == 1 else flat
        vectors.append(mapped[root])

    total = sum(1 for row in rows if row.sources and row.parent is None)  # one patched row per probe
    done = 0
    if progress is not None:
        progress(0, total)
    outputs: list[RowOutput | None] = [None] * len(rows)
    for batch in batches:
        probes = sum(1 for k in batch if rows[k].sources and rows[k].parent is None)

        def step_done(fraction: float, before: int = done, size: int = probes) -> None:
            if progress is not None and size:
                progress(before + size * min(fraction, 1.0), total)

        for k, out in zip(batch, _generate(model, [rows[k] for k in batch], [vectors[k] for k in batch], step_done)):
            outputs[k] = out
        done += probes
        if progress is not None and probes:
            progress(done, total)
    return [out for out in outputs if out is not None]
