"""Times walshipper and pgBackRest archive-push on the same segments.

Usage: push_timing.py DIR WALSHIPPER PGBACKREST_2.59.1 [PGBACKREST_2.45]
Called by bench/archive-push.sh. Both tools must meet a segment in the same
page-cache state, or the second one to read it wins for free: on this kind
of VM a file left alone for seconds is partly evicted again (measured with
fincore: 10-14 of 16 MiB still cached a minute after a read). So every push
is timed twice over, in two passes into empty archives:

- warm: the segment is read once just before the push, as when PostgreSQL
  has just written it (the archiver's usual case). The target applies here.
- cold: the segment is dropped from the page cache (posix_fadvise DONTNEED)
  just before the push, as when a backlog is archived long after.

Within a pass the tools take turns going first, segment by segment, so that
machine noise hits them alike. Figures are printed for all segments and
separately for compressible (pgbench-like) and less compressible WAL; the
ratios are walshipper's to pgBackRest 2.59.1's (and to 2.45's, when given).
"""
import os
import shutil
import statistics
import subprocess
import sys
import time

B, BIN, PGBR = sys.argv[1:4]
PGBR_245 = sys.argv[4] if len(sys.argv) > 4 else None
segs = open(f"{B}/segments.txt").read().split()
TOOLS = {"walshipper": lambda p: [BIN, "--config", f"{B}/walshipper.toml", "archive-push", p],
         "2.59.1": lambda p: [PGBR, f"--config={B}/pgbackrest.conf", "--stanza=bench",
                              "archive-push", p]}
REPOS = {"2.59.1": f"{B}/pgbr-repo"}
if PGBR_245:
    TOOLS["2.45"] = lambda p: [PGBR_245, f"--config={B}/pgbackrest-245.conf", "--stanza=bench",
                               "archive-push", p]
    REPOS["2.45"] = f"{B}/pgbr-245-repo"
NAMES = list(TOOLS)


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def cold(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def du(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]


def empty_archives():
    shutil.rmtree(f"{B}/ws-repo/wal", ignore_errors=True)
    os.makedirs(f"{B}/ws-repo/wal")
    for repo in REPOS.values():
        for d in os.listdir(f"{repo}/archive/bench"):
            if os.path.isdir(f"{repo}/archive/bench/{d}"):
                shutil.rmtree(f"{repo}/archive/bench/{d}")


def one_pass(prepare):
    """Returns rows (segment, {tool: seconds}, compression ratio)."""
    empty_archives()
    rows = []
    for i, s in enumerate(segs):
        p = f"{B}/wal/{s}"
        t = {}
        for tool in NAMES[i % len(NAMES):] + NAMES[:i % len(NAMES)]:
            prepare(p)
            t[tool] = timed(TOOLS[tool](p))
        stored = os.path.getsize(f"{B}/ws-repo/wal/{s[:16]}/{s}")
        rows.append((s, t, os.path.getsize(p) / stored))
    return rows


def report(title, rs):
    if not rs:
        return
    print(f"{title} ({len(rs)} segments)")
    for name, f in [("  median ms/segment", lambda v: statistics.median(v) * 1000),
                    ("  p95 ms/segment", lambda v: q(v, .95) * 1000),
                    ("  total s", sum)]:
        v = [f([r[1][tool] for r in rs]) for tool in NAMES]
        print(f"{name:24}" + "".join(f"{x:12.1f}" for x in v) + "".join(f"{v[0] / x:8.2f}" for x in v[1:]))


def show(title, rows):
    print(f"== {title}")
    print(f"{'':24}{'walshipper':>12}" + "".join(f"{'pgBR ' + n:>12}" for n in NAMES[1:])
          + "".join(f"{'/' + n:>8}" for n in NAMES[1:]))
    report("all segments", rows)
    report("compressible WAL, ratio >= 4 (pgbench)", [r for r in rows if r[2] >= 4])
    report("less compressible WAL, ratio < 4", [r for r in rows if r[2] < 4])


cold_rows = one_pass(cold)
show("cold: segment not in the page cache", cold_rows)
warm_rows = one_pass(warm)
show("warm: segment just written, in the page cache (the archiver's usual case)", warm_rows)
sizes = [du(f"{B}/ws-repo/wal")] + [du(f"{r}/archive") for r in REPOS.values()]
print(f"{'repository MiB':24}" + "".join(f"{x / 2**20:12.1f}" for x in sizes)
      + "".join(f"{sizes[0] / x:8.2f}" for x in sizes[1:]))
for title, rows in [("warm", warm_rows), ("cold", cold_rows)]:
    med_ws = statistics.median(r[1]["walshipper"] for r in rows)
    med_pb = statistics.median(r[1]["2.59.1"] for r in rows)
    verdict = "met" if med_ws <= 0.5 * med_pb else "NOT met"
    print(f"target, {title} median <= 0.5 x pgBackRest 2.59.1 over all segments: {verdict} "
          f"({med_ws / med_pb:.2f})")
