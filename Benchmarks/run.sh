#!/usr/bin/env bash
# Side-by-side benchmark of etcdlite and etcd 3.4 on this machine: same flags, same data disk,
# neutral load generators (h2load for gRPC). Rounds alternate A B A B; BENCHMARKS.md quotes medians.
#
# Needs: apt-get install etcd-server etcd-client nghttp2-client; pip install grpcio
# Usage: Benchmarks/run.sh [rounds] > results.txt   (build first: swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
source Benchmarks/lib.sh
python3 Benchmarks/grpc_bodies.py bodies "$work"

h2() { # port path body streams requests -> "reqs/s p50_us"
  local out
  rm -f "$work/h2.log"  # h2load appends to an existing log
  out=$(h2load -n "$5" -c 1 -m "$4" -H 'content-type: application/grpc' -H 'te: trailers' \
    --log-file="$work/h2.log" -d "$work/$3" "http://127.0.0.1:$1/$2" 2>&1)
  echo "$out" | grep -q "$5 succeeded" || { echo "h2load failed: $out" >&2; exit 1; }
  local rps p50
  rps=$(echo "$out" | awk '/^finished in/ {print $4}')
  # Per-request latency (µs) is the log's third column.
  p50=$(cut -f3 "$work/h2.log" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "$rps $p50"
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

machine_line
echo "etcd: $(etcd --version | head -1); etcdlite: $lite_bin"
for round in $(seq 1 "$rounds"); do
  for target in etcd etcdlite; do
    bin=$(server_binary "$target")
    rm -rf "$work/$target-data"
    port=$((24000 + round * 10))
    pid=$(start_server "$target" "$bin" "$port")
    wait_healthy "$port"
    # h2load counts HTTP 200s; check once that the same bodies succeed at the gRPC level.
    python3 Benchmarks/grpc_bodies.py check "127.0.0.1:$port" "$work"
    read -r put64 put64lat < <(h2 "$port" etcdserverpb.KV/Put put.bin 64 20000)
    read -r put1 put1lat < <(h2 "$port" etcdserverpb.KV/Put put.bin 1 3000)
    read -r range64 range64lat < <(h2 "$port" etcdserverpb.KV/Range range.bin 64 50000)
    python3 Benchmarks/grpc_bodies.py load "127.0.0.1:$port" 100000 256
    sleep 1
    rss=$(rss_kb "$pid")
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    t0=$(date +%s.%N)
    pid=$(start_server "$target" "$bin" "$port")
    wait_healthy "$port"
    t1=$(date +%s.%N)
    restart=$(echo "$t1 - $t0" | bc)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    echo "round=$round target=$target put64_rps=$put64 put64_p50us=$put64lat put1_rps=$put1 put1_p50us=$put1lat range64_rps=$range64 range64_p50us=$range64lat rss_100k_kb=$rss restart_s=$restart"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
