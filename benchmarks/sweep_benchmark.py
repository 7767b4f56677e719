#!/usr/bin/env python
"""Time one Patchscopes layer sweep done five ways, and a source x target layer grid, on one machine.

Workload (a), a layer sweep: source "Albert Einstein" (i = its last token), target = the
ENTITY_DESCRIPTION prompt (i* = its final " x"), l* = l for every layer l, greedy, 10 new tokens.

    ours          Patchscope.sweep(source, ENTITY_DESCRIPTION, layers=range(L), max_new_tokens=10, stop=())
                  (30 patched rows plus the target's unpatched continuation, one more row)
    ours_lean     the same with clean=False: exactly the 30 patched rows every other method runs
                  (timed in the paired rounds only)
    tl_loop       naive TransformerLens: run_with_cache(source), then per layer a prompt-only hook on
                  blocks.{l}.hook_out and one bridge.generate(...) (batch 1, KV cache, greedy)
    tl_batched    TransformerBridge.generate of the same L target rows, no patch (a reference point)
    hf            plain HF generate of the same L rows, no patch, on a separately loaded, unwrapped model
                  (min_new_tokens = max_new_tokens, so it does the full work)
    nnsight       one nnsight generate with L invokes, each patching model.model.layers[l].output[:, i*]
                  in the prompt pass (skipped when nnsight is not installed or does not work)

Workload (b), a grid: Patchscope.sweep(..., layers=range(L), target_layers=range(L)) = L*L probes,
with this project only; the HF reference for L*L plain rows is extrapolated from (a) unless
--grid-hf runs it for real (in chunks). --batch-memory-mb adds a grid run under that batch bound.

Every method runs in its own child process (`--method NAME`), so its peak RSS can be read:
the child resets the kernel's high-water mark (/proc/self/clear_refs) once its model is loaded and
reports VmHWM - VmRSS(at that point), i.e. the peak memory the method itself added.

Then one more child times the fast methods (ours, ours_lean, tl_batched, hf, nnsight) together, one run each
per round in a rotating order (--paired-rounds, default 8). A shared machine's speed drifts over
minutes; alternating runs see the same drift, so the targets are judged on the median of these
paired per-round ratios (tl_loop, too slow to alternate, is compared across processes).

    python benchmarks/sweep_benchmark.py              # everything (several minutes on 2 CPU cores)
    python benchmarks/sweep_benchmark.py --quick      # 6 layers, 6x6 grid, 1 repeat (a few minutes)
    python benchmarks/sweep_benchmark.py --threads 2 --repeats 5 --batch-memory-mb 256 --json out.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SOURCE = "Albert Einstein"
DEFAULT_BATCH_MEMORY_MB = 2048  # pytest_patchscope.engine's default; read from it when importable
ALL_METHODS = ("ours", "tl_loop", "tl_batched", "hf", "nnsight", "ours_grid", "ours_grid_bounded", "hf_grid")
BRIDGE_METHODS = ("ours", "ours_grid", "ours_grid_bounded", "tl_loop", "tl_batched")
PAIRED_METHODS = ("ours", "ours_lean", "tl_batched", "hf", "nnsight")  # the fast sweep methods, timed in alternation
TARGETS = (  # (baseline, required speed-up of ours over it)
    ("hf", 1 / 0.6),
    ("nnsight", 2.0),
    ("tl_loop", 15.0),
)


# ============================================================================================
# child side: one method, one process
# ============================================================================================
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mb() -> float:
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _hf_dir(model_spec: str | None) -> Path:
    from pytest_patchscope.model.loading import dequantized_cache_dir, resolve_model_source

    source = resolve_model_source(model_spec)
    return dequantized_cache_dir(source) if source.kind == "gguf" else source.path


def _load_raw_hf(model_spec: str | None) -> tuple[Any, Any]:
    """A separately loaded, unwrapped HF model and its tokenizer (no TransformerLens anywhere)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = str(_hf_dir(model_spec))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, tokenizer


def _positions(tokenizer: Any, target: str) -> tuple[list[int], int, list[int], int]:
    """Token ids of target and source under the tokenizer's own convention, i* and i."""
    target_ids = list(tokenizer(target, add_special_tokens=True)["input_ids"])
    source_ids = list(tokenizer(SOURCE, add_special_tokens=True)["input_ids"])
    i_star = max(k for k, t in enumerate(target_ids) if tokenizer.decode([t]).strip() == "x")
    return target_ids, i_star, source_ids, len(source_ids) - 1


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(tokens):
        if t in eos:
            return tokens[:k]
    return tokens


