"""Runs a command and reports wall time, CPU time (all descendants) and the
peak resident memory of its whole process tree (sampled every 10 ms), as
JSON on stdout. Usage: measure.py CMD [ARG...]
The command's stdout is discarded, or sent to stderr with MEASURE_STDOUT=stderr."""
import json
import os
import resource
import subprocess
import sys
import time


def tree_rss_kib(root):
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


before = resource.getrusage(resource.RUSAGE_CHILDREN)
start = time.perf_counter()
out = sys.stderr if os.environ.get("MEASURE_STDOUT") == "stderr" else subprocess.DEVNULL
p = subprocess.Popen(sys.argv[1:], stdout=out)
peak = 0
while p.poll() is None:
    peak = max(peak, tree_rss_kib(p.pid))
    time.sleep(0.01)
wall = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(json.dumps({"rc": p.returncode, "wall": wall, "cpu": cpu, "peak_mib": peak / 1024}))
sys.exit(p.returncode)
