"""The paper's named Patchscopes configurations, as data over the one general probe.

A preset fills in the target side (T, i*, l*, stop strings); it never runs anything itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from pytest_patchscope.probes.probe import Placeholder, Position

TargetLayer = Union[Literal["same", "last"], int]


@dataclass(frozen=True)
class Preset:
    """The target half of a probe.

    target None means T = S (the source prompt itself); target_position None means i* = i.
    target_layer is "same" (l* = l), "last" (l* = n_layers - 1) or a fixed layer.
    """

    name: str
    target: str | None
    target_position: Position | None
    target_layer: TargetLayer = "same"
    stop: tuple[str, ...] = ()

    def resolve_target_layer(self, layer: int, n_layers: int) -> int:
        if self.target_layer == "same":
            return layer
        if self.target_layer == "last":
            return n_layers - 1
        return int(self.target_layer)


TOKEN_IDENTITY = Preset(
    name="token_identity",
    target="cat -> cat\n1135 -> 1135\nhello -> hello\n?",
    target_position=-1,
    stop=("\n",),
)
"""Decode what token a hidden state stands for (paper §3.2, l* = l, i* = last)."""

ENTITY_DESCRIPTION = Preset(
    name="entity_description",
    target=(
        "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
        "multinational major appliance and consumer electronics corporation, x"
    ),
    target_position=Placeholder("x"),
    stop=("\n",),
)
"""Verbalise the entity that a hidden state encodes (paper §4.3)."""

LOGIT_LENS = Preset(name="logit_lens", target=None, target_position=None, target_layer="last")
"""T = S, i* = i, l* = L - 1, f = identity: the logit lens as a Patchscope (paper Table 4)."""


def attribute_extraction(relation: str = "The capital city of x is", placeholder: str = "x") -> Preset:
    """Zero-shot feature extraction (paper §4.2): a verbalised relation with a placeholder."""
    return Preset(
        name=f"attribute_extraction({relation!r})",
        target=relation,
        target_position=Placeholder(placeholder),
        stop=("\n",),
    )


ATTRIBUTE_EXTRACTION = attribute_extraction()

PRESETS: dict[str, Preset] = {
    "token_identity": TOKEN_IDENTITY,
    "entity_description": ENTITY_DESCRIPTION,
    "attribute_extraction": ATTRIBUTE_EXTRACTION,
    "logit_lens": LOGIT_LENS,
}
