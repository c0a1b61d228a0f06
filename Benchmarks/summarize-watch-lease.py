#!/usr/bin/env python3
"""Medians per target of Benchmarks/watch-lease.sh output, and etcdlite/etcd ratios."""
import json, re, statistics, sys

rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"round=(\d+) target=(\S+) workload=(\S+) server_cpu_s=(\S+) (\{.*\})$", line.strip())
    if not m:
        continue
    _, target, workload, cpu, body = m.groups()
    r = json.loads(body)
    figures = {"server_cpu_s": float(cpu)}
    if workload == "watch-latency":
        figures.update(event_p50_ms=r["latency"]["p50"], event_p99_ms=r["latency"]["p99"],
                       events=r["eventsReceived"])
    elif workload == "lease-keepalive":
        figures.update(keepalives_per_s=r["perSecond"], p50_ms=r["latency"]["p50"], p99_ms=r["latency"]["p99"])
    elif workload == "lease-expiry":
        figures.update(write_p50_ms=r["writesDuringExpiry"]["p50"], write_p99_ms=r["writesDuringExpiry"]["p99"],
                       write_max_ms=r["writesDuringExpiry"]["max"], expiry_s=r["expirySeconds"],
                       grant_s=r["grantSeconds"], keys_left=r["keysLeft"])
    for name, value in figures.items():
        rows.setdefault((workload, name), {}).setdefault(target, []).append(value)

print("| workload | figure | etcd 3.4.23 | etcdlite | ratio |")
print("| --- | --- | --- | --- | --- |")
for (workload, name), targets in rows.items():
    e = statistics.median(targets.get("etcd", [0]))
    l = statistics.median(targets.get("etcdlite", [0]))
    ratio = f"{l / e:.2f}×" if e else "—"
    print(f"| {workload} | {name} | {e:,.3f} | {l:,.3f} | {ratio} |")
