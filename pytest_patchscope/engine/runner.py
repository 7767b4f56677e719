"""Patch + generate, batched and prefix-sharing. No pytest in here: it runs under `python -c`.

How a batch of probes runs (on the plain HF twin, which shares every weight with the bridge):
1. One opening pass. Target tokens before i* do not depend on the patch (attention is causal), so
   each distinct prefix T[:i*] runs once and every row that uses it sees its keys/values. The
   prefixes, the source prompts whose states are needed and each row's own tokens T[i*:] are laid
   end to end with a mask under which each sees only what it would alone, so the weights stream
   through memory once for all of them. The rows run in streams (see `streams`): together at every
   layer where they cannot differ yet, branching off right after their patch layer, where the source
   state, captured lower in the same pass, is written.
2. Decoding needs no patch: later tokens see it only through the keys/values, as in the paper's
   code. Streams go on sharing while rows generate the same tokens. A row picks its tokens greedily
   or samples them with its own generator (see `decoding`); a probe's extra samples and its
   candidates (teacher-forced answers, scored token by token) are rows of its family, which share
   its opening pass and keys/values and branch off only where their tokens differ.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, cast

from pytest_patchscope.engine import general
from pytest_patchscope.engine.decode import degeneration, first_step_scores, next_token, row_generator, token_rank
from pytest_patchscope.engine.finite import finite, first_non_finite, model_overflow, source_overflow
from pytest_patchscope.engine.resolve import ResolvedProbe, apply_mapping, resolve_probe
from pytest_patchscope.engine.results import PatchResult
from pytest_patchscope.engine.rows import Row, RowOutput, SourceStates, StateKey, build_rows, family_roots, probe_result, source_model_key
from pytest_patchscope.engine.streams import (
    Capture,
    LayerKV,
    PackedLayout,
    Patch,
    Span,
    StreamPlan,
    forward_opening,
    forward_streams,
    overflow_error,
)
from pytest_patchscope.errors import EngineError, ProbeConfigError
from pytest_patchscope.model.sites import DEFAULT_SITE, locate_site
from pytest_patchscope.probes.probe import Probe, mapping_name
from pytest_patchscope.progress import ProgressCallback
from pytest_patchscope.validation import check_int

if TYPE_CHECKING:
    import torch

    from pytest_patchscope.model.loading import PatchscopeModel

DEFAULT_BATCH_MEMORY_MB = 512
DEFAULT_MAX_NEW_TOKENS_LIMIT = 1024
"""Default sanity bound on a probe's max_new_tokens: a typo such as 10**7 fails fast instead of running for days."""
PACK_TOKENS = 512
"""Longest packed row of the opening pass (unless one unit is longer): bounds its T x T mask."""


