"""Patch sites: which activation of a decoder layer a probe reads from S and writes into T.

A site is data over the one engine, as a hook name is in TransformerLens' `patching.py`: a place
in the decoder layer (the layer's input or output, or the input or output of one of its
submodules) and the shape of the vector found there. Where the submodules are comes from the
TransformerBridge adapter's component mapping, so every family the bridge maps gets every site it
has, under the TransformerLens name its users know.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.model.layers import (
    POST_ATTENTION_NORMS,
    POST_MLP_NORMS,
    attention_of,
    describe_layer,
    down_projection,
    head_count,
    input_width,
    mlps_of,
    output_projection,
    post_norm,
    residual_streams,
)

if TYPE_CHECKING:
    from pytest_patchscope.model.loading import PatchscopeModel


@dataclass(frozen=True)
class Site:
    """One kind of activation: its name, its TransformerLens hook name and what its units are."""

    name: str
    hook_template: str
    units_are: str
    inside_block: bool
    """True when the value is computed inside block l, so a row patched there differs from block l on."""

    def hook_name(self, layer: int) -> str:
        return self.hook_template.format(layer=layer)


SITES: dict[str, Site] = {
    site.name: site
    for site in (
        Site("resid_post", "blocks.{layer}.hook_resid_post", "residual dimensions", inside_block=False),
        Site("resid_pre", "blocks.{layer}.hook_resid_pre", "residual dimensions", inside_block=True),
        Site("attn_out", "blocks.{layer}.hook_attn_out", "residual dimensions", inside_block=True),
        Site("mlp_out", "blocks.{layer}.hook_mlp_out", "residual dimensions", inside_block=True),
        Site("neurons", "blocks.{layer}.mlp.hook_post", "MLP neurons", inside_block=True),
        Site("heads", "blocks.{layer}.attn.hook_z", "attention heads", inside_block=True),
    )
}
DEFAULT_SITE = "resid_post"


@dataclass(frozen=True)
class SiteLocation:
    """A site found in one model: where to hook it in each decoder layer, and its vector's shape.

    `path` is a submodule of the decoder layer ("" for the layer itself); `side` is whether the
    value is that module's input or its output. `shape` is what a mapping gets and returns:
    (d_model,), (d_mlp,) or (n_heads, d_head); (hc_mult * d_model,) at the input or output of a
    layer that carries hc_mult residual streams (DeepSeek-V4). Units index its first axis.
    """

    site: Site
    path: str
    side: Literal["input", "output"]
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        """The number of values at one token (the hooked tensor's last dimension)."""
        width = 1
        for size in self.shape:
            width *= size
        return width

    @property
    def n_units(self) -> int:
        return self.shape[0]

    def columns(self, units: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """The flattened vector's columns that `units` cover (a head covers its d_head values)."""
        if units is None:
            return None
        step = self.width // self.n_units
        return tuple(column for unit in units for column in range(unit * step, (unit + 1) * step))

    def branch_stage(self, layer: int) -> int:
        """The first stage (layer input) at which a row patched here at `layer` differs from its trunk."""
        return layer if self.site.inside_block else layer + 1


def _component(mapping: Any, key: str) -> Any:
    return (getattr(mapping, "submodules", None) or {}).get(key)


def _join(*names: Any) -> str:
    return ".".join(str(n) for n in names if n)


def site_names() -> str:
    return ", ".join(repr(name) for name in SITES)


def check_site_name(field_name: str, site: Any) -> Site:
    """The Site called `site`, or a ProbeConfigError listing the sites."""
    if not isinstance(site, str) or site not in SITES:
        raise ProbeConfigError(
            field_name, site, f"one of {site_names()}",
            "resid_post is the residual stream after block l (the default), the others are inside block l.",
        )
    return SITES[site]


def locate_site(model: "PatchscopeModel", site: Any, layer: int | None = None) -> SiteLocation:
    """Where `site` is in `model`'s decoder layers (in `layer`, on the general path, whose layers
    may differ; None: the first layer that has it); a ProbeConfigError when the model lacks it."""
    kind = check_site_name("site", site)
    if model.path == "general":
        return _locate_in_layer(model, kind, layer)
    cache: dict[str, SiteLocation] = model.__dict__.setdefault("_site_locations", {})
    if kind.name in cache:
        return cache[kind.name]
    d_model = model.d_model
    location: SiteLocation | None
    if kind.name in ("resid_post", "resid_pre"):
        location = SiteLocation(kind, "", "output" if kind.name == "resid_post" else "input", (d_model,))
    else:
        blocks = model.bridge.adapter.component_mapping["blocks"]
        attn, mlp = _component(blocks, "attn"), _component(blocks, "mlp")
        projection = _component(attn, "o") if attn is not None else None
        down = _component(mlp, "out") if mlp is not None else None
        block = model.plain_layers[0]
        location = None
        if kind.name == "attn_out" and projection is not None:
            post = _component(blocks, "ln1_post")  # Gemma 2/3, OLMo 2/3 normalise the output before adding it
            location = SiteLocation(kind, post.name if post is not None else _join(attn.name, projection.name), "output", (d_model,))
        elif kind.name == "mlp_out" and mlp is not None:
            post = _component(blocks, "ln2_post")
            path = post.name if post is not None else (_join(mlp.name, down.name) if down is not None else mlp.name)
            if path:
                location = SiteLocation(kind, path, "output", (d_model,))
        elif kind.name == "neurons" and down is not None:
            path = _join(mlp.name, down.name)
            location = SiteLocation(kind, path, "input", (input_width(block.get_submodule(path)),))
        elif kind.name == "heads" and projection is not None:
            path = _join(attn.name, projection.name)
            width, heads = input_width(block.get_submodule(path)), int(model.bridge.cfg.n_heads)
            if heads > 0 and width % heads == 0:
                location = SiteLocation(kind, path, "input", (heads, width // heads))
        if location is None:
            why = {
                "neurons": "its MLP has no single down projection (a mixture of experts has one per expert)",
            }.get(kind.name, "TransformerLens' adapter maps no such submodule for it")
            raise ProbeConfigError(
                "site", site, f"a site that {model.name!r} ({type(model.hf).__name__}) has; {why}",
                f"Sites it has: {', '.join(repr(n) for n in available_sites(model, skip=kind.name))}.",
            )
    cache[kind.name] = location
    return location


def available_sites(model: "PatchscopeModel", skip: str = "", layer: int | None = None) -> list[str]:
    """The sites `model` has (every name of SITES that `locate_site` finds, in `layer` if given)."""
    found = []
    for name in SITES:
        if name == skip:
            continue
        try:
            locate_site(model, name, layer)
        except ProbeConfigError:
            continue
        found.append(name)
    return found


def _locate_in_layer(model: "PatchscopeModel", kind: Site, layer: int | None) -> SiteLocation:
    """A site in one decoder layer of a general-path model, found by the HF submodule names (see
    `layers`); layers of a hybrid differ, so each is looked at on its own."""
    for j in range(model.n_layers) if layer is None else [layer]:
        found = _cached_in_layer(model, kind, j)
        if isinstance(found, SiteLocation):
            return found
    j = 0 if layer is None else layer
    here = [name for name in SITES if isinstance(_cached_in_layer(model, SITES[name], j), SiteLocation)]
    if layer is None:
        raise ProbeConfigError(
            "site", kind.name, f"a site that some layer of {model.name!r} ({type(model.hf).__name__}) has; none has it "
            f"(layer 0 is {describe_layer(model.plain_layers[0])}, and {_cached_in_layer(model, kind, 0)})",
            f"Sites it has: {', '.join(map(repr, here))}.",
        )
    having = [k for k in range(model.n_layers) if isinstance(_cached_in_layer(model, kind, k), SiteLocation)]
    raise ProbeConfigError(
        "site", kind.name,
        f"a site that layer {layer} of {model.name!r} has; it is {describe_layer(model.plain_layers[layer])}, "
        f"and {_cached_in_layer(model, kind, layer)}",
        f"Sites it has at layer {layer}: {', '.join(map(repr, here))}"
        + (f"; layers with {kind.name!r}: {having}." if having else f"; no layer has {kind.name!r}."),
    )


def _cached_in_layer(model: "PatchscopeModel", kind: Site, j: int) -> SiteLocation | str:
    cache: dict[tuple[str, int], SiteLocation | str] = model.__dict__.setdefault("_layer_site_locations", {})
    if (kind.name, j) not in cache:
        cache[(kind.name, j)] = _in_layer(model, kind, j)
    return cache[(kind.name, j)]


def _in_layer(model: "PatchscopeModel", kind: Site, j: int) -> SiteLocation | str:
    """The site's location in layer j, or why the layer has none."""
    block, d_model = model.plain_layers[j], model.d_model
    if kind.name in ("resid_post", "resid_pre"):
        # Hyper-connection families carry several residual streams: the layer's input and output hold them all.
        width = d_model * residual_streams(model.hf.config)
        return SiteLocation(kind, "", "output" if kind.name == "resid_post" else "input", (width,))
    if kind.name in ("attn_out", "heads"):
        attention = attention_of(block)
        if attention is None:
            return "it has no attention sublayer"
        if kind.name == "attn_out":
            return SiteLocation(kind, post_norm(block, POST_ATTENTION_NORMS) or attention, "output", (d_model,))
        module = block.get_submodule(attention)
        out = output_projection(module)
        heads = head_count(module, model.hf.config)
        if out is None or heads is None:
            return f"its attention ({type(module).__name__}) has no output projection over a known number of heads"
        width = input_width(module.get_submodule(out))
        if width % heads:
            return f"its attention's output projection takes {width} values, not a multiple of its {heads} heads"
        return SiteLocation(kind, _join(attention, out), "input", (heads, width // heads))
    mlps = mlps_of(block)
    if len(mlps) != 1:
        return "it has no MLP sublayer" if not mlps else f"its MLP output is the sum of {len(mlps)} modules ({', '.join(mlps)})"
    if kind.name == "mlp_out":
        return SiteLocation(kind, post_norm(block, POST_MLP_NORMS) or mlps[0], "output", (d_model,))
    mlp = block.get_submodule(mlps[0])
    down = down_projection(mlp)
    if down is None:
        return f"its MLP ({type(mlp).__name__}) has no single down projection (a mixture of experts has one per expert)"
    return SiteLocation(kind, _join(mlps[0], down), "input", (input_width(mlp.get_submodule(down)),))
