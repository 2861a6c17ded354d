#!/usr/bin/env bash
# Builds what tools/gpu_check.sh runs on a GPU machine. That machine reaches
# no package registry, so nothing is built there: this script, run on a
# machine with a registry (a developer's, CI's), builds the `egret` binary
# and the differential tests' binary, strips them, and puts them in
# gpu-bundle/ (git ignores it), compressed, with a manifest. Carry that folder to the
# device and run the check there:
#
#   bash tools/gpu_bundle.sh                     # here (about 15 minutes cold)
#   device tool: run(command="bash tools/gpu_check.sh", carry=["gpu-bundle"])
#
# The test data travels with the working tree (tests/data is tracked); the
# base-size models are made on the device with torch (tools/make_exports.py, or
# tools/torch_models.py in plain torch where transformers is absent).
# EGRET_BUNDLE_PROFILE=dev builds the optimised test profile instead of
# release (quicker where that profile is already built; for rehearsals).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${EGRET_BUNDLE_PROFILE:-release}
case "$profile" in
    release) dir=release ;;
    dev) dir=debug ;;
    *) echo "EGRET_BUNDLE_PROFILE is release or dev, not \`$profile\`" >&2; exit 2 ;;
esac
out=gpu-bundle
# What the device tool carries: 64 MiB in all.
limit=$((60 << 20))
rm -rf "$out"
mkdir -p "$out/bin"
cargo build --profile "$profile" --locked --all-features --bin egret
cp "target/$dir/egret" "$out/bin/egret"
# The test binary cargo builds, found from its own report.
exe=$(cargo test --profile "$profile" --locked --all-features --test differential --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "differential":
        print(m["executable"])')
[ -n "$exe" ] || { echo "cargo built no differential test binary" >&2; exit 1; }
cp "$exe" "$out/bin/differential"
strip "$out"/bin/*
# Compressed to travel (a stripped egret is about 45 MB); gpu_check.sh
# unpacks them.
gzip -9 "$out"/bin/*
bytes=$(du -cb "$out" | tail -1 | cut -f1)
if [ "$bytes" -gt "$limit" ]; then
    echo "gpu-bundle holds $bytes bytes, more than the $limit the device tool carries" >&2
    exit 1
fi
{
    echo "commit $(git rev-parse HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), profile $profile"
    rustc --version
    ls -l "$out/bin"
} > "$out/MANIFEST"
cat "$out/MANIFEST"
echo "gpu-bundle: $bytes bytes"
