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