def _float_mask(allowed: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class Engine:
    """Runs rows (target prompt + optional patch) in memory-bounded, prefix-sharing batches.

    `max_new_tokens_limit` bounds every probe's max_new_tokens (checked when probes are resolved).
    """

    def __init__(
        self, model: "PatchscopeModel", *, batch_memory_mb: float = DEFAULT_BATCH_MEMORY_MB,
        max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
    ) -> None:
        self.model = model
        self.batch_memory_mb = batch_memory_mb
        self.max_new_tokens_limit = max_new_tokens_limit

    # ---- the opening pass: prefixes, source prompts and patched spans, packed -----------------
    def capture(self, prompt_ids: Sequence[int], index: int, layers: Iterable[int], site: str = DEFAULT_SITE) -> dict[int, "torch.Tensor"]:
        """The site's values in each of `layers` (resid_post: `blocks.{l}.hook_resid_post`) at token `index` of one prompt."""
        return self.capture_many([(prompt_ids, index)], layers, site)[0]

    def capture_many(
        self, requests: Sequence[tuple[Sequence[int], int]], layers: Iterable[int], site: str = DEFAULT_SITE
    ) -> list[dict[int, "torch.Tensor"]]:
        """`capture` for many (prompt ids, token index) pairs in one packed opening pass; each prompt
        runs once however many of its positions are asked for. The caller bounds the batch."""
        import torch

        if self.model.path == "general":
            return general.capture_many(self.model, requests, sorted(set(layers)), site, self.batch_memory_mb)
        locate_site(self.model, site)
        keys = [(tuple(ids), index % len(ids), site, "") for ids, index in requests]
        wanted = {key: set(layers) for key in keys}
        states: SourceStates = {}
        with torch.no_grad():
            self._opening([], wanted, states, None)
        return [states[key] for key in keys]

    def _opening(
        self, rows: list[Row], wanted: dict[StateKey, set[int]], states: SourceStates,
        vector_of: Callable[[int], Any] | None, layer_done: Callable[[int], None] | None = None,
    ) -> tuple[StreamPlan, list[int], dict[Any, int], "torch.Tensor | None", list[LayerKV], int, int, list[int]]:
        """One pass over every shared prefix, every source prompt in `wanted` and every row's T[split:].

        Packed end to end into rows of at most PACK_TOKENS tokens, each segment sees only itself and
        each row's span its own prefix, so everything computes what it would alone; the weights stream
        through memory once. Fills `states`, writes the patches (`vector_of(r)` gives row r's vector),
        and returns the stream plan, the rows' groups, the logits per final stream and each layer's
        keys/values per stream, laid out [pad][prefix][pad][span] with the two widths, and each row's root.
        """
        segments, spans, shard_of, n_packed = self._pack(rows, wanted)
        segment_of: dict[tuple[int, ...], int] = {}
        for k, (ids, _) in enumerate(segments):
            segment_of.setdefault(ids, k)

        # Rows share a stream while they have seen the same tokens: at first, the same target and shard.
        group_ids: dict[Any, int] = {}
        groups = [group_ids.setdefault((row.target_ids, row.split, shard_of[r]), len(group_ids)) for r, row in enumerate(rows)]
        roots = family_roots(rows)
        plan = StreamPlan(range(len(rows)), groups, [row.branch_stage for row in rows], self.model.n_layers, roots)
        layout = PackedLayout(plan, spans, segments, n_packed)
        captures: dict[tuple[int, str], list[Capture]] = {}
        locations = {row.location.site.name: row.location for row in rows if row.location is not None}
        for key, layers in wanted.items():
            locations.setdefault(key[2], locate_site(self.model, key[2]))
            for layer in layers:
                captures.setdefault((layer, key[2]), []).append((key, segment_of[key[0]], key[1]))
        patches = [
            Patch(r, row.patch_layer, row.location, row.offsets, partial(vector_of, r), row.strength,
                  row.location.columns(row.units), mapping_name(row.mapping))
            for r, row in enumerate(rows)
            if row.sources and row.parent is None and row.patch_layer is not None and row.location is not None and vector_of is not None
        ]
        logits, kv, written = forward_opening(self.model, layout, captures, states, patches, list(locations.values()), layer_done)
        # A patch that is silently not written (or written twice) would pass for a probe that
        # found nothing: every patched row must have been written exactly once.
        for r, row in enumerate(rows):
            if row.sources and row.parent is None and written.get(r, 0) != 1:
                assert row.location is not None and row.patch_layer is not None  # every patched row has both
                raise EngineError(
                    f"the patch of row {r} (at {row.location.site.hook_name(row.patch_layer)}) was written "
                    f"{written.get(r, 0)} times in the opening pass instead of once"
                )
        prefix_width = max((row.split for row in rows), default=0)
        span_width = max((len(row.target_ids) - row.split for row in rows), default=0)
        stores = [layout.stream_kv(j, kv[j], prefix_width, span_width) for j in range(self.model.n_layers)] if rows else []
        return plan, groups, group_ids, logits, stores, prefix_width, span_width, roots

    @staticmethod
    def _pack(
        rows: list[Row], wanted: dict[StateKey, set[int]]
    ) -> tuple[list[tuple[tuple[int, ...], int]], dict[int, Span], list[int], int]:
        """Lay out the opening pass: (segment, packed row) list, each row's span, its shard, packed rows.

        A prefix and the spans that see it must share a packed row; when their spans grow longer
        than another copy of the prefix (or the PACK_TOKENS budget), the rest go to a new shard with
        its own copy. Source prompts that are not already a prefix are segments of their own. A row
        with a parent has no span of its own: it computes in its parent's stream.
        """
        units: list[tuple[tuple[int, ...], list[int]]] = []
        by_prefix: dict[Any, list[int]] = {}
        for r, row in enumerate(rows):
            if row.parent is not None:
                continue
            by_prefix.setdefault(row.target_ids[: row.split] or ("no prefix", row.target_ids), []).append(r)
        for members in by_prefix.values():
            prefix = rows[members[0]].target_ids[: rows[members[0]].split]
            budget = max(PACK_TOKENS - len(prefix), len(prefix))
            shard: list[int] = []
            spans_length = 0
            for r in members:
                length = len(rows[r].target_ids) - rows[r].split
                if shard and spans_length + length > budget:
                    units.append((prefix, shard))
                    shard, spans_length = [], 0
                shard.append(r)
                spans_length += length
            units.append((prefix, shard))
        prefixes = {prefix for prefix, _ in units}
        units += [(ids, []) for ids in dict.fromkeys(key[0] for key in wanted) if ids not in prefixes]

        size = [len(prefix) + sum(len(rows[r].target_ids) - rows[r].split for r in members) for prefix, members in units]
        cap = max([PACK_TOKENS, *size])
        fill: list[int] = []
        segments: list[tuple[tuple[int, ...], int]] = []
        spans: dict[int, Span] = {}
        shard_of = [0] * len(rows)
        for number, ((prefix, members), used) in enumerate(zip(units, size)):
            packed = next((k for k, taken in enumerate(fill) if taken + used <= cap), len(fill))
            if packed == len(fill):
                fill.append(0)
            fill[packed] += used
            if prefix:
                segments.append((prefix, packed))
            for r in members:
                row = rows[r]
                spans[r] = Span(row.target_ids[row.split:], row.split, packed, len(segments) - 1 if prefix else None)
                shard_of[r] = number
        for r, row in enumerate(rows):
            if row.parent is not None:
                spans[r], shard_of[r] = spans[row.parent], shard_of[row.parent]
        return segments, spans, shard_of, len(fill)

    # ---- batching --------------------------------------------------------------------------
    def _row_bytes(self, row: Row) -> int:
        """A generous estimate of one row's peak memory: KV cache, activations, masks and logits.

        Values are in the model's dtype, except the logits (float32 once scored). The opening pass
        keeps one float (W x W) mask per stage (n_layers + 1 at most) and attention window over
        packed rows of width W <= max(PACK_TOKENS, one unit); a row's tokens t (source + target,
        counted as if shared with nothing) take at most t * W of each. A row with a parent computes
        in its parent's stream there, so only its own keys/values, decoding and logits count.
        """
        cfg = self.model.hf.config
        element = next(self.model.hf.parameters()).dtype.itemsize
        # Config fields are untyped; head counts are ints whenever present.
        heads = cast(int, getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 1))
        head_dim = getattr(cfg, "head_dim", None) or self.model.d_model // max(1, getattr(cfg, "num_attention_heads", 1))
        length = len(row.target_ids) + row.max_new_tokens
        kv = 2 * self.model.n_layers * heads * head_dim * length
        inter = getattr(cfg, "intermediate_size", None) or 4 * self.model.d_model
        suffix = 1 if row.parent is not None else len(row.target_ids) - row.split
        activations = suffix * (8 * self.model.d_model + 3 * inter) + length * getattr(cfg, "num_attention_heads", 1) * 2
        logits = 3 * cfg.vocab_size
        if row.parent is not None:
            return element * (kv + activations) + 4 * logits
        tokens = len(row.target_ids) + sum(len(ids) for ids in dict.fromkeys(key[0] for key in row.sources))
        architecture = self.model.architecture
        per_head = architecture.alibi_heads if architecture.alibi_in_mask else 1  # Falcon's ALiBi masks are per head
        masks = (self.model.n_layers + 1) * len(architecture.distinct_windows) * per_head * tokens * max(PACK_TOKENS, tokens)
        return element * (kv + activations + masks) + 4 * logits

    def _chunks(self, rows: list[Row]) -> list[list[int]]:
        """Row indices grouped so that each chunk's estimated memory stays under the limit.

        A row and its samples and candidates (its family) always share a chunk, parent first.
        Families are ordered by (prefix, length) so that rows sharing a prefix land in one chunk. A
        family that alone needs more than the limit is a ProbeConfigError (raised before anything runs).
        """
        families: dict[int, list[int]] = {}
        for k, root in enumerate(family_roots(rows)):
            families.setdefault(root, []).append(k)
        order = sorted(families, key=lambda k: (rows[k].target_ids[: rows[k].split], len(rows[k].target_ids)))
        budget = self.batch_memory_mb * 2**20
        chunks: list[list[int]] = []
        current: list[int] = []
        used = 0
        for root in order:
            members = families[root]
            cost = sum(self._row_bytes(rows[k]) for k in members)
            if cost > budget:
                row = rows[root]
                family = f", with its {len(members) - 1} samples and candidates" if len(members) > 1 else ""
                raise ProbeConfigError(
                    "batch_memory_mb", self.batch_memory_mb,
                    f"at least {cost / 2**20:.2f} MB: one row of this probe (a {len(row.target_ids)}-token target, "
                    f"max_new_tokens={row.max_new_tokens}{family}) needs that much",
                    "Raise batch_memory_mb, or shorten the prompts or max_new_tokens.",
                )
            if current and used + cost > budget:
                chunks.append(current)
                current, used = [], 0
            current += members
            used += cost
        if current:
            chunks.append(current)
        return chunks

    def run_rows(self, rows: list[Row], states: SourceStates, progress: ProgressCallback | None = None) -> list[RowOutput]:
        """Run `rows` chunk by chunk; `states` holds known source states and gains those captured.

        The first chunk's opening pass also captures every missing source state of the whole job,
        and every mapping is applied (and checked) before a second chunk runs. A model on the
        general path runs them through its own `generate` instead (see `general`).
        """
        if self.model.path == "general":
            return general.run_rows(self.model, rows, states, progress, self.batch_memory_mb)
        if not rows:
            return []
        outputs: list[RowOutput | None] = [None] * len(rows)
        chunks = self._chunks(rows)
        wanted: dict[StateKey, set[int]] = {}
        for row in rows:
            for key in row.sources:
                if row.source_layer not in states.get(key, {}):
                    wanted.setdefault(key, set()).add(row.source_layer)
        # A patch is written in its target layer; a value from a higher source layer must exist by then.
        if any(key in wanted and rows[k].source_layer > (rows[k].patch_layer or 0) for k in chunks[0] for key in rows[k].sources):
            self._opening([], wanted, states, None)
            wanted = {}
        vectors: dict[int, Any] = {}

        def vector_of(k: int) -> Any:
            """Row k's mapped source values, one (width,) row per target offset."""
            import torch

            if k not in vectors:
                row = rows[k]
                assert row.location is not None  # only patched rows have vectors
                for key in row.sources:
                    if not finite(states[key][row.source_layer]):
                        raise _NonFiniteSource(key, row.source_layer, row.location.site.hook_name(row.source_layer))
                mapped = [apply_mapping(row.mapping, states[key][row.source_layer], row.location.shape) for key in row.sources]
                flat = torch.stack([m.reshape(-1) for m in mapped])
                vectors[k] = flat.expand(len(row.offsets), -1) if len(mapped) == 1 else flat
            return vectors[k]

        total = sum(1 for row in rows if row.sources and row.parent is None)  # one patched row per probe
        done = 0
        if progress is not None:
            progress(0, total)
        for number, chunk in enumerate(chunks):

            def chunk_vector(r: int, chunk: list[int] = chunk) -> Any:
                return vector_of(chunk[r])

            probes_in_chunk = sum(1 for k in chunk if rows[k].sources and rows[k].parent is None)
            local = {k: i for i, k in enumerate(chunk)}
            chunk_rows = [row if row.parent is None else replace(row, parent=local[row.parent]) for row in (rows[k] for k in chunk)]

            def step_done(fraction: float, before: int = done, size: int = probes_in_chunk) -> None:
                if progress is not None and size:
                    progress(before + size * min(fraction, 1.0), total)

            try:
                results = self._run_chunk(chunk_rows, wanted if number == 0 else {}, states, chunk_vector, step_done)
                for k, out in zip(chunk, results):
                    outputs[k] = out
                if number == 0:
                    for k, row in enumerate(rows):
                        if row.sources and row.parent is None:
                            vector_of(k)
            except _NonFiniteSource as bad:  # told here, once the pass's hooks are gone
                raise source_overflow(self.model, bad.key, bad.hook_name) from None
            done += probes_in_chunk
            if progress is not None and probes_in_chunk:  # a chunk of clean rows only would read as done == 0: a new job
                progress(done, total)
        return [o for o in outputs if o is not None]

    def _run_chunk(
        self, rows: list[Row], wanted: dict[StateKey, set[int]], states: SourceStates, vector_of: Callable[[int], Any],
        step_done: Callable[[float], None],
    ) -> list[RowOutput]:
        """The opening pass and decoding of one chunk, rows sharing streams where they agree.

        `step_done(fraction)` is told after the opening pass and after every decoding step."""
        import torch

        model, device = self.model, self.model.device
        dtype = next(model.hf.parameters()).dtype
        n = len(rows)
        steps = max(len(row.forced) or row.max_new_tokens for row in rows)
        n_layers = model.n_layers

        def layer_done(j: int) -> None:  # the opening pass counts as one step
            step_done((j + 1) / n_layers / (steps + 1))

        plan, groups, group_ids, logits, stores, lp, ls, roots = self._opening(rows, wanted, states, vector_of, layer_done)
        logits = logits.float()  # type: ignore[union-attr]
        self._check_finite(logits, plan, rows, roots, None, dtype)
        scores = [first_step_scores(logits[plan.final[r]], row.score_ids) for r, row in enumerate(rows)]

        # Decoding layout per row: [pad][prefix] | [pad][suffix] | new tokens; every prompt ends in one column.
        valid = torch.zeros(n, lp + ls, dtype=torch.bool, device=device)
        key_pos = torch.zeros(n, lp + ls, dtype=torch.long, device=device)  # each key's position in its prompt
        for r, row in enumerate(rows):
            suffix = len(row.target_ids) - row.split
            valid[r, lp - row.split: lp] = True
            valid[r, lp + ls - suffix:] = True
            key_pos[r, lp - row.split: lp] = torch.arange(row.split)
            key_pos[r, lp + ls - suffix:] = torch.arange(row.split, len(row.target_ids))
        last_pos = torch.tensor([len(row.target_ids) - 1 for row in rows], device=device)
        windows = model.architecture.distinct_windows
        # One layout for every row (a sweep's single target): one mask and one set of positions
        # broadcast over all streams, instead of one per stream.
        uniform = len({(row.split, len(row.target_ids)) for row in rows}) == 1
        branch_stages = [row.branch_stage for row in rows]

        tokens: list[list[int]] = [[] for _ in range(n)]
        stopped_text: dict[int, str] = {}  # rows cut at a stop string
        generators = [row_generator(row.decoding, row.sample, logits.device) for row in rows]  # the LM head's device
        forced_logprobs: list[list[float]] = [[] for _ in range(n)]
        first_rank: list[int | None] = [None] * n
        active = [r for r, row in enumerate(rows) if row.forced or row.max_new_tokens > 0]
        for step in range(steps):
            if not active:
                break
            plain = any(not rows[r].forced and not rows[r].decoding.processes_logits for r in active)
            best = logits.argmax(dim=-1).tolist() if plain else []
            logprobs = torch.log_softmax(logits.float(), dim=-1) if any(rows[r].forced for r in active) else None
            still = []
            for r in active:
                row, stream = rows[r], plan.final[r]
                if row.forced:  # a candidate: feed its next token, keep that token's log-probability
                    assert logprobs is not None  # computed whenever a forced row is active
                    token = row.forced[len(tokens[r])]
                    value = logprobs[stream, token]
                    forced_logprobs[r].append(float(value))
                    if first_rank[r] is None:
                        first_rank[r] = token_rank(logprobs[stream], token)
                    tokens[r].append(token)
                    groups[r] = group_ids.setdefault((groups[r], token), len(group_ids))
                    if len(tokens[r]) < len(row.forced):  # the last token's log-probability needs no pass
                        still.append(r)
                    continue
                if row.decoding.processes_logits:
                    token = next_token(logits[stream].float(), [*row.target_ids, *tokens[r]], row.decoding, generators[r])
                else:
                    token = best[stream]
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
            key_pos = torch.cat([key_pos, last_pos[:, None]], dim=1)
            previous, plan = plan, StreamPlan(active, groups, branch_stages, model.n_layers, roots)
            for j, store in enumerate(stores):
                parent = plan.from_previous(previous, j)
                store.select(None if parent is None else torch.tensor(parent, device=device))
            final = torch.tensor(plan.reps[-1], device=device)
            layout = final[:1] if uniform else final
            next_ids = torch.tensor([[tokens[r][-1]] for r in plan.reps[-1]], device=device)
            seen: dict[int | None, torch.Tensor] = {None: valid[layout, None, :]}
            for window in windows:
                if window is not None:
                    seen[window] = seen[None] & (last_pos[layout, None, None] - key_pos[layout, None, :] < window)
            masks = {window: _float_mask(allowed, dtype) for window, allowed in seen.items()}
            logits = forward_streams(model, plan, stores, next_ids, last_pos[layout, None], masks, key_pos[layout])
            self._check_finite(logits, plan, rows, roots, tokens, dtype)
            step_done((step + 2) / (steps + 1))
        outputs = []
        for r, row in enumerate(rows):
            text = stopped_text[r] if r in stopped_text else model.decode(tokens[r])
            flag = None if row.forced else degeneration(tokens[r], model.decode)
            outputs.append(RowOutput(tokens[r], text, scores[r], forced_logprobs[r], first_rank[r], flag))
        return outputs

    def _check_finite(
        self, logits: "torch.Tensor", plan: StreamPlan, rows: list[Row], roots: list[int], generated: list[list[int]] | None,
        dtype: "torch.dtype",
    ) -> None:
        """A pass's logits must be finite: NaN scores and the argmax of NaN logits would pass for a
        verdict. One reduction per pass (a sum, which is NaN/inf whenever a value is); on failure a
        plain forward over the first bad row's tokens tells the model's own overflow (a ModelLoadError
        naming where) from a patch that drives the layers after it to NaN/inf (a ProbeConfigError)."""
        import torch

        if finite(logits):
            return
        bad = set((~torch.isfinite(logits)).any(dim=-1).nonzero().flatten().tolist())
        r = next(r for r in plan.rows if plan.final[r] in bad)
        ids = (*rows[r].target_ids, *(generated[r] if generated else ()))
        where = first_non_finite(self.model, ids)
        if where is not None:
            raise model_overflow(self.model, ids, where, locate=False)
        root = rows[roots[r]]
        if root.sources and root.location is not None and root.patch_layer is not None:
            hook_name = root.location.site.hook_name(root.patch_layer)
            raise overflow_error(root.strength, mapping_name(root.mapping), hook_name, dtype, downstream=True)
        raise EngineError(f"the logits of row {r} are NaN/inf, although a plain forward over its tokens stays finite")


