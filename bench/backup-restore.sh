#!/usr/bin/env bash
# Benchmark (not a test): full backup and restore of the same database with
# walshipper and pgBackRest 2.45 side by side: zstd level 3, encryption on,
# 2 processes each, posix repositories, data checksums on. Prints wall time,
# CPU time, peak memory and repository size, and the ratios.
# Run as root: bash bench/backup-restore.sh   (SCALE=100, RUNS=3 by default)
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
bash "$REPO_TOP/scripts/setup.sh" --minimal >/dev/null
sync_tree
as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
B=$PGB_ROOT/bench-backup
rm -rf "$B"; install -d -o "$TEST_USER" "$B"
as_test_user env B="$B" BIN="$PGB_ROOT/target/release/walshipper" M="$PGB_ROOT/src/bench/measure.py" \
  SCALE="${SCALE:-100}" RUNS="${RUNS:-3}" bash -euo pipefail -c '
  source "$(dirname "$M")/two_tools.sh"
  echo "loading pgbench scale $SCALE and a less compressible table..."
  pgbench -h "$B/sock" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  psql -h "$B/sock" -U postgres -qc "CREATE TABLE rnd AS SELECT g, md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, $((SCALE * 20000))) g" postgres
  psql -h "$B/sock" -U postgres -qc "CHECKPOINT" postgres
  echo "database: $(psql -h "$B/sock" -U postgres -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))" postgres)"
  for i in $(seq 1 "$RUNS"); do
    python3 "$M" "$BIN" --config walshipper.toml backup --jobs 2 >> ws-backup.jsonl
    python3 "$M" pgbackrest --config="$B/pgbackrest.conf" --stanza=bench --type=full backup >> pgbr-backup.jsonl
  done
  for i in $(seq 1 "$RUNS"); do
    rm -rf r-ws r-pgbr
    python3 "$M" "$BIN" --config walshipper.toml restore --target-dir "$B/r-ws" --jobs 2 >> ws-restore.jsonl
    python3 "$M" pgbackrest --config="$B/pgbackrest.conf" --stanza=bench --pg1-path="$B/r-pgbr" restore >> pgbr-restore.jsonl
  done
  pg_ctl -D pg -m fast -w stop >/dev/null
  WS_ONE=$(ls ws-repo/backups | tail -1); PB_ONE=$(ls pgbr-repo/backup/bench | grep -E "F$" | tail -1)
  python3 "$(dirname "$M")/backup_report.py" "$B" "$WS_ONE" "$PB_ONE"
'
