#!/usr/bin/env bash
# The product start to finish on the embedded default, on a fresh Debian 12
# machine (as root: sudo bash scripts/demo.sh). It builds walshipper and the
# pg_backup_ext extension, installs the extension into PostgreSQL 15, and
# starts a local cluster that preloads it and archives its WAL with walshipper
# into an encrypted local repository. From there on the DBA works in SQL: a
# backup job, a full and an incremental backup, a restore point, an
# "accident" (a dropped table), backup.restore_plan(); the command it prints,
# run as printed, restores a copy of the cluster to the restore point; the
# table is taken back from the copy; the catalog views show the state; the
# monitoring service serves metrics and the dashboard, and the compliance
# report is written for an auditor.
# Rerunning it starts over (it stops and removes the previous run's clusters).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
D=$PGB_ROOT/demo

if [ "${1:-}" != --steps ]; then
  [ "$(id -u)" = 0 ] || die "run as root: sudo bash scripts/demo.sh (it installs packages and the extension)"
  started=$SECONDS
  for pg in "$D/pg" "$D/restored"; do
    if [ -f "$pg/postmaster.pid" ]; then
      log "stopping the previous run's cluster in $pg"
      runuser -u "$TEST_USER" -- "$PG_BIN/pg_ctl" -D "$pg" -m immediate -w stop >/dev/null 2>&1 || true
    fi
  done
  rm -rf "$D"
  bash "$REPO_TOP/scripts/setup.sh" --minimal
  sync_tree
  log "building walshipper (release)"
  as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
  log "building pg_backup_ext (release) and installing it into PostgreSQL $PG_MAJOR"
  as_test_user bash -c 'cd "$HOME/../src/pg_backup_ext" && cargo pgrx install --release --pg-config "$PG_CONFIG"' 2>&1 |
    sed 's/\x1b\[[0-9;]*m//g' | { grep -vE '^ +(Compiling|Downloaded|Downloading|Running) ' || true; }
  # The cluster runs its own copy of the binary: later builds do not change it under it.
  install -d -o "$TEST_USER" -g "$TEST_USER" "$D" "$D/bin"
  install -o "$TEST_USER" -g "$TEST_USER" -m 755 "$PGB_ROOT/target/release/walshipper" "$D/bin/walshipper"
  # The rest as the PostgreSQL OS user (PostgreSQL refuses root).
  built=$SECONDS
  as_test_user env PGB_ROOT="$PGB_ROOT" PG_MAJOR="$PG_MAJOR" bash "$PGB_ROOT/src/scripts/demo.sh" --steps
  log "demo passed in $((SECONDS - started)) s (set-up and builds $((built - started)) s, the rest $((SECONDS - built)) s)"
  exit 0
fi

cd "$D"
W=$D/bin/walshipper
step() { printf '\n--- %s\n' "$*"; }
# sql [-x] STATEMENT: runs it on the production cluster, shown as typed in psql.
sql() {
  local opts=()
  [ "$1" = -x ] && { opts=(-x); shift; }
  printf 'postgres=# %s;\n' "$1"
  psql -X -h "$D/sock" -U postgres -d postgres -v ON_ERROR_STOP=1 "${opts[@]}" -c "$1"
}
# val STATEMENT / rval STATEMENT: one value, unaligned, from production / the restored copy.
val() { psql -X -h "$D/sock" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atqc "$1"; }
rval() { psql -X -h "$D/restored-sock" -p 5433 -U postgres -d postgres -v ON_ERROR_STOP=1 -Atqc "$1"; }
# Waits up to $2 seconds for `val "$1"` to print t.
wait_true() {
  local i
  for ((i = 0; i < $2 * 2; i++)); do
    [ "$(val "$1")" = t ] && return 0
    sleep 0.5
  done
  die "waited $2 s for: $1"
}

