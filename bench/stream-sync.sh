#!/usr/bin/env bash
# Benchmark (not a test): what streaming costs the commits of a real
# PostgreSQL 15 cluster. pgbench (CLIENTS clients, DURATION s, TPC-B-like,
# synchronous_commit = on) against:
#   none      no synchronous standby, no receiver (the baseline)
#   ws-async  walshipper wal-receive, asynchronous ([stream] flush_interval 1)
#   ws-sync   walshipper wal-receive as THE synchronous standby
#             ([stream] synchronous = true): a commit returns once its WAL is
#             durable in the repository (posix, encrypted, zstd 3)
#   pgrw-sync pg_receivewal --synchronous as the synchronous standby, writing
#             to a local directory (what Barman runs): a commit returns once
#             its WAL is fsynced there
#   ws-sync-s3 (S3=1) ws-sync with the repository on the S3 test server
# Every run starts from a fresh repository / directory and slot, after a
# CHECKPOINT; the pgbench runs are taken holding /var/tmp/pg_backup/bench.lock,
# the variants alternate, RUNS rounds; medians of tps, average and p99
# latency (from pgbench's per-transaction log) and the ratios to `none`.
#
# Run as root: bash bench/stream-sync.sh   (CLIENTS=4 DURATION=30 RUNS=3
# SCALE=10 by default; about 8 minutes). WALSHIPPER_BIN=path skips the
# release build; VARIANTS="none ws-sync" picks variants; BIN_B=path runs the
# variants named <variant>-b with that build (A/B of a change; BIN_B alone
# adds ws-sync-b); RX_WRAP="strace -f
# -c -o FILE" runs the receiver under a profiler.
set -euo pipefail
if [ "${BENCH_INNER:-}" != 1 ]; then
  source "$(dirname "$0")/../scripts/lib.sh"
  bash "$REPO_TOP/scripts/setup.sh" --minimal >/dev/null
  sync_tree
  BIN=${WALSHIPPER_BIN:-$PGB_ROOT/target/release/walshipper}
  [ -n "${WALSHIPPER_BIN:-}" ] || as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
  B=$PGB_ROOT/bench-stream-sync
  fresh_bench_dir "$B"
  as_test_user env BENCH_INNER=1 B="$B" BIN="$BIN" \
    CLIENTS="${CLIENTS:-4}" DURATION="${DURATION:-30}" RUNS="${RUNS:-3}" SCALE="${SCALE:-10}" \
    VARIANTS="${VARIANTS:-}" S3="${S3:-}" BIN_B="${BIN_B:-}" PGB_TEST_S3_ENDPOINT="${PGB_TEST_S3_ENDPOINT:-http://127.0.0.1:18333}" \
    bash "$PGB_ROOT/src/bench/stream-sync.sh"
  rm -rf "$B"
  exit 0
fi

# --- as the PostgreSQL user, in $B -------------------------------------------
: "${B:?}" "${BIN:?}" "${CLIENTS:?}" "${DURATION:?}" "${RUNS:?}" "${SCALE:?}"
LOCK=/var/tmp/pg_backup/bench.lock
PORT=${PORT:-18450}
VARIANTS=${VARIANTS:-"none ws-async ws-sync pgrw-sync"}
[ "${S3:-}" = 1 ] && VARIANTS="$VARIANTS ws-sync-s3"
# A/B of two builds: a variant named <variant>-b runs with BIN_B; BIN_B
# alone adds ws-sync-b.
if [ -n "${BIN_B:-}" ] && [[ " $VARIANTS" != *-b* ]]; then VARIANTS="$VARIANTS ws-sync-b"; fi
cd "$B"
mkdir -p sock
PSQL=(psql -X -qAt -h "$B/sock" -p "$PORT" -U postgres postgres)
RX_PID=

