#!/usr/bin/env bash
# Is `etcdlite bench` a light enough client? The same put workload (64 clients on one connection,
# a 256-byte value, one key) from h2load (prebuilt gRPC body) and from `etcdlite bench`, alternating,
# against one fresh member of etcd (default) or etcdlite; prints each round and the medians' ratio.
#
# Needs: apt-get install etcd-server nghttp2-client; pip install grpcio
# Usage: Benchmarks/client-vs-h2load.sh [etcd|etcdlite] [rounds] [requests]   (build first: swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-etcd}
rounds=${2:-5}
requests=${3:-20000}
source Benchmarks/lib.sh
python3 Benchmarks/grpc_bodies.py bodies "$work"
machine_line
port=24600
pid=$(start_server "$target" "$(server_binary "$target")" "$port")
wait_healthy "$port"
python3 Benchmarks/grpc_bodies.py check "127.0.0.1:$port" "$work"
h2 "$port" etcdserverpb.KV/Put put.bin 64 3000 > /dev/null  # warm-up
h2_rates=() bench_rates=()
for round in $(seq 1 "$rounds"); do
  read -r h2_rps _ < <(h2 "$port" etcdserverpb.KV/Put put.bin 64 "$requests")
  bench_rps=$("$lite_bin" bench put --endpoints "127.0.0.1:$port" --total "$requests" --clients 64 --conns 1 --val-size 256 --json \
    | python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["requestsPerSecond"])')
  echo "round=$round target=$target h2load_rps=$h2_rps bench_rps=$bench_rps"
  h2_rates+=("$h2_rps") bench_rates+=("$bench_rps")
done
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
h2_median=$(median "${h2_rates[@]}") bench_median=$(median "${bench_rates[@]}")
echo "median h2load_rps=$h2_median bench_rps=$bench_median ratio=$(echo "scale=3; $bench_median / $h2_median" | bc)"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
