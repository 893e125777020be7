#!/usr/bin/env bash
# The one GPU run, sized for a 15-minute device lease with the machine's start included: at most
# BUDGET_S = 540 s, in three groups of stages, by priority:
#
#   (a) <= 180 s  install, the machine, the C++/CUDA extension build (and load), then the CUDA tests
#                 no GPU has run yet: the CUDA graphs (tests/test_graphs.py), the deformable
#                 sampling's kinks at the published initialisation, the mask threshold, opcheck of
#                 the custom ops on CUDA (NEW_CUDA_TESTS), stopping at the first failure (pytest -x);
#   (b) <= 240 s  B=4, L=5, 473 px, bf16: the transformer (forward + backward) and the whole training
#                 step, eager and from CUDA graphs (reference, auto, reference+graphs, auto+graphs),
#                 torch.compile(reference) in the default and the reduce-overhead mode, and the
#                 benches' host-bound mode (--regime host, eager and graphs: the compiled variants
#                 are the stages above);
#   (c) the rest, as long as time is left: torch.compile(auto), the backends chosen by measurement
#       at the host-bound shapes, the other CUDA tests, the step with
#       channels-last maps, the transformer and step over L 1,3,5,8 in bf16 and fp32, max-autotune,
#       the op benches, the whole suite.
#
#   bash benches/run_gpu.sh
#   bash benches/run_gpu.sh --dry-run     # every stage, its group, limit and latest start; runs nothing
#
# Runs from the repository root whatever the current directory. Every stage writes into the results
# folder, benches/results/<device>/ (RESULTS_DIR overrides it), before the next one starts: its log
# (logs/<stage>.log), the benches' CSV/JSON/PNG (--out), the tests' JUnit XML; logs/stages.tsv
# records each stage's verdict: ok, FAILED(rc), TIMEOUT or SKIPPED (and why). With $OUT set (the
# device tool), a tarball of the results folder, the main log and the stage table are copied there
# after every stage, so a run cut short still hands back what it finished, and the summary at the end.
#
# Time: a stage gets SIGINT at its limit minus KILL_GRACE_S (pytest then reports what passed; the
# benches have saved every configuration they finished) and SIGKILL at its limit, so no stage
# outlasts its limit. Limits are clipped to what is left of the budget minus RESERVE_S (the summary
# and packing); a stage with less than MIN_STAGE_S left is SKIPPED. So the whole script ends within
# BUDGET_S. Limits can be set from the environment, e.g. `BUDGET_S=900 T_B4=120 bash benches/run_gpu.sh`.
set -u -o pipefail
DRY_RUN=${DRY_RUN:-}
[ "${1:-}" = --dry-run ] && DRY_RUN=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

: "${BUDGET_S:=540}"        # the whole script, seconds
: "${RESERVE_S:=15}"        # kept back for the summary and packing
: "${KILL_GRACE_S:=5}"      # between a stage's SIGINT and its SIGKILL
: "${MIN_STAGE_S:=10}"      # a stage with less time left than this is skipped
[ "$MIN_STAGE_S" -gt "$KILL_GRACE_S" ] || MIN_STAGE_S=$((KILL_GRACE_S + 1))  # timeout needs a positive limit
# (a) 180 s
: "${T_INSTALL:=20}" "${T_ENV:=15}" "${T_BUILD:=70}" "${T_TESTS_NEW:=75}"
# (b) 240 s
: "${T_B4:=80}" "${T_COMPILE:=60}" "${T_COMPILE_RO:=60}" "${T_HOST:=40}"
# (c) what is left
: "${T_COMPILE_AUTO:=60}" "${T_HOST_TUNED:=60}" "${T_CHANNELS_LAST:=60}" "${T_TESTS_CUDA_FIRST:=100}" "${T_SWEEP:=120}" "${T_MAX_AUTOTUNE:=150}"
: "${T_OPS:=80}" "${T_TESTS_CUDA:=100}" "${T_OPS_COMPILE:=80}" "${T_TESTS_ALL:=120}"
START=$SECONDS
# Dry run: no time passes, so the latest start of each stage is worked out as if every earlier
# stage used its whole limit (the worst case).
DRY_ELAPSED=0