class _NonFiniteSource(Exception):
    """A source state is NaN/inf. Raised inside a pass (where a source value is mapped) and told as a
    ModelLoadError once the pass's hooks are gone, since naming where it overflows runs the model again."""

    def __init__(self, key: StateKey, layer: int, hook_name: str) -> None:
        super().__init__(hook_name)
        self.key, self.layer, self.hook_name = key, layer, hook_name


def _capture_other_models(resolved: Sequence[ResolvedProbe], states: SourceStates, batch_memory_mb: float) -> None:
    """Source values of probes whose source runs on another model (the paper's M != M*): one packed
    capture pass per (source model, site) on that model's own engine, before the target job runs."""
    requests: dict[tuple[str, str], tuple["PatchscopeModel", dict[tuple[tuple[int, ...], int], set[int]]]] = {}
    for rp in resolved:
        if rp.source_model is None:
            continue
        site = rp.location.site.name
        _, wanted = requests.setdefault((source_model_key(rp.source_model), site), (rp.source_model, {}))
        for index in rp.source_indices:
            wanted.setdefault((rp.source_ids, index), set()).add(rp.layer)
    for (origin, site), (model, wanted) in requests.items():
        pending = [(request, layers) for request, layers in wanted.items() if not layers <= set(states.get((*request, site, origin), {}))]
        if not pending:
            continue
        layers = sorted(set().union(*(layers for _, layers in pending)))
        captured = Engine(model, batch_memory_mb=batch_memory_mb).capture_many([request for request, _ in pending], layers, site)
        for (request, _), values in zip(pending, captured):
            states.setdefault((*request, site, origin), {}).update(values)


