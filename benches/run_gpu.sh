#!/usr/bin/env bash
# The one GPU run: install offline, record the machine, build the CUDA extension, run the CUDA
# tests of the CUDA graphs, the CUDA-graph benchmarks, torch.compile against them, then the other
# CUDA tests and the layer and op benchmarks; print a short summary last.
#
#   bash benches/run_gpu.sh
#   bash benches/run_gpu.sh --dry-run     # print the stages and their commands, run nothing
#
# Runs from the repository root whatever the current directory. Everything it writes goes to
# benches/results/<device>/ (CSV, JSON, PNG, one log per stage); when $OUT is set (the device
# tool), the main log, the summary, the two main plots and a tarball of that folder are copied
# there too (at most 8 files, none nested).
#
# Time: every stage runs under `timeout` with its own limit, and no stage may start or run past
# a global budget (BUDGET_S, default 540 s, so the whole script ends inside a 10-minute command
# limit with room to pack up). A stage that fails or times out is recorded and the next one starts.
# Limits can be overridden from the environment, e.g. `BUDGET_S=900 T_STEP=200 bash benches/run_gpu.sh`.
# Stages run in priority order, so a short budget drops the last ones (recorded as SKIPPED).
set -u -o pipefail
DRY_RUN=${DRY_RUN:-}
[ "${1:-}" = --dry-run ] && DRY_RUN=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

: "${BUDGET_S:=540}"        # whole script, seconds
: "${RESERVE_S:=15}"        # kept back for the summary and packing
: "${T_INSTALL:=60}" "${T_ENV:=30}" "${T_BUILD:=120}" "${T_TESTS_GRAPHS:=90}" "${T_GRAPHS:=80}"
: "${T_GRAPHS_STEP:=80}" "${T_MAX_AUTOTUNE:=200}" "${T_COMPILE:=120}" "${T_TESTS:=100}" "${T_TRANSFORMER:=90}"
: "${T_OPS:=80}" "${T_TESTS_ALL:=120}"
START=$SECONDS

DEVICE=$($PY -c "import torch; from benches.common import device_label; \
print(device_label(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>/dev/null || echo unknown)
RESULTS="$REPO/benches/results/$DEVICE"
[ -n "$DRY_RUN" ] && RESULTS=$(mktemp -d)  # a dry run leaves the results folders alone
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"
STATUS="$LOGS/stages.tsv"
: > "$STATUS"
MAIN_LOG="$LOGS/run_gpu.log"
exec > >(tee "$MAIN_LOG") 2>&1

echo "# run_gpu.sh on $DEVICE, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S}s, repo $REPO"
[ "$DEVICE" = unknown ] && echo "# WARNING: could not import torch to name the device"
case "$DEVICE" in cuda-*) ;; *) echo "# WARNING: no CUDA device seen; the CUDA stages will skip or fail";; esac

# stage NAME LIMIT_S COMMAND...: run under timeout (clipped to the budget left), log to
# $LOGS/NAME.log, echo its tail, record ok / FAILED(rc) / TIMEOUT / SKIPPED.
stage() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET_S - RESERVE_S - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then
        echo "=== [$name] SKIPPED: budget spent"
        printf '%s\tSKIPPED\t0\t%s\n' "$name" "$limit" >> "$STATUS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=== [$name] limit ${limit}s: $*"
    if [ -n "$DRY_RUN" ]; then
        printf '%s\tDRY\t0\t%s\n' "$name" "$limit" >> "$STATUS"
        return 0
    fi
    local began=$SECONDS
    # SIGINT first: pytest then still prints what passed and failed; the benches have saved
    # every configuration they finished.
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$? took=$((SECONDS - began)) verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; elif [ $rc -ne 0 ]; then verdict="FAILED($rc)"; fi
    tail -n "${TAIL_LINES:-25}" "$LOGS/$name.log"
    echo "=== [$name] $verdict after ${took}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$verdict" "$took" "$limit" >> "$STATUS"
}

# 1. Install offline (editable, no dependencies, no build isolation). If that fails, run from the
#    checkout: PYTHONPATH plus links that make kernels/ and csrc/ importable as ipmt_fast.kernels/.csrc.
#    --use-pep517: without it an older pip runs `setup.py develop`, which recent setuptools turns
#    into a nested `pip install -e .` *with* build isolation, which then fails offline (seen on the H100).
stage install "$T_INSTALL" $PY -m pip install --no-deps --no-build-isolation --no-index --use-pep517 -e .
if [ -z "$DRY_RUN" ] && ! (cd /tmp && $PY -c "import ipmt_fast.kernels, ipmt_fast.csrc") >/dev/null 2>&1; then
    echo "# editable install not importable: falling back to PYTHONPATH + links"
    [ -e ipmt_fast/kernels ] || ln -s ../kernels ipmt_fast/kernels
    [ -e ipmt_fast/csrc ] || ln -s ../csrc ipmt_fast/csrc
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. The machine and the software.
stage env "$T_ENV" bash -c "nvidia-smi; nvcc --version | tail -n 2; $PY - <<'EOF'
import json, torch
from benches.common import machine_info
print(json.dumps(machine_info(torch.device('cuda' if torch.cuda.is_available() else 'cpu')), indent=1))
import ipmt_fast.ops.registry as r
print({op: r.registered_backends(op) for op in r.registered_ops()})
EOF"

# 3. Build the compiled (C++/CUDA) extension once, so no later stage pays for it.
stage build-ext "$T_BUILD" $PY -c "
from ipmt_fast.ops import extension
reason = extension.unavailable_reason('cuda')
print(reason or 'compiled backend ready for CUDA tensors')
raise SystemExit(1 if reason else 0)"

