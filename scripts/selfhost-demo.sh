#!/usr/bin/env bash
# Issue 9's end-to-end scenario on the local platform, with real members and a real operator:
# boot member → pivot to 3 self-hosted → 5 → 3 → rolling upgrade (a new binary path) → kill -9 of
# every member → back with no manual command. A writer puts keys throughout; the table gives, per
# step, the elections caused and the longest time with no acknowledged write, and the run checks
# that every acknowledged write is there at the end.
#
#   scripts/selfhost-demo.sh [--json]          (BINARY=path to use a built etcdlite; CONFIG=debug|release)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-release}
if [[ -z "${BINARY:-}" ]]; then
    swift build -c "$CONFIG" --product etcdlite >&2
    BINARY="$(swift build -c "$CONFIG" --show-bin-path)/etcdlite"
fi
DIR=$(mktemp -d /tmp/etcdlite-selfhost-XXXXXX)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; binary $BINARY" >&2
status=0
"$BINARY" selfhost-demo --binary "$BINARY" --dir "$DIR" "$@" || status=$?
if [[ $status -eq 0 ]]; then rm -rf "$DIR"; else echo "kept $DIR for its logs" >&2; fi
exit $status
