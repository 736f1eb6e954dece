"""Where a recovery's restore_command time goes, from a traced replay of
bench/archive-async.sh (TRACE=1): the server log with archive-get's debug
lines, the prefetcher's log and the store's requests.

Usage: lookahead_trace.py TRACE_DIR VARIANT-RUN   (e.g. trace ws-la8-1)

Prints per archive-get call kind (segment, history, other) how many calls
and how long they took; for segments, hits, waits on a fetch in flight and
direct fetches; how far ahead the prefetcher was when each segment was
asked for; and the store's requests by operation and by kind of key."""
import collections
import re
import sys
from datetime import datetime

LINE = re.compile(r"(\d\d:\d\d:\d\d\.\d{3}) (archive-get|look-ahead|prefetch) (\S+): (.*)")


def secs(stamp):
    t = datetime.strptime(stamp, "%H:%M:%S.%f")
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def kind(name):
    if name.endswith(".history"):
        return "history"
    if re.fullmatch(r"[0-9A-F]{24}", name):
        return "segment"
    return "other"


def main(d, tag):
    calls = {}  # name -> dict (a name asked twice: its last call)
    order = []
    first_asked = None
    for line in open(f"{d}/{tag}.server.log", errors="replace"):
        m = LINE.search(line)
        if not m:
            continue
        t, who, name, what = secs(m[1]), m[2], m[3], m[4]
        c = calls.setdefault(name, {})
        if who == "archive-get" and what == "asked":
            c["asked"] = t
            first_asked = t if first_asked is None else first_asked
            if name not in order:
                order.append(name)
        elif who == "archive-get" and what.startswith("exit"):
            em = re.match(r"exit (\d+) after ([\d.]+) ms", what)
            c["exit"], c["ms"] = int(em[1]), float(em[2])
        elif who == "look-ahead":
            c["la"] = what
    done = {}
    started = {}
    for line in open(f"{d}/{tag}.prefetch.log", errors="replace"):
        m = LINE.search(line)
        if m and m[2] == "prefetch":
            if m[4] == "done":
                done[m[3]] = secs(m[1])
            elif m[4].startswith("started"):
                started.setdefault(m[3], secs(m[1]))
    by = collections.defaultdict(lambda: [0, 0.0])
    seg = collections.Counter()
    seg_ms = collections.defaultdict(float)
    ahead = []
    for name in order:
        c = calls[name]
        k = kind(name) + (" (not found)" if c.get("exit") == 1 else "")
        by[k][0] += 1
        by[k][1] += c.get("ms", 0)
        if kind(name) == "segment" and c.get("exit") == 0:
            la = c.get("la", "")
            what = (
                "hit" if la == "hit" else
                "waited on the prefetcher" if la.startswith("served after") else
                "fetched directly"
            )
            seg[what] += 1
            seg_ms[what] += c.get("ms", 0)
            asked = c["asked"]
            ahead.append(sum(1 for n, t in done.items() if n > name and t <= asked))
    print(f"== {tag}: {len(order)} names asked for (a name asked again counts once, with its last call)")
    for k, (n, ms) in sorted(by.items()):
        print(f"  {k:24s} {n:4d} calls  {ms / 1000:7.2f} s  ({ms / max(n, 1):6.1f} ms a call)")
    for k, n in seg.items():
        print(f"  segments {k:24s} {n:4d}  {seg_ms[k] / 1000:6.2f} s ({seg_ms[k] / n:6.1f} ms a call)")
    if ahead:
        s = sorted(ahead)
        print(f"  segments ready beyond the one asked for: min {s[0]}, median {s[len(s) // 2]}, max {s[-1]}")
    if first_asked is not None and started:
        print(f"  first prefetch started {min(started.values()) - first_asked:.3f} s after the first call")
    try:
        ops = collections.Counter()
        keys = collections.Counter()
        for line in open(f"{d}/{tag}.s3.log"):
            p = line.split()
            ops[p[1]] += 1
            if len(p) >= 8:
                path = p[7]
                keys["repository.json" if path.endswith("repository.json") else
                     "keys" if "/keys/" in path else
                     "wal" if "/wal/" in path else "other"] += 1
        print(f"  store requests: {dict(ops)}; by key: {dict(keys)}")
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
