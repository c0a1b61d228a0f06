#!/usr/bin/env bash
# etcdlite against etcd 3.4 on this machine, side by side: a fresh etcd and a fresh etcdlite (one
# member each, then three members each, the same flags, data under /var/tmp), every KV workload
# through `etcdlite bench --compare` (rounds alternate etcd, etcdlite; medians), plus h2load rows
# (Put and linearizable Range with 64 streams on one connection) and wrk rows (the JSON gateway:
# puts of new keys and serializable ranges, 64 connections, 5 s each). Prints the ratio table
# that BENCHMARKS.md shows.
#
# Usage: scripts/bench-vs-etcd.sh [rounds] [requests per run]   (ROUNDS=3, TOTAL=20000 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
total=${2:-20000}
if ! command -v etcd > /dev/null || ! command -v etcdctl > /dev/null; then
  apt-get install -y etcd-server etcd-client > /dev/null
fi
command -v h2load > /dev/null || apt-get install -y nghttp2-client > /dev/null
command -v wrk > /dev/null || apt-get install -y wrk > /dev/null
[ -x .build/release/etcdlite ] || swift build -c release --product etcdlite
source Benchmarks/lib.sh
python3 Benchmarks/grpc_bodies.py bodies "$work"
export ETCDCTL_API=3

workloads=(
  "put --val-size 256"
  "range --key-space-size 1000 --fill"
  "range --key-space-size 1000 --consistency s"
  "txn-put --val-size 256 --key-space-size 100000"
  "txn-mixed --key-space-size 1000"
  "delete --key-space-size 100000 --sequential-keys"
)

row() { # setup workload json -> one table row
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
setup, workload, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
a, b, q = r["a"], r["b"], r["ratio"]
print("| %s | %s | %s | %s | %.2fx | %.2f / %.2f ms | %.2f / %.2f ms | %d / %d |" % (
    setup, workload, format(round(a["requestsPerSecond"]), ","), format(round(b["requestsPerSecond"]), ","),
    q["requestsPerSecond"], a["p50"], b["p50"], a["p99"], b["p99"], a["errors"], b["errors"]))
PY
}

h2row() { # setup etcd-port etcdlite-port
  for method in Put Range; do
    local body=put.bin
    [ "$method" = Range ] && body=range.bin
    read -r e _ < <(h2 "$2" "etcdserverpb.KV/$method" "$body" 64 "$total")
    read -r l _ < <(h2 "$3" "etcdserverpb.KV/$method" "$body" 64 "$total")
    echo "| $1 | h2load $method, 64 streams | $e | $l | $(echo "scale=2; $l / $e" | bc)x | | | |"
  done
}

wrkrow() { # setup etcd-port etcdlite-port (the range script reads bench/range/0042)
  local value
  value=$(head -c 192 /dev/zero | base64 -w0)
  for port in "$2" "$3"; do
    curl -sf -X POST "http://127.0.0.1:$port/v3/kv/put" \
      -d "{\"key\":\"$(printf 'bench/range/0042' | base64)\",\"value\":\"$value\"}" > /dev/null
  done
  for script in put range; do
    local e l
    e=$(wrk -t 2 -c 64 -d 5s -s "Benchmarks/wrk/$script.lua" "http://127.0.0.1:$2" | awk '/^Requests\/sec/ {print $2}')
    l=$(wrk -t 2 -c 64 -d 5s -s "Benchmarks/wrk/$script.lua" "http://127.0.0.1:$3" | awk '/^Requests\/sec/ {print $2}')
    echo "| $1 | wrk JSON gateway $script, 64 connections | $e | $l | $(echo "scale=2; $l / $e" | bc)x | | | |"
  done
}

machine_line
echo "etcd: $(etcd --version | head -1); etcdlite: $lite_bin; rounds: $rounds; requests per run: $total"
echo
echo "| setup | workload (64 clients, 1 connection) | etcd req/s | etcdlite req/s | ratio | p50 etcd / etcdlite | p99 etcd / etcdlite | errors |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"

# One member each.
etcd_pid=$(start_server etcd "$(command -v etcd)" 46000)
lite_pid=$(start_server etcdlite "$lite_bin" 46100)
wait_healthy 46000
wait_healthy 46100
for w in "${workloads[@]}"; do
  # shellcheck disable=SC2086
  row "1 member" "$w" "$("$lite_bin" bench $w --endpoints 127.0.0.1:46000 --compare 127.0.0.1:46100 \
    --rounds "$rounds" --total "$total" --clients 64 --conns 1 --json)"
done
h2row "1 member" 46000 46100
wrkrow "1 member" 46000 46100
kill -9 "$etcd_pid" "$lite_pid"

# Three members each; every request to the leader.
read -r -a etcd_pids < <(start_cluster etcd 47000)
read -r -a lite_pids < <(start_cluster etcdlite 47100)
etcd_leader=$(leader_port 47000)
lite_leader=$(leader_port 47100)
for w in "${workloads[@]}"; do
  # shellcheck disable=SC2086
  row "3 members" "$w" "$("$lite_bin" bench $w --endpoints 127.0.0.1:$etcd_leader --compare 127.0.0.1:$lite_leader \
    --rounds "$rounds" --total "$total" --clients 64 --conns 1 --json)"
done
h2row "3 members" "$etcd_leader" "$lite_leader"
wrkrow "3 members" "$etcd_leader" "$lite_leader"
stop_cluster "${etcd_pids[@]}" "${lite_pids[@]}"
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
