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
step kernels 120 "$PY" benchmarks/kernels.py --device cuda --out "$OUT/kernels-cuda.json"

# 3. Mesa's table in shape: DeiT-Ti/S/B at batch 128 under bf16 autocast, exact vs Mesa's
#    storage (torchmesa-dynamic) vs the default with derived tensors (torchmesa)
step mesa-bf16 210 "$PY" benchmarks/bench.py --preset mesa --device cuda --precision bf16 \
    --configs exact torchmesa-dynamic torchmesa torchmesa-4bit checkpoint --steps 4 \
    --out "$OUT/bench-cuda-bf16-mesa.json"

# 4. the compiled path on CUDA: fused-QKV attention, both orders of compress and compile
step compiled 120 "$PY" - "$OUT/compiled-cuda.json" <<'PYTHON'
import json, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
import torchmesa

class Attn(nn.Module):
    def __init__(s, d=384, h=6):
        super().__init__(); s.qkv = nn.Linear(d, 3 * d); s.proj = nn.Linear(d, d); s.h = h
        s.fc1 = nn.Linear(d, 4 * d); s.fc2 = nn.Linear(4 * d, d); s.n = nn.LayerNorm(d)
    def forward(s, x):
        b, t, d = x.shape
        q, k, v = s.qkv(s.n(x)).view(b, t, 3, s.h, d // s.h).permute(2, 0, 3, 1, 4)
        x = x + s.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + s.fc2(F.gelu(s.fc1(x)))

def run(order):
    torch.manual_seed(0)
    base = nn.Sequential(*[Attn() for _ in range(4)]).cuda()
    model = {"exact": lambda m: torch.compile(m),
             "compress-then-compile": lambda m: torch.compile(torchmesa.compress(m)),
             "compile-then-compress": lambda m: torchmesa.compress(torch.compile(m))}[order](base)
    x = torch.randn(64, 197, 384, device="cuda")
    times = []
    for i in range(8):
        for p in base.parameters():
            p.grad = None
        torch.cuda.synchronize(); start = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        torch.cuda.synchronize(); times.append(time.perf_counter() - start)
    grads = torch.cat([p.grad.flatten().double() for p in base.parameters()])
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    peak = torch.cuda.max_memory_allocated()
    loss.backward()
    return {"step_ms_median": sorted(times[3:])[len(times[3:]) // 2] * 1e3,
            "forward_peak_mib": peak / 2**20}, grads

results, exact_grads = {}, None
for order in ("exact", "compress-then-compile", "compile-then-compress"):
    try:
        r, g = run(order)
        if exact_grads is None:
            exact_grads = g
        r["grad_cosine_vs_exact"] = float(F.cosine_similarity(g, exact_grads, dim=0))
    except Exception as err:  # recorded, not hidden: the summary shows it
        r = {"error": f"{type(err).__name__}: {err}"[:2000]}
    results[order] = r
    print(order, r)
json.dump(results, open(sys.argv[1], "w"), indent=1)
sys.exit(1 if any("error" in r for r in results.values()) else 0)
PYTHON

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
