#!/usr/bin/env bash
# Crash drill (not a test): what the product promises, measured. For each
# mode, a cluster under pgbench (DRILL_RATE tps) with a marker row committed
# every 100 ms is destroyed at a random moment (SIGKILL to every process,
# data directory and local spool removed), the latest point is restored from
# the repository alone, and the drill prints the RPO (time and markers
# between the last marker the client saw committed and the last one
# restored) and the RTO (destruction to a restored server accepting writes).
# Modes: archive (archive_command, archive_timeout DRILL_ARCHIVE_TIMEOUT,
# 60 s by default as README suggests), async (archive-push with its spool),
# stream (walshipper wal-receive beside archive_command), sync (the
# receiver as a synchronous standby).
#
# Run as root: bash bench/crash-drill.sh   (MODES="archive async stream sync",
# ROUNDS=3 per mode, SEED=1 for the first round; a round takes about 40 s).
# The moment of destruction comes from the seed: SEED=N ROUNDS=1 MODES=m
# replays one round. WALSHIPPER_BIN=path skips the release build.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
bash "$REPO_TOP/scripts/setup.sh" --minimal >/dev/null
sync_tree
BIN=${WALSHIPPER_BIN:-$PGB_ROOT/target/release/walshipper}
[ -n "${WALSHIPPER_BIN:-}" ] || as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
B=$PGB_ROOT/bench-drill
fresh_bench_dir "$B"
: > "$B/results.jsonl"; chown "$TEST_USER" "$B/results.jsonl"
seed=${SEED:-1}
for mode in ${MODES:-archive async stream sync}; do
  for r in $(seq 1 "${ROUNDS:-3}"); do
    d=$B/$mode-$seed; install -d -o "$TEST_USER" "$d"
    if as_test_user env $(env | grep -E '^DRILL_' || true) python3 "$PGB_ROOT/src/bench/crash_drill.py" "$d" "$BIN" "$mode" "$seed" >> "$B/results.jsonl"; then
      tail -1 "$B/results.jsonl"
      [ "${KEEP:-}" = 1 ] || rm -rf "$d"
    else
      echo "$mode seed $seed: the drill failed; its directory is kept: $d"
      ls "$d"; tail -5 "$d"/*.log 2>/dev/null || true
      exit 1
    fi
    seed=$((seed + 1))
  done
done
python3 - "$B/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("\n| mode | rounds | RPO, time (median, worst) | RPO, markers lost (median, worst) | RTO (median) |")
print("| --- | --- | --- | --- | --- |")
for mode in dict.fromkeys(r["mode"] for r in rows):
    rs = [r for r in rows if r["mode"] == mode]
    rpo = [r["rpo_s"] for r in rs]; lost = [r["rpo_markers"] for r in rs]; rto = [r["rto_s"] for r in rs]
    print(f"| {mode} | {len(rs)} | {statistics.median(rpo):.2f} s, {max(rpo):.2f} s | {statistics.median(lost):g}, {max(lost)} | {statistics.median(rto):.1f} s |")
PY
