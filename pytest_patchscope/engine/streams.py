"""Shared-trunk execution: rows compute together at every layer where they cannot differ yet.

A row patched after layer l* has exactly the clean hidden states and keys/values at layers 0..l*:
the patch reaches no earlier layer, and attention is causal. So at layer j, all rows on one target
whose patch comes at or after j, and which have generated the same tokens so far, compute the same
thing. Each layer therefore runs once per *stream*: one per distinct (target, tokens so far) among
those rows, plus one per row whose patch lies below j. A row's stream branches off its trunk right
after its patch layer, which is where the patch is written.

In a layer sweep this halves the work on T[i*:] in the opening pass and cuts every decoding step
by the rows whose texts agree so far. Only what a layer sees together changes; each stream's
arithmetic is that of the row alone, so results equal the probe run by itself.

Two mechanics, both hooks on the plain HF twin's decoder layers that are removed when the pass ends:
- The opening pass (`forward_opening`) packs everything into few sequences (`PackedLayout`): shared
  prefixes and source prompts as segments, then one span of T[i*:] per stream. A pre-hook gives each
  layer its stage's mask and positions; a hook after it captures source states, copies spans to the
  next stage's streams and writes the patches placed there.
- A decoding pass (`forward_streams`) has one sequence per stream: a pre-hook gives each layer its
  own streams' key/value store, and a hook after it widens its output to the next layer's streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pytest_patchscope.errors import EngineError, ProbeConfigError
from pytest_patchscope.model.backend import layer_signature
from pytest_patchscope.model.devices import module_device
from pytest_patchscope.model.sites import SiteLocation, locate_site

if TYPE_CHECKING:
    import torch

    from pytest_patchscope.model.loading import PatchscopeModel

PER_SEQUENCE_KWARGS = ("position_ids", "position_embeddings")
"""Decoder-layer arguments with one entry per sequence, narrowed to a layer's streams (the mask is set apart)."""


