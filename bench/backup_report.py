"""Prints bench/backup-restore.sh's comparison: medians per step, ratios
walshipper / pgBackRest with the range of the per-round ratios, the issue 17
targets met or not, and the machine's limit beside them.
Usage: backup_report.py DIR (with DIR/results.jsonl, meta.json, limit-*.jsonl)."""
import datetime
import json
import os
import statistics
import sys

B = sys.argv[1]
meta = json.load(open(f"{B}/meta.json"))
rows = [json.loads(line) for line in open(f"{B}/results.jsonl")]
bad = [r for r in rows if r["m"]["rc"] != 0]
if bad:
    sys.exit(f"failed runs: {bad}")
med = statistics.median
MIB = 2**20
STEPS = {  # printed step: the steps measured (the two incrementals pooled)
    "full backup": ["full"],
    "incremental after a 1 % change": ["incr1", "incr2"],
    "restore of full + incr + incr": ["chain"],
    "restore of the full alone": ["fullonly"],
}
# The chain restored into a tmpfs too (older runs lack it): the tools' own
# ratio, with the disk's write rate out of it. Information, not a target.
if any(r["step"] == "chainmem" for r in rows):
    STEPS["restore of the chain into a tmpfs"] = ["chainmem"]


def vals(tool, steps, key):
    return [(r["m"][key] if key != "stored" else r["stored"] / MIB)
            for r in rows if r["tool"] == tool and r["step"] in steps]


def pair_ratios(steps, key):
    out = []
    for w in rows:
        if w["tool"] == "ws" and w["step"] in steps:
            p = next(r for r in rows if r["tool"] == "pgbr" and r["step"] == w["step"]
                     and r["round"] == w["round"])
            a, b = (x[key] if key == "stored" else x["m"][key] for x in (w, p))
            out.append(a / b if b else float("inf"))
    return out


def verdict(ratio, limit):
    return f"<= {limit}: {'met' if ratio <= limit else 'NOT met'}"


TARGETS = {("full backup", "wall"): 0.5, ("full backup", "cpu"): 1.0,
           ("incremental after a 1 % change", "wall"): 0.5,
           ("incremental after a 1 % change", "stored"): 0.5,
           ("restore of full + incr + incr", "wall"): 0.5}
results = []
md = []  # the same figures as a Markdown table, for the README
print(f"walshipper vs {meta['pgbr']} (repo1-bundle=y, repo1-block=y), both: zstd 3, "
      f"encryption, 2 processes, posix repositories; {datetime.date.today()}")
print(f"database {meta['db_bytes'] / 1e6:.0f} MB (pgbench scale {meta['scale']} + a less "
      f"compressible table), {meta['cpus']} CPUs; medians of {meta['runs']} rounds "
      f"(incrementals: 2 per round, pooled; restores: {meta['runs'] + meta.get('restore_pairs', 0)} "
      f"pairs of chain and full alone), the tools alternating which goes first")
print("CPU = user + system time of the process tree; RSS = peak resident memory of the "
      "process tree, sampled every 10 ms; stored = what the repository grew by, WAL archive excluded")
print("archive_command pushes to both tools at once, so each backup's WAL wait shares the cores with both pushes\n")
print(f"{'':46}{'walshipper':>11}{'pgBackRest':>11}{'ratio':>7}{'per round':>13}  target")
for title, steps in STEPS.items():
    keys = [("wall", "wall (s)"), ("cpu", "CPU (s)"), ("peak_mib", "peak RSS (MiB)")]
    if "backup" in title or "incremental" in title:
        keys.append(("stored", "stored (MiB)"))
    for key, label in keys:
        a, b = med(vals("ws", steps, key)), med(vals("pgbr", steps, key))
        pr = pair_ratios(steps, key)
        ratio = a / b if b else float("inf")
        target = TARGETS.get((title, key))
        t = verdict(ratio, target) if target else ""
        if target:
            results.append(ratio <= target)
        name = title if key == "wall" else ""
        unit = "MiB" if key in ("peak_mib", "stored") else "s"
        md.append(f"| {title}, {label.split(' (')[0]} | {a:.2f} {unit} | {b:.2f} {unit} | {ratio:.2f} "
                  f"({min(pr):.2f}–{max(pr):.2f}) | {t.replace('<=', '≤').replace(': ', ' — ')} |")
        print(f"{name:30}{label:>16}{a:11.2f}{b:11.2f}{ratio:7.2f}"
              f"{min(pr):7.2f}-{max(pr):.2f}  {t}")

def chain_ratios(tool):
    """chain / full alone of one tool, pair by pair (same round: run back to
    back, so the machine's load drifts less within a pair than across)."""
    full = {r["round"]: r["m"]["wall"] for r in rows if r["tool"] == tool and r["step"] == "fullonly"}
    return [r["m"]["wall"] / full[r["round"]] for r in rows
            if r["tool"] == tool and r["step"] == "chain" and full.get(r["round"])]


