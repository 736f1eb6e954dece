"""Times archive-push to posix and S3 (alternating) and prints the figures
of bench/s3.sh. Usage: s3_report.py BENCH_DIR WALSHIPPER_BIN"""
import json, statistics, subprocess, sys, time
B, BIN = sys.argv[1], sys.argv[2]
t = {"posix": [], "s3": []}
for s in open(f"{B}/segments.txt").read().split():
    for repo in ("posix", "s3"):
        a = time.perf_counter()
        subprocess.run([BIN, "--config", f"{B}/{repo}.toml", "archive-push", f"{B}/wal/{s}"], check=True)
        t[repo].append((time.perf_counter() - a) * 1000)
def p95(v): return sorted(v)[max(0, int(len(v) * 0.95) - 1)]
print(f"\narchive-push, {len(t['posix'])} real segments (ms per segment)")
print(f"{'':8} {'median':>8} {'p95':>8}")
for r in ("posix", "s3"):
    print(f"{r:8} {statistics.median(t[r]):8.1f} {p95(t[r]):8.1f}")
print(f"s3/posix median ratio: {statistics.median(t['s3']) / statistics.median(t['posix']):.2f}")
print(f"\nfull backup and restore, --jobs 2")
print(f"{'':16} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}")
for r in ("posix", "s3"):
    for op in ("backup", "restore"):
        m = json.load(open(f"{B}/{r}-{op}.json"))
        print(f"{r + ' ' + op:16} {m['wall']:8.2f} {m['cpu']:8.2f} {m['peak_mib']:9.0f}")
