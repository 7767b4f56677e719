"""Patch + generate, batched and prefix-sharing. No pytest in here: it runs under `python -c`.

How a batch of probes runs (on the plain HF twin, which shares every weight with the bridge):
1. Target tokens before i* do not depend on the patch (attention is causal), so each distinct
   prefix T[:i*] runs once, unpatched, and its KV cache is shared by every row that uses it. The
   same pass captures every source state still needed: prefixes and source prompts are laid end
   to end with a block-diagonal mask, so the weights stream through memory once for all of them.
2. Each row then runs only T[i*:] and its new tokens, in streams (see `streams`): rows compute
   together at every layer where they cannot differ yet, and branch off right after their patch
   layer, where the patch is written. Prompts of mixed lengths line up through a custom attention
   mask and explicit positions, exactly as they would alone.
3. Decoding is greedy and needs no patch: later tokens see it only through the KV cache, as in the
   paper's code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .probe import Probe, ResolvedProbe, apply_mapping, resolve_probe
from .streams import LayerKV, Patch, StreamPlan, forward_streams

if TYPE_CHECKING:
    import torch

    from .models import PatchscopeModel

ProgressCallback = Callable[[int, int], None]
DEFAULT_BATCH_MEMORY_MB = 512
PACK_TOKENS = 512
"""Longest packed row of the prefill (unless one prompt is longer): bounds its T x T mask."""
SourceStates = dict[tuple[tuple[int, ...], int], dict[int, Any]]
"""Hidden states already at hand: (source ids, source index) -> {layer: (d_model,) tensor}."""


@dataclass(frozen=True)
class PatchResult:
    """What one probe generated: the patched continuation beside the clean one."""

    probe: Probe
    resolved: ResolvedProbe
    text: str
    clean_text: str
    tokens: tuple[int, ...]
    clean_tokens: tuple[int, ...]
    scores: dict[int, tuple[float, int]] = field(default_factory=dict, repr=False)
    """For requested token ids: (log-probability, rank) at the first generated step."""

    def __str__(self) -> str:
        return f"{self.probe.describe()}\n  patched: {self.text!r}\n  clean:   {self.clean_text!r}"


@dataclass
class _Row:
    """One sequence of a batch: a target prompt, at most one patch, and its decoding budget."""

    target_ids: tuple[int, ...]
    split: int  # tokens before this index are the shared prefix
    patch_layer: int | None = None
    source: tuple[tuple[int, ...], int] | None = None  # (source ids, source index); None = clean row
    source_layer: int = 0
    mapping: Any = None
    strength: float = 1.0
    max_new_tokens: int = 20
    stop: tuple[str, ...] = ()
    score_ids: tuple[int, ...] = ()


@dataclass
class _RowOutput:
    tokens: list[int]
    text: str
    scores: dict[int, tuple[float, int]]


def _float_mask(allowed: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class Engine:
    """Runs rows (target prompt + optional patch) in memory-bounded, prefix-sharing batches."""

    def __init__(self, model: "PatchscopeModel", *, batch_memory_mb: float = DEFAULT_BATCH_MEMORY_MB) -> None:
        self.model = model
        self.batch_memory_mb = batch_memory_mb

    # ---- the packed prefill: shared prefixes and source states in one pass ----------------
    def capture(self, prompt_ids: Sequence[int], index: int, layers: Iterable[int]) -> dict[int, "torch.Tensor"]:
        """Hidden states after each of `layers` (= `blocks.{l}.hook_out`) at token `index` of one prompt."""
        import torch

        ids = tuple(prompt_ids)
        key = (ids, index % len(ids))
        with torch.no_grad():
            _, states = self._prefill([], {key: set(layers)})
        return states[key]

    def _prefill(
        self, prefixes: Iterable[tuple[int, ...]], wanted: dict[tuple[tuple[int, ...], int], set[int]]
    ) -> tuple[dict[tuple[int, ...], list[tuple["torch.Tensor", "torch.Tensor"]]], SourceStates]:
        """One unpatched pass over every prefix and every source prompt in `wanted`.

        Segments are packed end to end into rows of at most PACK_TOKENS tokens; each sees only itself
        (block-diagonal causal mask, positions from 0), so its keys/values and hidden states are those
        of a pass of its own. Returns per-layer (keys, values) per prefix and {(ids, index): {layer: h}}.
        """
        import torch

        prefixes = list(dict.fromkeys(prefixes))
        segments = list(dict.fromkeys([*prefixes, *(ids for ids, _ in wanted)]))
        if not segments:
            return {}, {}
        device, cap = self.model.device, max(PACK_TOKENS, max(map(len, segments)))
        fill: list[int] = []
        placed: dict[tuple[int, ...], tuple[int, int]] = {}  # segment -> (packed row, first column)
        for segment in segments:
            row = next((k for k, used in enumerate(fill) if used + len(segment) <= cap), len(fill))
            if row == len(fill):
                fill.append(0)
            placed[segment], fill[row] = (row, fill[row]), fill[row] + len(segment)
        width = max(fill)
        ids = torch.full((len(fill), width), self.model.pad_token_id, dtype=torch.long, device=device)
        owner = torch.full((len(fill), width), -1, dtype=torch.long, device=device)
        positions = torch.zeros(len(fill), width, dtype=torch.long, device=device)
        for k, segment in enumerate(segments):
            row, start = placed[segment]
            ids[row, start: start + len(segment)] = torch.tensor(segment, device=device)
            owner[row, start: start + len(segment)] = k
            positions[row, start: start + len(segment)] = torch.arange(len(segment), device=device)
        cols = torch.arange(width, device=device)
        allowed = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0) & (cols[:, None] >= cols[None, :])
        allowed |= torch.eye(width, dtype=torch.bool, device=device)  # pads see themselves, never nothing

        states: SourceStates = {key: {} for key in wanted}
        picks: dict[int, list[tuple[tuple[tuple[int, ...], int], int, int]]] = {}
        for key, layers in wanted.items():
            row, start = placed[key[0]]
            for layer in layers:
                picks.setdefault(layer, []).append((key, row, start + key[1]))

        def keep(layer: int, module: Any, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            for key, row, col in picks[layer]:
                states[key][layer] = hidden[row, col].detach().clone()

        dtype = next(self.model.hf.parameters()).dtype
        layers = self.model.plain_layers
        handles = [layers[layer].register_forward_hook(partial(keep, layer)) for layer in picks]
        try:
            out = self.model.plain.base_model(
                input_ids=ids, attention_mask=_float_mask(allowed, dtype), position_ids=positions, use_cache=bool(prefixes)
            )
        finally:
            for handle in handles:
                handle.remove()
        kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for prefix in prefixes:
            row, start = placed[prefix]
            span = slice(start, start + len(prefix))
            kv[prefix] = [(layer.keys[row: row + 1, :, span], layer.values[row: row + 1, :, span]) for layer in out.past_key_values.layers]
        return kv, states

    # ---- batching --------------------------------------------------------------------------
    def _row_bytes(self, row: _Row) -> int:
        """A generous estimate of one row's peak memory: KV cache, activations and logits."""
        cfg = self.model.hf.config
        heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 1)
        head_dim = getattr(cfg, "head_dim", None) or self.model.d_model // max(1, getattr(cfg, "num_attention_heads", 1))
        length = len(row.target_ids) + row.max_new_tokens
        kv = 2 * self.model.n_layers * heads * head_dim * length
        inter = getattr(cfg, "intermediate_size", None) or 4 * self.model.d_model
        suffix = len(row.target_ids) - row.split
        activations = suffix * (8 * self.model.d_model + 3 * inter) + length * getattr(cfg, "num_attention_heads", 1) * 2
        logits = 3 * self.model.hf.config.vocab_size
        return 4 * (kv + activations + logits)

    def _chunks(self, rows: list[_Row]) -> list[list[int]]:
        """Row indices grouped so that each chunk's estimated memory stays under the limit.

        Rows are ordered by (prefix, length) so that rows sharing a prefix land in one chunk.
        """
        order = sorted(range(len(rows)), key=lambda k: (rows[k].target_ids[: rows[k].split], len(rows[k].target_ids)))
        budget = self.batch_memory_mb * 2**20
        chunks: list[list[int]] = []
        current: list[int] = []
        used = 0
        for k in order:
            cost = self._row_bytes(rows[k])
            if current and used + cost > budget:
                chunks.append(current)
                current, used = [], 0
            current.append(k)
            used += cost
        if current:
            chunks.append(current)
        return chunks

    def run_rows(self, rows: list[_Row], states: SourceStates, progress: ProgressCallback | None = None) -> list[_RowOutput]:
        """Run `rows` chunk by chunk; `states` holds known source states and gains those captured.

        The first chunk's prefill also captures every missing source state of the whole job, and
        every mapping is applied (and checked) before any patched pass runs.
        """
        outputs: list[_RowOutput | None] = [None] * len(rows)
        chunks = self._chunks(rows)
        wanted: dict[tuple[tuple[int, ...], int], set[int]] = {}
        for row in rows:
            if row.source is not None and row.source_layer not in states.get(row.source, {}):
                wanted.setdefault(row.source, set()).add(row.source_layer)
        vectors: list[Any] = []
        total = sum(row.max_new_tokens for row in rows)
        done = 0
        for number, chunk in enumerate(chunks):
            prefixes = (rows[k].target_ids[: rows[k].split] for k in chunk if rows[k].split)
            kv, captured = self._prefill(prefixes, wanted if number == 0 else {})
            if number == 0:
                for key, layers in captured.items():
                    states.setdefault(key, {}).update(layers)
                vectors = [
                    None if row.source is None else apply_mapping(row.mapping, states[row.source][row.source_layer], self.model.d_model)
                    for row in rows
                ]
            for k, out in zip(chunk, self._run_chunk([rows[k] for k in chunk], [vectors[k] for k in chunk], kv)):
                outputs[k] = out
            done += sum(rows[k].max_new_tokens for k in chunk)
            if progress is not None:
                progress(done, total)
        return [o for o in outputs if o is not None]

    def _run_chunk(self, rows: list[_Row], vectors: list[Any], prefixes: dict[tuple[int, ...], Any]) -> list[_RowOutput]:
        """The patched pass and greedy decoding of one chunk, rows sharing streams where they agree.

        `vectors[r]` is row r's mapped source state (None for a clean row); `prefixes` the prefill's
        keys/values of every prefix in the chunk.
        """
        import torch

        model, device = self.model, self.model.device
        dtype = next(model.hf.parameters()).dtype
        n = len(rows)
        pre_len = [r.split for r in rows]
        suf_len = [len(r.target_ids) - r.split for r in rows]
        lp, ls = max(pre_len), max(suf_len)
        width = lp + ls
        # Layout per row: [pad][prefix] | [pad][suffix]; every prompt ends in the same column.
        valid = torch.zeros(n, width, dtype=torch.bool, device=device)
        suffix_ids = torch.full((n, ls), model.pad_token_id, dtype=torch.long, device=device)
        suffix_pos = torch.zeros(n, ls, dtype=torch.long, device=device)
        patches: list[Patch] = []
        for r, row in enumerate(rows):
            valid[r, lp - pre_len[r]: lp] = True
            valid[r, width - suf_len[r]:] = True
            suffix_ids[r, ls - suf_len[r]:] = torch.tensor(row.target_ids[row.split:], device=device)
            suffix_pos[r, ls - suf_len[r]:] = torch.arange(row.split, len(row.target_ids), device=device)
            if vectors[r] is not None and row.patch_layer is not None:
                patches.append(Patch(r, row.patch_layer, ls - suf_len[r], vectors[r], row.strength))

        # Rows share a stream while they have seen the same tokens: at first, the same target.
        group_ids: dict[Any, int] = {}
        groups = [group_ids.setdefault((row.target_ids, row.split), len(group_ids)) for row in rows]
        patch_layers = [row.patch_layer if vectors[r] is not None else None for r, row in enumerate(rows)]
        plan = StreamPlan(range(n), groups, patch_layers, model.n_layers)
        stores = self._prefix_stores(rows, prefixes, plan, lp)

        # The patched pass: causal over valid keys; every query also sees itself (pads never go all-masked).
        cols = torch.arange(width, device=device)
        q_cols = cols[lp:]
        allowed = valid[:, None, :] & (cols[None, None, :] <= q_cols[None, :, None])
        allowed |= cols[None, None, :] == q_cols[None, :, None]
        # One layout for every row (a sweep's single target): one mask and one set of positions
        # broadcast over all streams, instead of one per stream.
        uniform = len({(row.split, len(row.target_ids)) for row in rows}) == 1
        first = torch.tensor(plan.reps[0], device=device)
        layout = first[:1] if uniform else first
        logits = forward_streams(
            model, plan, stores, suffix_ids[first], suffix_pos[layout], _float_mask(allowed[layout], dtype), patches
        ).float()
        scores = [self._scores(logits[plan.final[r]], row.score_ids) for r, row in enumerate(rows)]

        tokens: list[list[int]] = [[] for _ in range(n)]
        stopped_text: dict[int, str] = {}  # rows cut at a stop string
        last_pos = suffix_pos[:, -1]
        active = list(range(n))
        for step in range(max(row.max_new_tokens for row in rows)):
            best = logits.argmax(dim=-1).tolist()
            still = []
            for r in active:
                token, row = best[plan.final[r]], rows[r]
                finished = token in model.eos_token_ids
                if not finished:
                    tokens[r].append(token)
                    groups[r] = group_ids.setdefault((groups[r], token), len(group_ids))
                    if row.stop:  # decode only rows that can stop on text
                        text = model.decode(tokens[r])
                        cut = min((text.find(s) for s in row.stop if s in text), default=-1)
                        if cut >= 0:
                            stopped_text[r], finished = text[:cut], True
                    finished = finished or len(tokens[r]) >= row.max_new_tokens
                if not finished:
                    still.append(r)
            if not still:
                break
            active = still
            valid = torch.cat([valid, torch.ones(n, 1, dtype=torch.bool, device=device)], dim=1)
            last_pos = last_pos + 1
            previous, plan = plan, StreamPlan(active, groups, patch_layers, model.n_layers)
            for j, store in enumerate(stores):
                parent = plan.from_previous(previous, j)
                store.select(None if parent is None else torch.tensor(parent, device=device))
            first = torch.tensor(plan.reps[0], device=device)
            layout = first[:1] if uniform else first
            next_ids = torch.tensor([[tokens[r][-1]] for r in plan.reps[0]], device=device)
            logits = forward_streams(
                model, plan, stores, next_ids, last_pos[layout, None], _float_mask(valid[layout, None, :], dtype)
            )
        return [
            _RowOutput(tokens[r], stopped_text[r] if r in stopped_text else model.decode(tokens[r]), scores[r])
            for r in range(n)
        ]

    @staticmethod
    def _scores(logits: "torch.Tensor", token_ids: tuple[int, ...]) -> dict[int, tuple[float, int]]:
        """(log-probability, rank) of each requested token at the first generated step."""
        import torch

        if not token_ids:
            return {}
        logprobs = torch.log_softmax(logits, dim=-1)
        return {t: (float(logprobs[t]), int((logprobs > logprobs[t]).sum())) for t in token_ids}

    def _prefix_stores(self, rows: list[_Row], prefixes: dict[tuple[int, ...], Any], plan: StreamPlan, width: int) -> list[LayerKV]:
        """Each layer's key/value store for its streams, filled with their shared prefixes (left-padded)."""
        import torch

        if not width:
            return [LayerKV(None, None) for _ in range(self.model.n_layers)]
        order = {prefix: k for k, prefix in enumerate(prefixes)}
        stores = []
        for j in range(self.model.n_layers):
            keys, values = [], []
            for prefix in order:
                k, v = prefixes[prefix][j]
                pad = width - k.shape[-2]
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            keys.append(torch.zeros_like(keys[0]))  # rows patched at position 0 have no prefix
            values.append(torch.zeros_like(values[0]))
            index = []
            for r in plan.reps[j]:
                prefix = rows[r].target_ids[: rows[r].split]
                index.append(order[prefix] if prefix else len(order))
            pick = torch.tensor(index, device=self.model.device)
            stores.append(LayerKV(torch.cat(keys)[pick], torch.cat(values)[pick]))
        return stores


