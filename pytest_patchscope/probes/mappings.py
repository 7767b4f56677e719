"""Mappings f: R^d -> R^d* applied to a source hidden state before it is patched in.

`AffineMapping` is the paper's learned affine map (tuned-lens style): fitted by least squares,
saved to and loaded from a safetensors file, and usable as `mapping=` in any probe.
`ZERO` and `mean_ablation(states)` are the paper's f = 0 (attention knockout) and mean ablation;
with a probe's `units` they ablate single neurons or heads.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pytest_patchscope.errors import ProbeConfigError


class AffineMapping(torch.nn.Module):
    """f(h) = h @ W + b, with W of shape (d_in, d_out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, name: str = "affine") -> None:
        super().__init__()
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise ProbeConfigError(
                "mapping", f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}",
                "a (d_in, d_out) weight and a (d_out,) bias",
            )
        self.weight = torch.nn.Parameter(weight.detach().float(), requires_grad=False)
        self.bias = torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        self.name = name

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.weight.dtype) @ self.weight + self.bias

    @classmethod
    def fit(cls, inputs: torch.Tensor, outputs: torch.Tensor, name: str = "affine") -> "AffineMapping":
        """Least-squares fit of outputs ~ inputs @ W + b (inputs (n, d_in), outputs (n, d_out))."""
        ones = torch.ones(inputs.shape[0], 1, dtype=torch.float64)
        design = torch.cat([inputs.double(), ones], dim=1)
        solution = torch.linalg.lstsq(design, outputs.double()).solution
        return cls(solution[:-1].float(), solution[-1].float(), name=name)

    def save(self, path: str | os.PathLike[str]) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata={"name": self.name})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "AffineMapping":
        """Load a map saved by `save` (a safetensors file with 'weight' and 'bias')."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ProbeConfigError("mapping", str(path), "an existing .safetensors file saved by AffineMapping.save")
        try:
            with safe_open(str(path), framework="pt") as handle:
                name = (handle.metadata() or {}).get("name", path.stem)
                return cls(handle.get_tensor("weight"), handle.get_tensor("bias"), name=name)
        except ProbeConfigError:
            raise
        except Exception as exc:
            raise ProbeConfigError(
                "mapping", str(path), "a safetensors file with 'weight' (d_in, d_out) and 'bias' (d_out,) tensors",
                f"Reading it failed: {exc}",
            ) from exc


class ConstantMapping(torch.nn.Module):
    """f(h) = c: the source value is replaced by a fixed vector of the site's shape (ablation)."""

    def __init__(self, value: torch.Tensor, name: str) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(value.detach().float(), requires_grad=False)
        self.name = name

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value.to(hidden.dtype)


class _Zero:
    """f(h) = 0 for any site's shape: zero ablation, the paper's attention-knockout f."""

    name = "zero"

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)

    def __repr__(self) -> str:
        return "ZERO"


ZERO = _Zero()


def mean_ablation(states: torch.Tensor | list[torch.Tensor], name: str = "mean_ablation") -> ConstantMapping:
    """f(h) = the mean of `states` (n values of the site's shape, e.g. captured over a corpus).

    Its identity in baselines hashes the mean, so two different means never share a key.
    """
    if isinstance(states, (list, tuple)):
        if not states or not all(isinstance(s, torch.Tensor) for s in states):
            raise ProbeConfigError("states", type(states).__name__, "a non-empty list of tensors of one shape, or an (n, ...) tensor")
        states = torch.stack([s.detach().float() for s in states])
    if not isinstance(states, torch.Tensor) or states.ndim < 2 or states.shape[0] < 1 or not states.is_floating_point():
        raise ProbeConfigError(
            "states", getattr(states, "shape", states), "an (n, ...) floating-point tensor of n >= 1 values of the site's shape"
        )
    return ConstantMapping(states.float().mean(dim=0), name=name)