print("\nrestore of the chain vs restore of the full alone (wall; the verdict is on the "
      "median of the pairs' ratios):")
for tool, name in [("ws", "walshipper"), ("pgbr", "pgBackRest")]:
    chain, full = med(vals(tool, ["chain"], "wall")), med(vals(tool, ["fullonly"], "wall"))
    share = med(vals(tool, ["incr1"], "stored")) + med(vals(tool, ["incr2"], "stored"))
    share /= med(vals(tool, ["full"], "stored"))
    cr = chain_ratios(tool)
    ok = med(cr) <= 1 + share
    if tool == "ws":
        results.append(ok)
    print(f"  {name:11} chain {chain:.2f} s / full alone {full:.2f} s (medians of {len(cr)}); "
          f"pairs: median {med(cr):.3f} (" + " ".join(f"{x:.2f}" for x in cr) + "); "
          f"incrementals' share of the data (their bytes stored / the full's) {100 * share:.1f} %: "
          f"{'met' if ok else 'NOT met'} (median pair <= {1 + share:.3f})"
          + ("" if tool == "ws" else " [information]"))
for kind, steps in [("backup", ["full", "incr1", "incr2"]), ("restore", ["chain", "fullonly", "chainmem"])]:
    a, b = max(vals("ws", steps, "peak_mib")), max(vals("pgbr", steps, "peak_mib"))
    results.append(a <= b)
    print(f"peak RSS of any {kind}: walshipper {a:.0f} MiB, pgBackRest {b:.0f} MiB, "
          f"ratio {a / b:.2f}: {verdict(a / b, 1)}")
print(f"targets: {sum(results)} of {len(results)} met "
      "(archive-push: bench/archive-push.sh; memory as files grow: bench/many-files.sh)")

lim = {k: [json.loads(line) for line in open(f"{B}/limit-{k}.jsonl")]
       for k in ["compress", "hash", "decompress", "write"]}
# zstd -1 since compression.adaptive (older runs' directories lack it)
if os.path.exists(f"{B}/limit-compress1.jsonl"):
    lim["compress1"] = [json.loads(line) for line in open(f"{B}/limit-compress1.jsonl")]
cpu = {k: med(r["cpu"] for r in v) for k, v in lim.items()}
rel, cores = meta["rel_bytes"] / MIB, meta["cpus"]
write = med(r["wall"] for r in lim["write"])
print(f"\nthe machine's limit on the same data ({rel:.0f} MiB of relation files, in the page cache; "
      f"medians of {len(lim['write'])}):")
fast = f"zstd -1 {cpu['compress1']:.2f} s, " if "compress1" in cpu else ""
print(f"  CPU: zstd -3 {cpu['compress']:.2f} s, {fast}BLAKE3 (b3sum) {cpu['hash']:.2f} s, "
      f"zstd -d {cpu['decompress']:.2f} s (CLI tools reading the files directly, one process each)")
print(f"  write {rel:.0f} MiB to this disk with fsync (dd conv=fsync): wall {write:.2f} s")
for what, c, w, step in [("backup", cpu["compress"] + cpu["hash"], 0, "full"),
                         ("restore", cpu["decompress"] + cpu["hash"], write, "chain")]:
    floor = max(c / cores, w)
    tool = med(vals("ws", [step], "wall"))
    print(f"  {what} limit = max(CPU / {cores} cores, write) = {floor:.2f} s; "
          f"walshipper's {'full backup' if step == 'full' else 'chain restore'} {tool:.2f} s "
          f"= {tool / floor:.1f}x, CPU {med(vals('ws', [step], 'cpu')):.2f} s vs {c:.2f} s")
    if step == "full" and "compress1" in cpu:
        # compression.adaptive compresses at zstd 1 what zstd 3 would not
        # store smaller: the limit lies between the two.
        c1 = cpu["compress1"] + cpu["hash"]
        print(f"    with zstd -1 instead (compression.adaptive, where it stores as small): "
              f"{c1 / cores:.2f} s; the full backup = {tool / (c1 / cores):.1f}x")

if "restore of the chain into a tmpfs" in STEPS:
    a, b = med(vals("ws", ["chainmem"], "wall")), med(vals("pgbr", ["chainmem"], "wall"))
    c = cpu["decompress"] + cpu["hash"]
    print(f"  the chain restored into a tmpfs (the disk out of it): walshipper {a:.2f} s, "
          f"pgBackRest {b:.2f} s, ratio {a / b:.2f}; against the CPU limit "
          f"{c / cores:.2f} s = {a / (c / cores):.1f}x")

print("\nas a Markdown table (ratio: medians, and the range of the per-round ratios):")
print(f"\n| | walshipper | {meta['pgbr']} | ratio | target |\n| --- | --- | --- | --- | --- |")
print("\n".join(md))
