#!/usr/bin/env bash
# Benchmark (not a test): walshipper beside pgBackRest 2.59.1 with its best
# settings (file bundling and block incremental on), on one cluster and the
# same data in one run: zstd level 3, encryption, 2 processes each, posix
# repositories, data checksums on. Each round takes a full backup, changes a
# clustered 1 % (below), takes an incremental, changes another 1 %, takes a
# second incremental, restores the full + incr + incr chain and the full
# alone (alternating which of the two goes first), each step with both tools,
# which alternate going first round by round; then RESTORE_PAIRS (4) more
# chain / full-alone pairs of the last round's backups. Each chain is also
# restored into a tmpfs (/dev/shm, when it has room), where writing costs only
# a copy: the ratio there is the tools' own, with this disk's write rate out
# of it. Then the newest chain of each tool is started and compared with the
# source, and the machine's limit is measured on the same data. Prints
# medians of wall time, CPU time, peak RSS of the process tree and bytes
# stored, the ratios, and the issue 17 targets, met or not.
#
# Run as root: bash bench/backup-restore.sh   (SCALE=50 RUNS=3 by default;
# SCALE=10 RUNS=1 takes about two minutes). WALSHIPPER_BIN=path skips the
# release build and uses that binary; PGBR=path uses that pgBackRest 2.59.1;
# KEEP=1 keeps the clusters and repositories in $PGB_ROOT/bench-backup.
#
# "A clustered 1 %": each change updates a contiguous 1 % of pgbench_accounts
# (rows that change together, as recent rows usually do) and appends 0.1 % to
# pgbench_history. Random updates of 1 % of rows would touch far more pages
# (about 60 rows per page) and no page-granular tool could store 1 %.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
source "$(dirname "$0")/pgbackrest-bin.sh"
bash "$REPO_TOP/scripts/setup.sh" --minimal >/dev/null
PGBR=$(pgbackrest_bin)
sync_tree
BIN=${WALSHIPPER_BIN:-$PGB_ROOT/target/release/walshipper}
[ -n "${WALSHIPPER_BIN:-}" ] || as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
# b3sum prices the whole-file hash (BLAKE3) in the machine's limit.
B3SUM=$PGB_ROOT/tools/bin/b3sum
[ -x "$B3SUM" ] || { install -d -o "$TEST_USER" "$PGB_ROOT/tools"; as_test_user bash -c "cargo install b3sum --locked -q --root '$PGB_ROOT/tools'"; }
B=$PGB_ROOT/bench-backup
fresh_bench_dir "$B"

read -r -d '' RUN <<'SCRIPT' || true
source "$BENCH/two_tools.sh"
M="$BENCH/measure.py"
PSQL="psql -h $B/sock -U postgres -qAt postgres"
echo "loading pgbench scale $SCALE and a less compressible table..."
pgbench -h "$B/sock" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
$PSQL -c "CREATE TABLE rnd AS SELECT g, md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, $((SCALE * 20000))) g"
$PSQL -c "CHECKPOINT"
ROWS=$((SCALE * 100000)); STEP=$((ROWS / 100))
change() {  # a contiguous 1 % of the accounts, 0.1 % appended to history
  local from=$(( ($1 * STEP * 7) % (ROWS - STEP) + 1 ))
  $PSQL -c "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN $from AND $((from + STEP - 1))"
  $PSQL -c "INSERT INTO pgbench_history SELECT 1, 1, g % $ROWS + 1, 1, now() FROM generate_series(1, $((STEP / 10))) g"
  $PSQL -c "CHECKPOINT"
}
# Bytes in a repository outside its WAL archive.
stored() { find "$1" -path "$1/$2" -prune -o -type f -printf "%s\n" | awk '{s += $1} END {print s + 0}'; }
# one TOOL STEP CMD...: runs CMD measured and records it with what the repository grew by.
one() {
  local tool=$1 step=$2 repo=ws-repo wal=wal before after m; shift 2
  [ "$tool" = pgbr ] && { repo=pgbr-repo; wal=archive; }
  sync  # the previous step's writes are not left for this one to flush
  before=$(stored $repo $wal)
  m=$(MEASURE_STDOUT=stderr python3 "$M" "$@" 2>>"$tool.log") || { echo "$tool $step failed: $m"; tail -5 "$tool.log"; exit 1; }
  after=$(stored $repo $wal)
  echo "{\"round\": $r, \"tool\": \"$tool\", \"step\": \"$step\", \"stored\": $((after - before)), \"m\": $m}" >> results.jsonl
}
WS=("$BIN" --config walshipper.toml)
PB=("$PGBR" --config="$B/pgbackrest.conf" --stanza=bench)
ws_full() { one ws full "${WS[@]}" backup --jobs 2; WS_FULL=$(ls ws-repo/backups | tail -1); }
pb_full() { one pgbr full "${PB[@]}" --type=full backup; PB_FULL=$(ls pgbr-repo/backup/bench | grep -E "^[0-9]{8}-[0-9]{6}F$" | tail -1); }
ws_incr() { one ws "$step" "${WS[@]}" backup --type incr --jobs 2; }
pb_incr() { one pgbr "$step" "${PB[@]}" --type=incr backup; }
ws_chain() { rm -rf r-ws; one ws chain "${WS[@]}" restore --target-dir "$B/r-ws" --target immediate --target-action promote --jobs 2; }
pb_chain() { rm -rf r-pb; one pgbr chain "${PB[@]}" --pg1-path="$B/r-pb" --type=immediate --target-action=promote restore; }
# The chain again into a tmpfs: the same restore with the disk taken out.
# In a directory of our own (0700, /dev/shm is everyone's), removed however
# the run ends: a restore left there holds a gigabyte of RAM.
MEM_OK=$(( $(df --output=avail -B1 /dev/shm 2>/dev/null | tail -1 || echo 0) > 3 * $(du -sb pg | cut -f1) ))
if [ "$MEM_OK" = 1 ]; then
  MEMD=$(mktemp -d /dev/shm/pg_backup-bench.XXXXXX); MEM=$MEMD/restore
  trap 'rm -rf "$MEMD"' EXIT
