#!/usr/bin/env bash
# Runs Egret's cargo-fuzz targets (fuzz/): libFuzzer with AddressSanitizer,
# each from its committed corpus (fuzz/corpus/TARGET, read only) into a work
# corpus (fuzz/work/TARGET, git-ignored), with the ONNX or IR dictionary.
# A crash, a leak, an input running past a second (-timeout=1) or past
# 2 GB of memory stops the target with its input under fuzz/artifacts/TARGET/
# and this script exits non-zero.
#
#   tools/fuzz.sh                      # every target for 20 s (about a minute)
#   tools/fuzz.sh --time 600 compile_run
#   tools/fuzz.sh --runs 1000000 import_bytes ir_text
#   tools/fuzz.sh --time 600 compile_run -- -fork=1 -ignore_crashes=1
#                                      # (after --: more libFuzzer flags)
#   tools/fuzz.sh --lean --runs 1000000 compile_run -- -fork=2
#                                      # the long runs' setting, below
#
# --lean trades a little of the search for speed, for runs of millions of
# inputs where most of the time is libFuzzer's and the sanitizer's own
# bookkeeping: no comparison tracing (`cargo fuzz --no-trace-compares`, its
# own build under fuzz/target-lean), no allocation stacks in ASan's reports
# (`malloc_context_size=0`; every error is still caught) and libFuzzer's
# plain schedule (`-entropic=0`). compile_run: 40 -> about 60 inputs a
# second from the last two alone (BENCHMARKS.md, coverage-guided fuzzing).
# It also leaves out ASan's fake stacks, which catch a use of a stack slot
# after its function returned (`detect_stack_use_after_return=0`: safe Rust
# can't make one, and the JIT's code is not instrumented either way), and
# its filling of new allocations (`max_malloc_fill_size=0`; reads of memory
# never written are MemorySanitizer's job, not ASan's): the corpus of
# compile_run replays in 26% less time.
#
# Needs a nightly toolchain (`rustup toolchain list`), or stable with
# RUSTC_BOOTSTRAP=1; installs cargo-fuzz if it is missing. Minimise a crash
# with `cargo +nightly fuzz tmin TARGET fuzz/artifacts/TARGET/crash-...`
# (from fuzz/'s parent), and the committed corpus with
# `cargo +nightly fuzz cmin TARGET fuzz/corpus/TARGET`.
set -euo pipefail
cd "$(dirname "$0")/.."

time_s=20
runs=""
lean=""
targets=()
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; extra=("$@"); break ;;
        --time) time_s="$2"; shift 2 ;;
        --runs) runs="$2"; time_s=""; shift 2 ;;
        --lean) lean=1; shift ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(import_bytes ir_text compile_run)

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    cargo=(cargo +nightly)
else
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi

build=()
schedule=()
if [ -n "$lean" ]; then
    build=(--no-trace-compares --target-dir fuzz/target-lean)
    schedule=(-entropic=0)
    export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}malloc_context_size=0:detect_stack_use_after_return=0:max_malloc_fill_size=0"
fi

status=0
for t in "${targets[@]}"; do
    case "$t" in
        ir_text) dict=fuzz/ir.dict; max_len=65536 ;;
        compile_run) dict=fuzz/onnx.dict; max_len=4096 ;;
        import_bytes) dict=fuzz/onnx.dict; max_len=1048576 ;;
        *) echo "unknown target $t (import_bytes, ir_text, compile_run)" >&2; exit 2 ;;
    esac
    mkdir -p "fuzz/work/$t"
    limit=()
    if [ -n "$time_s" ]; then limit=(-max_total_time="$time_s"); else limit=(-runs="$runs"); fi
    echo "== $t ${limit[*]}"
    if ! "${cargo[@]}" fuzz run "${build[@]}" "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -dict="$dict" -max_len="$max_len" -timeout=1 -rss_limit_mb=2048 \
        -print_final_stats=1 "${schedule[@]}" "${limit[@]}" "${extra[@]}"; then
        echo "tools/fuzz.sh: $t failed; its input is under fuzz/artifacts/$t/" >&2
        status=1
    fi
done
exit $status