DEVICE=$($PY -c "import torch; from benches.common import device_label; \
print(device_label(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>/dev/null || echo unknown)
RESULTS=${RESULTS_DIR:-$REPO/benches/results/$DEVICE}
[ -n "$DRY_RUN" ] && RESULTS=$(mktemp -d)  # a dry run leaves the results folders alone
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"
STATUS="$LOGS/stages.tsv"
: > "$STATUS"
MAIN_LOG="$LOGS/run_gpu.log"
exec > >(tee "$MAIN_LOG") 2>&1

echo "# run_gpu.sh on $DEVICE, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S}s (reserve ${RESERVE_S}s), repo $REPO"
echo "# results: $RESULTS"
[ -n "$DRY_RUN" ] && echo "# dry run: each stage's latest start assumes every earlier stage used its whole limit"
[ "$DEVICE" = unknown ] && echo "# WARNING: could not import torch to name the device"
case "$DEVICE" in cuda-*) ;; *) echo "# WARNING: no CUDA device seen; the CUDA stages will skip or fail";; esac

elapsed() { if [ -n "$DRY_RUN" ]; then echo "$DRY_ELAPSED"; else echo $((SECONDS - START)); fi; }

# Copy what exists so far to $OUT (the device tool hands back only what is there when the command ends).
pack() {
    [ -n "${OUT:-}" ] && [ -z "$DRY_RUN" ] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/results-$DEVICE.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null
    cp "$STATUS" "$OUT/stages.tsv"
    cp "$MAIN_LOG" "$OUT/run_gpu.log"
}

# The command as one shell line: plain words as they are, others in single quotes.
quoted() {
    local arg words=()
    for arg in "$@"; do
        if [[ $arg =~ ^[][A-Za-z0-9_./:=,+@%-]+$ ]]; then words+=("$arg"); else words+=("'${arg//\'/\'\\\'\'}'"); fi
    done
    echo "${words[*]}"
}

record() {  # NAME GROUP VERDICT SECONDS LIMIT
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STATUS"
}

# stage GROUP NAME LIMIT COMMAND...: run under timeout (limit clipped to the budget left), log to
# $LOGS/NAME.log, echo its tail, record ok / FAILED(rc) / TIMEOUT / SKIPPED.
stage() {
    local group=$1 name=$2 nominal=$3; shift 3
    local began limit left
    began=$(elapsed)
    left=$((BUDGET_S - RESERVE_S - began))
    limit=$nominal
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt "$MIN_STAGE_S" ]; then
        echo "=== [$name] ($group) SKIPPED (limit ${nominal}s): budget spent (${left}s left at ${began}s): $(quoted "$@")"
        record "$name" "$group" "SKIPPED(budget)" 0 "$nominal"
        return 0
    fi
    echo
    echo "=== [$name] ($group) limit ${limit}s of ${nominal}s, starts at ${began}s: $(quoted "$@")"
    if [ -n "$DRY_RUN" ]; then
        record "$name" "$group" DRY 0 "$nominal"
        DRY_ELAPSED=$((DRY_ELAPSED + limit))
        return 0
    fi
    timeout --signal=INT --kill-after="$KILL_GRACE_S" "$((limit - KILL_GRACE_S))" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$? took=$(($(elapsed) - began)) verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; elif [ $rc -ne 0 ]; then verdict="FAILED($rc)"; fi
    tail -n "${TAIL_LINES:-25}" "$LOGS/$name.log"
    echo "=== [$name] $verdict after ${took}s"
    record "$name" "$group" "$verdict" "$took" "$nominal"
    pack
}

# ------------------------------------------------------------------------------------------- (a)
# Install offline (editable, no dependencies, no build isolation). If that fails, run from the
# checkout: PYTHONPATH plus links that make kernels/ and csrc/ importable as ipmt_fast.kernels/.csrc.
# --use-pep517: without it an older pip runs `setup.py develop`, which recent setuptools turns
# into a nested `pip install -e .` *with* build isolation, which then fails offline (seen on the H100).
stage a install "$T_INSTALL" $PY -m pip install --no-deps --no-build-isolation --no-index --use-pep517 -e .
if [ -z "$DRY_RUN" ] && ! (cd /tmp && $PY -c "import ipmt_fast.kernels, ipmt_fast.csrc") >/dev/null 2>&1; then
    echo "# editable install not importable: falling back to PYTHONPATH + links"
    [ -e ipmt_fast/kernels ] || ln -s ../kernels ipmt_fast/kernels
    [ -e ipmt_fast/csrc ] || ln -s ../csrc ipmt_fast/csrc
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# The machine and the software.
stage a env "$T_ENV" bash -c "nvidia-smi; nvcc --version | tail -n 2; $PY -c \"import json, torch; \
from benches.common import machine_info; import ipmt_fast.ops.registry as r; \
print(json.dumps(machine_info(torch.device('cuda' if torch.cuda.is_available() else 'cpu')), indent=1)); \
print({op: r.registered_backends(op) for op in r.registered_ops()})\""

