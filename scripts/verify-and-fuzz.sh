#!/usr/bin/env bash
# The second half of the tests (after `swift test`, as README and .ci/run run them): a short round
# of `etcdlite verify` (three members under every kind of fault), on its own because it keeps both
# cores busy for two minutes, then a short libFuzzer run per fuzz target (it rebuilds EtcdLite with
# coverage instrumentation, so it comes last).
set -euo pipefail
cd "$(dirname "$0")/.."
ETCDLITE_VERIFY_SECONDS="${ETCDLITE_VERIFY_SECONDS:-120}" swift test --skip-build --filter VerifyRunTests
scripts/fuzz.sh --debug "${ETCDLITE_FUZZ_RUNS:-1000000}"