fi
ws_chainmem() { rm -rf "$MEM"; one ws chainmem "${WS[@]}" restore --target-dir "$MEM" --target immediate --target-action promote --jobs 2; rm -rf "$MEM"; }
pb_chainmem() { rm -rf "$MEM"; one pgbr chainmem "${PB[@]}" --pg1-path="$MEM" --type=immediate --target-action=promote restore; rm -rf "$MEM"; }
ws_fullonly() { one ws fullonly "${WS[@]}" restore --backup "$WS_FULL" --target-dir "$B/r-full" --target immediate --jobs 2; rm -rf r-full; }
pb_fullonly() { one pgbr fullonly "${PB[@]}" --set="$PB_FULL" --pg1-path="$B/r-full" --type=immediate restore; rm -rf r-full; }
both() {  # STEP: both tools, walshipper first in odd rounds
  if [ $((r % 2)) = 1 ]; then "ws_$1"; "pb_$1"; else "pb_$1"; "ws_$1"; fi
}
: > results.jsonl
for r in $(seq 1 "$RUNS"); do
  echo "round $r of $RUNS"
  both full
  for step in incr1 incr2; do change $((r * 2 + ${step#incr})); both incr; done
  # The chain and the full alone alternate which goes first: the first
  # restore of a round reads the full's objects from disk, the second may
  # find them in the page cache.
  if [ $((r % 2)) = 1 ]; then both chain; both fullonly; else both fullonly; both chain; fi
  if [ "$MEM_OK" = 1 ]; then both chainmem; fi
done
# More chain / full-alone pairs of the last round's backups (both tools,
# alternating): the two differ by a few percent at most, less than one
# restore's noise, so the comparison needs more than RUNS pairs.
for r in $(seq $((RUNS + 1)) $((RUNS + RESTORE_PAIRS))); do
  if [ $((r % 2)) = 1 ]; then both chain; both fullonly; else both fullonly; both chain; fi
  if [ "$MEM_OK" = 1 ]; then both chainmem; fi
done

# The machine's limit on the same data (the relation files, in the page
# cache as they were for the backups): the CPU time of the work itself,
# each tool reading the files directly (no pipes), and the time to write as
# many bytes with fsync. The report divides the CPU by the cores.
find pg/base pg/global -type f ! -name 'pg_internal.init*' -print0 > relfiles
REL=$(find pg/base pg/global -type f ! -name 'pg_internal.init*' -printf "%s\n" | awk '{s += $1} END {print s + 0}')
xargs -0 cat < relfiles | zstd -3 -q -c > limit.zst
for i in $(seq 1 "$RUNS"); do
  python3 "$M" bash -c 'xargs -0 zstd -3 -q -c < relfiles' >> limit-compress.jsonl
  python3 "$M" bash -c 'xargs -0 zstd -1 -q -c < relfiles' >> limit-compress1.jsonl
  python3 "$M" bash -c "xargs -0 $B3SUM --no-mmap < relfiles" >> limit-hash.jsonl
  python3 "$M" zstd -d -q -c limit.zst >> limit-decompress.jsonl
  sync; python3 "$M" dd if=/dev/zero of=limit.out bs=1M count=$((REL >> 20)) conv=fsync status=none >> limit-write.jsonl; rm limit.out
done
echo "{\"scale\": $SCALE, \"runs\": $RUNS, \"restore_pairs\": $RESTORE_PAIRS, \"db_bytes\": $($PSQL -c "SELECT pg_database_size(current_database())"), \"rel_bytes\": $REL, \"cpus\": $(nproc), \"pgbr\": \"$("$PGBR" version)\"}" > meta.json
rm -f limit.zst

# The newest chain of each tool, started, holds what the source holds.
sums() {
  $PSQL -c "SELECT md5(string_agg(abalance::text, ',' ORDER BY aid)) FROM pgbench_accounts" \
        -c "SELECT count(*) || '/' || sum(aid) FROM pgbench_history" \
        -c "SELECT md5(string_agg(v, '' ORDER BY g)) FROM rnd"
}
want=$(sums)
pg_ctl -D pg -m fast -w stop >/dev/null
for d in r-ws r-pb; do
  # archive_mode off: the restored cluster must not archive into the repositories
  pg_ctl -D "$d" -o "-c archive_mode=off" -l "$d.log" -w start >/dev/null
  for _ in $(seq 120); do [ "$($PSQL -c "SELECT pg_is_in_recovery()")" = f ] && break; sleep 1; done
  got=$(sums)
  pg_ctl -D "$d" -m fast -w stop >/dev/null
  [ "$got" = "$want" ] || { echo "$d: THE RESTORED CHAIN DIFFERS FROM THE SOURCE"; exit 1; }
done
echo "check: both restored chains (full + incr + incr), started, equal the source (accounts, history, rnd)"
echo
python3 "$BENCH/backup_report.py" "$B"
[ "${KEEP:-}" = 1 ] || rm -rf pg r-ws r-pb ws-repo pgbr-repo relfiles
SCRIPT

as_test_user env B="$B" BIN="$BIN" PGBR="$PGBR" B3SUM="$B3SUM" BENCH="$PGB_ROOT/src/bench" \
  SCALE="${SCALE:-50}" RUNS="${RUNS:-3}" RESTORE_PAIRS="${RESTORE_PAIRS:-4}" KEEP="${KEEP:-}" bash -euo pipefail -c "$RUN"