# 4. The CUDA tests of the CUDA graphs (graphed vs eager training steps, dropout, resume, inference),
#    spread over several processes when pytest-xdist is there.
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_WORKERS:-8}"
GRAPH_TESTS="tests/test_graphs.py"
stage tests-graphs "$T_TESTS_GRAPHS" $PY -m pytest $GRAPH_TESTS -q -p no:cacheprovider --maxfail=20 -rfE $XDIST

# 5. CUDA graphs against eager, per layer count (for the per-layer slopes of time, ops and kernels):
#    the transformer alone (forward + backward), then the whole training step (GraphedStep), bf16.
GRAPH_VARIANTS="reference,auto,reference+graphs,auto+graphs"
stage graphs-transformer "$T_GRAPHS" $PY -m benches.layers --bench transformer --layers 1,3,5 --batch 4 \
    --dtypes bf16 --image-size 473 --backends "$GRAPH_VARIANTS" --warmup 3 --repeats 10 --tag layers-graphs-transformer
stage graphs-step "$T_GRAPHS_STEP" $PY -m benches.layers --bench step --layers 1,3,5 --batch 4 --dtypes bf16 \
    --image-size 473 --backends "$GRAPH_VARIANTS" --warmup 2 --repeats 5 --tag layers-graphs-step

# 6. torch.compile(reference, mode="max-autotune") (autotuning, inductor's own CUDA graphs) against
#    the graphed transformer at L = 5, bf16: the slowest compile, in a run of its own so a timeout
#    loses nothing else. Then the default-mode compiles of the reference and of auto.
stage max-autotune "$T_MAX_AUTOTUNE" $PY -m benches.layers --bench transformer --layers 5 --batch 4 --dtypes bf16 \
    --backends reference,reference+graphs,auto+graphs --compile-layers 5 \
    --compile-variants "compile(reference,max-autotune)" --warmup 3 --repeats 10 --tag layers-max-autotune
stage transformer-compile "$T_COMPILE" $PY -m benches.layers --bench transformer --layers 5 --batch 4 \
    --dtypes bf16 --backends reference,auto,auto+graphs --compile-layers 5 \
    --compile-variants "compile(reference),compile(auto)" --warmup 3 --repeats 10 --tag layers-transformer-compile

# 7. The other CUDA equivalence tests (every test or parameter named 'cuda'). The files whose CUDA
#    tests have not all passed on a GPU yet go first (query activation, the full model, the FFN:
#    the 2026-11-27 H100 run stopped inside the first; the deformable sampling's kink exactness
#    and the mask threshold on CUDA, new since), then the rest (torch.compile with Inductor on CUDA,
#    opcheck of every custom op on CUDA).
FIRST_TESTS="tests/test_query_activation.py tests/test_deform_sample.py tests/test_model_backends.py tests/test_ffn.py"
stage tests-cuda-first "$T_TESTS" $PY -m pytest $FIRST_TESTS -q -k cuda -p no:cacheprovider --maxfail=20 -rfE $XDIST
stage tests-cuda "$T_TESTS" $PY -m pytest tests -q -k cuda -p no:cacheprovider --maxfail=20 -rfE $XDIST \
    $(for f in $FIRST_TESTS $GRAPH_TESTS; do printf -- '--ignore=%s ' "$f"; done)

# 8. The transformer alone, forward + backward, per layer count, every eager backend, bf16 and fp32.
stage transformer "$T_TRANSFORMER" $PY -m benches.layers --bench transformer --layers 1,3,5,8 --batch 4 \
    --dtypes bf16,fp32 --image-size 473 --warmup 3 --repeats 10 --tag layers-transformer

# 9. The ops: every backend vs the reference and SDPA, IPMT's token counts (1 shot, 5 shots),
#    eager and replayed from CUDA graphs (device time, compared with the memory-traffic floor).
stage ops "$T_OPS" $PY -m benches.ops --batch 4 --tokens 3600,18000 --widths 384 --dtypes bf16,fp32 \
    --warmup 3 --repeats 20 --no-compile --tag ops

# 10. torch.compile of each op's reference (bf16, 1 and 5 shots).
stage ops-compile "$T_OPS" $PY -m benches.ops --batch 4 --tokens 3600,18000 --widths 384 --dtypes bf16 \
    --warmup 3 --repeats 20 --no-graphs --tag ops-compile

# 11. With what is left: the whole test suite on this machine.
stage tests-all "$T_TESTS_ALL" $PY -m pytest tests -q -p no:cacheprovider --maxfail=20 -rfE $XDIST

# Summary and packing.
if [ -n "$DRY_RUN" ]; then
    echo "# dry run: nothing ran"
    rm -rf "$RESULTS"
    exit 0
fi
echo
$PY -m benches.plot "$RESULTS"/layers-*.json "$RESULTS"/ops*.json > /dev/null 2>&1
SUMMARY="$LOGS/summary.txt"
{
    $PY -m benches.summary "$RESULTS" 2>&1
    echo
    echo "# stages (name, verdict, seconds, limit) - total $((SECONDS - START))s"
    column -t -s $'\t' "$STATUS" 2>/dev/null || cat "$STATUS"
} > "$SUMMARY"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar -czf "$OUT/results-$DEVICE.tar.gz" -C "$REPO/benches/results" "$DEVICE"
    cp "$SUMMARY" "$OUT/summary.txt"
    for f in layers-graphs-transformer.png layers-graphs-step.png; do [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/$f"; done
    echo "# results packed into $OUT/results-$DEVICE.tar.gz (unpack under benches/results/)"
fi
echo "# everything under $RESULTS"
echo
cat "$SUMMARY"
[ -n "${OUT:-}" ] && cp "$MAIN_LOG" "$OUT/run_gpu.log"
exit 0
