#!/usr/bin/env bash
# Benchmark (not a test): archive-push latency of walshipper vs pgBackRest on
# the same real WAL segments, zstd level 3 and encryption on both sides, one
# synchronous push per segment as PostgreSQL's archiver does it, in a warm and
# a cold page-cache pass (see push_timing.py for why both tools must meet the
# segment in the same state).
# Run as root: bash bench/archive-push.sh   (SEGMENTS=48 by default)
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
bash "$REPO_TOP/scripts/setup.sh" >/dev/null
sync_tree
as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
BIN="$PGB_ROOT/target/release/walshipper"
SEGMENTS=${SEGMENTS:-48}
B=$PGB_ROOT/bench-archive
rm -rf "$B"; install -d -o "$TEST_USER" "$B"

as_test_user env BENCH_DIR="$PGB_ROOT/src/bench" B="$B" BIN="$BIN" SEGMENTS="$SEGMENTS" bash -euo pipefail -c '
  cd "$B"
  mkdir wal pgbr-repo pgbr-log sock
  initdb -D pg -U postgres -A trust -k --no-sync >/dev/null
  cat >> pg/postgresql.conf <<CONF
listen_addresses = '"''"'
unix_socket_directories = '"'"'$B/sock'"'"'
archive_mode = on
archive_command = '"'"'cp %p $B/wal/%f'"'"'
max_wal_size = 1GB
CONF
  pg_ctl -D pg -l pg.log -w start >/dev/null
  # Real WAL from a mixed load: pgbench data (compresses ~15x) and a less compressible table.
  pgbench -h "$B/sock" -U postgres -i -s 20 -q postgres >/dev/null 2>&1
  psql -h "$B/sock" -U postgres -qc "CREATE TABLE rnd AS SELECT g, md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, 3000000) g" postgres
  pgbench -h "$B/sock" -U postgres -n -c 2 -T 10 postgres >/dev/null
  psql -h "$B/sock" -U postgres -qAtc "SELECT pg_switch_wal()" postgres >/dev/null
  sleep 2
  pg_ctl -D pg -m fast -w stop >/dev/null
  ls wal | grep -E "^[0-9A-F]{24}$" | head -n "$SEGMENTS" > segments.txt
  echo "segments: $(wc -l < segments.txt) real WAL segments of 16 MiB"

  # walshipper: encrypted repository, zstd 3.
  head -c 48 /dev/urandom | base64 > passphrase; chmod 600 passphrase
  cat > walshipper.toml <<CONF
[pg]
data_dir = "$B/pg"
[repo]
path = "$B/ws-repo"
[encryption]
passphrase_file = "$B/passphrase"
key_cache_dir = "$B/keycache"
[compression]
level = 3
CONF
  "$BIN" --config walshipper.toml repo-init >/dev/null

  # pgBackRest 2.45: zstd 3, aes-256-cbc, posix repository.
  cat > pgbackrest.conf <<CONF
[global]
repo1-path=$B/pgbr-repo
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$(cat passphrase)
compress-type=zst
compress-level=3
log-path=$B/pgbr-log
lock-path=$B/pgbr-log
log-level-console=warn
log-level-file=off
spool-path=$B/pgbr-log
[bench]
pg1-path=$B/pg
pg1-socket-path=$B/sock
CONF
  pg_ctl -D pg -l pg.log -w start >/dev/null
  pgbackrest --config="$B/pgbackrest.conf" --stanza=bench stanza-create >/dev/null
  pg_ctl -D pg -m fast -w stop >/dev/null

  python3 "$BENCH_DIR/push_timing.py" "$B" "$BIN"
'
