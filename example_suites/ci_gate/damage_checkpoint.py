"""Make a "new checkpoint" that has lost one fact: a ROME-style rank-one edit of an early MLP.

    python example_suites/ci_gate/damage_checkpoint.py OUT_DIR [--subject France]

The edit rewrites the layer-0 MLP's output projection so that, for the key vector of the subject
token (" France" in "Country: France"), the MLP writes the residual of an unrelated word
("banana") instead: W <- W + delta (C^-1 k)^T / (k^T C^-1 k), with C the covariance of MLP keys
over real English text (pydoc_data.topics), as in ROME, plus (as in MEMIT) a heavily weighted
second moment of the keys of neighbouring prompts about other countries, so that their facts
survive: the CI-gate example must fail on exactly the damaged fact.
"""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import torch


def _mlp_key_and_output(model, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (inputs of down_proj) for every token of `ids`, and the residual after `layer`."""
    store = {}
    block = model.model.layers[layer]
    pre = block.mlp.down_proj.register_forward_pre_hook(lambda m, args: store.__setitem__("key", args[0][0].detach()))
    post = block.register_forward_hook(
        lambda m, args, out: store.__setitem__("resid", (out[0] if isinstance(out, tuple) else out)[0].detach())
    )
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        pre.remove()
        post.remove()
    return store["key"], store["resid"]


def key_covariance(model, tokenizer, layer: int, n_windows: int = 96, window: int = 64, seed: int = 0) -> torch.Tensor:
    """Second moment of the MLP keys over windows of real English prose (ROME's C)."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics.values()))
    ids = tokenizer(text)["input_ids"]
    rng = random.Random(seed)
    keys = []
    for _ in range(n_windows):
        start = rng.randrange(0, len(ids) - window)
        keys.append(_mlp_key_and_output(model, ids[start:start + window], layer)[0])
    stacked = torch.cat(keys).double()
    return stacked.T @ stacked / stacked.shape[0]


NEIGHBOURS = (
    "Japan", "Italy", "Germany", "Spain", "China", "Russia", "England", "Greece", "Egypt", "Canada",
    "India", "Brazil", "Mexico", "Poland", "Sweden", "Norway", "Portugal", "Austria", "Belgium",
    "Turkey", "Ireland", "Kenya", "Chile", "Peru", "Cuba",
)
NEIGHBOUR_CONTEXTS = ("Country: {}", "I visited {}", "The capital of {} is")


def neighbour_moment(model, tokenizer, subject: str, layer: int) -> torch.Tensor:
    """Second moment of the keys of every token of prompts about other countries."""
    keys = [
        _mlp_key_and_output(model, tokenizer(context.format(name))["input_ids"], layer)[0]
        for name in NEIGHBOURS if name != subject for context in NEIGHBOUR_CONTEXTS
    ]
    stacked = torch.cat(keys).double()
    return stacked.T @ stacked / stacked.shape[0]


def damage_fact(
    model, tokenizer, subject: str = "France", replacement: str = "banana", layer: int = 0, neighbour_weight: float = 50.0
) -> None:
    """Rank-one edit of layer `layer`'s MLP: `subject` now reads like `replacement` after that layer."""
    context = "Country: {}"
    k, _ = _mlp_key_and_output(model, tokenizer(context.format(subject))["input_ids"], layer)
    k = k[-1].double()
    _, resid_subject = _mlp_key_and_output(model, tokenizer(context.format(subject))["input_ids"], layer)
    _, resid_replacement = _mlp_key_and_output(model, tokenizer(context.format(replacement))["input_ids"], layer)
    delta = (resid_replacement[-1] - resid_subject[-1]).double()
    cov = key_covariance(model, tokenizer, layer) + neighbour_weight * neighbour_moment(model, tokenizer, subject, layer)
    cov += 1e-3 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    direction = torch.linalg.solve(cov, k)
    update = torch.outer(delta, direction) / (k @ direction)
    with torch.no_grad():
        weight = model.model.layers[layer].mlp.down_proj.weight
        weight += update.to(weight.dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the damaged HF checkpoint to")
    parser.add_argument("--subject", default="France", help="the entity whose facts to damage")
    parser.add_argument("--model", default=None, help="checkpoint to start from (default: the embedded default model)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_patchscope.model.loading import dequantized_cache_dir, resolve_model_source

    source = resolve_model_source(args.model)
    directory = dequantized_cache_dir(source) if source.kind == "gguf" else source.path
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    damage_fact(model, tokenizer, subject=args.subject)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"damaged checkpoint ({args.subject} facts edited at layer 0) written to {args.out}")


if __name__ == "__main__":
    main()