# Build and load the compiled (C++/CUDA) extension once, so no later stage pays for it; fails
# (and says why) if the library has no CUDA kernels.
stage a build-ext "$T_BUILD" $PY -m ipmt_fast.ops.extension --require-cuda

# The CUDA tests no GPU has run yet. `-k` keeps the CUDA cases of the named tests (their CPU
# parameters ran in CI) and every test of test_graphs.py.
NEW_CUDA_TESTS=(
    tests/test_graphs.py
    tests/test_deform_sample.py::test_cuda_published_initialisation_kinks_match_reference
    tests/test_deform_attention.py::test_cuda_matches_reference_at_the_published_init
    tests/test_query_activation.py::test_cuda_mask_threshold_constant_is_torch_sigmoids_boundary
    tests/test_deform_sample.py::test_cuda_compiled_custom_ops_pass_opcheck
    tests/test_deform_sample.py::test_cuda_triton_custom_ops_pass_opcheck
    tests/test_prototype_attention.py::test_compiled_custom_ops_pass_opcheck
    tests/test_prototype_attention.py::test_triton_custom_ops_pass_opcheck
    tests/test_query_activation.py::test_triton_custom_ops_pass_opcheck
)
XDIST=""
[ -z "$DRY_RUN" ] && $PY -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_WORKERS:-8}"
PYTEST=($PY -m pytest -q -p no:cacheprovider -rfE $XDIST)
stage a tests-cuda-new "$T_TESTS_NEW" "${PYTEST[@]}" -x --junitxml="$RESULTS/tests-cuda-new.xml" \
    "${NEW_CUDA_TESTS[@]}" -k "cuda or test_graphs.py"

# ------------------------------------------------------------------------------------------- (b)
# B=4, L=5, 473 px, bf16: eager and graphed, transformer (forward + backward) and training step.
LAYERS=($PY -m benches.layers --layers 5 --batch 4 --dtypes bf16 --image-size 473 --warmup 3 --repeats 10
        --out "$RESULTS")
stage b layers-b4 "$T_B4" "${LAYERS[@]}" --bench transformer,step \
    --backends reference,auto,reference+graphs,auto+graphs --tag layers-b4
# torch.compile of the reference transformer (compiled in the warm-up, outside the timing), one
# mode per run so a slow compile loses nothing else; the eager reference and auto+graphs beside it.
stage b layers-b4-compile "$T_COMPILE" "${LAYERS[@]}" --bench transformer --backends reference,auto+graphs \
    --compile-layers 5 --compile-variants "compile(reference)" --tag layers-b4-compile
stage b layers-b4-compile-ro "$T_COMPILE_RO" "${LAYERS[@]}" --bench transformer --backends reference,auto+graphs \
    --compile-layers 5 --compile-variants "compile(reference,reduce-overhead)" --tag layers-b4-compile-ro
# The host-bound mode (IPMT's batch at tiny sizes: host time per layer next to GPU time), eager
# and graphed; its torch.compile variants would not fit this stage's limit.
stage b layers-host "$T_HOST" $PY -m benches.layers --regime host --compile-layers "" --repeats 5 --bench transformer,step \
    --backends reference,auto,reference+graphs,auto+graphs --out "$RESULTS" --tag layers-host

# ------------------------------------------------------------------------------------------- (c)
stage c layers-b4-compile-auto "$T_COMPILE_AUTO" "${LAYERS[@]}" --bench transformer \
    --backends reference,auto+graphs --compile-layers 5 --compile-variants "compile(auto)" --tag layers-b4-compile-auto
# Each op's backend chosen by measurement on this GPU (ipmt_fast.tune_backends; the Triton kernels
# compile in its warm-up), at the host-bound shapes, against auto's fixed preference: the tables
# of the choices are in the stage's log.
stage c layers-host-tuned "$T_HOST_TUNED" $PY -m benches.layers --regime host --compile-layers "" --repeats 5 \
    --bench transformer --backends reference,auto,auto+tuned --out "$RESULTS" --tag layers-host-tuned
# The other CUDA tests (every test or parameter named 'cuda'): first the files whose CUDA tests
# have not all passed on a GPU yet, then the rest.
FIRST_TESTS=(tests/test_query_activation.py tests/test_deform_sample.py tests/test_deform_attention.py
             tests/test_model_backends.py tests/test_ffn.py tests/test_prototype_attention.py)
