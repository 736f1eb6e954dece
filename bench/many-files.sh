#!/usr/bin/env bash
# Benchmark (not a test): a cluster with many small relations (tables of one
# row, one 8 KiB file each), grown in steps, walshipper beside pgBackRest
# 2.59.1 (bundle + block, zstd 3, encryption, 2 processes, posix
# repositories). At each step: full backup, 1 % of the tables changed,
# incremental, restore of the chain, each restore's base/ compared byte for
# byte with the source; wall, CPU, peak RSS of the process tree, objects each
# backup added, time per 1000 files: time should grow linearly and memory stay
# flat. At the first step the cycle runs again against the S3
# test server through a counting proxy (bench/s3_count_proxy.py; pgBackRest
# over TLS to it), printing requests per command by method.
# Run as root: bash bench/many-files.sh
#   FILES="25000 50000 100000" (tables per step), RUNS=1, SHORT=1 for FILES="2000 5000" and RUNS=3,
#   S3_FILES (the step with the S3 phase; 0 = none), BIN=walshipper to use (else built here).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
if [ -n "${SHORT:-}" ]; then FILES=${FILES:-2000 5000}; RUNS=${RUNS:-3}; fi
FILES=${FILES:-25000 50000 100000}
PGBR=/var/tmp/pgbackrest-2.59.1/build/src/pgbackrest
if [ ! -x "$PGBR" ]; then
  for s in "$REPO_TOP/../shared/peers/build-pgbackrest.sh" /work/shared/peers/build-pgbackrest.sh; do
    [ -f "$s" ] && { PGBR=$(bash "$s"); break; }
  done
fi
[ -x "$PGBR" ] || die "pgBackRest 2.59.1 missing and ../shared/peers/build-pgbackrest.sh not found"
if [ -z "${BIN:-}" ]; then
  bash "$REPO_TOP/scripts/setup.sh" --minimal >/dev/null
  sync_tree
  as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q'
  BIN=$PGB_ROOT/target/release/walshipper
fi
B=${B:-$PGB_ROOT/bench-many-files}
fresh_bench_dir "$B"
# Started if it is not running; never stopped here (it is shared).
as_test_user bash "$REPO_TOP/scripts/s3-server.sh" start
as_test_user env B="$B" BIN="$BIN" PGBR="$PGBR" HERE="$REPO_TOP/bench" FILES="$FILES" RUNS="${RUNS:-1}" \
  S3_FILES="${S3_FILES:-${FILES%% *}}" python3 -u "$REPO_TOP/bench/many_files.py"
rm -rf "$B"/pg "$B"/ws-repo "$B"/pgbr-repo "$B"/r-*
