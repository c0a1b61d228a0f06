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

# Three-member clusters (cluster.sh, scripts/bench-vs-etcd.sh).
start_cluster() { # target base-port -> pids on stdout (one line)
  local target=$1 base=$2 bin initial="" pids=""
  bin=$(server_binary "$target")
  for i in 0 1 2; do initial+="m$i=http://127.0.0.1:$((base + 10 * i + 1)),"; done
  initial=${initial%,}
  for i in 0 1 2; do
    local client=$((base + 10 * i)) peer=$((base + 10 * i + 1)) dir="$work/$target-data-$i"
    rm -rf "$dir"
    "$bin" --name "m$i" --data-dir "$dir" --initial-cluster "$initial" --initial-cluster-token bench \
      --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
      --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      > "$work/$target-$i.log" 2>&1 &
    pids+="$! "
  done
  echo "$pids"
}

endpoints() { echo "127.0.0.1:$1,127.0.0.1:$(($1 + 10)),127.0.0.1:$(($1 + 20))"; }

stop_cluster() { # pids...: SIGKILL, then wait until they are gone (they are not this shell's children)
  kill -9 "$@" 2>/dev/null || true
  for pid in "$@"; do while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done; done
}

leader_port() { # base -> client port of the leader
  local base=$1
  for _ in $(seq 1 250); do
    for i in 0 1 2; do
      local port=$((base + 10 * i))
      if etcdctl --endpoints="127.0.0.1:$port" --dial-timeout=300ms --command-timeout=500ms endpoint status -w json 2>/dev/null \
        | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["Status"]; sys.exit(0 if s["header"]["member_id"]==s["leader"] else 1)' 2>/dev/null; then
        echo "$port"; return 0
      fi
    done
    sleep 0.02
  done
  return 1
}