def _timed(fn: Any, repeats: int) -> tuple[list[float], list[float], Any]:
    """Wall and CPU seconds (this process, all threads) of each call."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return times, cpu, result


def _touch(model: Any) -> None:
    """Fault in every weight page: safetensors weights are mmapped and load lazily, which would
    otherwise count the model itself as memory the first run added."""
    import torch

    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.numel():
                tensor.sum()


def _load(bridge: bool, raw: bool, args: argparse.Namespace) -> dict[str, Any]:
    """The models a method needs (the bridged PatchscopeModel, a separate raw HF model) and positions."""
    from pytest_patchscope.probes.presets import ENTITY_DESCRIPTION

    ctx: dict[str, Any] = {}
    if bridge:
        from pytest_patchscope.model.loading import load_model

        pm = load_model(args.model)
        _touch(pm.hf)
        ctx.update(pm=pm, tokenizer=pm.tokenizer, eos=set(pm.eos_token_ids))
    if raw:
        hf, tokenizer = _load_raw_hf(args.model)
        _touch(hf)
        eos = hf.generation_config.eos_token_id
        ctx["hf"] = hf
        ctx.setdefault("tokenizer", tokenizer)
        ctx.setdefault("eos", {eos} if isinstance(eos, int) else set(eos or []))
    target_ids, i_star, source_ids, i_src = _positions(ctx["tokenizer"], ENTITY_DESCRIPTION.target)
    ctx.update(target_ids=target_ids, i_star=i_star, source_ids=source_ids, i_src=i_src)
    return ctx


def run_paired(args: argparse.Namespace) -> dict[str, Any]:
    """Every fast method in one process, one run each per round, in a rotating order.

    A shared machine's speed drifts over minutes; runs that alternate see the same drift, so the
    per-round ratios ours/base are paired comparisons. Peak memory comes from the per-method children.
    """
    import torch

    torch.set_num_threads(args.threads)
    methods = [m for m in PAIRED_METHODS if m != "nnsight" or _nnsight_problem() is None]
    ctx = _load(True, True, args)
    torch.set_grad_enabled(False)
    built = {m: _build(m, ctx, args) for m in methods}
    for _fn, warm, _ in built.values():
        warm()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for number in range(args.paired_rounds):
        shift = number % len(methods)
        for m in methods[shift:] + methods[:shift]:
            started = time.perf_counter()
            built[m][0]()
            times[m].append(round(time.perf_counter() - started, 3))
    ratios = {
        mine: {m: [round(o / b, 3) for o, b in zip(times[mine], times[m])] for m in methods if not m.startswith("ours")}
        for mine in ("ours", "ours_lean")
    }
    return {"method": "paired", "methods": methods, "times": times, "ratios": ratios, "threads": torch.get_num_threads()}


def _build(method: str, ctx: dict[str, Any], args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The measured callable of one method, a small warm-up for it, and the Patchscope (ours only)."""
    import torch

    from pytest_patchscope.probes.presets import ENTITY_DESCRIPTION

    pm, hf, tokenizer = ctx.get("pm"), ctx.get("hf"), ctx["tokenizer"]
    target_ids, i_star, source_ids, i_src = ctx["target_ids"], ctx["i_star"], ctx["source_ids"], ctx["i_src"]
    eos, layers, n_new = ctx["eos"], _layers(args), args.max_new_tokens
    rows = len(layers)
    scope: Any = None
    warm: Any
    if method in ("ours", "ours_lean", "ours_grid", "ours_grid_bounded"):
        from pytest_patchscope import Patchscope

        kwargs = {} if method != "ours_grid_bounded" else {"batch_memory_mb": args.batch_memory_mb}
        scope = Patchscope(pm, **kwargs)
        grid = "grid" in method
        clean = method != "ours_lean"

        def fn() -> Any:
            return scope.sweep(
                SOURCE, ENTITY_DESCRIPTION, layers=layers, target_layers=layers if grid else None, max_new_tokens=n_new, stop=(), clean=clean
            )

        def warm() -> Any:  # the grid warms up on a small sweep: the same code paths, a fraction of the time
            return scope.sweep(SOURCE, ENTITY_DESCRIPTION, layers=layers[:2], max_new_tokens=n_new, stop=()) if grid else fn()

    elif method == "tl_loop":
        bridge = pm.bridge
        target = torch.tensor([target_ids])
        source = torch.tensor([source_ids])

        def sweep_layers(ls: list[int]) -> dict[int, list[int]]:
            _, cache = bridge.run_with_cache(source, names_filter=lambda name: name.endswith("hook_out"))
            states = {l: cache[f"blocks.{l}.hook_out"][0, i_src].clone() for l in ls}
            del cache
            out: dict[int, list[int]] = {}
            for l in ls:
                h = states[l]

                def hook(value: Any, hook: Any, h: Any = h) -> Any:
                    if value.shape[1] > 1:  # the prompt pass only; decode steps see [b, 1, d]
                        value[:, i_star, :] = h
                    return value

                with bridge.hooks(fwd_hooks=[(f"blocks.{l}.hook_out", hook)]):
                    seq = bridge.generate(
                        target, max_new_tokens=n_new, do_sample=False, use_past_kv_cache=True,
                        stop_at_eos=True, verbose=False, return_type="tokens",
                    )
                out[l] = seq[0, len(target_ids):].tolist()
            return out

        fn = lambda: sweep_layers(layers)  # noqa: E731
        warm = lambda: sweep_layers(layers[:2])  # noqa: E731

    elif method == "tl_batched":
        bridge = pm.bridge
        batch = torch.tensor([target_ids] * rows)

        def fn() -> Any:
            return bridge.generate(
                batch, max_new_tokens=n_new, do_sample=False, use_past_kv_cache=True,
                stop_at_eos=False, verbose=False, return_type="tokens",
            )

        warm = fn

    elif method in ("hf", "hf_grid"):
        n_rows = rows if method == "hf" else len(layers) ** 2
        chunk = rows if method == "hf" else args.hf_chunk
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)

        def generate(n: int) -> Any:
            ids = torch.tensor([target_ids] * n)
            return hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad,
            )

        def fn() -> Any:
            outs = []
            for first in range(0, n_rows, chunk):
                outs.append(generate(min(chunk, n_rows - first)))
            return outs[0]

        warm = lambda: generate(rows)  # noqa: E731

    elif method == "nnsight":
        import warnings

        from nnsight import LanguageModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = LanguageModel(hf, tokenizer=tokenizer)
        target_text = ENTITY_DESCRIPTION.target

        def nn_sweep(ls: list[int]) -> Any:
            states: list[Any] = []
            with lm.trace(SOURCE):
                for l in range(max(ls) + 1):  # modules must be reached in execution order
                    if l in ls:
                        states.append(lm.model.layers[l].output[0, i_src].save())
            by_layer = dict(zip([l for l in range(max(ls) + 1) if l in ls], states))
            with lm.generate(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False) as tracer:
                for l in ls:
                    with tracer.invoke(target_text):
                        # decoder layers return a plain tensor in transformers 5; no .iter, so this
                        # edit binds to the first call only: the prompt pass.
                        lm.model.layers[l].output[:, i_star, :] = by_layer[l]
                with tracer.invoke():
                    ids = tracer.result.save()
            return ids

        fn = lambda: nn_sweep(layers)  # noqa: E731
        warm = lambda: nn_sweep(layers[:2])  # noqa: E731
    else:
        raise SystemExit(f"unknown method {method!r}")

    return fn, warm, scope


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from pytest_patchscope.probes.presets import ENTITY_DESCRIPTION

    method = args.method
    layers = _layers(args)
    n_new = args.max_new_tokens
    info: dict[str, Any] = {"method": method, "threads": torch.get_num_threads(), "loadavg_start": _loadavg()}
    started = time.perf_counter()

    # ---- load, then build the measured callable (and a small warm-up) ---------------------
    ctx = _load(method in BRIDGE_METHODS, method not in BRIDGE_METHODS, args)
    info.update(load_s=round(time.perf_counter() - started, 2), target_len=len(ctx["target_ids"]),
                i_star=ctx["i_star"], source_len=len(ctx["source_ids"]))
    if method == "nnsight":
        import nnsight

        info["nnsight_version"] = nnsight.__version__
    pm, target_ids, i_star, eos, rows = ctx.get("pm"), ctx["target_ids"], ctx["i_star"], ctx["eos"], len(layers)
    torch.set_grad_enabled(False)
    fn, warm, scope = _build(method, ctx, args)

    # ---- measure --------------------------------------------------------------------------
    info["rss_loaded_mb"] = round(_rss_mb(), 1)
    info["peak_method"] = "VmHWM after clear_refs" if _reset_peak_rss() else "ru_maxrss (includes loading)"
    t0 = time.perf_counter()
    warm()
    info["warmup_s"] = round(time.perf_counter() - t0, 3)
    repeats = args.repeats
    if method == "tl_loop":
        repeats = args.tl_loop_repeats
    elif method in ("ours_grid", "ours_grid_bounded", "hf_grid"):
        repeats = args.grid_repeats
    times, cpu, result = _timed(fn, repeats)
    info["peak_added_mb"] = round(_peak_mb() - info["rss_loaded_mb"], 1)
    info["times"] = [round(t, 3) for t in times]
    info["median_s"] = round(statistics.median(times), 3)
    info["cpu_times"] = [round(t, 3) for t in cpu]
    info["median_cpu_s"] = round(statistics.median(cpu), 3)
    info["loadavg_end"] = _loadavg()

    # ---- outputs for agreement and token counts -----------------------------------------
    if method in ("ours", "ours_lean", "ours_grid", "ours_grid_bounded"):
        info["texts"] = {str(c.layer): c.text for c in result.cells} if method == "ours" else {}
        info["clean_text"] = result.clean_text
        info["probes"] = len(result.cells)
        if method == "ours":  # the token ids: the same probes through run() (not timed)
            probes = [scope.probe(SOURCE, ENTITY_DESCRIPTION, layer=l, max_new_tokens=n_new, stop=()) for l in layers]
            results = scope.run(probes)
            info["tokens"] = {str(l): list(r.tokens) for l, r in zip(layers, results)}
            info["clean_tokens"] = list(results[0].clean_tokens)
            info["i_star_engine"] = results[0].resolved.target_index
            info["generated_tokens"] = sum(len(r.tokens) for r in results) + len(results[0].clean_tokens)
            info["sweep_matches_run"] = [c.text for c in result.cells] == [r.text for r in results]
        else:
            info["generated_tokens"] = None
            try:  # how many batches the engine splits the grid into (private API: best effort)
                stub = _row_stub(pm, target_ids, i_star, n_new)
                info["chunks"] = len(scope.engine._chunks([stub] * (len(layers) ** 2 + 1)))
            except Exception:
                info["chunks"] = None
    elif method == "tl_loop":
        info["tokens"] = {str(l): toks for l, toks in result.items()}
        info["generated_tokens"] = sum(len(t) for t in result.values())
    elif method in ("tl_batched", "hf", "hf_grid"):
        new = result[:, len(target_ids):].tolist()
        info["row_tokens"] = new[0]
        info["rows_identical"] = all(r == new[0] for r in new)
        info["generated_tokens"] = (rows if method != "hf_grid" else len(layers) ** 2) * n_new
    elif method == "nnsight":
        new = result[:, len(target_ids):].tolist()
        info["tokens"] = {str(l): _cut_at_eos(t, eos) for l, t in zip(layers, new)}
        info["generated_tokens"] = len(new) * len(new[0])
        info["prompt_len_seen"] = int(result.shape[1]) - n_new
    info["eos"] = sorted(eos)
    info["rows"] = rows
    return info


