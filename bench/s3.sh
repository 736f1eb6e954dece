#!/usr/bin/env bash
# Benchmark (not a test): walshipper to an S3-compatible store (SeaweedFS on
# this host) beside the same work to a posix repository: archive-push
# latency per segment, full backup and restore (wall, CPU, peak memory of the
# process tree), and one multi-gigabyte object streamed through the data path
# (peak memory must stay bounded). pgBackRest is not run here: it speaks S3
# only over TLS, and the test store is plain HTTP.
# Run as root: bash bench/s3.sh   (SCALE=20, SEGMENTS=24, BIG_GIB=3 by default)
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
bash "$REPO_TOP/scripts/setup.sh" >/dev/null
sync_tree
as_test_user bash -c 'cd "$HOME/../src" && cargo build --release -p walshipper --locked -q --bin walshipper --example big_object'
B=$PGB_ROOT/bench-s3
fresh_bench_dir "$B"
as_test_user bash "$PGB_ROOT/src/scripts/s3-server.sh" start
as_test_user env B="$B" BIN="$PGB_ROOT/target/release/walshipper" BIG="$PGB_ROOT/target/release/examples/big_object" \
  M="$PGB_ROOT/src/bench/measure.py" SCALE="${SCALE:-20}" SEGMENTS="${SEGMENTS:-24}" BIG_GIB="${BIG_GIB:-3}" \
  bash -euo pipefail -c '
  cd "$B"; mkdir sock wal
  head -c 48 /dev/urandom | base64 > passphrase; chmod 600 passphrase
  common="[encryption]
passphrase_file = \"$B/passphrase\"
key_cache_dir = \"$B/keycache\"
[compression]
level = 3
[pg]
data_dir = \"$B/pg\"
host = \"$B/sock\""
  printf "[repo]\ntype = \"posix\"\npath = \"%s\"\n%s\n" "$B/posix-repo" "$common" > posix.toml
  printf "[repo]\ntype = \"s3\"\nbucket = \"walshipper-test\"\nprefix = \"bench-%s\"\nendpoint = \"http://127.0.0.1:18333\"\nforce_path_style = true\naccess_key_id = \"testkey\"\nsecret_access_key = \"testsecret\"\n%s\n" "$$" "$common" > s3.toml
  chmod 600 s3.toml  # it holds a secret: walshipper refuses it otherwise
  initdb -D pg -U postgres -A trust -k --no-sync >/dev/null
  cat >> pg/postgresql.conf <<CONF
listen_addresses = '"''"'
unix_socket_directories = '"'"'$B/sock'"'"'
archive_mode = on
archive_command = '"'"'cp %p $B/wal/%f && $BIN --config $B/posix.toml archive-push %p && $BIN --config $B/s3.toml archive-push %p'"'"'
max_wal_size = 2GB
CONF
  "$BIN" --config posix.toml repo-init >/dev/null
  "$BIN" --config s3.toml repo-init >/dev/null
  pg_ctl -D pg -l pg.log -w start >/dev/null
  echo "loading pgbench scale $SCALE and a less compressible table..."
  pgbench -h "$B/sock" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  psql -h "$B/sock" -U postgres -qc "CREATE TABLE rnd AS SELECT g, md5(random()::text) AS v FROM generate_series(1, $((SCALE * 20000))) g" postgres
  psql -h "$B/sock" -U postgres -qc "CHECKPOINT" postgres
  echo "database: $(psql -h "$B/sock" -U postgres -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))" postgres)"
  for repo in posix s3; do
    python3 "$M" "$BIN" --config $repo.toml backup --jobs 2 > $repo-backup.json
    python3 "$M" "$BIN" --config $repo.toml restore --target-dir "$B/r-$repo" --jobs 2 > $repo-restore.json
    rm -rf "$B/r-$repo"
  done
  pg_ctl -D pg -m fast -w stop >/dev/null
  ls wal | grep -E "^[0-9A-F]{24}$" | head -n "$SEGMENTS" > segments.txt
  # Fresh repositories for the push timing, pushes alternating between them.
  sed -i "s#posix-repo#posix-repo2#" posix.toml; sed -i "s#prefix = \"bench-#prefix = \"bench2-#" s3.toml
  "$BIN" --config posix.toml repo-init >/dev/null; "$BIN" --config s3.toml repo-init >/dev/null
  python3 "$(dirname "$M")/s3_report.py" "$B" "$BIN"
  echo; echo "one object of ${BIG_GIB} GiB (incompressible) through the data path to S3 and back:"
  "$BIG" s3.toml "$BIG_GIB"
'
as_test_user bash "$PGB_ROOT/src/scripts/s3-server.sh" stop
