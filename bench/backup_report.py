"""Prints the backup/restore comparison from bench/backup-restore.sh's measurements."""
import json
import os
import statistics
import sys

B, ws_one, pb_one = sys.argv[1:4]


def load(n):
    return [json.loads(line) for line in open(f"{B}/{n}.jsonl")]


def du(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def med(rows, key):
    return statistics.median(r[key] for r in rows)


print(f"{'':28}{'walshipper':>12}{'pgBackRest':>12}{'ratio':>8}")
for op in ["backup", "restore"]:
    w, p = load(f"ws-{op}"), load(f"pgbr-{op}")
    bad = [r for r in w + p if r["rc"] != 0]
    if bad:
        sys.exit(f"a {op} run failed: {bad}")
    for key, unit in [("wall", "s"), ("cpu", "s"), ("peak_mib", "MiB")]:
        a, b = med(w, key), med(p, key)
        print(f"{op + ' ' + key + ' (' + unit + ')':28}{a:12.2f}{b:12.2f}{a / b:8.2f}")
a = du(f"{B}/ws-repo/backups/{ws_one}") / 2**20
b = du(f"{B}/pgbr-repo/backup/bench/{pb_one}") / 2**20
print(f"{'one backup stored (MiB)':28}{a:12.1f}{b:12.1f}{a / b:8.2f}")
print(f"(medians of {len(load('ws-backup'))} runs each)")
wb = med(load("ws-backup"), "wall") / med(load("pgbr-backup"), "wall")
wr = med(load("ws-restore"), "wall") / med(load("pgbr-restore"), "wall")
pk = max(r["peak_mib"] for r in load("ws-backup") + load("ws-restore"))
verdict = lambda ok: "met" if ok else "NOT met"
print(f"targets: backup <= 0.7x pgBackRest: {verdict(wb <= 0.7)} ({wb:.2f}); "
      f"restore <= 0.7x: {verdict(wr <= 0.7)} ({wr:.2f}); peak < 256 MiB: {verdict(pk < 256)} ({pk:.0f} MiB)")