def _row_stub(pm: Any, target_ids: list[int], i_star: int, n_new: int) -> Any:
    from pytest_patchscope.engine.rows import Row

    return Row(target_ids=tuple(target_ids), split=i_star, max_new_tokens=n_new)


def _layers(args: argparse.Namespace) -> list[int]:
    return list(range(0, args.n_layers, args.layer_step))


# ============================================================================================
# parent side: spawn, collect, compare, print
# ============================================================================================
def _spawn(method: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out_path = handle.name
    cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--child-out", out_path] + _forward_args(args)
    print(f"  running {method:<18} ...", end="", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    try:
        if proc.returncode != 0:
            lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            print(f" FAILED in {wall:.0f}s: {reason}")
            return {"method": method, "error": reason}
        info = json.loads(Path(out_path).read_text())
        if method == "paired":
            print(f" {wall:5.0f}s  ({len(next(iter(info['times'].values())))} rounds of {', '.join(info['methods'])})")
        else:
            print(
                f" {wall:5.0f}s  (load {info['load_s']}s, warm-up {info['warmup_s']}s, runs {info['times']}, "
                f"load avg {info['loadavg_start']}->{info['loadavg_end']})"
            )
        return info
    finally:
        Path(out_path).unlink(missing_ok=True)


def _forward_args(args: argparse.Namespace) -> list[str]:
    out = [
        "--threads", str(args.threads), "--repeats", str(args.repeats), "--tl-loop-repeats", str(args.tl_loop_repeats),
        "--grid-repeats", str(args.grid_repeats), "--max-new-tokens", str(args.max_new_tokens),
        "--paired-rounds", str(args.paired_rounds),
        "--n-layers", str(args.n_layers), "--layer-step", str(args.layer_step), "--hf-chunk", str(args.hf_chunk),
    ]
    if args.batch_memory_mb is not None:
        out += ["--batch-memory-mb", str(args.batch_memory_mb)]
    if args.model:
        out += ["--model", args.model]
    return out


def _nnsight_problem() -> str | None:
    if importlib.util.find_spec("nnsight") is None:
        return "not installed (pip install nnsight --no-deps, then its light deps: greenlet cloudpickle zstandard websocket-client)"
    return None


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return f"load average {os.getloadavg()}"


def _versions() -> str:
    parts = []
    for name in ("torch", "transformers", "transformer_lens", "nnsight"):
        try:
            from importlib.metadata import version

            parts.append(f"{name} {version(name.replace('_', '-'))}")
        except Exception:
            parts.append(f"{name} -")
    return ", ".join(parts)


def _fmt_mb(info: dict[str, Any]) -> str:
    return f"{info['peak_added_mb']:>8.0f}" if "peak_added_mb" in info else f"{'-':>8}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 layers (every 5th), 6x6 grid, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median reported); default 3")
    parser.add_argument("--paired-rounds", type=int, default=8, help="rounds of the fast methods timed in alternation "
                        "in one process, for the target ratios (0: judge on the separate children); default 8")
    parser.add_argument("--tl-loop-repeats", type=int, default=1, help="timed repeats of the slow TL per-probe loop; default 1")
    parser.add_argument("--grid-repeats", type=int, default=1, help="timed repeats of the grid runs; default 1")
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP/MKL threads for every method; default 1 "
                        "(on a small shared machine more threads than idle cores makes OpenMP spin)")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--n-layers", type=int, default=None, help="layers to sweep (default: all of the model's)")
    parser.add_argument("--layer-step", type=int, default=1)
    parser.add_argument("--batch-memory-mb", type=float, default=None, help="also run the grid with this batch memory bound")
    parser.add_argument("--grid-hf", action="store_true", help="run HF plain generate of L*L rows for real (slow) instead of extrapolating")
    parser.add_argument("--hf-chunk", type=int, default=90, help="rows per HF generate call in --grid-hf; default 90")
    parser.add_argument("--no-grid", action="store_true", help="skip workload (b)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    parser.add_argument("--model", default=None, help="model spec for load_model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--json", default=None, help="write all measurements to this JSON file")
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.quick:
        args.repeats, args.layer_step, args.paired_rounds = 1, 5, 2
        args.tl_loop_repeats = args.grid_repeats = 1
    if args.n_layers is None:
        if args.method is None:
            from transformers import AutoConfig

            args.n_layers = int(AutoConfig.from_pretrained(str(_hf_dir(args.model))).num_hidden_layers)
        else:
            raise SystemExit("--n-layers is required in child mode")

    if args.method is not None:  # child
        info = run_paired(args) if args.method == "paired" else run_child(args)
        Path(args.child_out).write_text(json.dumps(info))
        return 0

    # ---- parent ----------------------------------------------------------------------------
    global DEFAULT_BATCH_MEMORY_MB
    try:
        from pytest_patchscope.engine.runner import DEFAULT_BATCH_MEMORY_MB
    except ImportError:
        pass
    layers = _layers(args)
    L = len(layers)
    methods = list(ALL_METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    if args.no_grid:
        methods = [m for m in methods if "grid" not in m]
    if args.batch_memory_mb is None:
        methods = [m for m in methods if m != "ours_grid_bounded"]
    if not args.grid_hf:
        methods = [m for m in methods if m != "hf_grid"]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")

    print("Patchscope sweep benchmark")
    print(f"  machine: {platform.machine()}, {os.cpu_count()} CPUs, {_uptime()}")
    load = _loadavg()
    if load is not None and os.cpu_count() and load > 0.5 * os.cpu_count():
        print(f"  WARNING: load average {load} on {os.cpu_count()} CPUs: other processes compete for the cores; "
              "times are noisy and inflated (compare ratios, and look at each method's load avg below)")
    print(f"  {_versions()}; threads={args.threads} (OMP/MKL_NUM_THREADS={args.threads} for every method)")
    print(f"  workload (a): {L} layers x 1 probe, source {SOURCE!r}, target ENTITY_DESCRIPTION, l*=l, "
          f"{args.max_new_tokens} new tokens, greedy; repeats {args.repeats} (tl_loop {args.tl_loop_repeats}), "
          f"then {args.paired_rounds} paired rounds")
    if not args.no_grid:
        print(f"  workload (b): {L}x{L} = {L * L} probes (l x l*), this project only; repeats {args.grid_repeats}")

    results: dict[str, dict[str, Any]] = {}
    nnsight_problem = _nnsight_problem()
    for method in methods:
        if method == "nnsight" and nnsight_problem:
            print(f"  nnsight: not installed/unsupported ({nnsight_problem})")
            results[method] = {"method": method, "error": nnsight_problem}
            continue
        results[method] = _spawn(method, args, env)
        if method == "nnsight" and "error" in results[method]:
            print(f"  nnsight: not installed/unsupported ({results[method]['error']})")
    paired: dict[str, Any] = {}
    if args.paired_rounds and "ours" in methods:
        paired = _spawn("paired", args, env)
    ok = {m: r for m, r in results.items() if "error" not in r}

    # ---- table (a) ---------------------------------------------------------------------------
    print(f"\nWorkload (a): {L}-layer sweep, median wall time")
    print(f"  {'method':<12} {'median s':>9} {'runs (wall s)':>26} {'CPU s':>7} {'tokens':>7} {'peak+MB':>8} {'ours faster by':>15} {'(CPU)':>7}")
    ours = ok.get("ours")
    for m in ("ours", "tl_loop", "tl_batched", "hf", "nnsight"):
        if m not in results:
            continue
        r = results[m]
        if "error" in r:
            print(f"  {m:<12} {'-':>9} {'error: ' + r['error'][:60]}")
            continue
        ratio = f"{r['median_s'] / ours['median_s']:.2f}x" if ours and m != "ours" else ""
        cpu_ratio = f"{r['median_cpu_s'] / ours['median_cpu_s']:.2f}x" if ours and m != "ours" else ""
        print(f"  {m:<12} {r['median_s']:>9.2f} {str(r['times']):>26} {r['median_cpu_s']:>7.2f} {str(r['generated_tokens']):>7} "
              f"{_fmt_mb(r)} {ratio:>15} {cpu_ratio:>7}")
    if ours:
        note = ""
        full = L * args.max_new_tokens
        patched = ours["generated_tokens"] - len(ours.get("clean_tokens", []))
        if patched < full:
            note = f" (EOS ended some rows early: {patched}/{full} patched tokens; the baselines do the full {full})"
        print(f"  ours generated {patched} patched + {len(ours.get('clean_tokens', []))} clean tokens{note}")
        print(f"  target prompt: {ours['target_len']} tokens, i* = {ours['i_star']} (engine resolved {ours.get('i_star_engine')})")
        if not ours.get("sweep_matches_run", True):
            print("  WARNING: the timed sweep() texts differ from the same probes through run()")

    # ---- targets --------------------------------------------------------------------------------
    verdicts: dict[str, Any] = {}
    paired_ok = paired if "ratios" in paired else {}
    if paired_ok:
        print("\nPaired rounds (one process, methods alternating, order rotating): wall s per round")
        for m, ts in paired_ok["times"].items():
            print(f"  {m:<12} median {statistics.median(ts):6.2f}  {ts}")
    if ours:
        print("\nTargets" + (" (median of the paired per-round ratios where measured)" if paired_ok else ""))
        for mine, label in (("ours", "ours"), ("ours_lean", "ours_lean (clean=False: the same 30 rows as the others)")):
            ratios = paired_ok.get("ratios", {}).get(mine, {})
            if mine != "ours" and not ratios:
                continue
            print(f"  {label}:")
            for base, speedup in TARGETS:
                if base in ratios:
                    per_round = ratios[base]
                    ratio, how = statistics.median(per_round), f"paired, rounds {min(per_round):.3f}-{max(per_round):.3f}"
                elif base in ok and mine == "ours":
                    ratio, how = ours["median_s"] / ok[base]["median_s"], "separate processes"
                else:
                    print(f"    vs {base:<10}: not measured")
                    continue
                holds = ratio <= 1 / speedup + 1e-9
                verdicts.setdefault(mine, {})[base] = {"over_base": round(ratio, 3), "required": round(1 / speedup, 3), "holds": holds, "how": how}
                goal = f"<= {1 / speedup:.3g}x {base} ({speedup:.3g}x faster)"
                print(f"    {goal:<34}: {mine}/{base} = {ratio:.3f} wall ({1 / ratio:.2f}x faster)  -> "
                      f"{'HOLDS' if holds else 'MISSED'}   [{how}]")

    # ---- agreement ---------------------------------------------------------------------------
    agreement: dict[str, Any] = {}
    if ours:
        print("\nAgreement (greedy token ids, cut at EOS)")
        eos = set(ours["eos"])
        for other in ("tl_loop", "nnsight"):
            if other not in ok:
                print(f"  ours vs {other:<10}: not measured")
                continue
            bad = [l for l in map(str, layers) if _cut_at_eos(ours["tokens"][l], eos) != _cut_at_eos(ok[other]["tokens"][l], eos)]
            agreement[other] = bad
            print(f"  ours vs {other:<10}: {L - len(bad)}/{L} layers identical" + (f"; MISMATCH at layers {bad}" if bad else ""))
            for l in bad:
                print(f"      layer {l}: ours {ours['texts'][l]!r}")
                print(f"      {'':>{len(l) + 7}}{other} {_decode(ok[other]['tokens'][l], args)!r}")
        for other in ("tl_batched", "hf"):
            if other in ok:
                same = _cut_at_eos(ok[other]["row_tokens"], eos) == _cut_at_eos(ours["clean_tokens"], eos)
                agreement[f"clean_vs_{other}"] = same
                print(f"  ours clean row vs {other} rows: {'identical' if same else 'DIFFERENT'}"
                      f" (all {other} rows identical to each other: {ok[other]['rows_identical']})")

    # ---- grid ----------------------------------------------------------------------------------
    if not args.no_grid and any(m in results for m in ("ours_grid", "ours_grid_bounded", "hf_grid")):
        print(f"\nWorkload (b): {L}x{L} grid = {L * L} probes")
        print(f"  {'method':<32} {'median s':>9} {'CPU s':>7} {'peak+MB':>8} {'chunks':>7}")
        for m in ("ours_grid", "ours_grid_bounded", "hf_grid"):
            r = results.get(m)
            if r is None:
                continue
            if "error" in r:
                print(f"  {m:<32} error: {r['error'][:80]}")
                continue
            if m == "ours_grid":
                label = f"ours (batch_memory_mb {DEFAULT_BATCH_MEMORY_MB:g})"
            elif m == "ours_grid_bounded":
                label = f"ours (batch_memory_mb {args.batch_memory_mb:g})"
            else:
                label = f"HF plain {L * L} rows (chunks {args.hf_chunk})"
            print(f"  {label:<32} {r['median_s']:>9.2f} {r['median_cpu_s']:>7.2f} {_fmt_mb(r)} {str(r.get('chunks', '')):>7}")
        if "hf" in ok and "hf_grid" not in ok:
            est = ok["hf"]["median_s"] * L
            print(f"  {'HF plain ' + str(L * L) + ' rows (extrapolated)':<32} {est:>9.2f} {ok['hf']['median_cpu_s'] * L:>7.2f}        - {'':>7}"
                  f"  = {L} x the measured {L}-row generate ({ok['hf']['median_s']:.2f}s)")
            if "ours_grid" in ok:
                print(f"  ours grid / HF plain grid = {ok['ours_grid']['median_s'] / est:.3f}")
        print("  peak+MB = peak RSS the method added above its loaded model (child process, VmHWM reset after load)")

    if args.json:
        summary = {"args": vars(args), "results": results, "paired": paired, "targets": verdicts, "agreement": agreement}
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"\nwrote {args.json}")
    return 0


def _decode(tokens: list[int], args: argparse.Namespace) -> str:
    from transformers import AutoTokenizer

    global _TOKENIZER
    if "_TOKENIZER" not in globals():
        _TOKENIZER = AutoTokenizer.from_pretrained(str(_hf_dir(args.model)))
    return _TOKENIZER.decode(tokens)


if __name__ == "__main__":
    sys.exit(main())
