#!/usr/bin/env bash
# Benchmark (not a test): differential and incremental backups after ~1% of
# a pgbench database changed, walshipper beside pgBackRest 2.45 on the same
# cluster and the same change: zstd level 3, encryption on, 2 processes
# each, posix repositories. Prints wall time, CPU time, peak memory and the
# bytes each backup added to its repository, and the ratios.
# Run as root: bash bench/incremental.sh   (SCALE=50, RUNS=3 by default)
#
# "About 1%": each round updates a contiguous 1% of pgbench_accounts (rows
# that change together, as recent rows usually do) and appends 0.1% to
# pgbench_history. Random updates of 1% of rows would touch far more pages
# (about 60 rows per page) and no page-granular tool could store 1%.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
bash "$REPO_TOP/scripts/setup.sh" --minimal >/dev/null
sync_tree
as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
B=$PGB_ROOT/bench-incr
rm -rf "$B"; install -d -o "$TEST_USER" "$B"
as_test_user env B="$B" BIN="$PGB_ROOT/target/release/walshipper" M="$PGB_ROOT/src/bench/measure.py" \
  SCALE="${SCALE:-50}" RUNS="${RUNS:-3}" bash -euo pipefail -c '
  source "$(dirname "$M")/two_tools.sh"
  PSQL="psql -h $B/sock -U postgres -qAt postgres"
  echo "loading pgbench scale $SCALE..."
  pgbench -h "$B/sock" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  $PSQL -c "CHECKPOINT"
  echo "database: $($PSQL -c "SELECT pg_size_pretty(pg_database_size(current_database()))")"
  ROWS=$((SCALE * 100000)); STEP=$((ROWS / 100))
  last_ws() { ls ws-repo/backups | tail -1; }
  last_pb() { ls pgbr-repo/backup/bench | grep -E "F$" | tail -1; }
  du_b() { du -sb "$1" | cut -f1; }
  change() {  # a contiguous 1% of the accounts, 0.1% appended to history
    local from=$(( ($1 * STEP * 7) % (ROWS - STEP) + 1 ))
    $PSQL -c "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN $from AND $((from + STEP - 1))"
    $PSQL -c "INSERT INTO pgbench_history SELECT 1, 1, g % $ROWS + 1, 1, now() FROM generate_series(1, $((STEP / 10))) g"
    $PSQL -c "CHECKPOINT"
  }
  : > sizes.txt
  for i in $(seq 1 "$RUNS"); do
    "$BIN" --config walshipper.toml backup --jobs 2 >/dev/null
    pgbackrest --config="$B/pgbackrest.conf" --stanza=bench --type=full backup
    echo "full ws $(du_b ws-repo/backups/$(last_ws)) pb $(du_b pgbr-repo/backup/bench/$(last_pb))" >> sizes.txt
    for kind in diff incr; do
      change $((i * 2 + ${#kind}))
      python3 "$M" "$BIN" --config walshipper.toml backup --type $kind --jobs 2 >> ws-$kind.jsonl
      python3 "$M" pgbackrest --config="$B/pgbackrest.conf" --stanza=bench --type=$kind backup >> pgbr-$kind.jsonl
      echo "$kind ws $(du_b ws-repo/backups/$(last_ws)) pb $(du_b pgbr-repo/backup/bench/$(ls pgbr-repo/backup/bench | grep -E "[DI]$" | tail -1))" >> sizes.txt
    done
  done
  # The newest chain restores (full + diff + incr) and matches the source.
  want=$($PSQL -c "SELECT md5(string_agg(abalance::text, chr(44) ORDER BY aid)) FROM pgbench_accounts")
  $PSQL -c "SELECT pg_switch_wal()" >/dev/null; sleep 2
  pg_ctl -D pg -m fast -w stop >/dev/null
  python3 "$M" "$BIN" --config walshipper.toml restore --target-dir "$B/r-ws" --target immediate --target-action promote --jobs 2 > ws-restore.jsonl
  python3 "$M" pgbackrest --config="$B/pgbackrest.conf" --stanza=bench --pg1-path="$B/r-pgbr" --type=immediate --target-action=promote restore > pgbr-restore.jsonl
  pg_ctl -D r-ws -l r-ws.log -w start >/dev/null
  for _ in $(seq 60); do [ "$($PSQL -c "SELECT pg_is_in_recovery()")" = f ] && break; sleep 1; done
  got=$($PSQL -c "SELECT md5(string_agg(abalance::text, chr(44) ORDER BY aid)) FROM pgbench_accounts")
  pg_ctl -D r-ws -m fast -w stop >/dev/null
  [ "$got" = "$want" ] && echo "restored chain matches the source" || { echo "RESTORED CHAIN DIFFERS"; exit 1; }
  python3 "$(dirname "$M")/incremental_report.py" "$B"
'