DESELECT_NEW=()
for t in "${NEW_CUDA_TESTS[@]}"; do [[ $t == *::* ]] && DESELECT_NEW+=("--deselect=$t"); done
stage c tests-cuda-first "$T_TESTS_CUDA_FIRST" "${PYTEST[@]}" --maxfail=20 --junitxml="$RESULTS/tests-cuda-first.xml" \
    "${FIRST_TESTS[@]}" -k cuda "${DESELECT_NEW[@]}"

# The step with the feature maps channels-last (cuDNN's tensor-core convolutions take NHWC),
# eager and graphed, beside the contiguous ones.
stage c layers-b4-channels-last "$T_CHANNELS_LAST" "${LAYERS[@]}" --bench step \
    --backends reference,auto,auto+channels_last,auto+graphs,auto+channels_last+graphs --tag layers-b4-channels-last

# More layer counts (per-layer slopes of time, ops and kernels) and fp32, every default variant.
stage c layers-sweep "$T_SWEEP" $PY -m benches.layers --bench transformer,step --layers 1,3,5,8 --batch 4 \
    --dtypes bf16,fp32 --image-size 473 --warmup 3 --repeats 10 --out "$RESULTS" --tag layers-sweep

# torch.compile(reference, mode="max-autotune") (the slowest compile) against the graphed transformer.
stage c layers-b4-max-autotune "$T_MAX_AUTOTUNE" "${LAYERS[@]}" --bench transformer \
    --backends reference,auto+graphs --compile-layers 5 --compile-variants "compile(reference,max-autotune)" \
    --tag layers-b4-max-autotune

# The ops: every backend vs the reference and SDPA, IPMT's token counts (1 shot, 5 shots), eager
# and replayed from CUDA graphs (device time, compared with the memory-traffic floor).
stage c ops "$T_OPS" $PY -m benches.ops --batch 4 --tokens 3600,18000 --widths 384 --dtypes bf16,fp32 \
    --warmup 3 --repeats 20 --no-compile --out "$RESULTS" --tag ops

IGNORE_DONE=()
for f in "${FIRST_TESTS[@]}" tests/test_graphs.py; do IGNORE_DONE+=("--ignore=$f"); done
stage c tests-cuda "$T_TESTS_CUDA" "${PYTEST[@]}" --maxfail=20 --junitxml="$RESULTS/tests-cuda.xml" tests -k cuda \
    "${IGNORE_DONE[@]}"

# torch.compile of each op's reference (bf16, 1 and 5 shots).
stage c ops-compile "$T_OPS_COMPILE" $PY -m benches.ops --batch 4 --tokens 3600,18000 --widths 384 --dtypes bf16 \
    --warmup 3 --repeats 20 --no-graphs --out "$RESULTS" --tag ops-compile

stage c tests-all "$T_TESTS_ALL" "${PYTEST[@]}" --maxfail=20 --junitxml="$RESULTS/tests-all.xml" tests

# ------------------------------------------------------------------------------------ summary
if [ -n "$DRY_RUN" ]; then
    echo
    echo "# dry run: nothing ran; worst case ends at ${DRY_ELAPSED}s + ${RESERVE_S}s reserve of ${BUDGET_S}s"
    rm -rf "$RESULTS"
    exit 0
fi
echo
SUMMARY="$LOGS/summary.txt"
left=$((BUDGET_S - (SECONDS - START)))
{
    [ "$left" -gt 1 ] && timeout "$((left - 1))" $PY -m benches.summary "$RESULTS" 2>&1
    echo
    echo "# stages (name, group, verdict, seconds, limit) - total $((SECONDS - START))s"
    column -t -s $'\t' "$STATUS" 2>/dev/null || cat "$STATUS"
} > "$SUMMARY"
left=$((BUDGET_S - (SECONDS - START)))
[ "$left" -gt 1 ] && timeout "$((left - 1))" $PY -m benches.plot "$RESULTS"/layers-*.json "$RESULTS"/ops*.json \
    > /dev/null 2>&1
echo "# everything under $RESULTS"
echo
cat "$SUMMARY"
if [ -n "${OUT:-}" ]; then
    pack
    cp "$SUMMARY" "$OUT/summary.txt"
    echo "# results packed into $OUT/results-$DEVICE.tar.gz (unpack under benches/results/)"
fi
exit 0
