#!/usr/bin/env bash
# Benchmark (not a test): asynchronous archiving and archive-get look-ahead,
# walshipper beside pgBackRest 2.59.1 on the same real WAL segments (zstd
# level 3 and encryption on both sides, as bench/archive-push.sh).
#
# 1. Async archive throughput: a real PostgreSQL 15 cluster holds SEGMENTS+
#    segments marked .ready (made with archiving off); archive_command is
#    then set and the server reloaded, and the time until its archiver has
#    archived every one is measured. walshipper: [archive] async = true,
#    async_jobs = 4; pgBackRest: archive-async=y, process-max=4.
# 2. Restore WAL replay: a base backup taken before the load recovers
#    through every segment from the repository (restore_command), timed from
#    start to promotion: walshipper lookahead = 0 (one by one) and 8;
#    pgBackRest archive-async=n and archive-async=y (archive-get-queue-max =
#    128MiB, 8 segments).
#    The floor: the same recovery with every segment already local and
#    decoded (restore_command = mv from a directory copied before the
#    timing): what no look-ahead can beat on this machine.
# Each timing is taken holding /var/tmp/pg_backup/bench.lock; the variants
# alternate, RUNS times each; medians and ratios are printed.
#
# REPO=s3: both repositories on the S3 test server (SeaweedFS, port 18333)
# through bench/s3_count_proxy.py adding LATENCY_MS (20 by default) to every
# request, a store one round trip away (pgBackRest over TLS to the proxy
# with a self-signed certificate, as bench/many-files.sh). Proxy ports
# 18440 (http) and 18441 (TLS).
#
# Run as root: bash bench/archive-async.sh   (SEGMENTS=64, RUNS=3 by
# default; about 5 minutes). WALSHIPPER_BIN=path skips the release build;
# PGBR=path uses that pgBackRest 2.59.1; ARCHIVE_RUNS (default RUNS) timed
# archiving runs; VARIANTS (default "floor ws-la0 ws-la8 pgbr-sync
# pgbr-async"; a space for none) the replays; BIN_B=path and variants b-ws-laN replay with
# that walshipper binary too (an A/B in the same run; its async archiving
# is then timed as well). ADAPTIVE=false|true sets walshipper's
# compression.adaptive (unset: the default). TRACE=1 keeps, per
# replay, the server log with archive-get's debug lines, the prefetcher's
# log and the store's requests in $B/trace (WALSHIPPER_LOG=walshipper=debug;
# not for timing: compare traced runs only with each other).
set -euo pipefail
if [ "${BENCH_INNER:-}" != 1 ]; then
  source "$(dirname "$0")/../scripts/lib.sh"
  source "$(dirname "$0")/pgbackrest-bin.sh"
  bash "$REPO_TOP/scripts/setup.sh" >/dev/null
  PGBR=$(pgbackrest_bin)
  sync_tree
  BIN=${WALSHIPPER_BIN:-$PGB_ROOT/target/release/walshipper}
  [ -n "${WALSHIPPER_BIN:-}" ] || as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
  B=$PGB_ROOT/bench-async
  rm -rf "$B"; install -d -o "$TEST_USER" "$B"
  [ "${REPO:-posix}" = s3 ] && as_test_user bash "$REPO_TOP/scripts/s3-server.sh" start
  as_test_user env BENCH_INNER=1 B="$B" BIN="$BIN" PGBR="$PGBR" \
    SEGMENTS="${SEGMENTS:-64}" RUNS="${RUNS:-3}" ARCHIVE_RUNS="${ARCHIVE_RUNS:-}" \
    REPO="${REPO:-posix}" LATENCY_MS="${LATENCY_MS:-20}" VARIANTS="${VARIANTS:-}" BIN_B="${BIN_B:-}" TRACE="${TRACE:-}" \
    ADAPTIVE="${ADAPTIVE:-}" \
    bash "$PGB_ROOT/src/bench/archive-async.sh"
  [ "${TRACE:-}" = 1 ] || rm -rf "$B"
  exit 0
fi

# --- as the PostgreSQL user, in $B -------------------------------------------
: "${B:?}" "${BIN:?}" "${PGBR:?}" "${SEGMENTS:?}" "${RUNS:?}"
REPO=${REPO:-posix} LATENCY_MS=${LATENCY_MS:-20}
ARCHIVE_RUNS=${ARCHIVE_RUNS:-$RUNS}
VARIANTS=${VARIANTS:-floor ws-la0 ws-la8 pgbr-sync pgbr-async}
LOCK=/var/tmp/pg_backup/bench.lock
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$B"
mkdir -p sock spool-ws spool-pgbr pgbr-log
export B BIN BIN_B PGBR LOCK
# A server an aborted run left here: its sockets would be removed under it.
for d in pg r; do
  [ -f "$d/postmaster.pid" ] && pg_ctl -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
