#!/usr/bin/env python
"""What batching buys a Hypothesis property: N drawn probes one per example vs one check_all job.

The probes are the identity property of example_suites/robustness (source "The capital of France
is", targets from strategies.identity_prompts(), layers 23-29, 4 new tokens), drawn once with a
fixed seed. "one by one" runs each with Patchscope.generate, as a @given test with one probe per
example does; "check_all" runs them all with Patchscope.check_all, as a @given test over
st.lists(strategies.probes(...)) does. Rounds alternate the two (a shared machine drifts).

    python benchmarks/property_benchmark.py --probes 20 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from hypothesis import find, settings
    from hypothesis import strategies as st

    from pytest_patchscope import Patchscope
    from pytest_patchscope import strategies as ps

    torch.set_num_threads(args.threads)
    scope = Patchscope.load()
    strategy = st.lists(ps.probes(sources=["The capital of France is"], targets=ps.identity_prompts(), layers=st.integers(23, 29),
                                  max_new_tokens=4), min_size=args.probes, max_size=args.probes)
    drawn = find(strategy, lambda probes: len({p.target for p in probes}) >= min(args.probes, 10),
                 settings=settings(database=None, derandomize=True, max_examples=1000))

    def holds(result: Any) -> bool:
        return "paris" in result.text.lower()

    def one_by_one() -> None:
        for probe in drawn:
            assert holds(scope.run([probe])[0])

    def batched() -> None:
        scope.check_all(drawn, holds)

    one_by_one()  # warm-up
    batched()
    times: dict[str, list[float]] = {"one by one": [], "check_all": []}
    for number in range(args.rounds):
        order = [("one by one", one_by_one), ("check_all", batched)]
        for name, fn in order if number % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            fn()
            times[name].append(round(time.perf_counter() - started, 3))
    print(f"property benchmark: {len(drawn)} drawn probes ({len({p.target for p in drawn})} distinct targets), "
          f"threads={torch.get_num_threads()}, {args.rounds} rounds")
    for name, values in times.items():
        print(f"  {name:<11} median {statistics.median(values):6.2f} s  {values}")
    ratios = [a / b for a, b in zip(times["one by one"], times["check_all"])]
    print(f"  check_all is {statistics.median(ratios):.2f}x faster (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
