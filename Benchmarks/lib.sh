# Shared by the benchmark scripts: a scratch directory and members on loopback.
# Sourced after `cd` to the repository root; sets $work and $lite_bin.
lite_bin=${ETCDLITE_BINARY:-.build/release/etcdlite}
work=$(mktemp -d /var/tmp/etcdlite-bench.XXXXXX)
trap 'pkill -f "$work" 2>/dev/null || true; rm -rf "$work"' EXIT

start_server() { # name binary port -> pid
  local name=$1 bin=$2 port=$3 dir="$work/$1-data"
  "$bin" --name "$name" --data-dir "$dir" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$name=http://127.0.0.1:$((port + 1))" > "$work/$name.log" 2>&1 &
  echo $!
}

wait_healthy() { # port
  for _ in $(seq 1 2000); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null 2>&1 && return 0
    sleep 0.005
  done
  return 1
}

server_binary() { # target -> binary
  if [ "$1" = etcd ]; then command -v etcd; else echo "$lite_bin"; fi
}

machine_line() {
  echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
}

h2() { # port path body streams requests -> "reqs/s p50_us" (h2load with a prebuilt gRPC body)
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
