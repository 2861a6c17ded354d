#!/usr/bin/env bash
# Artifact against JIT, side by side in one run: for each model, `egret
# compile` it to a shared library, build tools/artifact_bench.c against it,
# and time the library from C and the JIT (`egret bench`) at 1 and 2
# threads, in alternating rounds so that machine noise moves both alike.
# Prints a markdown table (the one in BENCHMARKS.md).
#
#   tools/bench_artifact.sh [--rounds N] [--iters N] [--target-cpu CPU] MODEL_DIR...
#   tools/bench_artifact.sh --soak RUNS [--threads N] MODEL_DIR   RSS over RUNS runs
#   tools/bench_artifact.sh --symbolic "batch=1 sequence=128" MODEL_DIR...
#       a library that keeps the model's symbolic dims against one compiled
#       with --dim for those values, both run at them (one thread)
#
# Uses target/release/egret (built if missing: cargo build --release --features aot).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 iters=30 soak="" target_cpu=native soak_threads=1 symbolic=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --iters) iters=$2; shift 2 ;;
        --soak) soak=$2; shift 2 ;;
        --threads) soak_threads=$2; shift 2 ;;
        --target-cpu) target_cpu=$2; shift 2 ;;
        --symbolic) symbolic=$2; shift 2 ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { sed -n 2,11p "$0"; exit 2; }
egret=target/release/egret
[ -x "$egret" ] || cargo build --release --locked --features aot --bin egret
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Builds the timing program for model folder $1 in $work/$name$3 (more
# `egret compile` flags in $2); prints the name.
build() {
    local dir=$1 name
    name=$(basename "$dir" | tr -c 'a-zA-Z0-9\n' '_' | tr 'A-Z' 'a-z')$3
    # shellcheck disable=SC2086
    "$egret" compile "$dir" -o "$work/$name" --name "$name" --target-cpu "$target_cpu" ${2:-} >/dev/null
    cc -O2 -DMODEL="$name" -DMODEL_HEADER="\"$name.h\"" -DMODEL_ABI="${name^^}_ABI_VERSION" -I "$work/$name" \
        tools/artifact_bench.c -L "$work/$name" -l"$name" -Wl,-rpath,"$work/$name" -o "$work/$name/bench"
    echo "$name"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

if [ -n "$symbolic" ]; then
    flags=$(for d in $symbolic; do printf -- '--dim %s ' "$d"; done)
    echo "| model | dims | symbolic library (ms) | specialised library (ms) | symbolic / specialised |"
    echo "| --- | --- | --- | --- | --- |"
    for dir in "$@"; do
        sym=$(build "$dir" "" "") fixed=$(build "$dir" "$flags" _fixed)
        : > "$work/sym" && : > "$work/fixed"
        for _ in $(seq "$rounds"); do
            EGRET_DIMS="$symbolic" "$work/$sym/bench" time 1 5 "$iters" | awk '{ print $2 }' >> "$work/sym"
            "$work/$fixed/bench" time 1 5 "$iters" | awk '{ print $2 }' >> "$work/fixed"
        done
        a=$(median < "$work/sym") b=$(median < "$work/fixed")
        printf '| %s | %s | %.3f | %.3f | %.2fx |\n' "$(basename "$dir")" "$symbolic" "$a" "$b" "$(python3 -c "print($a / $b)")"
    done
    exit 0
fi

if [ -n "$soak" ]; then
    name=$(build "$1")
    "$work/$name/bench" soak "$soak_threads" "$soak"
    exit 0
fi

echo "| model | threads | artifact (ms) | JIT (ms) | artifact / JIT |"
echo "| --- | --- | --- | --- | --- |"
for dir in "$@"; do
    name=$(build "$dir")
    for threads in 1 2; do
        : > "$work/aot" && : > "$work/jit"
        for _ in $(seq "$rounds"); do
            "$work/$name/bench" time "$threads" 5 "$iters" | awk '{ print $2 }' >> "$work/aot"
            "$egret" bench "$dir" --threads "$threads" --warmup 5 --iters "$iters" --json \
                | python3 -c 'import json, sys; print(json.load(sys.stdin)["median_ms"])' >> "$work/jit"
        done
        aot=$(median < "$work/aot") jit=$(median < "$work/jit")
        printf '| %s | %s | %.2f | %.2f | %.2fx |\n' "$(basename "$dir")" "$threads" "$aot" "$jit" \
            "$(python3 -c "print($aot / $jit)")"
    done
done
