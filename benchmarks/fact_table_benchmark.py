#!/usr/bin/env python
"""Time the same facts as one fact table and as test functions: two pytest runs, load included.

Workload (issue 25): N facts (default 60) x 6 source layers, 8 new tokens each, on the default
model. Fact k patches country k into "The capital city of x is" (i* = the x) and expects its
capital; some the model misses, which changes no work: every fact runs its whole sweep either way.

    table       facts.patchscope.yaml: N probes, which run as one batched job at the first item
    functions   test_facts.py: N test functions, each `patchscope.sweep(...)`, `patchscope.record`
                and `assert_localized` (the same calls a table item makes), each its own job

Each is a fresh `python -m pytest` subprocess in its own temporary project, timed from start to
exit (interpreter start, imports, model load, collection, the probes, the report). With
--rounds R the two alternate (table first in odd rounds), so a shared machine's drift hits both;
the ratio printed is table / functions of the median wall times. The target is <= 0.6.

    nice -n 5 python benchmarks/fact_table_benchmark.py                # one round (several minutes on 2 CPU cores)
    python benchmarks/fact_table_benchmark.py --rounds 3 --json out.json -- --patchscope-device cuda
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTRIES = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Russia", "Moscow"), ("England", "London"), ("Egypt", "Cairo"), ("China", "Beijing"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Turkey", "Ankara"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"),
    ("Belgium", "Brussels"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("India", "Delhi"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Israel", "Jerusalem"), ("Jordan", "Amman"),
    ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Bolivia", "La Paz"),
    ("Brazil", "Brasilia"), ("Australia", "Canberra"), ("Indonesia", "Jakarta"), ("Vietnam", "Hanoi"), ("Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Switzerland", "Bern"),
    ("Netherlands", "Amsterdam"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"),
]
TARGET = "The capital city of x is"


def table_text(facts: list[tuple[str, str]], layers: int, tokens: int) -> str:
    probes = "".join(f"  - id: {country}\n    source: {country}\n    expect: {capital}\n" for country, capital in facts)
    return (
        f'target: "{TARGET}"\ntarget_position: {{placeholder: x}}\nlayers: {list(range(layers))}\nmin_hits: 1\n'
        f"max_new_tokens: {tokens}\nprobes:\n{probes}"
    )


def functions_text(facts: list[tuple[str, str]], layers: int, tokens: int) -> str:
    head = f'from pytest_patchscope import Placeholder, assert_localized\n\nTARGET = "{TARGET}"\n'
    return head + "".join(
        f"\n\ndef test_{country}(patchscope):\n"
        f"    profile = patchscope.sweep({country!r}, TARGET, layers={list(range(layers))}, expect={capital!r}, "
        f'max_new_tokens={tokens}, target_position=Placeholder("x"))\n'
        "    patchscope.record(profile)\n    assert_localized(profile, min_hits=1)\n"
        for country, capital in facts
    )


def run(project: Path, target: str, extra: list[str]) -> tuple[float, str]:
    """Wall seconds of one pytest subprocess, and its final summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--patchscope-progress=off", target, *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=project, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    if done.returncode not in (0, 1) or not lines:
        sys.exit(f"pytest {target} failed to run (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed, lines[-1].strip("= ")


def outcome_counts(summary: str) -> dict[str, int]:
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed)", summary)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=60, help=f"how many facts (at most {len(COUNTRIES)})")
    parser.add_argument("--layers", type=int, default=6, help="source layers per fact: 0..N-1")
    parser.add_argument("--tokens", type=int, default=8, help="max_new_tokens")
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of each (median wall time)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest options for both runs (e.g. --patchscope-device cuda)")
    args = parser.parse_args()
    if not 1 <= args.facts <= len(COUNTRIES):
        parser.error(f"--facts must be from 1 to {len(COUNTRIES)}")
    facts = COUNTRIES[: args.facts]
    times: dict[str, list[float]] = {"table": [], "functions": []}
    summaries: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fact-table-bench-") as tmp:
        projects = {}
        for kind, name, text in (
            ("table", "facts.patchscope.yaml", table_text(facts, args.layers, args.tokens)),
            ("functions", "test_facts.py", functions_text(facts, args.layers, args.tokens)),
        ):
            project = Path(tmp) / kind
            project.mkdir()
            (project / "pytest.ini").write_text("[pytest]\n")
            (project / name).write_text(text)
            projects[kind] = (project, name)
        for round_ in range(args.rounds):
            order = ("table", "functions") if round_ % 2 == 0 else ("functions", "table")
            for kind in order:
                elapsed, summaries[kind] = run(*projects[kind], args.pytest_args)
                times[kind].append(elapsed)
                print(f"round {round_ + 1} {kind:9} {elapsed:7.1f} s  ({summaries[kind]})", flush=True)
    if outcome_counts(summaries["table"]) != outcome_counts(summaries["functions"]):
        print(f"warning: the verdicts differ: table {summaries['table']!r}, functions {summaries['functions']!r}")
    table, functions = statistics.median(times["table"]), statistics.median(times["functions"])
    ratio = table / functions
    print(
        f"{args.facts} facts x {args.layers} layers, {args.tokens} tokens: table {table:.1f} s, functions {functions:.1f} s, "
        f"ratio table/functions {ratio:.2f} (target <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'})"
    )
    if args.json:
        args.json.write_text(json.dumps({
            "facts": args.facts, "layers": args.layers, "max_new_tokens": args.tokens, "rounds": args.rounds,
            "seconds": times, "median_seconds": {"table": table, "functions": functions}, "ratio": ratio,
            "summaries": summaries, "pytest_args": args.pytest_args, "machine": platform.platform(),
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
