"""Prints the diff/incr comparison from bench/incremental.sh's measurements."""
import json
import statistics
import sys

B = sys.argv[1]


def load(n):
    return [json.loads(line) for line in open(f"{B}/{n}.jsonl")]


sizes = {}
for line in open(f"{B}/sizes.txt"):
    kind, _, ws, _, pb = line.split()
    sizes.setdefault(kind, []).append((int(ws), int(pb)))

med = statistics.median
print(f"{'':30}{'walshipper':>12}{'pgBackRest':>12}{'ratio':>8}")
verdicts = []
for kind in ["diff", "incr"]:
    w, p = load(f"ws-{kind}"), load(f"pgbr-{kind}")
    bad = [r for r in w + p if r["rc"] != 0]
    if bad:
        sys.exit(f"a {kind} backup failed: {bad}")
    for key, unit in [("wall", "s"), ("cpu", "s"), ("peak_mib", "MiB")]:
        a, b = med(r[key] for r in w), med(r[key] for r in p)
        print(f"{kind + ' ' + key + ' (' + unit + ')':30}{a:12.2f}{b:12.2f}{a / b:8.2f}")
    a = med(s[0] for s in sizes[kind]) / 2**20
    b = med(s[1] for s in sizes[kind]) / 2**20
    print(f"{kind + ' stored (MiB)':30}{a:12.2f}{b:12.2f}{a / b:8.2f}")
    full_ws = med(s[0] for s in sizes["full"]) / 2**20
    print(f"{kind + ' stored / full (%)':30}{100 * a / full_ws:12.2f}")
    tw = med(r["wall"] for r in w) / med(r["wall"] for r in p)
    verdicts.append(f"{kind}: bytes <= 0.5x {'met' if a / b <= 0.5 else 'NOT met'} ({a / b:.2f}), "
                    f"time <= 0.5x {'met' if tw <= 0.5 else 'NOT met'} ({tw:.2f})")
full_ws, full_pb = (med(s[i] for s in sizes["full"]) / 2**20 for i in (0, 1))
print(f"{'full stored (MiB)':30}{full_ws:12.1f}{full_pb:12.1f}{full_ws / full_pb:8.2f}")
rw, rp = load("ws-restore")[0], load("pgbr-restore")[0]
print(f"{'restore of the chain (s)':30}{rw['wall']:12.2f}{rp['wall']:12.2f}{rw['wall'] / rp['wall']:8.2f}")
print(f"(medians of {len(load('ws-diff'))} rounds: full, 1% change, diff, 1% change, incr)")
print("targets: " + "; ".join(verdicts) + "; incr after ~1% change < 5% of full: "
      + ("met" if med(s[0] for s in sizes["incr"]) < 0.05 * med(s[0] for s in sizes["full"]) else "NOT met"))
