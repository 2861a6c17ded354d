#!/usr/bin/env bash
# The one script to run on a GPU machine (the device tool lends one to some
# tasks, 15 minutes in all, with no network and no package registry): every
# check and benchmark of the GPU backends, from binaries built elsewhere by
# tools/gpu_bundle.sh and carried in gpu-bundle/. Nothing is built or
# downloaded here.
#
#   bash tools/gpu_check.sh          (from the repository root)
#
# Output goes to $OUT (or ./gpu-check): a log per step, and gpu-check.json
# with every step (ran, failed, timed out, or skipped and why) and the
# benchmarks' own JSON. Without a CUDA driver or a Vulkan adapter each step
# that needs one says so and is skipped; the differential tests then run on
# the PTX interpreter instead, so the whole script can be rehearsed on a
# machine without a GPU. EGRET_GPU_CHECK_BUDGET (seconds, default 480)
# bounds the whole run; each step also has its own limit.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
bundle=${EGRET_BUNDLE:-gpu-bundle}
budget=${EGRET_GPU_CHECK_BUDGET:-480}
mkdir -p "$out/logs"
steps="$out/steps.jsonl"
: > "$steps"
start=$(date +%s)
if [ ! -f "$bundle/bin/egret.gz" ]; then
    echo "no $bundle/bin/egret.gz: run tools/gpu_bundle.sh on a machine with a registry, then carry gpu-bundle" >&2
    exit 2
