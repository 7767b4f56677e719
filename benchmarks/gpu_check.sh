#!/usr/bin/env bash
# GPU machine check for pytest-xdist: one worker per GPU, each on its own device; the time (probes per
# second) of a 30x30 source x target layer grid sweep on one GPU in float32 and in bfloat16; and
# device_map=auto against one device. Installs nothing: run it from a checkout whose
# environment is already set up (make test once, or PYTHON=/path/to/venv/bin/python).
#
#   benchmarks/gpu_check.sh               # on a GPU machine: pytest -n <GPUs>, then the 30x30 grid
#   benchmarks/gpu_check.sh --cpu-smoke   # anywhere: 2 CPU workers with a fake CUDA_VISIBLE_DEVICES=0,1
#                                         # (device auto falls back to the CPU) on a small generated
#                                         # suite (SUITE=example_suites to run those), then a 3x3 grid
#   SUITE=path/to/tests benchmarks/gpu_check.sh   # another suite than example_suites
#
# Each worker's device comes from the plugin's own "patchscope workers" terminal section (one
# "gwN: device ..., CUDA_VISIBLE_DEVICES=..." line per worker that loaded a model): no conftest.
# Bounded: pytest gets 180 s, each grid 90 s, the device_map check 120 s. Exit status 0 only when every check passed; the last
# line is a one-line summary.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
case "${1:-}" in
    --cpu-smoke) SMOKE=1 ;;
    "") ;;
    *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
SUITE_GIVEN=${SUITE:+1}
SUITE=${SUITE:-example_suites}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failures=()

if [ "$SMOKE" = 1 ]; then
    N=2
    DEVICE=cpu
    GRID=3
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    FAKE_VISIBLE="0,1"   # workers must still get one token each ("0", "1"); torch stays on the CPU
else
    N=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    if [ "${N:-0}" -lt 1 ]; then
        echo "gpu_check: FAIL: nvidia-smi lists no GPU (use --cpu-smoke on a machine without one)"
        exit 1
    fi
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        echo "note: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES is set; workers share out those devices"
        N=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    fi
    DEVICE=cuda
    GRID=30
    FAKE_VISIBLE=""
fi

# ---- 1. pytest -n N: one device per worker ------------------------------------------------------
if { [ "$SMOKE" = 1 ] && [ -z "$SUITE_GIVEN" ]; } || [ -z "$(find "$SUITE" -name 'test_*.py' -print -quit 2>/dev/null)" ]; then
    echo "note: using a generated suite of $((2 * N)) small probes on the default model"
    SUITE="$WORK/suite"
    mkdir -p "$SUITE"
    for i in $(seq 1 "$N"); do
        cat >"$SUITE/test_probe_$i.py" <<'EOF'
import pytest
from pytest_patchscope import attribute_extraction


@pytest.mark.parametrize("country,capital", [("France", "Paris"), ("Japan", "Tokyo")])
def test_capital(patchscope, country, capital):
    patchscope.record(patchscope.sweep(f"Country: {country}", attribute_extraction(),
                                       layers=range(0, 12, 3), expect=capital, max_new_tokens=4))
EOF
    done
fi

echo "== pytest $SUITE -n $N (device auto)"
started=$(date +%s)
env ${FAKE_VISIBLE:+CUDA_VISIBLE_DEVICES=$FAKE_VISIBLE} timeout 180 "$PYTHON" -m pytest "$SUITE" -n "$N" \
    -p no:cacheprovider -q --patchscope-report="$WORK/report.json" >"$WORK/pytest.log" 2>&1
status=$?
elapsed=$(( $(date +%s) - started ))
tail -n 25 "$WORK/pytest.log"
[ "$status" = 124 ] && failures+=("pytest ran past 180 s")
[ "$status" != 0 ] && [ "$status" != 124 ] && failures+=("pytest exited $status")