def run_probes(
    engine: Engine,
    probes: Sequence[Probe],
    *,
    score_ids: Sequence[tuple[int, ...]] | None = None,
    source_states: SourceStates | None = None,
    progress: ProgressCallback | None = None,
    clean: bool = True,
) -> list[PatchResult]:
    """Resolve, validate and run `probes` as one batched job; results come back in order.

    Every probe is validated before anything runs, and every mapping is applied and checked in the
    first chunk's opening pass, before any other chunk runs. Every hook goes when its pass ends, so
    bad input never leaves the model hooked. `clean=False` skips the unpatched continuations.
    An empty list is an empty job: no results (a property over no probes holds).
    """
    import torch

    if isinstance(probes, (str, bytes, Probe)) or not isinstance(probes, Iterable):
        hint = "Wrap one probe in a list: run([probe])." if isinstance(probes, Probe) else None
        raise ProbeConfigError("probes", probes, "a list of Probe objects (see Patchscope.probe)", hint)
    resolved = [resolve_probe(p, engine.model, max_new_tokens_limit=engine.max_new_tokens_limit) for p in probes]
    if not resolved:
        return []
    with torch.no_grad():
        rows, placed = build_rows(resolved, score_ids, clean=clean)
        states: SourceStates = {key: dict(value) for key, value in (source_states or {}).items()}
        _capture_other_models(resolved, states, engine.batch_memory_mb)
        outputs = engine.run_rows(rows, states, progress)
    return [probe_result(rp, where, outputs, engine.model.path) for rp, where in zip(resolved, placed)]


def run_unpatched(engine: Engine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[str]:
    """The model's own greedy continuation of each prompt (token ids), as text: the clean rows of a
    job with no probes, batched like any job (e.g. the paper's "does the model know this fact" filter)."""
    import torch

    if not prompts or any(not ids for ids in prompts):
        raise ProbeConfigError("prompts", [list(ids) for ids in prompts][:3], "a non-empty list of non-empty token-id prompts")
    check_int("max_new_tokens", max_new_tokens, 1, engine.max_new_tokens_limit)
    rows = [Row(target_ids=tuple(ids), split=len(ids) - 1, max_new_tokens=max_new_tokens) for ids in prompts]
    with torch.no_grad():
        return [output.text for output in engine.run_rows(rows, {})]
