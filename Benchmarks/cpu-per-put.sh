#!/usr/bin/env bash
# CPU time a server spends per durable Put: for each binary, a fresh single member, h2load's
# 64-stream put (prebuilt 256-byte body), and the member's CPU (user + system, /proc/PID/stat)
# before and after, split into its event-loop threads (NIO-*; etcd has none, all of its CPU shows as "other") and the rest. One line per
# binary and round: "name rounds=R reqs/s total_us_per_put eventloop_us_per_put other_us_per_put".
#
# Needs: apt-get install etcd-server nghttp2-client; pip install grpcio
# Usage: Benchmarks/cpu-per-put.sh ROUNDS REQUESTS NAME=BINARY...
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=$1 requests=$2
shift 2
source Benchmarks/lib.sh
python3 Benchmarks/grpc_bodies.py bodies "$work"
machine_line
ticks=$(getconf CLK_TCK)
cpu() { # pid [thread-name-prefix] -> clock ticks of the matching threads (all when no prefix)
  local pid=$1 prefix=${2:-} total=0
  for task in /proc/"$pid"/task/*; do
    if [ -n "$prefix" ] && ! grep -q "^$prefix" "$task/comm" 2>/dev/null; then continue; fi
    local stat
    stat=$(cat "$task/stat" 2>/dev/null) || continue
    stat=${stat##*) }
    set -- $stat
    total=$((total + ${12} + ${13}))
  done
  echo "$total"
}
port=25000
for round in $(seq 1 "$rounds"); do
  for spec in "$@"; do
    name=${spec%%=*} bin=${spec#*=}
    port=$((port + 10))
    pid=$(start_server "$name" "$bin" "$port")
    wait_healthy "$port"
    h2 "$port" etcdserverpb.KV/Put put.bin 64 2000 > /dev/null  # warm-up
    all0=$(cpu "$pid") loop0=$(cpu "$pid" NIO-)
    result=$(h2 "$port" etcdserverpb.KV/Put put.bin 64 "$requests")
    all1=$(cpu "$pid") loop1=$(cpu "$pid" NIO-)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    awk -v n="$name" -v r="$round" -v res="$result" -v a=$((all1 - all0)) -v l=$((loop1 - loop0)) -v hz="$ticks" -v q="$requests" \
      'BEGIN { split(res, x, " "); printf "%s round=%d reqs/s=%s cpu_us_per_put=%.1f eventloop_us=%.1f other_us=%.1f\n", n, r, x[1], a*1e6/hz/q, l*1e6/hz/q, (a-l)*1e6/hz/q }'
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