step "1. a PostgreSQL $PG_MAJOR cluster (data checksums on) preloading pg_backup_ext, archiving with walshipper"
initdb -D pg -U postgres -A trust -k >/dev/null
mkdir -m 700 sock restored-sock
head -c 48 /dev/urandom | base64 >passphrase && chmod 600 passphrase
cat >walshipper.toml <<CONF
[pg]
data_dir = "$D/pg"
host = "$D/sock"
port = 5432
[repo]
type = "posix"
path = "$D/repo"
[encryption]
passphrase_file = "$D/passphrase"
[compression]
level = 3
CONF
sed 's/^/  walshipper.toml: /' walshipper.toml
tee -a pg/postgresql.conf <<CONF | sed 's/^/  postgresql.conf: /'
listen_addresses = ''
unix_socket_directories = '$D/sock'
archive_mode = on
archive_command = '$W --config $D/walshipper.toml archive-push %p'
archive_timeout = 60
shared_preload_libraries = 'pg_backup_ext'
pg_backup.walshipper_path = '$W'
pg_backup.walshipper_config = '$D/walshipper.toml'
pg_backup.database = 'postgres'
CONF
"$W" --config walshipper.toml repo-init
pg_ctl -D pg -l pg.log -w start >/dev/null
"$W" --config walshipper.toml check

step "2. the data"
sql "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric)"
sql "INSERT INTO accounts SELECT g, 'customer ' || g, g * 10 FROM generate_series(1, 1000) g"
echo "pgbench -i -s 2"
pgbench -h "$D/sock" -U postgres -i -s 2 -q postgres >/dev/null 2>&1

step "3. in SQL: the extension, a nightly job, and its first backup now (a full one)"
sql "CREATE EXTENSION pg_backup_ext"
sql "SELECT backup.job_create('nightly', '30 2 * * *', kind => 'full')"
sql "SELECT backup.backup_run('nightly', wait => true)"

step "4. changes, then an incremental backup: only the blocks changed since"
sql "UPDATE accounts SET balance = balance + 1 WHERE id <= 100"
sql "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 2000"
sql "SELECT backup.backup_run('nightly', kind => 'incr', wait => true)"

step "5. more work (in the WAL only, in no backup), then a restore point before a risky change"
sql "INSERT INTO accounts SELECT g, 'customer ' || g, 5 FROM generate_series(1001, 1010) g"
before=$(val "SELECT count(*) || ' rows, total balance ' || sum(balance) FROM accounts")
before_pgbench=$(val "SELECT sum(abalance) FROM pgbench_accounts")
echo "accounts: $before; pgbench_accounts: total abalance $before_pgbench"
sql "SELECT backup.restore_point_create('before_accident')"

step "6. the accident: the table is dropped (and life goes on)"
sql "DROP TABLE accounts"
sql "CREATE TABLE later_work AS SELECT g FROM generate_series(1, 10) g"

step "7. recover just the dropped table from SQL, as it was at the restore point, into a new schema (production keeps running)"
wait_true "SELECT last_archived_time >= (SELECT created_at FROM backup.restore_points WHERE name = 'before_accident')
             FROM backup.wal_archive_status" 30
sql "SELECT backup.table_restore(ARRAY['public.accounts'], 'recovered', restore_point => 'before_accident')"
sql -x "SELECT operation_id, kind, status, backup_id, target_kind, target_value, schema_name, tables, duration_s FROM backup.recovery_operations WHERE kind = 'table_restore'"
got=$(val "SELECT count(*) || ' rows, total balance ' || sum(balance) FROM recovered.accounts")
echo "recovered.accounts: $got"
[ "$got" = "$before" ] || die "recovered.accounts: $got; before the accident: $before"
sql "ALTER TABLE recovered.accounts SET SCHEMA public"
sql "DROP SCHEMA recovered"
back=$(val "SELECT count(*) || ' rows, total balance ' || sum(balance) FROM accounts")
echo "production accounts: $back; later_work (after the accident) stays: $(val "SELECT count(*) FROM later_work") rows"
[ "$back" = "$before" ] || die "production accounts: $back; before the accident: $before"

step "8. the whole cluster to the same moment: ask for the plan, then run the printed command (as the PostgreSQL OS user)"
plan="SELECT * FROM backup.restore_plan(restore_point => 'before_accident', target_dir => '$D/restored')"
sql -x "$plan"
cmd=$(val "SELECT command FROM ($plan) p")
printf '$ %s\n' "$cmd"
bash -c "$cmd"
pg_verifybackup -n restored

step "9. start the restored copy beside production (its own port and socket; no archiving, no scheduler)"
tee -a restored/postgresql.conf <<CONF | sed 's/^/  restored\/postgresql.conf: /'
port = 5433
unix_socket_directories = '$D/restored-sock'
archive_mode = off
shared_preload_libraries = ''
CONF
pg_ctl -D restored -l restored.log -W start >/dev/null
for ((i = 0; i < 240; i++)); do
  [ "$(rval "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ] && break
  sleep 0.5
