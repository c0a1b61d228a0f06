#!/usr/bin/env bash
# Every test: the unit and process tests, then a short round of `etcdlite verify` (three members
# under every kind of fault), on its own because it keeps both cores busy for two minutes, then a
# short libFuzzer run per fuzz target (it rebuilds EtcdLite with coverage instrumentation, so last).
# Differential tests need etcd: apt-get install etcd-server etcd-client curl.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build --build-tests 2>&1 | tail -n 20
swift test --skip-build "$@"
ETCDLITE_VERIFY_SECONDS="${ETCDLITE_VERIFY_SECONDS:-120}" swift test --skip-build --filter VerifyRunTests
scripts/fuzz.sh --debug "${ETCDLITE_FUZZ_RUNS:-1000000}"
