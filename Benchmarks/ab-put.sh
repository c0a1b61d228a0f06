#!/usr/bin/env bash
# A/B of two etcdlite builds beside etcd: three fresh single members up at once, h2load puts
# (prebuilt 256-byte body) on each in turn, round after round; prints "reqs/s p50_us" per server.
#
# Needs: apt-get install etcd-server nghttp2-client; pip install grpcio
# Usage: Benchmarks/ab-put.sh OLD_BINARY NEW_BINARY [streams] [requests] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2 streams=${3:-64} requests=${4:-20000} rounds=${5:-5}
source Benchmarks/lib.sh
python3 Benchmarks/grpc_bodies.py bodies "$work"
machine_line
pe=$(start_server etcd "$(command -v etcd)" 24700)
po=$(start_server old "$old" 24800)
pn=$(start_server new "$new" 24900)
for port in 24700 24800 24900; do
  wait_healthy "$port"
  python3 Benchmarks/grpc_bodies.py check "127.0.0.1:$port" "$work"
  h2 "$port" etcdserverpb.KV/Put put.bin "$streams" 2000 > /dev/null  # warm-up
done
for round in $(seq 1 "$rounds"); do
  echo "round=$round streams=$streams etcd $(h2 24700 etcdserverpb.KV/Put put.bin "$streams" "$requests")" \
    "old $(h2 24800 etcdserverpb.KV/Put put.bin "$streams" "$requests")" \
    "new $(h2 24900 etcdserverpb.KV/Put put.bin "$streams" "$requests")"
done
kill -TERM "$pe" "$po" "$pn"; wait 2>/dev/null || true
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
