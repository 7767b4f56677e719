"""Scoring candidates vs greedy generation over a 30-layer sweep, on the default model.

Issue 15's target: scoring 5 candidates of up to 4 tokens over a 30-layer sweep costs under 1.3x
the same sweep generating max_new_tokens=4 greedily. Both sweeps run the same probes (token
identity, "The capital of France is", layers 0-29, with the clean row); rounds alternate the two
and the ratio of medians is printed.

    python benchmarks/scoring_benchmark.py [--rounds 7] [--candidates Paris,London,...]
"""
from __future__ import annotations

import argparse
import statistics
import time

from pytest_patchscope import TOKEN_IDENTITY, Patchscope
from pytest_patchscope.engine.resolve import resolve_probe

SOURCE = "The capital of France is"
CANDIDATES = "Paris,London,Rome,Rio de Janeiro,Addis Ababa"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--candidates", default=CANDIDATES, help="comma-separated candidates")
    args = parser.parse_args()
    candidates = args.candidates.split(",")
    scope = Patchscope.load(progress=False)
    layers = range(scope.model.n_layers)
    probe = scope.probe(SOURCE, TOKEN_IDENTITY, layer=0, candidates=candidates, max_new_tokens=0)
    lengths = [len(ids) for ids in resolve_probe(probe, scope.model).candidate_ids]
    print(f"candidates {candidates}: {lengths} tokens after the token-identity prompt")

    def greedy() -> object:
        return scope.sweep(SOURCE, TOKEN_IDENTITY, layers=layers, expect="Paris", max_new_tokens=4, stop=())

    def scoring() -> object:
        return scope.sweep(SOURCE, TOKEN_IDENTITY, layers=layers, candidates=candidates, max_new_tokens=0)

    greedy(), scoring()  # warm up
    times: dict[str, list[float]] = {"greedy": [], "scoring": []}
    for _ in range(args.rounds):
        for name, run in (("greedy", greedy), ("scoring", scoring)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    g, s = statistics.median(times["greedy"]), statistics.median(times["scoring"])
    print(f"greedy max_new_tokens=4 sweep: median {g:.3f} s over {args.rounds} rounds ({', '.join(f'{t:.2f}' for t in times['greedy'])})")
    print(f"scoring {len(candidates)} candidates sweep: median {s:.3f} s ({', '.join(f'{t:.2f}' for t in times['scoring'])})")
    print(f"scoring/greedy = {s / g:.3f} (target < 1.3)")


if __name__ == "__main__":
    main()
