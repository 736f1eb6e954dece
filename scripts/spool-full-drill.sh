#!/usr/bin/env bash
# Drill (not a CI test: it mounts a file system, which needs root): the spool
# disk of asynchronous archive-push and of archive-get look-ahead runs full.
# A real PostgreSQL 15 cluster (1 MiB segments) archives through the real
# walshipper into a posix repository, both spools on a 16 MiB tmpfs.
#
# 1. Async push, spool full: the archiver's calls fail with an error naming
#    archive.spool_dir; no segment is marked done that is not in the
#    repository. Space freed: archiving catches up, no gap.
# 2. Look-ahead spool with room for two segments: prefetching stops at the
#    full disk (its log says so), the rest is fetched directly, recovery
#    gives exactly the source's rows, no temporary left in the spool.
# 3. Look-ahead spool full: archive-get says look-ahead is unavailable and
#    fetches directly; recovery gives exactly the source's rows.
# Prints each check; exits non-zero at the first that fails.
#
# Run as root: bash scripts/spool-full-drill.sh  (about a minute).
# WALSHIPPER_BIN=path uses that binary (else the release build in target/).
set -euo pipefail
if [ "${DRILL_INNER:-}" != 1 ]; then
  source "$(dirname "$0")/lib.sh"
  [ "$(id -u)" = 0 ] || die "run as root: the drill mounts a tmpfs"
  BIN=${WALSHIPPER_BIN:-$PGB_ROOT/target/release/walshipper}
  [ -x "$BIN" ] || die "no walshipper at $BIN (build it, or set WALSHIPPER_BIN)"
  D=${D:-$PGB_ROOT/spool-full-drill}
  fresh_bench_dir "$D"
  install -d -o "$TEST_USER" "$D/spool"
  mount -t tmpfs -o size=16m,mode=0700 tmpfs "$D/spool"
  chown "$TEST_USER" "$D/spool"
  rc=0
  as_test_user env DRILL_INNER=1 D="$D" BIN="$BIN" bash "$REPO_TOP/scripts/spool-full-drill.sh" || rc=$?
  for c in pg r1 r2; do
    [ -f "$D/$c/postmaster.pid" ] && as_test_user pg_ctl -D "$D/$c" -m immediate -w stop >/dev/null 2>&1 || true
  done
  # Background walshipper processes still in the spool (their pid is in
  # their lock file): stopped before the unmount.
  for l in $(find "$D/spool" -name '*.lock' 2>/dev/null); do
    [ -s "$l" ] || continue
    pid=$(cat "$l")
    grep -q walshipper "/proc/$pid/cmdline" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  done
  sleep 0.2
  umount "$D/spool"
  rm -rf "$D"
  [ "$rc" = 0 ] && echo "spool-full drill: all checks passed" || echo "spool-full drill: FAILED"
  exit "$rc"
fi