fi
[ -f "$bundle/MANIFEST" ] && cat "$bundle/MANIFEST"
# The bundle's binaries, unpacked.
bin="$out/bin"
mkdir -p "$bin"
for f in "$bundle"/bin/*.gz; do
    gzip -dc "$f" > "$bin/$(basename "$f" .gz)"
    chmod +x "$bin/$(basename "$f" .gz)"
done
egret="$bin/egret"

# What this machine has.
cuda=""
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    cuda=yes
fi
why_no_cuda="no CUDA driver (nvidia-smi lists no GPU)"
vulkan=""
if "$egret" check tests/data/zoo/bert_tiny --backend wgsl -q >/dev/null 2>&1; then
    vulkan=yes
fi
why_no_vulkan="no Vulkan adapter (egret's wgsl backend found none)"
torch=""
python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1 && torch=yes
why_no_torch="no PyTorch with CUDA in python3"
torch_cpu=""
python3 -c 'import torch' >/dev/null 2>&1 && torch_cpu=yes
transformers=""
python3 -c 'import transformers, onnx, onnxruntime' >/dev/null 2>&1 && transformers=yes
why_no_transformers="python3 lacks transformers, onnx or onnxruntime (needed to export the base-size models)"
sanitizer=""
command -v compute-sanitizer >/dev/null && sanitizer=yes

json_string() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null || printf '"%s"' "$1"; }

# record NAME STATUS EXIT SECONDS REASON LOG KIND
record() {
    printf '{"step": %s, "status": "%s", "exit": %s, "seconds": %s, "reason": %s, "log": %s, "kind": "%s"}\n' \
        "$(json_string "$1")" "$2" "$3" "$4" "$(json_string "$5")" "$(json_string "$6")" "$7" >> "$steps"
}

n=0
# step NAME KIND LIMIT NEED... -- CMD...: runs CMD with its limit (and what
# is left of the budget), or records why it was skipped. KIND `json`: its
# standard output is JSON to keep.
step() {
    local name=$1 kind=$2 limit=$3
    shift 3
    local reason=""
    while [ "$1" != "--" ]; do
        case "$1" in
            cuda) [ -n "$cuda" ] || reason=$why_no_cuda ;;
            vulkan) [ -n "$vulkan" ] || reason=$why_no_vulkan ;;
            torch) [ -n "$torch" ] || reason=$why_no_torch ;;
            torch_cpu) [ -n "$torch_cpu" ] || reason="no PyTorch in python3" ;;
            transformers) [ -n "$transformers" ] || reason=$why_no_transformers ;;
            sanitizer) [ -n "$sanitizer" ] || reason="no compute-sanitizer on PATH" ;;
            dir:*) [ -e "${1#dir:}" ] || reason="${1#dir:} is not here" ;;
        esac
        shift
    done
    shift
    n=$((n + 1))
    local log="$out/logs/$(printf '%02d' "$n")-$(echo "$name" | tr -c 'A-Za-z0-9_.-' '_').log"
    if [ -n "$reason" ]; then
        echo "== $name: skipped ($reason)"
        record "$name" skipped null 0 "$reason" "$log" "$kind"
        return
    fi
    local left=$((budget - ($(date +%s) - start)))
    if [ "$left" -le 10 ]; then
        echo "== $name: skipped (the budget of ${budget}s is spent)"
        record "$name" skipped null 0 "the budget of ${budget}s is spent" "$log" "$kind"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s)"
    local t0 code status
    t0=$(date +%s.%N)
    if [ "$kind" = json ]; then
        # The JSON alone in the log; notes beside it.
        timeout "$limit" "$@" > "$log" 2> "$log.err"
    else
        timeout "$limit" "$@" > "$log" 2>&1
    fi
    code=$?
    local secs
    secs=$(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 2))" 2>/dev/null || echo 0)
    case $code in
        0) status=ran ;;
        124) status=timeout ;;
        *) status=failed ;;
    esac
    tail -3 "$log" | sed 's/^/   /'
    echo "   ($status, exit $code, ${secs}s)"
    record "$name" "$status" "$code" "$secs" "" "$log" "$kind"
}

step "gpu" text 20 cuda -- nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

# The differential tests' graphs, their PTX on the device (or interpreted
# where there is none, so a rehearsal runs them too).
if [ -n "$cuda" ]; then
    step "differential tests, PTX on the device" text 180 -- env EGRET_PTX_DEVICE=cuda "$bin/differential"
else
    step "differential tests, PTX interpreted (no device)" text 180 -- "$bin/differential" attention
fi

# Every model with stored outputs, on each GPU backend and precision.
for dir in tests/data/zoo tests/data/synthetic tests/data/exports tests/data/dynamic_exports ../shared/perf; do
    step "check $dir ptx f32" text 120 cuda "dir:$dir" -- "$egret" check "$dir" --backend ptx -q
    step "check $dir ptx f32 --opt 0" text 120 cuda "dir:$dir" -- "$egret" check "$dir" --backend ptx -q --opt 0
    for p in tf32 bf16; do
        step "check $dir ptx $p" text 120 cuda "dir:$dir" -- \
            "$egret" check "$dir" --backend ptx -q --precision "$p" --rtol 2e-2 --atol 2e-2
    done
    step "check $dir wgsl" text 120 vulkan "dir:$dir" -- "$egret" check "$dir" --backend wgsl -q
done

# Timings: device time from CUDA events and timestamp queries (`--json`).
for m in ../shared/perf/deit_tiny ../shared/perf/gpt2_small4 tests/data/zoo/bert_tiny tests/data/exports/perceiver_wide_heads_dynamo; do
    for p in f32 tf32 bf16; do
        step "bench $m ptx $p" json 60 cuda "dir:$m" -- "$egret" bench "$m" --backend ptx --precision "$p" --iters 50 --json
    done
    step "bench $m wgsl" json 60 vulkan "dir:$m" -- "$egret" bench "$m" --backend wgsl --iters 50 --json
done
# What recording a run's launches as a CUDA graph saves: the same model
# with each kernel launched one by one.
step "bench gpt2_small4 ptx f32 without CUDA graphs" json 60 cuda "dir:../shared/perf/gpt2_small4" -- \
    env EGRET_CUDA_GRAPHS=0 "$egret" bench ../shared/perf/gpt2_small4 --backend ptx --iters 50 --json

# Base-size models, exported here with torch (no download): GPT-2 small.
models="$out/models"
step "export gpt2_small_past_legacy" text 120 transformers -- \
    python3 tools/make_exports.py --out "$models" gpt2_small_past_legacy
for p in f32 bf16; do
    step "bench gpt2_small_past_legacy ptx $p" json 90 cuda "dir:$models/gpt2_small_past_legacy" -- \
        "$egret" bench "$models/gpt2_small_past_legacy" --backend ptx --precision "$p" --iters 20 --json
done

# PyTorch on the same shapes (eager, CUDA events).
step "pytorch side by side" text 180 cuda torch -- python3 tools/bench_vs_pytorch.py --egret "$egret" --out "$out"

# BERT-base and GPT-2 small (a 128-token prompt and a decode step) in plain
# torch, which needs no transformers: exported, checked against torch, and
# timed beside PyTorch eager (f32, bf16) and torch.compile. Rehearsed
# without a GPU at a small size on the CPU backend.
if [ -n "$cuda" ]; then
    step "plain-torch models, ptx against pytorch" text 300 torch -- \
        python3 tools/torch_models.py --egret "$egret" --out "$out/torch-models"
else
    step "plain-torch models, small, cpu (no device)" text 300 torch_cpu -- \
        python3 tools/torch_models.py --egret "$egret" --out "$out/torch-models" --device cpu --small --iters 5
fi

# Memory errors in one model's kernels.
step "compute-sanitizer memcheck bert_tiny" text 120 cuda sanitizer -- \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$egret" run tests/data/zoo/bert_tiny --backend ptx

# One JSON file: every step, with the benchmarks' JSON inlined.
python3 - "$steps" "$out/gpu-check.json" <<'EOF' || echo "python3 could not write gpu-check.json; $steps has the steps"
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
for s in steps:
    if s["kind"] == "json" and s["status"] == "ran":
        try:
            s["result"] = json.load(open(s["log"]))
        except (OSError, ValueError) as e:
            s["result_error"] = str(e)
json.dump({"steps": steps}, open(sys.argv[2], "w"), indent=1)
counts = {}
for s in steps:
    counts[s["status"]] = counts.get(s["status"], 0) + 1
print("gpu-check.json:", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
EOF
echo "total $(($(date +%s) - start))s"
