"""NaN/inf: a model's own overflow told apart from a patch's, on either path.

NaN scores and the argmax of NaN logits would pass for a verdict, so neither path reports them.
When a value is not finite, a plain forward of the model over the same tokens (no patch, no hook
but the ones here) says whether the model itself overflows, and from which layer on: then no
patch is to blame (a ModelLoadError naming the layer); otherwise the patch is (the engine's
`overflow_error`, a ProbeConfigError naming the strength or mapping).
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Sequence

from pytest_patchscope.errors import ModelLoadError, shown

if TYPE_CHECKING:
    import torch

    from pytest_patchscope.model.loading import PatchscopeModel


def finite(values: "torch.Tensor") -> bool:
    """Whether every value is finite, by one reduction: a sum is NaN/inf whenever a value is (and,
    rarely, when finite values overflow it: then the exact check decides)."""
    import torch

    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def first_non_finite(model: "PatchscopeModel", ids: Sequence[int]) -> str | None:
    """Where a plain forward of `model` over `ids` (no patch) first holds NaN/inf, or None. Its own
    hooks see each layer's output (output_hidden_states would leave transformers' recorders on the layers)."""
    import torch

    found: list[int] = []

    def check(layer_index: int, module: Any, args: tuple, output: Any) -> None:
        if not found and not finite(output[0] if isinstance(output, (tuple, list)) else output):  # GPT-1's blocks return lists
            found.append(layer_index)

    handles = [layer.register_forward_hook(partial(check, j)) for j, layer in enumerate(model.plain_layers)]
    try:
        with torch.no_grad():
            logits = model.plain(input_ids=torch.tensor([list(ids)], device=model.device), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return f"from layer {found[0]} on (the output of blocks.{found[0]})"
    return None if finite(logits) else "in its final norm or LM head"


def model_overflow(model: "PatchscopeModel | None", ids: Sequence[int], where: str, *, locate: bool = True) -> ModelLoadError:
    """The model itself (no patch involved) computes NaN/inf on a prompt: refuse to report anything.
    With `locate`, a plain forward finds the layer it starts from (else `where` stands: a caller
    that has run `first_non_finite` already passes what it found). `model` None: the prompt ran on
    another (source) model, which cannot be run again here."""
    if locate and model is not None:
        where = first_non_finite(model, ids) or where
    name = "the source model" if model is None else f"model={model.name!r}"
    prompt = shown(model.decode(list(ids))) if model is not None else f"of {len(ids)} tokens"
    return ModelLoadError(
        f"{name} computes NaN/inf values {where} on the prompt {prompt}, before any patch: its weights are "
        "finite, but its activations overflow. No result is reported (NaN scores and the argmax of NaN logits "
        "would pass for a verdict). Allowed: a model whose forward pass stays finite; check the checkpoint for "
        "mis-scaled weights, or load it in float32 if it runs in float16 or bfloat16."
    )


def source_overflow(model: "PatchscopeModel", key: tuple, hook_name: str) -> ModelLoadError:
    """A captured source value (key: a StateKey, (source ids, index, site, source model)) is NaN/inf:
    nothing was patched yet, so the source model overflows on its own prompt."""
    return model_overflow(model if key[3] == "" else None, key[0], f"in the source state at {hook_name}")