done
TAG=bench-async-$$
PROXY_PID=
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  # Our prefix on the shared server, through its filer.
  [ "$REPO" = s3 ] && curl -s -X DELETE "http://127.0.0.1:8888/buckets/walshipper-test/$TAG?recursive=true" >/dev/null || true
}
trap cleanup EXIT
if [ "$REPO" = s3 ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout proxy-key.pem -out proxy-cert.pem -days 2 \
    -subj /CN=127.0.0.1 >/dev/null 2>&1
  LATENCY_MS=$LATENCY_MS python3 "$HERE/s3_count_proxy.py" serve "$B/s3.log" 18333 18440 18441 \
    proxy-cert.pem proxy-key.pem &
  PROXY_PID=$!
  for _ in $(seq 1 50); do
    curl -s -o /dev/null http://127.0.0.1:18440/ && break
    sleep 0.1
  done
  echo "repositories on S3 (SeaweedFS) through a proxy adding ${LATENCY_MS} ms per request"
fi
PSQL=(psql -X -qAt -h "$B/sock" -U postgres postgres)

initdb -D pg -U postgres -A trust -k --no-sync >/dev/null
cat >> pg/postgresql.conf <<CONF
listen_addresses = ''
unix_socket_directories = '$B/sock'
archive_mode = on
max_wal_size = 16GB
checkpoint_timeout = 1h
include_if_exists = 'archive.conf'
CONF
echo "archive_command = ''" > pg/archive.conf
pg_ctl -D pg -l pg.log -w start >/dev/null
# The base backup the replay benchmark recovers from (its WAL is archived
# with the rest below).
# -X stream: with -X none the backup would wait for its WAL to be archived.
pg_basebackup -h "$B/sock" -U postgres -D base -X stream -c fast --no-sync

# Real WAL from a mixed load (pgbench data compresses well, md5 text less),
# produced with archiving off so that every segment waits as .ready.
pgbench -h "$B/sock" -U postgres -i -s 10 -q postgres >/dev/null 2>&1
"${PSQL[@]}" -c "CREATE TABLE rnd AS SELECT g, md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, 1000000) g"
ready() { find pg/pg_wal/archive_status -name '*.ready' | wc -l; }
while [ "$(ready)" -lt "$SEGMENTS" ]; do
  pgbench -h "$B/sock" -U postgres -n -c 2 -t 2000 postgres >/dev/null
  "${PSQL[@]}" -c "UPDATE rnd SET v = md5(random()::text) || v WHERE g % 3 = 0" -c "VACUUM rnd"
  "${PSQL[@]}" -c "UPDATE rnd SET v = substr(v, 33)  WHERE g % 3 = 0" -c "VACUUM rnd"
done
"${PSQL[@]}" -c "CHECKPOINT" -c "SELECT pg_switch_wal()" >/dev/null
sleep 1
NREADY=$(ready)
pg_ctl -D pg -m fast -w stop >/dev/null
echo "files to archive: $NREADY (segments of 16 MiB, one .backup)"

head -c 48 /dev/urandom | base64 > passphrase; chmod 600 passphrase
ws_repo() { # $1 = run
  if [ "$REPO" = s3 ]; then
    cat <<CONF
[repo]
type = "s3"
bucket = "walshipper-test"
prefix = "$TAG/ws-$1"
endpoint = "http://127.0.0.1:18440"
force_path_style = true
region = "us-east-1"
access_key_id = "testkey"
secret_access_key = "testsecret"
min_free_space = "0"
CONF
  else
    printf '[repo]\npath = "%s"\nmin_free_space = "0"\n' "$B/ws-repo"
  fi
}
ws_conf() { # $1 = lookahead, $2 = run
  cat <<CONF
[pg]
data_dir = "$B/pg"
host = "$B/sock"
$(ws_repo "$2")
[encryption]
passphrase_file = "$B/passphrase"
key_cache_dir = "$B/keycache"
[compression]
level = 3
${ADAPTIVE:+adaptive = $ADAPTIVE}
[archive]
async = true
spool_dir = "$B/spool-ws"
async_jobs = 4
async_queue_max = 64
[restore]
lookahead = $1
spool_dir = "$B/spool-ws"
CONF
}
ws_confs() { # $1 = run
  ws_conf 0 "$1" > ws-la0.toml; ws_conf 8 "$1" > ws-la8.toml
  chmod 600 ws-la0.toml ws-la8.toml # may hold a secret: walshipper refuses it otherwise
}
pgbr_repo() { # $1 = run
  if [ "$REPO" = s3 ]; then
    printf '%s\n' "repo1-type=s3" "repo1-path=/$TAG/pgbr-$1" "repo1-s3-bucket=walshipper-test" \
      "repo1-s3-endpoint=127.0.0.1" "repo1-storage-port=18441" "repo1-s3-region=us-east-1" \
      "repo1-s3-key=testkey" "repo1-s3-key-secret=testsecret" "repo1-s3-uri-style=path" \
      "repo1-storage-verify-tls=n"
  else
    echo "repo1-path=$B/pgbr-repo"
  fi
}
pgbr_conf() { # $1 = archive-async for archive-get (y/n), $2 = run
  cat <<CONF
[global]
$(pgbr_repo "$2")
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$(cat passphrase)
compress-type=zst
compress-level=3
log-path=$B/pgbr-log
lock-path=$B/pgbr-log
log-level-console=warn
log-level-file=off
spool-path=$B/spool-pgbr
process-max=4
archive-async=$1
archive-get-queue-max=128MiB
[bench]
pg1-path=$B/pg
pg1-socket-path=$B/sock
CONF
}
pgbr_confs() { # $1 = run
  pgbr_conf y "$1" > pgbr-async.conf; pgbr_conf n "$1" > pgbr-sync.conf
}

# Puts every archived file back to .ready, with no shutdown checkpoint in
# between (it would remove the archived segments).
reset_archive() {
  pg_ctl -D pg -m immediate -w stop >/dev/null
  for f in pg/pg_wal/archive_status/*.done; do
    [ -e "$f" ] && mv "$f" "${f%.done}.ready"
  done
  echo "archive_command = ''" > pg/archive.conf
}

# One timed async archiving run of tool $1; prints seconds.
timed_archive() {
  local cmd
  case $1 in
    walshipper) cmd="$BIN --config $B/ws-la0.toml archive-push %p" ;;
    walshipper-b) cmd="$BIN_B --config $B/ws-la0.toml archive-push %p" ;;
    pgbackrest) cmd="$PGBR --config=$B/pgbr-async.conf --stanza=bench archive-push %p" ;;
  esac
  echo "archive_command = '$cmd'" > pg/archive.conf
  local t0 t1 c0 c1
  c0=$(cpu_jiffies)
  t0=$(date +%s.%N)
  pg_ctl -D pg reload >/dev/null
  while [ -n "$(find pg/pg_wal/archive_status -name '*.ready' -print -quit)" ]; do
    sleep 0.02
  done
  t1=$(date +%s.%N)
  c1=$(cpu_jiffies)
  # Seconds, then the whole machine's busy CPU seconds meanwhile (every
  # process: the tool, PostgreSQL's archiver, anything else running).
  printf '%s %.2f\n' "$(echo "$t1 - $t0" | bc -l)" "$(echo "($c1 - $c0) / $(getconf CLK_TCK)" | bc -l)"
}
# Busy jiffies of all CPUs since boot (user, nice, system, irq, softirq, steal).
cpu_jiffies() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
export -f cpu_jiffies
export -f timed_archive

# One timed replay of the base backup through restore_command $1; prints seconds.
timed_replay() {
  local t0 t1
  t0=$(date +%s.%N)
  pg_ctl -D r -l r.log -W start >/dev/null
  until [ "$(psql -X -qAt -h "$B/rsock" -U postgres -c 'SELECT pg_is_in_recovery()' postgres 2>/dev/null)" = f ]; do
    if ! [ -e r/postmaster.pid ] && grep -q FATAL r.log 2>/dev/null; then
      echo "recovery failed:" >&2; tail -20 r.log >&2; return 1
    fi
    sleep 0.02
  done
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}
export -f timed_replay

# Stops the walshipper background process whose lock is $1 (its pid is in
# it), so that it cannot work during the next tool's timed run.
stop_bg() {
  local l pid
  for l in "$@"; do
    [ -s "$l" ] || continue
    pid=$(cat "$l")
    if grep -q walshipper "/proc/$pid/cmdline" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    fi
  done
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A RES
for run in $(seq 1 "$ARCHIVE_RUNS"); do
  # With BIN_B, that binary's archiving is timed too (an A/B).
  for tool in walshipper ${BIN_B:+walshipper-b} pgbackrest; do
    pg_ctl -D pg -l pg.log -w start >/dev/null
    # A fresh repository per run (on S3 a prefix of its own); the last
    # run's of each tool stays for the replay benchmark. An archive-push
    # call still in flight from the immediate stop may start a new pusher
    # after stop_bg: none may write into the spool while it is removed.
    pkill -9 -f -- "ws-la0.toml archive-push" 2>/dev/null || true
    while pgrep -f -- "ws-la0.toml archive-push" >/dev/null; do sleep 0.05; done
    rm -rf spool-ws/* spool-pgbr/*
    if [ $tool != pgbackrest ]; then
      rm -rf ws-repo keycache
      ws_confs "$run${tool#walshipper}" # walshipper-b: a prefix of its own on S3
      "$BIN" --config ws-la0.toml repo-init >/dev/null
    else
      rm -rf pgbr-repo
      pgbr_confs "$run"
      "$PGBR" --config="$B/pgbr-async.conf" --stanza=bench stanza-create >/dev/null
    fi
    read -r s cpu < <(flock -o "$LOCK" bash -c 'timed_archive '$tool)
    printf 'async archive, %s, run %s: %s files in %.2fs, machine CPU busy %.2fs (%.0f %% of %s cores)\n' \
      "$tool" "$run" "$NREADY" "$s" "$cpu" "$(echo "100 * $cpu / $s / $(nproc)" | bc -l)" "$(nproc)"
    RES[archive_$tool]+="$s "
    RES[cpu_$tool]+="$cpu "
    reset_archive
    stop_bg spool-ws/archive-push/*/pusher.lock
  done
done

# The floor: every archived file decoded and local (the same bytes the
# archive holds: the server's own files, kept by the immediate stops).
mkdir -p floor
for f in pg/pg_wal/archive_status/*.ready; do
  f=$(basename "$f" .ready); cp "pg/pg_wal/$f" floor/
done

mkdir -p rsock
for run in $(seq 1 "$RUNS"); do
  for variant in $VARIANTS; do
    # A prefetcher started by a call late in the last recovery, after its
    # stop_bg, may still be writing into the spool.
    pkill -9 -f -- "$B/ws-la[0-9]*.toml archive-get" 2>/dev/null || true
    while pgrep -f -- "$B/ws-la[0-9]*.toml archive-get" >/dev/null; do sleep 0.05; done
    rm -rf r r.log spool-ws/archive-get spool-pgbr/*
    cp -a base r
    touch r/recovery.signal
    case $variant in
      # A rename from a copy made before the timing: the fastest
      # restore_command there can be (a look-ahead hit is a rename too).
      floor) rm -rf floor-run; cp -a floor floor-run; rc="mv $B/floor-run/%f \"%p\"" ;;
      ws-la*|b-ws-la*) # any look-ahead depth, e.g. ws-la16; b-: the binary BIN_B (A/B)
        v=${variant#b-}
        [ -f "$v.toml" ] || { ws_conf "${v#ws-la}" "$ARCHIVE_RUNS" > "$v.toml"; chmod 600 "$v.toml"; }
        bin=$BIN; [ "$v" = "$variant" ] || bin=${BIN_B:?b- variants need BIN_B}
        rc="$bin --config $B/$v.toml archive-get %f \"%p\"" ;;
      # pg1-path: pgBackRest resolves %p (relative) against it.
      pgbr-*) rc="$PGBR --config=$B/$variant.conf --stanza=bench --pg1-path=$B/r archive-get %f \"%p\"" ;;
    esac
    cat >> r/postgresql.conf <<CONF
unix_socket_directories = '$B/rsock'
archive_mode = off
restore_command = '$rc'
CONF
    echo "archive_command = ''" > r/archive.conf
    s3_from=$( [ -f s3.log ] && wc -l < s3.log || echo 0)
    if [ "${TRACE:-}" = 1 ]; then
      s=$(WALSHIPPER_LOG=walshipper=debug flock -o "$LOCK" bash -c 'timed_replay')
    else
      s=$(flock -o "$LOCK" bash -c 'timed_replay')
    fi
    # Every variant must replay the same WAL: the same end of redo.
    end=$(grep -o 'redo done at [0-9A-F/]*' r.log | awk '{print $4}')
    # PostgreSQL's own time from redo start to redo done: the WAL replay,
    # restore_command waits included, without startup and the end-of-recovery
    # checkpoint (which cost every variant the same).
    redo=$(grep -o 'elapsed: [0-9.]* s' r.log | tail -1 | awk '{print $2}')
    echo "replay, $variant, run $run: ${s}s to promotion, redo ${redo}s (redo done at $end)"
    RES[redo_$variant]+="$redo "
    [ -z "${END_LSN:-}" ] && END_LSN=$end
    [ "$end" = "$END_LSN" ] || { echo "error: $variant ended redo at $end, not $END_LSN" >&2; tail -20 r.log >&2; exit 1; }
    RES[replay_$variant]+="$s "
    pg_ctl -D r -m immediate -w stop >/dev/null
    stop_bg spool-ws/archive-get/*/prefetch.lock
    # The store's requests of this replay; with TRACE=1 also the server log
    # (archive-get's debug lines) and the prefetcher's log, for
    # bench/lookahead_trace.py.
    mkdir -p trace
    [ -f s3.log ] && tail -n +"$((s3_from + 1))" s3.log > "trace/$variant-$run.s3.log"
    if [ "${TRACE:-}" = 1 ]; then
      cp r.log "trace/$variant-$run.server.log"
      cat spool-ws/archive-get/*/prefetch.log > "trace/$variant-$run.prefetch.log" 2>/dev/null || true
    fi
  done
done
rm -rf r floor floor-run

m() { echo "${RES[$1]:-nan}" | tr ' ' '\n' | grep . | median; }
aw=$(m archive_walshipper); ap=$(m archive_pgbackrest); ab=$(m archive_walshipper-b)
r0=$(m replay_ws-la0); r8=$(m replay_ws-la8); p0=$(m replay_pgbr-sync); p8=$(m replay_pgbr-async)
d0=$(m redo_ws-la0); d8=$(m redo_ws-la8); e0=$(m redo_pgbr-sync); e8=$(m redo_pgbr-async)
fl=$(m redo_floor)
# A subset of VARIANTS leaves some figures out: printed as nan, not fatal.
set +e
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || b + 0 == 0) print "nan"; else print a / b }'; }
echo
echo "== medians of $RUNS runs ($ARCHIVE_RUNS of archiving), $NREADY files, repositories: $REPO$([ "$REPO" = s3 ] && echo " + ${LATENCY_MS} ms per request")$([ -n "${ADAPTIVE:-}" ] && echo ", walshipper compression.adaptive = $ADAPTIVE") =="
printf 'redo floor (segments local, mv) %6.2fs: best look-ahead speed-up possible here %.2fx\n' \
  "$fl" "$(div "$d0" "$fl")"
printf 'async archive   walshipper %6.2fs (%5.1f files/s)   pgBackRest %6.2fs (%5.1f files/s)   throughput ratio %.2fx (target >= 2)\n' \
  "$aw" "$(div "$NREADY" "$aw")" "$ap" "$(div "$NREADY" "$ap")" "$(div "$ap" "$aw")"
[ -n "${BIN_B:-}" ] && printf 'async archive   BIN_B      %6.2fs (%5.1f files/s)   ratio to pgBackRest %.2fx   (runs: %s; machine CPU busy %.2fs, runs: %s)\n' \
  "$ab" "$(div "$NREADY" "$ab")" "$(div "$ap" "$ab")" "${RES[archive_walshipper-b]:-}" \
  "$(m cpu_walshipper-b)" "${RES[cpu_walshipper-b]:-}"
printf 'async archive runs: walshipper %s  pgBackRest %s\n' "${RES[archive_walshipper]:-}" "${RES[archive_pgbackrest]:-}"
printf 'machine CPU busy runs: walshipper %s  pgBackRest %s\n' "${RES[cpu_walshipper]:-}" "${RES[cpu_pgbackrest]:-}"
printf 'async archive, machine CPU busy (median)   walshipper %6.2fs   pgBackRest %6.2fs   ratio %.2fx\n' \
  "$(m cpu_walshipper)" "$(m cpu_pgbackrest)" "$(div "$(m cpu_pgbackrest)" "$(m cpu_walshipper)")"
printf 'redo (WAL replay) walshipper one-by-one %6.2fs  look-ahead 8 %6.2fs  speed-up %.2fx (target >= 2)\n' \
  "$d0" "$d8" "$(div "$d0" "$d8")"
printf 'redo (WAL replay) pgBackRest sync       %6.2fs  async         %6.2fs  speed-up %.2fx\n' \
  "$e0" "$e8" "$(div "$e0" "$e8")"
printf 'start to promotion walshipper %6.2fs / %6.2fs   pgBackRest %6.2fs / %6.2fs (one-by-one / ahead)\n' \
  "$r0" "$r8" "$p0" "$p8"
for v in $VARIANTS; do printf '  redo %-12s median %6.2fs (runs: %s)\n' "$v" "$(m "redo_$v")" "${RES[redo_$v]:-}"; done
printf 'look-ahead redo vs pgBackRest async redo: %.2fx\n' "$(div "$e8" "$d8")"
pg_ctl -D pg -m immediate -w stop >/dev/null 2>&1 || true