class LayerKV:
    """One layer's keys and values for its current streams; the attention module appends to it."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: "torch.Tensor | None", values: "torch.Tensor | None") -> None:
        self.keys, self.values = keys, values

    def update(self, keys: "torch.Tensor", values: "torch.Tensor", *args: Any, **kwargs: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        """The HF `Cache.update` call every attention module makes: append, return everything."""
        import torch

        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            assert self.values is not None  # keys and values are always set together
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        return self.keys, self.values

    def select(self, index: "torch.Tensor | None") -> None:
        """Keep (and repeat) streams by index: a trunk that splits hands its history to each branch."""
        if index is not None and self.keys is not None:
            assert self.values is not None  # keys and values are always set together
            index = index.to(self.keys.device)
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)


class StreamPlan:
    """Which rows share a stream at each stage: stage j is the input of layer j, stage L the final norm.

    `groups[r]` names what row r has seen so far (its target and generated tokens); rows of one group
    share a stream at stage j unless r's patch reaches stage j (`branch_stages[r] <= j`: a patch after
    block l reaches stage l + 1, one inside block l reaches stage l). From there on, r shares only
    with rows of the same group that carry the same patch: those whose `roots` entry is r's (a
    probe's samples and candidates, rooted at the probe's own row).
    """

    def __init__(
        self, rows: Sequence[int], groups: Sequence[int], branch_stages: Sequence[int | None], n_layers: int,
        roots: Sequence[int] | None = None,
    ) -> None:
        self.rows = list(rows)
        self.stream_of: list[dict[int, int]] = []
        self.reps: list[list[int]] = []  # a representative row of every stream
        branch_at = {stage for stage in [branch_stages[r] for r in self.rows] if stage is not None}
        for stage in range(n_layers + 1):
            if stage and stage not in branch_at:
                self.stream_of.append(self.stream_of[-1])
                self.reps.append(self.reps[-1])
                continue
            streams: dict[Any, int] = {}
            of: dict[int, int] = {}
            reps: list[int] = []
            for r in self.rows:
                branch = branch_stages[r]
                patched = branch is not None and branch <= stage
                key: Any = ("patched", r if roots is None else roots[r], groups[r]) if patched else groups[r]
                if key not in streams:
                    streams[key] = len(reps)
                    reps.append(r)
                of[r] = streams[key]
            self.stream_of.append(of)
            self.reps.append(reps)

    @property
    def final(self) -> dict[int, int]:
        """Row -> its stream at the final norm, i.e. its row of the logits."""
        return self.stream_of[-1]

    def widen(self, stage: int) -> list[int] | None:
        """Index from stage-1's streams into stage's (None where they are the same)."""
        if self.reps[stage] is self.reps[stage - 1]:
            return None
        return [self.stream_of[stage - 1][r] for r in self.reps[stage]]

    def from_final(self, stage: int) -> list[int] | None:
        """Index from the final streams (a decoding pass's inputs) into stage's (None where the same).

        Streams only split as stages rise, so any final stream of a row stands for that row's stream
        at every lower stage: the same tokens so far, the same positions."""
        index = [self.final[r] for r in self.reps[stage]]
        return None if index == list(range(len(self.reps[-1]))) else index

    def from_previous(self, previous: "StreamPlan", stage: int) -> list[int] | None:
        """Index from the previous step's streams at stage into this step's (None where the same)."""
        index = [previous.stream_of[stage][r] for r in self.reps[stage]]
        return None if index == list(range(len(previous.reps[stage]))) else index


@dataclass(frozen=True)
class Patch:
    """v <- (1 - strength) * v + strength * vector(), at a site of block `layer`, at span tokens `offsets` of `row`.

    `vector` is called when the patch is written, giving one (width,) row per offset: the source
    state it maps may be captured in the same pass, at this layer or below. Only `units` (columns of
    the site's flattened vector, see `SiteLocation.columns`; None = all) are written. `mapping` names
    f for messages.
    """

    row: int
    layer: int
    location: SiteLocation
    offsets: tuple[int, ...]
    vector: Callable[[], Any]
    strength: float
    units: tuple[int, ...] | None = None
    mapping: str = "identity"


Capture = tuple[Any, int, int]
"""(state key, segment, token index): a source value to keep from the opening pass."""


@dataclass(frozen=True)
class Span:
    """A row's own tokens in the opening pass, T[split:], which see its prefix segment (if any)."""

    ids: tuple[int, ...]
    first_position: int
    packed_row: int
    prefix: int | None


class _StageTokens:
    """One stage's token table: where each stream's span starts, and per token what a layer needs."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.spans: list[int] = []  # stream -> flat index of its span's first token
        self.ids: list[list[int]] = []  # token ids (read at stage 0 only)
        self.origin: list[list[int]] = []  # flat index of the same token at stage 0
        self.parent: list[list[int]] = []  # flat index of the token it copies at the previous stage
        self.seg: list[list[int]] = []  # its segment or stream: it sees that one's earlier tokens...
        self.pre: list[list[int]] = []  # ...and all of this segment (its prefix), -1 for none
        self.pos: list[list[int]] = []  # its position in its own prompt
        self.tensors: dict[tuple[Any, ...], Any] = {}  # by (table name, device), ("mask", window, device) or ("kv", widths...)


class PackedLayout:
    """Where every token of the opening pass sits, stage by stage.

    Each packed row holds its segments first (shared prefixes and source prompts, which never move)
    and then one span per stream placed in it; a stream branching off at stage j gets a copy of its
    parent's span. A token sees the earlier tokens of its own segment or span and all of its span's
    prefix segment; positions restart in every segment, so each sees exactly what it would alone.
    """

    def __init__(self, plan: StreamPlan, spans: dict[int, Span], segments: Sequence[tuple[tuple[int, ...], int]], n_packed: int) -> None:
        self.plan, self.row_spans, self.n_packed = plan, spans, n_packed
        self.segments = list(segments)
        self.segment_cols: list[tuple[int, int]] = []  # segment -> (packed row, first column)
        used = [0] * n_packed
        for ids, packed in self.segments:
            self.segment_cols.append((packed, used[packed]))
            used[packed] += len(ids)
        self.stages: list[_StageTokens] = []
        for stage in range(len(plan.reps)):
            if stage and plan.reps[stage] is plan.reps[stage - 1]:
                self.stages.append(self.stages[-1])
            else:
                self.stages.append(self._build(stage))

    def _build(self, stage: int) -> _StageTokens:
        plan = self.plan
        first = self.stages[0] if stage else None
        previous = self.stages[-1] if stage else None
        # per packed row: (token id, origin, parent, seg, pre, pos); origin/parent of spans as (stream, t)
        rows: list[list[tuple[int, Any, Any, int, int, int]]] = [[] for _ in range(self.n_packed)]
        for k, (ids, packed) in enumerate(self.segments):
            col = self.segment_cols[k][1]
            rows[packed].extend((ids[t], ("col", col + t), ("col", col + t), k, -1, t) for t in range(len(ids)))
        starts = []
        for s, rep in enumerate(plan.reps[stage]):
            span = self.row_spans[rep]
            starts.append((span.packed_row, len(rows[span.packed_row])))
            rows[span.packed_row].extend(
                (span.ids[t], ("span", plan.stream_of[0][rep], t), ("span", plan.stream_of[stage - 1][rep] if stage else 0, t),
                 len(self.segments) + s, -1 if span.prefix is None else span.prefix, span.first_position + t)
                for t in range(len(span.ids))
            )
        tokens = _StageTokens(max(1, max(map(len, rows))))
        width = tokens.width
        tokens.spans = [b * width + c for b, c in starts]
        next_pad = len(self.segments) + len(starts)

        def flat(where: tuple, b: int, table: _StageTokens | None) -> int:
            if table is None:  # stage 0 is its own origin and has no parent
                return -1
            if where[0] == "col":
                return b * table.width + where[1]
            return table.spans[where[1]] + where[2]

        for b, entries in enumerate(rows):
            row_ids: list[int] = []
            origin: list[int] = []
            parent: list[int] = []
            seg: list[int] = []
            pre: list[int] = []
            pos: list[int] = []
            for token, where_first, where_previous, segment, prefix, position in entries:
                row_ids.append(token)
                origin.append(flat(where_first, b, first))
                parent.append(flat(where_previous, b, previous))
                seg.append(segment)
                pre.append(prefix)
                pos.append(position)
            while len(row_ids) < width:  # pads see only themselves
                row_ids.append(0)
                origin.append(b * first.width if first else -1)
                parent.append(b * previous.width if previous else -1)
                seg.append(next_pad)
                pre.append(-1)
                pos.append(0)
                next_pad += 1
            tokens.ids.append(row_ids)
            tokens.origin.append(origin)
            tokens.parent.append(parent)
            tokens.seg.append(seg)
            tokens.pre.append(pre)
            tokens.pos.append(pos)
        return tokens

    def tensor(self, stage: int, name: str, device: Any) -> "torch.Tensor":
        """A stage's table as a tensor, built once: ids, origin/parent (flat indices) or positions."""
        import torch

        tokens = self.stages[stage]
        key = (name, str(device))  # a model spread over devices needs each table where its layer runs
        if key not in tokens.tensors:
            tokens.tensors[key] = torch.tensor(getattr(tokens, name), device=device)
        return tokens.tensors[key]

    def mask(self, stage: int, device: Any, dtype: Any, window: int | None = None) -> "torch.Tensor":
        """A stage's float attention mask, built once per window: each token sees the earlier tokens
        of its own segment or span and all of its prefix segment, `window` positions back at most."""
        import torch

        tokens = self.stages[stage]
        key = ("mask", window, str(device))
        if key not in tokens.tensors:
            seg = torch.tensor(tokens.seg, device=device)
            pre = torch.tensor(tokens.pre, device=device)
            pos = self.tensor(stage, "pos", device)
            allowed = (seg[:, None, :] == seg[:, :, None]) & (pos[:, None, :] <= pos[:, :, None])
            allowed |= seg[:, None, :] == pre[:, :, None]
            if window is not None:
                allowed &= pos[:, :, None] - pos[:, None, :] < window
            tokens.tensors[key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        return tokens.tensors[key]

    def stream_kv(self, stage: int, store: LayerKV, prefix_width: int, span_width: int) -> LayerKV:
        """A layer's keys/values of the opening pass, one row per stream, laid out [pad][prefix][pad][span]."""
        import torch

        tokens = self.stages[stage]
        keys, values = store.keys, store.values
        assert keys is not None and values is not None  # the opening pass filled this layer's store
        key = ("kv", prefix_width, span_width)
        if key not in tokens.tensors:
            index = []
            for s, rep in enumerate(self.plan.reps[stage]):
                span = self.row_spans[rep]
                prefix = [] if span.prefix is None else [self.segment_token(stage, span.prefix, t) for t in range(len(self.segments[span.prefix][0]))]
                own = [tokens.spans[s] + t for t in range(len(span.ids))]
                index.append([0] * (prefix_width - len(prefix)) + prefix + [0] * (span_width - len(own)) + own)
            tokens.tensors[key] = torch.tensor(index, device=keys.device)
        pick = tokens.tensors[key]

        def per_stream(x: "torch.Tensor") -> "torch.Tensor":
            rows = x.transpose(1, 2).flatten(0, 1).index_select(0, pick.flatten())
            return rows.view(*pick.shape, *rows.shape[1:]).transpose(1, 2)

        return LayerKV(per_stream(keys), per_stream(values))

    def segment_token(self, stage: int, segment: int, index: int) -> int:
        """Flat index, at `stage`, of token `index` of a segment."""
        packed, col = self.segment_cols[segment]
        return packed * self.stages[stage].width + col + index

    def span_token(self, stage: int, row: int, index: int) -> int:
        """Flat index, at `stage`, of token `index` of `row`'s stream span."""
        return self.stages[stage].spans[self.plan.stream_of[stage][row]] + index


def _take(value: Any, index: "torch.Tensor", batch: int) -> Any:
    """`value` narrowed to `index` along its batch dimension; broadcastable values pass through."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device)) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, index, batch) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, index, batch) for k, v in value.items()}
    return value


def _layer_kwargs(module: Any, args: tuple, kwargs: dict, store: LayerKV) -> dict:
    """A decoder layer's arguments by name (GPT-2 passes some by position), with `store` as its cache."""
    signature = layer_signature(module)
    kwargs = dict(kwargs)
    kwargs.update(zip(signature.positional, args[1:]))
    assert signature.cache is not None  # checked when the model was loaded (backend.check_layers)
    kwargs[signature.cache] = store
    return kwargs


def _gather_tokens(value: Any, origin: "torch.Tensor", batch: int, width: int) -> Any:
    """A per-token layer input of stage 0, (batch, width, ...), re-laid out to another stage's tokens."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[1] != width or value.shape[0] not in (1, batch):
            return value
        flat = value.expand(batch, *value.shape[1:]).flatten(0, 1)
        return flat.index_select(0, origin.flatten().to(value.device)).view(*origin.shape, *value.shape[2:])
    if isinstance(value, (tuple, list)):
        return type(value)(_gather_tokens(v, origin, batch, width) for v in value)
    return value


def _write_patches(flat: "torch.Tensor", layout: PackedLayout, stage: int, placed: Sequence[Patch]) -> None:
    """Write `placed` into `flat` (one row per token of `stage`, in place); refuse non-finite results."""
    import torch

    tokens = [layout.span_token(stage, p.row, offset) for p in placed for offset in p.offsets]
    if len(set(tokens)) < len(tokens):
        raise EngineError(f"patches of rows {[p.row for p in placed]} at {placed[0].location.site.hook_name(placed[0].layer)} share a token")
    at = torch.tensor(tokens, device=flat.device)
    vectors = torch.cat([p.vector().to(flat.device) for p in placed]).to(dtype=flat.dtype)
    strength = torch.tensor([p.strength for p in placed for _ in p.offsets], device=flat.device, dtype=flat.dtype)[:, None]
    clean = flat[at]
    patched = clean + strength * (vectors - clean)
    owner = [p for p in placed for _ in p.offsets]
    if any(p.units is not None for p in placed):
        write = torch.zeros(len(tokens), flat.shape[-1], dtype=torch.bool)
        for k, p in enumerate(owner):
            write[k, slice(None) if p.units is None else list(p.units)] = True
        patched = torch.where(write.to(flat.device), patched, clean)
    finite = torch.isfinite(patched).all(dim=-1).tolist()
    if not all(finite):
        k = finite.index(False)
        # Where the model's own value is already NaN/inf the patch is not to blame: it is written as
        # is, and the engine's check of the pass's logits names the layer that overflows.
        if bool(torch.isfinite(clean[k]).all()):
            bad = owner[k]
            raise overflow_error(bad.strength, bad.mapping, bad.location.site.hook_name(bad.layer), flat.dtype)
    flat[at] = patched


def overflow_error(strength: float, mapping: str, hook_name: str, dtype: Any, downstream: bool = False) -> ProbeConfigError:
    """The error for a patch whose values are not finite in the model's dtype (a huge strength times
    f(h)), or (`downstream`) that is finite but drives the layers after it to NaN/inf."""
    field, value = ("strength", strength) if abs(strength) > 1 else ("mapping", mapping)
    keeps, what = ("the layers after it", "the patch is finite, but the layers after it overflow") if downstream else ("it", "it overflows")
    return ProbeConfigError(
        field, value,
        f"a strength and mapping whose patch at {hook_name} keeps {keeps} finite in {dtype}; with strength={strength:g} "
        f"and mapping {mapping}, {what}",
        "Use a smaller strength or a mapping with smaller outputs.",
    )


def forward_opening(
    model: "PatchscopeModel",
    layout: PackedLayout,
    captures: dict[tuple[int, str], list[Capture]],
    states: dict[Any, dict[int, Any]],
    patches: Sequence[Patch] = (),
    locations: Sequence[SiteLocation] = (),
    layer_done: Callable[[int], None] | None = None,
) -> tuple["torch.Tensor | None", list[LayerKV], dict[int, int]]:
    """The opening pass: every segment and every stream's span, packed, in one pass of the plain twin.

    `layer_done(j)` is told as each layer finishes (a long opening pass still shows progress).

    Fills `states[key][layer]` for `captures` ({(layer, site name): [(key, segment, token index)]})
    and writes the patches; `locations` are the sites they use. Returns the last-span-token logits
    per final stream (None without streams), each layer's keys/values over its stage's tokens, and
    how many patches were written per row (for the engine to check that none was lost). Patched
    values that are not finite (a huge strength times f(h), beyond the model's dtype) are a
    ProbeConfigError.
    """
    import torch

    device = model.device
    dtype = next(model.hf.parameters()).dtype
    plan = layout.plan
    batch, first = layout.n_packed, layout.stages[0]
    by_site: dict[tuple[int, str], list[Patch]] = {}
    for patch in patches:
        by_site.setdefault((patch.layer, patch.location.site.name), []).append(patch)
    stores = [LayerKV(None, None) for _ in model.plain_layers]
    architecture = model.architecture
    layer_devices = [module_device(layer) for layer in model.plain_layers]
    written: dict[int, int] = {}
    final = len(layout.stages) - 1
    last = torch.tensor([layout.span_token(final, rep, len(layout.row_spans[rep].ids) - 1) for rep in plan.reps[-1]], device=device, dtype=torch.long)

    def visit(value: "torch.Tensor", layer_index: int, location: SiteLocation, capture_stage: int, patch_stage: int,
              parent: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Capture the site's source values, re-lay them out to the next stage (`parent`: which token
        each copies), write the site's patches; returns the value to pass on in the value's shape.

        The value is viewed as one (width,) row per token of the stage; a module input is copied
        before it is written (the caller may hold it), an output is written in place."""
        key = (layer_index, location.site.name)
        flat = value.reshape(-1, value.shape[-1])
        for state_key, segment, index in captures.get(key, ()):
            token = layout.segment_token(capture_stage, segment, index)
            states.setdefault(state_key, {})[layer_index] = flat[token].clone().view(location.shape)
        shape = tuple(value.shape)
        if parent is not None:
            flat = flat.index_select(0, parent.flatten())
            shape = (*parent.shape, value.shape[-1])
        placed = by_site.get(key)
        if placed:
            if location.side == "input":
                flat = flat.clone()
            _write_patches(flat, layout, patch_stage, placed)
            for p in placed:
                written[p.row] = written.get(p.row, 0) + 1
        return flat.view(shape)

    # The block output is always visited: it is where each stage's tokens are re-laid out for the next.
    resid_post = next((loc for loc in locations if loc.site.name == "resid_post"), None) or locate_site(model, "resid_post")
    resid_pre = next((loc for loc in locations if loc.site.name == "resid_pre"), None)

    def enter(layer_index: int, module: Any, args: tuple, kwargs: dict) -> tuple:
        kwargs = _layer_kwargs(module, args, kwargs, stores[layer_index])
        stage = layout.stages[layer_index]
        if stage is not first:
            origin = layout.tensor(layer_index, "origin", layer_devices[layer_index])
            for name in ("position_ids", "position_embeddings"):
                if name in kwargs:
                    kwargs[name] = _gather_tokens(kwargs[name], origin, batch, first.width)
        kwargs["attention_mask"] = layout.mask(layer_index, layer_devices[layer_index], dtype, architecture.windows[layer_index])
        if architecture.alibi_heads:
            kwargs["alibi"] = architecture.layer_bias(layout.tensor(layer_index, "pos", layer_devices[layer_index]), dtype)
            if architecture.alibi_in_mask:
                kwargs["attention_mask"] = architecture.fold(kwargs["attention_mask"], kwargs["alibi"])
        hidden = args[0]
        if resid_pre is not None:
            hidden = visit(hidden, layer_index, resid_pre, layer_index, layer_index)
        return (hidden,), kwargs

    def leave(layer_index: int, module: Any, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        stage = layer_index + 1
        parent = None
        if layout.stages[stage] is not layout.stages[layer_index]:
            parent = layout.tensor(stage, "parent", hidden.device)
        hidden = visit(hidden, layer_index, resid_post, layer_index, stage, parent)
        if stage == final and plan.reps[-1]:
            # Only each final stream's last token goes on to the final norm and the logits, in a shape
            # whose length is stage 0's (GPT-2 views its output as the input's shape).
            keep = hidden.flatten(0, 1).index_select(0, last.to(hidden.device))
            padding = (-len(last)) % first.width
            hidden = torch.cat([keep, keep[:1].expand(padding, -1)]).view(-1, first.width, keep.shape[-1])
        if layer_done is not None:
            layer_done(layer_index)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def inside(layer_index: int, location: SiteLocation, module: Any, args: tuple, output: Any = None) -> Any:
        if location.side == "input":
            return (visit(args[0], layer_index, location, layer_index, layer_index), *args[1:])
        value = output[0] if isinstance(output, tuple) else output
        value = visit(value, layer_index, location, layer_index, layer_index)
        return (value, *output[1:]) if isinstance(output, tuple) else value

    handles = []
    try:
        for j, layer in enumerate(model.plain_layers):
            handles.append(layer.register_forward_pre_hook(partial(enter, j), with_kwargs=True))
            handles.append(layer.register_forward_hook(partial(leave, j)))
            for location in locations:
                if location.path and ((j, location.site.name) in captures or (j, location.site.name) in by_site):
                    module = layer.get_submodule(location.path)
                    hook = partial(inside, j, location)
                    if location.side == "input":
                        handles.append(module.register_forward_pre_hook(hook))
                    else:
                        handles.append(module.register_forward_hook(hook))
        hidden = model.plain.base_model(
            input_ids=layout.tensor(0, "ids", device),
            # An ALiBi model builds its bias from a 2-D mask; each layer gets the engine's own instead.
            attention_mask=None if architecture.alibi_heads else layout.mask(0, device, dtype),
            position_ids=layout.tensor(0, "pos", device),
            use_cache=False,
        ).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    if not plan.reps[-1]:
        return None, stores, written
    logits = architecture.final_logits(model.plain.get_output_embeddings()(hidden.flatten(0, 1)[: len(last)]))
    return logits, stores, written


def forward_streams(
    model: "PatchscopeModel",
    plan: StreamPlan,
    stores: Sequence[LayerKV],
    input_ids: "torch.Tensor",
    position_ids: "torch.Tensor",
    masks: dict[int | None, "torch.Tensor"],
    key_positions: "torch.Tensor | None" = None,
) -> "torch.Tensor":
    """One decoding pass of the plain twin; returns logits per final stream.

    The model's inputs hold one row per *final* stream, so that outside its decoder layers its batch
    is its output's (GPTBigCode views the output as the input's shape). Layer 0 keeps one row per
    stage-0 stream, and each layer widens to the next stage's. `position_ids` and the 4D float masks
    (one per attention window of the model, None = full) hold one row per final stream too, or a
    single row that every stream shares (then nothing needs narrowing). An ALiBi model also needs
    `key_positions`, each key's position in its prompt, laid out like the masks.
    """
    import torch

    device = input_ids.device
    batch = len(plan.reps[-1])
    architecture = model.architecture
    shared_layout = masks[None].shape[0] == 1 and position_ids.shape[0] == 1

    def tensor(index: list[int] | None) -> torch.Tensor | None:
        return None if index is None else torch.tensor(index, device=device)

    def enter(layer_index: int, narrow: torch.Tensor | None, module: Any, args: tuple, kwargs: dict) -> tuple:
        kwargs = _layer_kwargs(module, args, kwargs, stores[layer_index])
        hidden = args[0]
        if narrow is not None:
            if layer_index == 0:
                hidden = hidden.index_select(0, narrow.to(hidden.device))
            if not shared_layout:
                for name in PER_SEQUENCE_KWARGS:
                    if name in kwargs:
                        kwargs[name] = _take(kwargs[name], narrow, batch)
        mask = masks[architecture.windows[layer_index]]
        if not shared_layout and narrow is not None:
            mask = mask.index_select(0, narrow.to(mask.device))
        # One shared row broadcasts; XGLM checks the mask's batch, so give it the layer's (a view).
        kwargs["attention_mask"] = mask.expand(hidden.shape[0], *mask.shape[1:])
        if architecture.alibi_heads:
            assert key_positions is not None  # the engine passes them for every ALiBi model
            keys = key_positions if shared_layout or narrow is None else key_positions.index_select(0, narrow.to(key_positions.device))
            kwargs["alibi"] = architecture.layer_bias(keys.expand(hidden.shape[0], keys.shape[-1]), mask.dtype)
            if architecture.alibi_in_mask:
                kwargs["attention_mask"] = architecture.fold(kwargs["attention_mask"], kwargs["alibi"])
        return (hidden,), kwargs

    def leave(widen: torch.Tensor | None, module: Any, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if widen is not None:
            hidden = hidden.index_select(0, widen.to(hidden.device))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = []
    try:
        for j, layer in enumerate(model.plain_layers):
            narrow = tensor(plan.from_final(j))
            handles.append(layer.register_forward_pre_hook(partial(enter, j, narrow), with_kwargs=True))
            handles.append(layer.register_forward_hook(partial(leave, tensor(plan.widen(j + 1)))))
        out = model.plain(
            input_ids=input_ids,
            attention_mask=None if architecture.alibi_heads else masks[None],
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[:, -1]
