#!/usr/bin/env bash
# Resident memory of a member before and after many short connections: N HTTP/1.1 /health
# requests through curl (one connection each), then N/4 etcdctl gets (one gRPC connection each).
# A handler kept alive after its connection closed shows as growth.
# Usage: Benchmarks/connection-rss.sh BINARY N PORT
bin=$1 n=$2 port=$3
dir=$(mktemp -d)
$bin --data-dir $dir/d --listen-client-urls http://127.0.0.1:$port --advertise-client-urls http://127.0.0.1:$port --listen-peer-urls http://127.0.0.1:$((port+1)) --initial-advertise-peer-urls http://127.0.0.1:$((port+1)) --initial-cluster default=http://127.0.0.1:$((port+1)) > $dir/log 2>&1 &
pid=$!
sleep 1.5
for i in $(seq 1 200); do curl -s http://127.0.0.1:$port/health >/dev/null; done
r0=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
for i in $(seq 1 $n); do curl -s http://127.0.0.1:$port/health >/dev/null; done
r1=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
for i in $(seq 1 $((n/4))); do etcdctl --endpoints=127.0.0.1:$port get k >/dev/null; done
r2=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
echo "$bin: rss after warm-up ${r0} kB, after $n HTTP connections ${r1} kB, after $((n/4)) etcdctl connections ${r2} kB"
kill $pid; wait $pid 2>/dev/null; rm -rf $dir