def build_rows(
    resolved: Sequence[ResolvedProbe], score_ids: Sequence[tuple[int, ...]] | None = None
) -> tuple[list[_Row], list[int], list[int]]:
    """Rows for the patched probes plus one clean row per distinct (target, budget, stop).

    Returns (rows, patched_row_of_probe, clean_row_of_probe).
    """
    # A clean row shares the prefix of the probes on the same target (the smallest split).
    split_of_target: dict[tuple[int, ...], int] = {}
    for rp in resolved:
        current = split_of_target.get(rp.target_ids, rp.target_index)
        split_of_target[rp.target_ids] = min(current, rp.target_index)

    rows: list[_Row] = []
    patched_rows, clean_rows = [], []
    clean_index: dict[tuple[Any, ...], int] = {}
    for k, rp in enumerate(resolved):
        scores = tuple(score_ids[k]) if score_ids else ()
        rows.append(
            _Row(
                target_ids=rp.target_ids,
                split=rp.target_index,
                patch_layer=rp.target_layer,
                source=(rp.source_ids, rp.source_index),
                source_layer=rp.layer,
                mapping=rp.probe.mapping,
                strength=float(rp.probe.strength),
                max_new_tokens=rp.probe.max_new_tokens,
                stop=rp.probe.stop,
                score_ids=scores,
            )
        )
        patched_rows.append(len(rows) - 1)
        key = (rp.target_ids, rp.probe.max_new_tokens, rp.probe.stop)
        if key not in clean_index:
            rows.append(
                _Row(
                    target_ids=rp.target_ids,
                    split=split_of_target[rp.target_ids],
                    max_new_tokens=rp.probe.max_new_tokens,
                    stop=rp.probe.stop,
                )
            )
            clean_index[key] = len(rows) - 1
        clean_rows.append(clean_index[key])
    return rows, patched_rows, clean_rows


def run_probes(
    engine: Engine,
    probes: Sequence[Probe],
    *,
    score_ids: Sequence[tuple[int, ...]] | None = None,
    source_states: SourceStates | None = None,
    progress: ProgressCallback | None = None,
) -> list[PatchResult]:
    """Resolve, validate and run `probes` as one batched job; results come back in order.

    Every probe is validated before anything runs, and every mapping is applied and checked right
    after the source pass, before any patched pass. Every hook goes when its pass ends, so bad
    input never leaves the model hooked.
    """
    import torch

    resolved = [resolve_probe(p, engine.model) for p in probes]
    with torch.no_grad():
        rows, patched, clean = build_rows(resolved, score_ids)
        states: SourceStates = {key: dict(value) for key, value in (source_states or {}).items()}
        outputs = engine.run_rows(rows, states, progress)
    return [
        PatchResult(
            probe=rp.probe,
            resolved=rp,
            text=outputs[patched[k]].text,
            clean_text=outputs[clean[k]].text,
            tokens=tuple(outputs[patched[k]].tokens),
            clean_tokens=tuple(outputs[clean[k]].tokens),
            scores=outputs[patched[k]].scores,
        )
        for k, rp in enumerate(resolved)
    ]

