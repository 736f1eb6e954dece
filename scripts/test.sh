#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit tests, integration tests
# against real PostgreSQL clusters, the extension's #[pg_test]s and
# pg_regress tests. Run as root on Debian 12: sudo bash scripts/test.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$REPO_TOP/scripts/setup.sh"

log "copying the tree to $PGB_ROOT/src (built and tested as $TEST_USER)"
sync_tree

# A fresh S3 test server for this run, owned by $TEST_USER so that the
# outage test can kill and restart it. Sockets a root-started weed left in
# /tmp would stop it from starting.
as_test_user bash "$PGB_ROOT/src/scripts/s3-server.sh" stop
find /tmp -maxdepth 1 -name 'seaweedfs-*.sock' ! -user "$TEST_USER" -delete 2>/dev/null || true
rm -rf "$PGB_ROOT/s3/data"
log "starting the S3 test server (SeaweedFS)"
as_test_user bash "$PGB_ROOT/src/scripts/s3-server.sh" start
trap 'as_test_user bash "$PGB_ROOT/src/scripts/s3-server.sh" stop || true' EXIT

as_test_user bash -euo pipefail -c '
  cd "$HOME/../src"
  echo "==> cargo fmt --check"; cargo fmt --all -- --check
  echo "==> cargo clippy"; cargo clippy --workspace --all-targets --locked -- -D warnings
  echo "==> installing pg_backup_ext for the integration tests"
  (cd pg_backup_ext && cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null)
  export PGB_TEST_S3_ENDPOINT=http://127.0.0.1:18333
  echo "==> walshipper: unit tests, storage conformance (posix, S3), integration tests on posix"
  cargo test -p walshipper --locked -- --test-threads=2
  echo "==> walshipper: the archive, backup, point-in-time and hostile-repository suites again on S3"
  PGB_TEST_BACKEND=s3 cargo test -p walshipper --locked --test archive --test backup --test incremental --test hostile_objects --test hostile_manifests --test hostile_restore --test streaming -- --test-threads=2
  echo "==> walshipper: object store killed under load (alone: it stops the S3 server)"
  PGB_TEST_S3_CTL="$PWD/scripts/s3-server.sh" cargo test -p walshipper --locked --test s3_outage
  echo "==> walshipper: recovery under a failing store (alone: starts and stops an S3 server of its own)"
  PGB_TEST_S3_CTL="$PWD/scripts/s3-server.sh" cargo test -p walshipper --locked --test recovery_faults recovery_stops
  cd pg_backup_ext
  echo "==> pg_backup_ext: #[pg_test]"; cargo pgrx test pg15
  echo "==> pg_backup_ext: pg_regress"
  trap "cargo pgrx stop pg15 >/dev/null 2>&1 || true" EXIT
  cargo pgrx regress pg15 --resetdb
'
log "all tests passed"