# "gw0: device cuda, CUDA_VISIBLE_DEVICES=0" lines of the "patchscope workers" section.
workers=$(sed -n '/^-* patchscope workers -*$/,/^[-=]* .* [-=]*$/p' "$WORK/pytest.log" | grep -E '^gw[0-9]+: ')
n_workers=$(grep -c . <<<"$workers" || true)
n_devices=$(grep -o 'CUDA_VISIBLE_DEVICES=[^,]*' <<<"$workers" | sort -u | grep -c . || true)
on_device=$(grep -c "device $DEVICE" <<<"$workers" || true)
mapping=$(sed -E 's/^(gw[0-9]+): .*CUDA_VISIBLE_DEVICES=([^,]*).*/\1->\2/' <<<"$workers" | paste -sd' ' -)
# The merged report names no worker (it equals a run without -n), so only the total is checked here.
n_probes=$("$PYTHON" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["probes"]))' "$WORK/report.json" 2>/dev/null || echo 0)
echo "workers: $n_workers reported, $n_devices distinct CUDA_VISIBLE_DEVICES ($mapping); probes in the merged report: $n_probes"
[ "$n_probes" -gt 0 ] || failures+=("the merged report holds no probe")
[ "$n_workers" = "$N" ] || failures+=("$n_workers of $N workers reported a device (did every worker load a model?)")
[ "$n_devices" = "$n_workers" ] || failures+=("workers share a device: $mapping")
[ "$on_device" = "$n_workers" ] || failures+=("not every worker ran on $DEVICE")

# ---- 2. one GRID x GRID sweep on one device, in float32 and in bfloat16 ---------------------------
grid=""
for DTYPE in float32 bfloat16; do
    echo "== ${GRID}x${GRID} grid sweep on $DEVICE in $DTYPE"
    line=$(timeout 90 "$PYTHON" -c "
import time, torch
from pytest_patchscope import ENTITY_DESCRIPTION, Patchscope

device, n, dtype = '$DEVICE', $GRID, '$DTYPE'
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
scope = Patchscope.load(device=device, dtype=dtype)
scope.sweep('Albert Einstein', ENTITY_DESCRIPTION, layers=[0], max_new_tokens=2)  # warm-up
sync()
started = time.perf_counter()
profile = scope.sweep('Albert Einstein', ENTITY_DESCRIPTION, layers=range(n), target_layers=range(n), max_new_tokens=10)
sync()
seconds = time.perf_counter() - started
name = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
print(f'{n}x{n} grid in {scope.model.dtype} ({len(profile.cells)} probes x 10 tokens) on {name}: {seconds:.1f} s, '
      f'{len(profile.cells) / seconds:.1f} probes/s, {len(profile.cells) * 10 / seconds:.0f} generated tokens/s')
" 2>"$WORK/grid-$DTYPE.err" | tail -n 1)
    if [ -z "$line" ]; then
        tail -n 15 "$WORK/grid-$DTYPE.err"
        failures+=("$DTYPE grid sweep failed or ran past 90 s")
        line="$DTYPE grid: no result"
    fi
    echo "$line"
    grid="${grid:+$grid; }$line"
done

# ---- 3. device_map=auto gives the tokens of the model on one device --------------------------------
echo "== device_map=auto against device=$DEVICE"
placed=$(timeout 120 "$PYTHON" -c "
from pytest_patchscope import TOKEN_IDENTITY, Patchscope
one = Patchscope.load(device='$DEVICE')
spread = Patchscope.load(device_map='auto')
probes = [one.probe('The capital of France is', TOKEN_IDENTITY, layer=l, max_new_tokens=6) for l in range(0, one.model.n_layers, 3)]
same = sum(a.tokens == b.tokens for a, b in zip(one.run(probes), spread.run(probes)))
devices = sorted({str(p.device) for p in spread.model.hf.parameters()})
print(f'device_map=auto on {devices}: {same}/{len(probes)} probes give the same tokens')
" 2>"$WORK/placed.err" | tail -n 1)
if [ -z "$placed" ]; then
    tail -n 15 "$WORK/placed.err"
    failures+=("device_map=auto failed or ran past 120 s")
    placed="device_map: no result"
fi
echo "$placed"
grep -qE ': ([0-9]+)/\1 probes' <<<"$placed" || failures+=("device_map=auto changed tokens: $placed")
grid="$grid; $placed"

# ---- summary ------------------------------------------------------------------------------------
if [ ${#failures[@]} = 0 ]; then
    echo "gpu_check: OK: $N workers on $n_devices devices ($mapping), pytest ${elapsed} s; $grid"
    exit 0
fi
echo "gpu_check: FAIL: $(printf '%s; ' "${failures[@]}")pytest ${elapsed} s; $grid"
exit 1