cleanup() {
  [ -n "$RX_PID" ] && kill "$RX_PID" 2>/dev/null || true
  pg_ctl -D "$B/pg" -m immediate -w stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

initdb -D pg -U postgres -A trust -k --no-sync >/dev/null
cat >> pg/postgresql.conf <<CONF
listen_addresses = ''
unix_socket_directories = '$B/sock'
port = $PORT
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
max_wal_senders = 4
synchronous_commit = on
include_if_exists = 'sync.conf'
CONF
echo "local replication postgres trust" >> pg/pg_hba.conf
echo "synchronous_standby_names = ''" > pg/sync.conf
pg_ctl -D pg -l pg.log -w start >/dev/null
pgbench -h "$B/sock" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1

head -c 48 /dev/urandom | base64 > passphrase; chmod 600 passphrase
STREAM_SETTINGS='flush_interval = 1, status_interval = 10; synchronous = true for ws-sync*'
ws_conf() { # $1 = posix or s3
  cat <<CONF
[pg]
data_dir = "$B/pg"
host = "$B/sock"
port = $PORT
user = "postgres"
database = "postgres"
CONF
  if [ "$1" = s3 ]; then
    cat <<CONF
[repo]
type = "s3"
bucket = "walshipper-test"
prefix = "bench-stream-sync-$$"
endpoint = "$PGB_TEST_S3_ENDPOINT"
region = "us-east-1"
force_path_style = true
access_key_id = "testkey"
secret_access_key = "testsecret"
min_free_space = "0"
CONF
  else
    printf '[repo]\npath = "%s/ws-repo"\nmin_free_space = "0"\n' "$B"
  fi
  cat <<CONF
[encryption]
passphrase_file = "$B/passphrase"
key_cache_dir = "$B/keycache"
[compression]
level = 3
[stream]
slot = "walshipper"
flush_interval = 1
status_interval = 10
CONF
}
ws_conf posix > ws.toml; ws_conf s3 > ws-s3.toml; chmod 600 ws.toml ws-s3.toml

set_sync() { # $1 = synchronous_standby_names
  echo "synchronous_standby_names = '$1'" > pg/sync.conf
  "${PSQL[@]}" -c "SELECT pg_reload_conf()" >/dev/null
}

# Waits until standby $1 streams (and, with $2 = sync, is the synchronous one).
wait_standby() {
  local want="streaming" q
  q="SELECT state || coalesce('/' || nullif(sync_state, 'async'), '') FROM pg_stat_replication WHERE application_name = '$1'"
  [ "${2:-}" = sync ] && want="streaming/sync"
  for _ in $(seq 1 600); do
    [ "$("${PSQL[@]}" -c "$q")" = "$want" ] && return 0
    sleep 0.1
  done
  echo "standby $1 did not reach $want" >&2; tail -20 rx.log >&2 || true; exit 1
}

# Drops every slot once no walsender holds one (a stopped receiver's
# walsender ends a moment later).
drop_slots() {
  for _ in $(seq 1 100); do
    [ "$("${PSQL[@]}" -c "SELECT count(*) FROM pg_replication_slots WHERE active")" = 0 ] && break
    sleep 0.1
  done
  "${PSQL[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active" >/dev/null
}

# Starts what variant $1 needs.
start_variant() {
  local v=$1 bin=$BIN
  if [[ $v == *-b ]]; then v=${v%-b}; bin=$BIN_B; fi
  RX_PID=
  drop_slots
  rm -rf ws-repo keycache pgrw
  case $v in
    none) set_sync "" ;;
    ws-*)
      local conf=ws.toml sync=false
      [ "$v" = ws-sync-s3 ] && conf=ws-s3.toml
      [ "$v" != ws-async ] && sync=true
      if [ "$conf" = ws-s3.toml ]; then
        sed -i "s/^prefix = .*/prefix = \"bench-stream-sync-$$-$RANDOM\"/" ws-s3.toml
      fi
      "$bin" --config "$conf" repo-init --kdf-memory-kib 8192 >/dev/null
      WALSHIPPER_STREAM_SYNCHRONOUS=$sync ${RX_WRAP:-} "$bin" --config "$conf" wal-receive >rx.log 2>&1 &
      RX_PID=$!
      if [ "$sync" = true ]; then set_sync walshipper; wait_standby walshipper sync
      else set_sync ""; wait_standby walshipper; fi
      ;;
    pgrw-sync)
      mkdir pgrw
      pg_receivewal -h "$B/sock" -p "$PORT" -U postgres -D pgrw --slot pgrw --create-slot --if-not-exists
      pg_receivewal -h "$B/sock" -p "$PORT" -U postgres -D pgrw --slot pgrw --synchronous --no-loop >rx.log 2>&1 &
      RX_PID=$!
      set_sync pg_receivewal; wait_standby pg_receivewal sync
      ;;
  esac
}

