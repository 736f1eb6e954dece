#!/usr/bin/env bash
# The main job on the embedded default, start to finish, on a fresh Debian 12
# machine (run as root: sudo bash scripts/demo.sh):
#   a local PostgreSQL 15 cluster archives its WAL with walshipper into a local
#   encrypted repository; walshipper takes a full and an incremental backup; an "accident" drops
#   a table; walshipper restores the cluster to the moment before the
#   accident; the data is shown.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$REPO_TOP/scripts/setup.sh" --minimal
sync_tree
log "building walshipper (release)"
as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'

D=$PGB_ROOT/demo
rm -rf "$D"; install -d -o "$TEST_USER" "$D"
as_test_user env D="$D" BIN="$PGB_ROOT/target/release/walshipper" bash -euo pipefail -c '
  step() { printf "\n--- %s\n" "$*"; }
  cd "$D"; mkdir sock
  PSQL="psql -X -h $D/sock -U postgres -d postgres -v ON_ERROR_STOP=1"

  step "1. a PostgreSQL cluster (data checksums on) and a walshipper repository"
  initdb -D pg -U postgres -A trust -k >/dev/null
  head -c 48 /dev/urandom | base64 > passphrase && chmod 600 passphrase
  cat > walshipper.toml <<CONF
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
  cat >> pg/postgresql.conf <<CONF
listen_addresses = '"''"'
unix_socket_directories = '"'"'$D/sock'"'"'
archive_mode = on
archive_command = '"'"'$BIN --config $D/walshipper.toml archive-push %p'"'"'
archive_timeout = 60
CONF
  "$BIN" --config walshipper.toml repo-init
  pg_ctl -D pg -l pg.log -w start >/dev/null
  "$BIN" --config walshipper.toml check

  step "2. data, and a base backup"
  $PSQL -qc "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric)"
  $PSQL -qc "INSERT INTO accounts SELECT g, '"'"'customer '"'"' || g, g * 10 FROM generate_series(1, 1000) g"
  pgbench -h "$D/sock" -U postgres -i -s 2 -q postgres >/dev/null 2>&1
  "$BIN" --config walshipper.toml backup
  $PSQL -qc "UPDATE accounts SET balance = balance + 1 WHERE id <= 100"
  $PSQL -qc "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 2000"
  step "2b. an incremental backup: only what changed since the full"
  "$BIN" --config walshipper.toml backup --type incr
  $PSQL -Atc "SELECT '"'"'accounts: '"'"' || count(*) || '"'"' rows, total balance '"'"' || sum(balance) FROM accounts"
  sleep 1; T=$($PSQL -Atc "SELECT now()"); sleep 1
  echo "good state at $T"

  step "3. the accident: a table is dropped (and life goes on)"
  $PSQL -qc "DROP TABLE accounts"
  $PSQL -qc "CREATE TABLE later_work AS SELECT g FROM generate_series(1, 10) g"
  $PSQL -Atc "SELECT pg_walfile_name(pg_switch_wal())" >/dev/null
  sleep 2
  $PSQL -Atc "SELECT '"'"'accounts exists: '"'"' || (to_regclass('"'"'accounts'"'"') IS NOT NULL)"
  pg_ctl -D pg -m fast -w stop >/dev/null

  step "4. what the repository holds"
  "$BIN" --config walshipper.toml info

  step "5. restore to $T (before the accident) from full + incr; PostgreSQL replays WAL through walshipper archive-get"
  "$BIN" --config walshipper.toml restore --target-dir "$D/restored" --target-time "$T" --target-action promote
  pg_verifybackup -n restored
  pg_ctl -D restored -l restored.log -W start >/dev/null
  for i in $(seq 1 120); do [ "$($PSQL -Atc "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ] && break; sleep 0.5; done
  grep -E "restored log file|recovery stopping|archive recovery complete" restored.log | sed "s/^/  log: /" | tail -4
  $PSQL -Atc "SELECT '"'"'accounts: '"'"' || count(*) || '"'"' rows, total balance '"'"' || sum(balance) FROM accounts"
  $PSQL -Atc "SELECT pg_walfile_name(pg_switch_wal())" >/dev/null; sleep 2
  pg_ctl -D restored -m fast -w stop >/dev/null
  step "6. the repository now also holds the new timeline the restored cluster started"
  "$BIN" --config walshipper.toml info | grep -E "^(timeline|history files) |^[0-9]+ +[0-9A-F]{24}"
  "$BIN" --config walshipper.toml verify | tail -1
  step "done: the dropped table is back as it was at $T"
'
