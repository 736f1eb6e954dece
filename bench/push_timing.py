"""Times walshipper and pgBackRest archive-push on the same segments.

Called by bench/archive-push.sh. The two tools alternate segment by segment
so that machine noise hits both alike. Figures are printed for all segments
and separately for compressible (pgbench-like) and less compressible WAL.
"""
import os
import statistics
import subprocess
import sys
import time

B, BIN = sys.argv[1], sys.argv[2]
segs = open(f"{B}/segments.txt").read().split()


def run(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def du(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]


rows = []  # (segment, walshipper s, pgbackrest s, compression ratio)
for s in segs:
    p = f"{B}/wal/{s}"
    ws = run([BIN, "--config", f"{B}/walshipper.toml", "archive-push", p])
    pb = run(["pgbackrest", f"--config={B}/pgbackrest.conf", "--stanza=bench", "archive-push", p])
    stored = os.path.getsize(f"{B}/ws-repo/wal/{s[:16]}/{s}")
    rows.append((s, ws, pb, os.path.getsize(p) / stored))


def report(title, rs):
    if not rs:
        return
    ws = [r[1] for r in rs]
    pb = [r[2] for r in rs]
    print(f"{title} ({len(rs)} segments)")
    for name, f in [("  median ms/segment", lambda v: statistics.median(v) * 1000),
                    ("  p95 ms/segment", lambda v: q(v, .95) * 1000),
                    ("  total s", sum)]:
        a, b = f(ws), f(pb)
        print(f"{name:24}{a:12.1f}{b:12.1f}{a / b:8.2f}")


print(f"{'':24}{'walshipper':>12}{'pgBackRest':>12}{'ratio':>8}")
report("all segments", rows)
report("compressible WAL, ratio >= 4 (pgbench)", [r for r in rows if r[3] >= 4])
report("less compressible WAL, ratio < 4", [r for r in rows if r[3] < 4])
wsz, pbz = du(f"{B}/ws-repo/wal"), du(f"{B}/pgbr-repo/archive")
print(f"{'repository MiB':24}{wsz / 2**20:12.1f}{pbz / 2**20:12.1f}{wsz / pbz:8.2f}")
med_ws = statistics.median(r[1] for r in rows)
med_pb = statistics.median(r[2] for r in rows)
print(f"target, median <= 0.5 x pgBackRest over all segments: {'met' if med_ws <= 0.5 * med_pb else 'NOT met'} ({med_ws / med_pb:.2f})")
