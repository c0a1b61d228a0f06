#!/bin/bash
# Put and Range with 64 clients against etcd 3.4 and etcdlite, one member each, three ways:
# plaintext, TLS with client certificates (--client-cert-auth), and plaintext with auth on (a
# user who is not root, so that every request has its key permission checked). `etcdlite bench
# --compare` alternates etcd (A) and etcdlite (B) for ROUNDS rounds and reports medians.
# Usage: Benchmarks/security.sh [rounds] [seconds]   (build first: swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/.."
. Benchmarks/lib.sh
rounds=${1:-3}
seconds=${2:-8}
machine_line

# A CA, the servers' certificate and a client certificate (ECDSA P-256), as etcd's docs make them.
pki="$work/pki"
mkdir -p "$pki"
ssl() { openssl "$@" > /dev/null 2>&1; }
ssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 2 -subj "/CN=bench CA"
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > "$pki/ext"
for leaf in server client; do
  ssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$pki/$leaf.key" -out "$pki/$leaf.csr" -subj "/CN=$leaf"
  ssl x509 -req -in "$pki/$leaf.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -out "$pki/$leaf.crt" -days 2 -extfile "$pki/ext"
done

start() { # name binary port scheme
  local name=$1 bin=$2 port=$3 scheme=$4 dir="$work/$1-data" tls=()
  rm -rf "$dir"
  if [ "$scheme" = https ]; then
    tls=(--cert-file "$pki/server.crt" --key-file "$pki/server.key" --trusted-ca-file "$pki/ca.crt" --client-cert-auth)
  fi
  "$bin" --name "$name" --data-dir "$dir" "${tls[@]}" \
    --listen-client-urls "$scheme://127.0.0.1:$port" --advertise-client-urls "$scheme://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$name=http://127.0.0.1:$((port + 1))" > "$work/$name.log" 2>&1 &
  echo $!
}

ready() { # endpoint etcdctl-flags...
  local endpoint=$1; shift
  for _ in $(seq 1 400); do
    etcdctl --endpoints="$endpoint" "$@" --dial-timeout=300ms endpoint health > /dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "no member at $endpoint" >&2; exit 1
}

# A user whose one role may read and write every key (the permission check runs for each request).
enable_auth() { # endpoint
  local ctl=(etcdctl --endpoints="$1")
  "${ctl[@]}" user add root:rootpw > /dev/null
  "${ctl[@]}" user add bench:benchpw > /dev/null
  "${ctl[@]}" role add all > /dev/null
  "${ctl[@]}" role grant-permission all readwrite "" --from-key > /dev/null
  "${ctl[@]}" user grant-role bench all > /dev/null
  "${ctl[@]}" auth enable > /dev/null 2>&1
}

# Put, then Range over 1,000 filled keys: A and B alternating, medians of the rounds.
compare() { # endpoint-A endpoint-B label bench-flags...
  local a=$1 b=$2 label=$3 workload extra; shift 3
  for workload in put range; do
    extra=()
    [ $workload = range ] && extra=(--fill --key-space-size 1000)
    echo "== $label $workload"
    .build/release/etcdlite bench $workload --endpoints "$a" --compare "$b" \
      --rounds "$rounds" --duration "$seconds" --total 10000000 --conns 1 --clients 64 --key-size 8 --val-size 64 \
      "${extra[@]}" "$@"
  done
}

# MODES="plain tls auth ab" (the default) picks the parts to run.
modes=${MODES:-plain tls auth ab}
for mode in plain tls auth; do
  [[ " $modes " == *" $mode "* ]] || continue
  scheme=http; flags=(); ctlflags=()
  if [ $mode = tls ]; then
    scheme=https
    flags=(--cacert "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key")
    ctlflags=("${flags[@]}")
  fi
  [ $mode = auth ] && flags=(--user bench:benchpw)
  etcd_pid=$(start etcd "$(command -v etcd)" 24379 $scheme)
  lite_pid=$(start lite "$lite_bin" 24479 $scheme)
  ready "$scheme://127.0.0.1:24379" "${ctlflags[@]}"
  ready "$scheme://127.0.0.1:24479" "${ctlflags[@]}"
  if [ $mode = auth ]; then enable_auth "127.0.0.1:24379"; enable_auth "127.0.0.1:24479"; fi
  compare "$scheme://127.0.0.1:24379" "$scheme://127.0.0.1:24479" "$mode" "${flags[@]}"
  kill "$etcd_pid" "$lite_pid"
  wait "$etcd_pid" "$lite_pid" 2>/dev/null || true
done
# The cost of auth itself: the same server without auth (A) and with it (B), alternating.
for target in etcd lite; do
  [[ " $modes " == *" ab "* ]] || continue
  bin=$(server_binary $target)
  off_pid=$(start "$target-off" "$bin" 24579 http)
  on_pid=$(start "$target-on" "$bin" 24679 http)
  ready "http://127.0.0.1:24579"
  ready "http://127.0.0.1:24679"
  enable_auth "127.0.0.1:24679"
  compare "http://127.0.0.1:24579" "http://127.0.0.1:24679" "$target without auth (A) and with auth (B):" --user bench:benchpw
  kill "$off_pid" "$on_pid"
  wait "$off_pid" "$on_pid" 2>/dev/null || true
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