# --- as the PostgreSQL user -------------------------------------------------
: "${D:?}" "${BIN:?}"
cd "$D"
ok() { echo "ok: $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
PSQL=(psql -X -qAt -h "$D/sock" -U postgres postgres)
mkdir -p sock rsock spool/push spool/get
cat > ws.toml <<CONF
[pg]
data_dir = "$D/pg"
host = "$D/sock"
[repo]
path = "$D/repo"
min_free_space = "0"
[encryption]
mode = "none"
[archive]
async = true
spool_dir = "$D/spool/push"
async_wait = 10
[restore]
lookahead = 8
spool_dir = "$D/spool/get"
archive_get_retry_timeout = 0
CONF
initdb -D pg -U postgres -A trust --wal-segsize=1 --no-sync >/dev/null
"$BIN" --config ws.toml repo-init --no-encryption >/dev/null
cat >> pg/postgresql.conf <<CONF
listen_addresses = ''
unix_socket_directories = '$D/sock'
archive_mode = on
archive_command = '$BIN --config $D/ws.toml archive-push %p'
wal_level = replica
CONF
pg_ctl -D pg -l pg.log -w start >/dev/null
pg_basebackup -h "$D/sock" -U postgres -D base -X none -c fast --no-sync
"${PSQL[@]}" -c "SELECT pg_switch_wal()" >/dev/null

# Fills the spool's file system, leaving $1 bytes free (about).
fill() {
  rm -f spool/filler
  local avail
  avail=$(df -B1 --output=avail spool | tail -1)
  [ "$avail" -gt "$1" ] && head -c $((avail - $1)) /dev/zero > spool/filler || true
  echo "spool: $(df -B1 --output=avail spool | tail -1) bytes free"
}
ready() { find pg/pg_wal/archive_status -name '*.ready' | wc -l; }
wait_archived() {
  for _ in $(seq 1 1200); do [ "$(ready)" = 0 ] && return 0; sleep 0.1; done
  return 1
}
wait_archived || fail "the base backup's WAL was not archived"

echo "== 1. async archive-push, spool full"
fill 0
"${PSQL[@]}" -c "CREATE TABLE t AS SELECT g, md5(g::text) AS v FROM generate_series(1, 100000) g" \
  -c "SELECT pg_switch_wal()" >/dev/null
sleep 3
n=$(ready)
[ "$n" -gt 0 ] || fail "segments were marked archived with the spool full"
ok "$n segments wait as .ready while the spool is full"
grep -q "archive.spool_dir: the spool .* is full" pg.log || fail "no clear error in the server log"
ok "the server log says: $(grep -o 'archive.spool_dir: the spool [^;]*' pg.log | tail -1)"
for f in pg/pg_wal/archive_status/*.done; do
  s=$(basename "$f" .done)
  [ ${#s} = 24 ] || continue
  "$BIN" --config ws.toml archive-get "$s" "$D/check" >/dev/null 2>&1 || fail "$s marked done, not in the repository"
done
rm -f check
ok "every segment marked .done is in the repository"
rm -f spool/filler
# The archiver waits up to a minute after three failures; a new segment
# wakes it.
"${PSQL[@]}" -c "INSERT INTO t VALUES (0, 'x')" -c "SELECT pg_switch_wal()" >/dev/null
wait_archived || fail "archiving did not catch up after space was freed"
ok "space freed: the archiver caught up ($(ls pg/pg_wal/archive_status | grep -c done) files done)"
"$BIN" --config ws.toml info --json > info.json
python3 - <<'PY' || fail "gaps in the archive"
import json
tl = json.load(open("info.json"))["wal"]["timelines"]
assert all(not t["gaps"] for t in tl), tl
PY
ok "no gap in the archive"
rows=$("${PSQL[@]}" -c "SELECT count(*), sum(hashtext(v)) FROM t")
end=$("${PSQL[@]}" -c "SELECT pg_walfile_name(pg_switch_wal())")
wait_archived || fail "the last segment was not archived"

recover() { # $1 = directory
  cp -a base "$1"
  touch "$1/recovery.signal"
  cat >> "$1/postgresql.conf" <<CONF
unix_socket_directories = '$D/rsock'
archive_mode = off
restore_command = '$BIN --config $D/ws.toml archive-get %f "%p"'
recovery_target_action = 'promote'
CONF
  pg_ctl -D "$1" -l "$1.log" -w -t 120 start >/dev/null || { tail -20 "$1.log" >&2; fail "$1 did not start"; }
  # Accepting read-only connections is not the end of recovery.
  for _ in $(seq 1 1200); do
    [ "$(psql -X -qAt -h "$D/rsock" -U postgres -c 'SELECT pg_is_in_recovery()' postgres 2>/dev/null)" = f ] && break
    sleep 0.1
  done
  got=$(psql -X -qAt -h "$D/rsock" -U postgres -c "SELECT count(*), sum(hashtext(v)) FROM t" postgres)
  pg_ctl -D "$1" -m immediate -w stop >/dev/null
  [ "$got" = "$rows" ] || fail "$1 recovered $got, the source has $rows"
  ok "$1 recovered exactly the source's rows ($rows)"
}
stop_prefetcher() {
  local l pid
  for l in spool/get/archive-get/*/prefetch.lock; do
    [ -s "$l" ] || continue
    pid=$(cat "$l")
    grep -q archive-get-prefetch "/proc/$pid/cmdline" 2>/dev/null || continue
    kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  done
}

echo "== 2. look-ahead spool with room for two segments (1 MiB each, 1 MiB kept free)"
fill $((3 * 1024 * 1024 + 512 * 1024))
recover r1
stop_prefetcher
grep -qi "no space left" spool/get/archive-get/*/prefetch.log || fail "the prefetcher's log does not say the disk was full"
ok "prefetch.log: $(grep -i -m1 'no space left' spool/get/archive-get/*/prefetch.log)"
left=$(find spool/get -name '.*tmp*' | wc -l)
[ "$left" = 0 ] || fail "$left temporaries left in the look-ahead spool"
ok "no temporary left in the look-ahead spool"

echo "== 3. look-ahead spool full"
fill 0
recover r2
grep -q "look-ahead unavailable (restore.spool_dir: the spool .* is full" r2.log || fail "archive-get did not say look-ahead was unavailable"
ok "server log: $(grep -m1 'look-ahead unavailable' r2.log)"
pg_ctl -D pg -m fast -w stop >/dev/null
echo "last segment archived: $end"
