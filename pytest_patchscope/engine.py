"""Patch + generate, batched and prefix-sharing. No pytest in here: it runs under `python -c`.

How a batch of probes runs:
1. Each distinct source prompt runs once; hooks on `blocks.{l}.hook_out` capture every layer a
   probe needs at its source position.
2. Target tokens before i* do not depend on the patch (attention is causal), so each distinct
   prefix T[:i*] runs once, unpatched, and its KV cache is shared by every row that uses it.
3. Each row then runs only T[i*:] (patched at its layer l*, through the bridge's hook points),
   all rows batched with a custom attention mask and explicit positions, so prompts of mixed
   lengths line up exactly as they would alone.
4. Greedy decoding continues on the plain HF KV cache with no hooks registered: later tokens see
   the patch only through the cache, as in the paper's code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .probe import Probe, ResolvedProbe, apply_mapping, resolve_probe

if TYPE_CHECKING:
    import torch

    from .models import PatchscopeModel

ProgressCallback = Callable[[int, int], None]
DEFAULT_BATCH_MEMORY_MB = 512


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
    vector: Any = None  # (d_model,) tensor; None = clean row
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

    # ---- sources -------------------------------------------------------------------------
    def capture(self, prompt_ids: Sequence[int], index: int, layers: Iterable[int]) -> dict[int, "torch.Tensor"]:
        """Hidden states after each of `layers` at token `index` of one source prompt, in one pass."""
        import torch

        wanted = sorted(set(layers))
        captured: dict[int, torch.Tensor] = {}

        def make_hook(layer: int) -> Callable[..., Any]:
            def hook(value: torch.Tensor, hook: Any) -> torch.Tensor:
                captured[layer] = value[0, index].detach().clone()
                return value

            return hook

        ids = torch.tensor([list(prompt_ids)], device=self.model.device)
        hooks = [(self.model.hook_name(layer), make_hook(layer)) for layer in wanted]
        with torch.no_grad(), self.model.bridge.hooks(fwd_hooks=hooks):
            self.model.hf(input_ids=ids, use_cache=False, logits_to_keep=1)
        return captured

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

    def run_rows(self, rows: list[_Row], progress: ProgressCallback | None = None) -> list[_RowOutput]:
        outputs: list[_RowOutput | None] = [None] * len(rows)
        chunks = self._chunks(rows)
        total = sum(rows[k].max_new_tokens for k in range(len(rows)))
        done = 0
        for chunk in chunks:
            for k, out in zip(chunk, self._run_chunk([rows[k] for k in chunk])):
                outputs[k] = out
            done += sum(rows[k].max_new_tokens for k in chunk)
            if progress is not None:
                progress(done, total)
        return [o for o in outputs if o is not None]

    def _prefix_caches(self, rows: list[_Row]) -> dict[tuple[int, ...], Any]:
        """One unpatched forward per distinct prefix; returns its per-layer (keys, values)."""
        import torch

        caches: dict[tuple[int, ...], Any] = {}
        for row in rows:
            prefix = row.target_ids[: row.split]
            if not prefix or prefix in caches:
                continue
            ids = torch.tensor([list(prefix)], device=self.model.device)
            out = self.model.plain(input_ids=ids, use_cache=True, logits_to_keep=1)
            caches[prefix] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return caches

    def _run_chunk(self, rows: list[_Row]) -> list[_RowOutput]:
        import torch
        from transformers import DynamicCache

        model, device = self.model, self.model.device
        dtype = next(model.hf.parameters()).dtype
        with torch.no_grad():
            prefixes = self._prefix_caches(rows)
            n = len(rows)
            pre_len = [r.split for r in rows]
            suf_len = [len(r.target_ids) - r.split for r in rows]
            lp, ls = max(pre_len), max(suf_len)
            width = lp + ls
            # Layout per row: [pad][prefix] | [pad][suffix]; every prompt ends in the same column.
            valid = torch.zeros(n, width, dtype=torch.bool, device=device)
            suffix_ids = torch.full((n, ls), model.pad_token_id, dtype=torch.long, device=device)
            suffix_pos = torch.zeros(n, ls, dtype=torch.long, device=device)
            patch_col = [0] * n
            for r, row in enumerate(rows):
                valid[r, lp - pre_len[r]: lp] = True
                valid[r, width - suf_len[r]:] = True
                suffix_ids[r, ls - suf_len[r]:] = torch.tensor(row.target_ids[row.split:], device=device)
                suffix_pos[r, ls - suf_len[r]:] = torch.arange(row.split, len(row.target_ids), device=device)
                patch_col[r] = ls - suf_len[r]
            cache = DynamicCache(config=model.hf.config)
            if lp:
                n_cache_layers = len(next(iter(prefixes.values())))
                for layer_idx in range(n_cache_layers):
                    keys, values = [], []
                    for row in rows:
                        prefix = row.target_ids[: row.split]
                        if prefix:
                            k, v = prefixes[prefix][layer_idx]
                        else:
                            k, v = _empty_like(prefixes, layer_idx)
                        pad = lp - k.shape[-2]
                        keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                        values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
                    cache.update(torch.cat(keys), torch.cat(values), layer_idx)

            # Suffix pass: causal over valid keys; every query also sees itself (pads never go all-masked).
            cols = torch.arange(width, device=device)
            q_cols = cols[lp:]
            allowed = valid[:, None, :] & (cols[None, None, :] <= q_cols[None, :, None])
            allowed |= cols[None, None, :] == q_cols[None, :, None]
            hooks = self._patch_hooks(rows, patch_col)
            with model.bridge.hooks(fwd_hooks=hooks):
                out = model.hf(
                    input_ids=suffix_ids,
                    attention_mask=_float_mask(allowed, dtype),
                    position_ids=suffix_pos,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            logits, cache = out.logits[:, -1].float(), out.past_key_values
            del out
            return self._decode(rows, logits, cache, valid, suffix_pos[:, -1])

    def _patch_hooks(self, rows: list[_Row], patch_col: list[int]) -> list[tuple[str, Callable[..., Any]]]:
        """One hook per patched layer: h <- (1 - s) * h + s * f(h_src) at each row's i*."""
        import torch

        by_layer: dict[int, list[int]] = {}
        for r, row in enumerate(rows):
            if row.vector is not None and row.patch_layer is not None:
                by_layer.setdefault(row.patch_layer, []).append(r)
        hooks = []
        for layer, members in sorted(by_layer.items()):
            idx = torch.tensor(members, device=self.model.device)
            col = torch.tensor([patch_col[r] for r in members], device=self.model.device)
            vectors = torch.stack([rows[r].vector for r in members]).to(self.model.device)
            strength = torch.tensor([rows[r].strength for r in members], device=self.model.device)[:, None]

            def hook(value: torch.Tensor, hook: Any, idx=idx, col=col, vectors=vectors, strength=strength) -> torch.Tensor:
                clean = value[idx, col]
                value[idx, col] = clean + strength.to(value.dtype) * (vectors.to(value.dtype) - clean)
                return value

            hooks.append((self.model.hook_name(layer), hook))
        return hooks

    def _decode(self, rows: list[_Row], logits: "torch.Tensor", cache: Any, valid: "torch.Tensor", last_pos: "torch.Tensor") -> list[_RowOutput]:
        """Greedy decoding on the HF KV cache, no hooks; finished rows leave the batch."""
        import torch

        model, device = self.model, self.model.device
        dtype = next(model.hf.parameters()).dtype
        n = len(rows)
        scores: list[dict[int, tuple[float, int]]] = []
        for r, row in enumerate(rows):
            row_scores = {}
            if row.score_ids:
                logprobs = torch.log_softmax(logits[r], dim=-1)
                for token in row.score_ids:
                    value = logprobs[token]
                    row_scores[token] = (float(value), int((logprobs > value).sum()))
            scores.append(row_scores)
        tokens: list[list[int]] = [[] for _ in range(n)]
        stopped_text: dict[int, str] = {}  # rows cut at a stop string
        active = list(range(n))  # original row index of each batch slot
        budget = max(row.max_new_tokens for row in rows)
        for step in range(budget):
            next_tokens = logits.argmax(dim=-1).tolist()
            keep = []
            for slot, r in enumerate(active):
                token = next_tokens[slot]
                row = rows[r]
                finished = token in model.eos_token_ids
                if not finished:
                    tokens[r].append(token)
                    if row.stop:  # decode only rows that can stop on text
                        text = model.decode(tokens[r])
                        cut = min((text.find(s) for s in row.stop if s in text), default=-1)
                        if cut >= 0:
                            stopped_text[r], finished = text[:cut], True
                    finished = finished or len(tokens[r]) >= row.max_new_tokens
                if not finished:
                    keep.append(slot)
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                valid, last_pos = valid[index], last_pos[index]
                next_tokens = [next_tokens[s] for s in keep]
                active = [active[s] for s in keep]
            if step == budget - 1:
                break
            valid = torch.cat([valid, torch.ones(len(active), 1, dtype=torch.bool, device=device)], dim=1)
            last_pos = last_pos + 1
            out = model.plain(
                input_ids=torch.tensor(next_tokens, device=device)[:, None],
                attention_mask=_float_mask(valid[:, None, :], dtype),
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits, cache = out.logits[:, -1], out.past_key_values
        return [
            _RowOutput(tokens[r], stopped_text[r] if r in stopped_text else model.decode(tokens[r]), scores[r])
            for r in range(n)
        ]


def _empty_like(prefixes: dict[tuple[int, ...], Any], layer_idx: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Zero-length keys/values shaped like another prefix's, for rows patched at position 0."""
    k, v = next(iter(prefixes.values()))[layer_idx]
    return k[..., :0, :], v[..., :0, :]


SourceStates = dict[tuple[tuple[int, ...], int], dict[int, Any]]
"""Hidden states already at hand: (source ids, source index) -> {layer: (d_model,) tensor}."""


def build_rows(
    engine: Engine,
    resolved: Sequence[ResolvedProbe],
    score_ids: Sequence[tuple[int, ...]] | None = None,
    source_states: SourceStates | None = None,
) -> tuple[list[_Row], list[int], list[int]]:
    """Rows for the patched probes plus one clean row per distinct (target, budget, stop).

    Source states not given in `source_states` are captured (one pass per source prompt).
    Returns (rows, patched_row_of_probe, clean_row_of_probe).
    """
    model = engine.model
    states: SourceStates = {key: dict(value) for key, value in (source_states or {}).items()}
    needed: dict[tuple[tuple[int, ...], int], set[int]] = {}
    for rp in resolved:
        needed.setdefault((rp.source_ids, rp.source_index), set()).add(rp.layer)
    for (ids, index), layers in needed.items():
        missing = layers - states.get((ids, index), {}).keys()
        if missing:
            states.setdefault((ids, index), {}).update(engine.capture(ids, index, missing))

    # A clean row shares the prefix of the probes on the same target (the smallest split).
    split_of_target: dict[tuple[int, ...], int] = {}
    for rp in resolved:
        current = split_of_target.get(rp.target_ids, rp.target_index)
        split_of_target[rp.target_ids] = min(current, rp.target_index)

    rows: list[_Row] = []
    patched_rows, clean_rows = [], []
    clean_index: dict[tuple[Any, ...], int] = {}
    for k, rp in enumerate(resolved):
        vector = apply_mapping(rp.probe.mapping, states[(rp.source_ids, rp.source_index)][rp.layer], model.d_model)
        scores = tuple(score_ids[k]) if score_ids else ()
        rows.append(
            _Row(
                target_ids=rp.target_ids,
                split=rp.target_index,
                patch_layer=rp.target_layer,
                vector=vector,
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

    Every probe is validated (and every mapping applied and checked) before any hook is added,
    so bad input never leaves the model hooked.
    """
    import torch

    resolved = [resolve_probe(p, engine.model) for p in probes]
    with torch.no_grad():
        rows, patched, clean = build_rows(engine, resolved, score_ids, source_states)
        outputs = engine.run_rows(rows, progress)
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

