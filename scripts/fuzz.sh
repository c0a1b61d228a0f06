#!/usr/bin/env bash
# libFuzzer over everything a member decodes from bytes others control: client requests (decoded
# and validated), JSON gateway bodies, peer messages, log segments, a client's HTTP/2 frames.
#   scripts/fuzz.sh [--debug] [runs per target] [targets...]
# Builds EtcdLiteFuzz with coverage instrumentation (ETCDLITE_FUZZ=1; release unless --debug),
# starts each target from Tests/EtcdLiteTests/fuzz-regressions/<target> (crashers found before,
# replayed by FuzzRegressionTests too) and stops at the first crash, whose input it copies there.
set -euo pipefail
cd "$(dirname "$0")/.."
config=release
if [ "${1:-}" = "--debug" ]; then config=debug; shift; fi
runs="${1:-1000000}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request gateway peer log http2)

ETCDLITE_FUZZ=1 swift build -c "$config" --product EtcdLiteFuzz 2>&1 | tail -n 3
binary=".build/$config/EtcdLiteFuzz"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for target in "${targets[@]}"; do
  seeds="Tests/EtcdLiteTests/fuzz-regressions/$target"
  mkdir -p "$work/$target" "$work/$target-artifacts"
  start=$(date +%s)
  if ETCDLITE_FUZZ_TARGET="$target" "$binary" "$work/$target" "$seeds" -runs="$runs" -max_len=4096 \
       -artifact_prefix="$work/$target-artifacts/" -print_final_stats=1 >"$work/$target.log" 2>&1; then
    echo "fuzz $target: $(grep -E '^Done' "$work/$target.log") ($(( $(date +%s) - start )) s, $(grep -o 'cov: [0-9]*' "$work/$target.log" | tail -1))"
  else
    status=1
    echo "fuzz $target: CRASH"
    tail -n 30 "$work/$target.log"
    for crash in "$work/$target-artifacts"/*; do
      [ -f "$crash" ] && cp "$crash" "$seeds/" && echo "saved $seeds/$(basename "$crash") (a regression input now)"
    done
  fi
done
exit $status
