#!/usr/bin/env bash
# Side-by-side JSON gateway benchmark of etcdlite and etcd 3.4: wrk with Lua scripts, 64
# connections on the client port. Rounds alternate etcd, etcdlite; BENCHMARKS.md quotes medians.
#
# Needs: apt-get install etcd-server wrk curl
# Usage: Benchmarks/gateway.sh [rounds] [seconds] > results.txt   (build first: swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-10}
source Benchmarks/lib.sh

bench() { # port script -> "reqs/s p50_ms p99_ms non2xx"
  local out
  out=$(wrk -t 2 -c 64 -d "${seconds}s" --latency -s "Benchmarks/wrk/$2" "http://127.0.0.1:$1" 2>&1)
  local rps p50 p99 bad
  rps=$(echo "$out" | awk '/^Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  bad=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  echo "$rps $p50 $p99 ${bad:-0}"
}

machine_line
echo "etcd: $(etcd --version | head -1); etcdlite: $lite_bin; wrk -t 2 -c 64 -d ${seconds}s"
for round in $(seq 1 "$rounds"); do
  for target in etcd etcdlite; do
    bin=$(server_binary "$target")
    rm -rf "$work/$target-data"
    port=$((24000 + round * 10))
    pid=$(start_server "$target" "$bin" "$port")
    wait_healthy "$port"
    for n in $(seq -w 0 99); do
      key=$(printf 'bench/range/00%s' "$n" | base64)
      curl -sf -X POST "http://127.0.0.1:$port/v3/kv/put" -d "{\"key\":\"$key\",\"value\":\"$(head -c 192 /dev/zero | base64 -w0)\"}" > /dev/null
    done
    read -r put put50 put99 putbad < <(bench "$port" put.lua)
    read -r rng rng50 rng99 rngbad < <(bench "$port" range.lua)
    read -r pfx pfx50 pfx99 pfxbad < <(bench "$port" prefix.lua)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    echo "round=$round target=$target put_rps=$put put_p50=$put50 put_p99=$put99 put_non2xx=$putbad range_rps=$rng range_p50=$rng50 range_p99=$rng99 range_non2xx=$rngbad prefix_rps=$pfx prefix_p50=$pfx50 prefix_p99=$pfx99 prefix_non2xx=$pfxbad"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