stop_variant() {
  set_sync ""
  if [ -n "$RX_PID" ]; then
    kill -TERM "$RX_PID" 2>/dev/null || true
    wait "$RX_PID" 2>/dev/null || true
    RX_PID=
  fi
  drop_slots
  rm -rf ws-repo pgrw
}

# One pgbench run of variant $1 (round $2): appends "variant tps avg_ms p99_ms" to results.
run_variant() {
  local v=$1 r=$2 out
  start_variant "$v"
  "${PSQL[@]}" -c "VACUUM" -c "CHECKPOINT" >/dev/null
  rm -rf txlog; mkdir txlog
  out=$(cd txlog && flock -o "$LOCK" pgbench -h "$B/sock" -p "$PORT" -U postgres -n \
    -c "$CLIENTS" -j 2 -T "$DURATION" -l --log-prefix=tx postgres 2>&1) || {
    echo "pgbench failed ($v):"; echo "$out"; tail -20 rx.log; exit 1; }
  stop_variant
  local tps
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | tail -1)
  # Per-transaction log: client, transaction, latency (µs), script, epoch s, µs.
  cat txlog/tx* | python3 -c '
import sys
lat = sorted(int(l.split()[2]) for l in sys.stdin if l.strip())
avg = sum(lat) / len(lat) / 1000
p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000
print(f"{avg:.3f} {p99:.3f} {len(lat)}")' | { read -r avg p99 n; echo "$v $tps $avg $p99 $n" >> results; echo "round $r $v: $tps tps, avg $avg ms, p99 $p99 ms ($n transactions)"; }
}

: > results
echo "pgbench: $CLIENTS clients, $DURATION s, scale $SCALE, synchronous_commit = on; [stream] $STREAM_SETTINGS"
for r in $(seq 1 "$RUNS"); do
  # Alternate the order each round.
  order=$VARIANTS
  [ $((r % 2)) = 0 ] && order=$(tr ' ' '\n' <<<"$VARIANTS" | tac | tr '\n' ' ')
  for v in $order; do run_variant "$v" "$r"; done
done
python3 - results <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for v, tps, avg, p99, n in rows:
    by.setdefault(v, []).append((float(tps), float(avg), float(p99)))
med = {v: tuple(statistics.median(x[i] for x in r) for i in range(3)) for v, r in by.items()}
base = med.get("none")
print("\n| variant | runs | tps (median) | latency avg | latency p99 | tps vs none | avg vs none |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for v, (tps, avg, p99) in med.items():
    rt = f"{tps / base[0]:.2f}" if base else "-"
    ra = f"{avg / base[1]:.2f}×" if base else "-"
    print(f"| {v} | {len(by[v])} | {tps:.0f} | {avg:.2f} ms | {p99:.2f} ms | {rt} | {ra} |")
if "ws-sync" in med and "pgrw-sync" in med:
    print(f"\nws-sync / pgrw-sync: tps {med['ws-sync'][0] / med['pgrw-sync'][0]:.2f}, "
          f"avg latency {med['ws-sync'][1] / med['pgrw-sync'][1]:.2f}×")
PY
