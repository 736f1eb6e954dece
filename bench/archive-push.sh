#!/usr/bin/env bash
# Benchmark (not a test): archive-push latency of walshipper vs pgBackRest
# 2.59.1 on the same real WAL segments, zstd level 3 and encryption on both
# sides, one synchronous push per segment as PostgreSQL's archiver does it,
# in a warm and a cold page-cache pass (see push_timing.py for why all tools
# must meet the segment in the same state).
# Run as root: bash bench/archive-push.sh   (SEGMENTS=48 by default;
# SEGMENTS=8 takes about a minute). PGBR_245=1 adds Debian's pgBackRest 2.45
# as a third column, for continuity with the figures before 2026-11-26;
# WALSHIPPER_BIN=path skips the release build; PGBR=path uses that 2.59.1.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
source "$(dirname "$0")/pgbackrest-bin.sh"
bash "$REPO_TOP/scripts/setup.sh" >/dev/null
PGBR=$(pgbackrest_bin)
PGBR_245_BIN=
if [ "${PGBR_245:-}" = 1 ]; then
  PGBR_245_BIN=$(command -v pgbackrest) || die "PGBR_245=1: Debian's pgbackrest (2.45) is not installed"
fi
sync_tree
BIN=${WALSHIPPER_BIN:-$PGB_ROOT/target/release/walshipper}
[ -n "${WALSHIPPER_BIN:-}" ] || as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
B=$PGB_ROOT/bench-archive
fresh_bench_dir "$B"

read -r -d '' RUN <<'SCRIPT' || true
cd "$B"
mkdir wal pgbr-log sock
initdb -D pg -U postgres -A trust -k --no-sync >/dev/null
cat >> pg/postgresql.conf <<CONF
listen_addresses = ''
unix_socket_directories = '$B/sock'
archive_mode = on
archive_command = 'cp %p $B/wal/%f'
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

# pgBackRest: zstd 3, aes-256-cbc, posix repository (2.59.1, and 2.45 if asked).
pgbr_conf() {
  cat <<CONF
[global]
repo1-path=$B/$1
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
}
pgbr_conf pgbr-repo > pgbackrest.conf
pgbr_conf pgbr-245-repo > pgbackrest-245.conf
pg_ctl -D pg -l pg.log -w start >/dev/null
"$PGBR" --config="$B/pgbackrest.conf" --stanza=bench stanza-create >/dev/null
[ -z "$PGBR_245" ] || "$PGBR_245" --config="$B/pgbackrest-245.conf" --stanza=bench stanza-create >/dev/null
pg_ctl -D pg -m fast -w stop >/dev/null

python3 "$BENCH/push_timing.py" "$B" "$BIN" "$PGBR" $PGBR_245
rm -rf pg wal ws-repo pgbr-repo pgbr-245-repo
SCRIPT

as_test_user env BENCH="$PGB_ROOT/src/bench" B="$B" BIN="$BIN" PGBR="$PGBR" PGBR_245="$PGBR_245_BIN" \
  SEGMENTS="${SEGMENTS:-48}" bash -euo pipefail -c "$RUN"
