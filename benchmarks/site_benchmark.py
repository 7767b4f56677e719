#!/usr/bin/env python
"""Time sweeps at the sites inside a block against the residual-stream sweep and plain HF.

Same workload as sweep_benchmark.py (source "Albert Einstein", target ENTITY_DESCRIPTION, l* = l,
greedy, 10 new tokens, clean=False so that every method runs exactly its patched rows):

    resid_post   Patchscope.sweep(..., layers=range(L))                          L rows
    mlp_out      the same with site="mlp_out"                                     L rows
    heads_each   the same with site="heads", units="each": one probe per head     L x n_heads rows
    hf_heads     plain HF generate of L x n_heads unpatched rows of the target    (min_new_tokens = 10)

Each round runs every method once, in a rotating order, in one process; a shared machine's speed
drifts over minutes, and alternating runs see the same drift, so the ratios are the medians of the
per-round ratios. Targets (issue 13): mlp_out / resid_post <= 1.15, heads_each / hf_heads < 0.5.

    python benchmarks/site_benchmark.py --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_benchmark import SOURCE, _load  # noqa: E402  (the same models, positions and weight touching)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)

    import torch

    from pytest_patchscope import ENTITY_DESCRIPTION, Patchscope
    from pytest_patchscope.model.sites import locate_site

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    ctx = _load(True, True, args)
    scope = Patchscope(ctx["pm"])
    layers = range(scope.model.n_layers)
    n_heads = locate_site(scope.model, "heads").n_units
    rows = len(layers) * n_heads
    hf, tokenizer, n_new = ctx["hf"], ctx["tokenizer"], args.max_new_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ctx["eos"])

    def sweep(**kwargs: Any) -> Callable[[], Any]:
        return lambda: scope.sweep(SOURCE, ENTITY_DESCRIPTION, layers=layers, max_new_tokens=n_new, stop=(), clean=False, **kwargs)

    def hf_rows() -> Any:
        ids = torch.tensor([ctx["target_ids"]] * rows)
        return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad)

    methods: dict[str, Callable[[], Any]] = {
        "resid_post": sweep(),
        "mlp_out": sweep(site="mlp_out"),
        "heads_each": sweep(site="heads", units="each"),
        "hf_heads": hf_rows,
    }
    print(f"site benchmark: {len(layers)} layers, {n_heads} heads ({rows} head rows), {n_new} new tokens, "
          f"threads={torch.get_num_threads()}, {args.rounds} rounds")
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for number in range(args.rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            methods[name]()
            times[name].append(round(time.perf_counter() - started, 3))
    for name, values in times.items():
        print(f"  {name:<11} median {statistics.median(values):7.2f} s  {values}")
    for mine, base, bound in (("mlp_out", "resid_post", 1.15), ("heads_each", "hf_heads", 0.5)):
        ratios = [m / b for m, b in zip(times[mine], times[base])]
        ratio = statistics.median(ratios)
        verdict = "HOLDS" if ratio <= bound else "MISSED"
        print(f"  {mine}/{base} = {ratio:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}; target <= {bound}) -> {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
