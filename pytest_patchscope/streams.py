"""Shared-trunk execution: rows compute together at every layer where they cannot differ yet.

A row patched after layer l* has exactly the clean hidden states and keys/values at layers 0..l*:
the patch reaches no earlier layer, and attention is causal. So at layer j, all rows on one target
whose patch comes at or after j, and which have generated the same tokens so far, compute the same
thing. Each layer therefore runs once per *stream*: one per distinct (target, tokens so far) among
those rows, plus one per row whose patch lies below j. A row's stream branches off its trunk right
after its patch layer, which is where the patch is written.

In a layer sweep this halves the patched pass and cuts every decoding step by the rows whose texts
agree so far. Only the batch a layer sees changes; each stream's arithmetic is that of the row
alone, so results equal the probe run by itself.

Mechanics: for one forward of the plain HF twin, a pre-hook on each decoder layer gives it its own
streams' attention mask, positions and key/value store, and a hook after it widens its output to the
next layer's streams and writes the patches placed there. Every hook is removed when the pass ends.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from .models import PatchscopeModel

PER_SEQUENCE_KWARGS = ("attention_mask", "position_ids", "position_embeddings")
"""Decoder-layer arguments with one entry per sequence, narrowed to a layer's streams."""


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
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        return self.keys, self.values

    def select(self, index: "torch.Tensor | None") -> None:
        """Keep (and repeat) streams by index: a trunk that splits hands its history to each branch."""
        if index is not None and self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]


class StreamPlan:
    """Which rows share a stream at each stage: stage j is the input of layer j, stage L the final norm.

    `groups[r]` names what row r has seen so far (its target and generated tokens); rows of one group
    share a stream at stage j unless r's patch lies below j (`patch_layers[r] < j`).
    """

    def __init__(self, rows: Sequence[int], groups: Sequence[int], patch_layers: Sequence[int | None], n_layers: int) -> None:
        self.rows = list(rows)
        self.stream_of: list[dict[int, int]] = []
        self.reps: list[list[int]] = []  # a representative row of every stream
        branch_at = {patch_layers[r] + 1 for r in self.rows if patch_layers[r] is not None}
        for stage in range(n_layers + 1):
            if stage and stage not in branch_at:
                self.stream_of.append(self.stream_of[-1])
                self.reps.append(self.reps[-1])
                continue
            streams: dict[int, int] = {}
            of: dict[int, int] = {}
            reps: list[int] = []
            for r in self.rows:
                branched = patch_layers[r] is not None and patch_layers[r] < stage  # type: ignore[operator]
                key = -1 - r if branched else groups[r]
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

    def to_first(self, stage: int) -> list[int] | None:
        """Index from stage 0's streams (the model's inputs) into stage's (None where the same)."""
        index = [self.stream_of[0][r] for r in self.reps[stage]]
        return None if index == list(range(len(self.reps[0]))) else index

    def from_previous(self, previous: "StreamPlan", stage: int) -> list[int] | None:
        """Index from the previous step's streams at stage into this step's (None where the same)."""
        index = [previous.stream_of[stage][r] for r in self.reps[stage]]
        return None if index == list(range(len(previous.reps[stage]))) else index


@dataclass(frozen=True)
class Patch:
    """h <- (1 - strength) * h + strength * vector, at column `column` of row `row`, after layer `layer`."""

    row: int
    layer: int
    column: int
    vector: Any
    strength: float


def _take(value: Any, index: "torch.Tensor", batch: int) -> Any:
    """`value` narrowed to `index` along its batch dimension; broadcastable values pass through."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, index, batch) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, index, batch) for k, v in value.items()}
    return value


_POSITIONAL_NAMES: dict[type, list[str]] = {}


def _positional_names(layer: Any) -> list[str]:
    """The names of a decoder layer's positional parameters after hidden_states (GPT-2 passes some)."""
    cls = type(layer)
    if cls not in _POSITIONAL_NAMES:
        params = list(inspect.signature(layer.forward).parameters.values())[1:]
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        _POSITIONAL_NAMES[cls] = [p.name for p in params if p.kind in kinds]
    return _POSITIONAL_NAMES[cls]


def forward_streams(
    model: "PatchscopeModel",
    plan: StreamPlan,
    stores: Sequence[LayerKV],
    input_ids: "torch.Tensor",
    position_ids: "torch.Tensor",
    attention_mask: "torch.Tensor",
    patches: Sequence[Patch] = (),
) -> "torch.Tensor":
    """One pass of the plain twin over stage 0's streams; returns last-position logits per final stream.

    `input_ids` holds one row per stage-0 stream; `position_ids` and the 4D float `attention_mask`
    hold one too, or a single row that every stream shares (then nothing needs narrowing).
    """
    import torch

    device = input_ids.device
    first = len(plan.reps[0])
    shared_layout = attention_mask.shape[0] == 1 and position_ids.shape[0] == 1

    def tensor(index: list[int] | None) -> torch.Tensor | None:
        return None if index is None else torch.tensor(index, device=device)

    by_layer: dict[int, list[Patch]] = {}
    for patch in patches:
        by_layer.setdefault(patch.layer, []).append(patch)

    def enter(layer_index: int, narrow: torch.Tensor | None, module: Any, args: tuple, kwargs: dict) -> tuple:
        kwargs = dict(kwargs)
        kwargs.update(zip(_positional_names(module), args[1:]))  # name what GPT-2 passes by position
        if narrow is not None:
            for name in PER_SEQUENCE_KWARGS:
                if name in kwargs:
                    kwargs[name] = _take(kwargs[name], narrow, first)
        kwargs["past_key_values"] = stores[layer_index]
        return args[:1], kwargs

    def leave(widen: torch.Tensor | None, placed: list[Patch], stage: int, module: Any, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if widen is not None:
            hidden = hidden[widen]
        if placed:
            rows = torch.tensor([plan.stream_of[stage][p.row] for p in placed], device=device)
            cols = torch.tensor([p.column for p in placed], device=device)
            vectors = torch.stack([p.vector for p in placed]).to(device=device, dtype=hidden.dtype)
            strength = torch.tensor([p.strength for p in placed], device=device, dtype=hidden.dtype)[:, None]
            clean = hidden[rows, cols]
            hidden[rows, cols] = clean + strength * (vectors - clean)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = []
    try:
        for j, layer in enumerate(model.plain_layers):
            narrow = None if shared_layout else tensor(plan.to_first(j))
            handles.append(layer.register_forward_pre_hook(partial(enter, j, narrow), with_kwargs=True))
            handles.append(layer.register_forward_hook(partial(leave, tensor(plan.widen(j + 1)), by_layer.get(j, []), j + 1)))
        out = model.plain(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[:, -1]
