#!/usr/bin/env bash
# Every GPU check in one run, for a lent CUDA machine (benchmarks/gpu.sh; under 10 minutes
# on one H200). It uses the machine's own python3 (torch, Triton, transformers installed)
# with this checkout on PYTHONPATH, installs nothing, and writes what it measures to $OUT
# (JSON, plus the Triton tests' JUnit XML and one log): at most 8 files, as the device
# tool returns them. Each step has its own time limit, and a step that fails is recorded
# in gpu-summary.json while the others still run.
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="$OUT/gpu.log"
declare -A STATUS

step() {  # step NAME SECONDS COMMAND...: run it, log it, keep its exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    STATUS[$name]="$rc $((SECONDS - start))"
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG" || exit 1

# 1. the Triton kernels on the GPU, against the reference (the suite CI runs interpreted)
step triton-tests 120 env TORCHMESA_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/quant/test_triton.py tests/quant/test_triton_blocks.py \
    --junitxml="$OUT/triton-tests.xml"

# 2. kernel speed: quantize and dequantize against a plain copy, hot and cold (block-scaled
#    codes too)
step kernels 90 "$PY" benchmarks/kernel_speed.py --device cuda --out "$OUT/kernels-cuda.json"

# 3. Mesa's table in shape: DeiT-Ti/S/B at batch 128 under bf16 autocast, exact vs Mesa's
#    storage (torchmesa-dynamic) vs the default with derived tensors (torchmesa)
step mesa-bf16 210 "$PY" benchmarks/bench.py --preset mesa --device cuda --precision bf16 \
    --configs exact torchmesa-dynamic torchmesa torchmesa-4bit checkpoint --steps 4 \
    --out "$OUT/bench-cuda-bf16-mesa.json"

# 4. the compiled path (engine rule [ Compiled graphs ]): DeiT-B at batch 128 under bf16, compiled torchmesa
#    against compiled exact (step ratio, peak memory, saved bytes, compile time, breaks)
step compiled 150 "$PY" benchmarks/compiled.py --models deit-b --batch 128 --device cuda \
    --dtype bf16 --steps 5 --two-models --out "$OUT/compiled-cuda.json"

{
    echo "{"
    first=1
    for name in "${!STATUS[@]}"; do
        read -r rc secs <<<"${STATUS[$name]}"
        [ $first -eq 1 ] || echo ","
        first=0
        printf '  "%s": {"exit": %s, "seconds": %s}' "$name" "$rc" "$secs"
    done
    echo
    echo "}"
} >"$OUT/gpu-summary.json"
cat "$OUT/gpu-summary.json"
for name in "${!STATUS[@]}"; do
    read -r rc _ <<<"${STATUS[$name]}"
    [ "$rc" -eq 0 ] || exit 1
done
