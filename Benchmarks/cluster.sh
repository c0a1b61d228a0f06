#!/usr/bin/env bash
# Side by side: a 3-member etcd 3.4 cluster and a 3-member etcdlite cluster on this machine (all
# members on loopback, data on the same disk), the same flags. Per round and target: Put with 64
# streams and linearizable Range with 64 streams against the leader (h2load, prebuilt gRPC bodies),
# then leader failover: kill -9 of the leader, time until a write through a survivor is
# acknowledged (etcdctl put, retried every 20 ms).
#
# Needs: apt-get install etcd-server etcd-client nghttp2-client; pip install grpcio
# Usage: Benchmarks/cluster.sh [rounds] [failovers] > results.txt  (build first: swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
failovers=${2:-5}
source Benchmarks/lib.sh
python3 Benchmarks/grpc_bodies.py bodies "$work"
export ETCDCTL_API=3

machine_line
echo "etcd: $(etcd --version | head -1); etcdlite: $lite_bin"
for round in $(seq 1 "$rounds"); do
  for target in etcd etcdlite; do
    base=$((25000 + round * 100 + $([ "$target" = etcd ] && echo 0 || echo 50)))
    read -r -a pids < <(start_cluster "$target" "$base")
    leader=$(leader_port "$base")
    python3 Benchmarks/grpc_bodies.py check "127.0.0.1:$leader" "$work"
    read -r put64 put64lat < <(h2 "$leader" etcdserverpb.KV/Put put.bin 64 20000)
    read -r range64 range64lat < <(h2 "$leader" etcdserverpb.KV/Range range.bin 64 50000)
    echo "round=$round target=$target put64_rps=$put64 put64_p50us=$put64lat range64_rps=$range64 range64_p50us=$range64lat"
    if [ "$round" = 1 ]; then
      # etcdctl's own check (60 s of load); its verdict is the last line.
      perf=$(etcdctl --endpoints="$(endpoints "$base")" check perf --load=l 2>&1 | tr '\r' '\n' | grep -E 'PASS|FAIL' | tr '\n' ' ' || true)
      echo "check-perf target=$target load=l: $perf"
    fi
    stop_cluster "${pids[@]}"
  done
done
# Failover: a fresh cluster each time; kill -9 the leader, then write through a survivor until it
# is acknowledged.
for target in etcd etcdlite; do
  for n in $(seq 1 "$failovers"); do
    base=$((27000 + n * 100 + $([ "$target" = etcd ] && echo 0 || echo 50)))
    read -r -a pids < <(start_cluster "$target" "$base")
    leader=$(leader_port "$base")
    etcdctl --endpoints="127.0.0.1:$leader" put warm up > /dev/null
    index=$(((leader - base) / 10))
    survivor=$((base + 10 * ((index + 1) % 3)))
    t0=$(date +%s.%N)
    kill -9 "${pids[$index]}"
    until etcdctl --endpoints="127.0.0.1:$survivor" --command-timeout=500ms put after failover > /dev/null 2>&1; do sleep 0.02; done
    t1=$(date +%s.%N)
    echo "failover target=$target n=$n seconds=$(echo "$t1 - $t0" | bc)"
    stop_cluster "${pids[@]}"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