done
[ "$(rval "SELECT pg_is_in_recovery()")" = f ] || die "the restored copy did not finish recovery in 120 s; see $D/restored.log"
{ grep -E "starting point-in-time|recovery stopping|archive recovery complete|selected new timeline" restored.log || true; } |
  sed 's/^/  log: /'

step "10. the restored cluster is as it was at the restore point"
after=$(rval "SELECT count(*) || ' rows, total balance ' || sum(balance) FROM accounts")
after_pgbench=$(rval "SELECT sum(abalance) FROM pgbench_accounts")
echo "restored accounts: $after; pgbench_accounts: total abalance $after_pgbench"
[ "$after" = "$before" ] || die "restored accounts: $after; before the accident: $before"
[ "$after_pgbench" = "$before_pgbench" ] || die "restored pgbench_accounts total: $after_pgbench; before: $before_pgbench"
[ "$(rval "SELECT to_regclass('later_work') IS NULL")" = t ] || die "the restored copy went past the restore point"
pg_ctl -D restored -m fast -w stop >/dev/null

step "11. prove the newest backup restorable, and measure the RTO: restore, recover to the end of the archived WAL, check, clean up"
# The recovered table is in the archive once its WAL segment is.
t0=$(val "SELECT now()")
sql "SELECT pg_switch_wal()"
wait_true "SELECT last_archived_time >= '$t0' FROM backup.wal_archive_status" 30
sql "SELECT backup.restore_check_create('accounts_back', 'SELECT count(*) FROM accounts', '1010')"
sql "SELECT backup.restore_test_run(wait => true)"
sql -x "SELECT verification_id, kind, backup_id, status, restore_s, replay_s, checks_s, rto_s, recovered_lsn, recovered_time, jsonb_path_query_array(checks, '\$[*].name') AS checks FROM backup.backup_verifications WHERE kind = 'restore_test'"
sql -x "SELECT * FROM backup.recovery_objectives"
sql "SELECT operation_id, kind, source, status, backup_id, target_kind, round(duration_s::numeric, 1) AS seconds FROM backup.recovery_operations ORDER BY operation_id"

step "12. the catalog, in production"
sql -x "SELECT name, kind, schedule, timezone, health, last_success, last_backup_id, last_backup_type, backups_kept, next_run FROM backup.job_status"
sql "SELECT backup_id, type, chain, stop_time, pg_size_pretty(size_bytes) AS size, pg_size_pretty(stored_bytes) AS stored FROM backup.backups"
sql -x "SELECT * FROM backup.wal_archive_status"

step "13. watched without asking: walshipper serve (metrics, health, dashboard), the compliance report"
# The monitoring service on a port of its own for the demo (loopback: no
# authentication needed); a real set-up runs it from systemd
# (docs/monitoring/walshipper-serve.service).
WALSHIPPER_SERVE_LISTEN=127.0.0.1:19187 "$W" --config walshipper.toml serve >serve.log 2>&1 &
serve_pid=$!
for ((i = 0; i < 40; i++)); do
  curl -sf http://127.0.0.1:19187/health >/dev/null 2>&1 && break
  sleep 0.25
done
echo "GET /health: $(curl -sf http://127.0.0.1:19187/health)"
echo "GET /metrics (some of them):"
curl -sf http://127.0.0.1:19187/metrics |
  grep -E '^pg_backup_(backups_total|rpo_seconds|last_rto_seconds|repository_(stored|free)_bytes|alerts_open\{kind="backup_failed")' | sed 's/^/  /'
curl -sf http://127.0.0.1:19187/ >dashboard.html
echo "GET /: $(wc -c <dashboard.html) bytes of dashboard (saved as $D/dashboard.html)"
kill -TERM "$serve_pid" && wait "$serve_pid" || die "walshipper serve did not stop cleanly; see $D/serve.log"
sql "SELECT section, subject, item, value, status FROM backup.compliance_report(now() - interval '1 day') WHERE section IN ('summary', 'backups', 'recovery_objectives', 'storage')"
"$W" --config walshipper.toml report --from "$(date -u -d yesterday +%F)" --output report.html
echo "the compliance report for an auditor: $D/report.html ($(wc -c <report.html) bytes, printable)"
pg_ctl -D pg -m fast -w stop >/dev/null

step "done: the dropped table recovered from SQL, the cluster restored to the restore point with the command restore_plan() printed, the newest backup proven restorable with its RTO measured, metrics, dashboard and compliance report served; everything is in $D"
