#!/usr/bin/env bash
# Side-by-side Watch and Lease benchmarks of etcdlite and etcd 3.4 on this machine, driven by
# `etcdlite bench` (the same client for both). Rounds alternate etcd, etcdlite; BENCHMARKS.md
# quotes medians. Server CPU is the server process's user+system time over the workload.
#
# Needs: apt-get install etcd-server
# Usage: Benchmarks/watch-lease.sh [rounds] > results.txt   (build first: swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
source Benchmarks/lib.sh

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run_workload target round name args... : fresh member, one workload, one JSON line out.
run_workload() {
  local target=$1 round=$2 name=$3; shift 3
  local bin port pid before after json
  bin=$(server_binary "$target")
  rm -rf "$work/$target-data"
  port=$((24000 + round * 10))
  pid=$(start_server "$target" "$bin" "$port")
  wait_healthy "$port"
  before=$(cpu_ticks "$pid")
  json=$("$lite_bin" bench "$name" --endpoints "127.0.0.1:$port" --json "$@")
  after=$(cpu_ticks "$pid")
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  echo "round=$round target=$target workload=$name server_cpu_s=$(echo "($after - $before) / $(getconf CLK_TCK)" | bc -l | cut -c1-6) $json"
}

machine_line
echo "etcd: $(etcd --version | head -1); etcdlite: $lite_bin"
for round in $(seq 1 "$rounds"); do
  for target in etcd etcdlite; do
    run_workload "$target" "$round" watch-latency --watchers 1000 --streams 10 --puts 1000 --rate 100
    run_workload "$target" "$round" lease-keepalive --conns 4 --streams 16 --window 32 --leases 1000 --duration 10
    run_workload "$target" "$round" lease-expiry --leases 10000 --ttl 10 --rate 200
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
