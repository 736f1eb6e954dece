#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit tests, integration tests
# against real PostgreSQL clusters, the extension's #[pg_test]s and
# pg_regress tests. Run as root on Debian 12: sudo bash scripts/test.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$REPO_TOP/scripts/setup.sh"

log "copying the tree to $PGB_ROOT/src (built and tested as $TEST_USER)"
sync_tree

as_test_user bash -euo pipefail -c '
  cd "$HOME/../src"
  echo "==> cargo fmt --check"; cargo fmt --all -- --check
  echo "==> cargo clippy"; cargo clippy --workspace --all-targets --locked -- -D warnings
  echo "==> installing pg_backup_ext for the integration tests"
  (cd pg_backup_ext && cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null)
  echo "==> walshipper: unit and integration tests"
  cargo test -p walshipper --locked -- --test-threads=2
  cd pg_backup_ext
  echo "==> pg_backup_ext: #[pg_test]"; cargo pgrx test pg15
  echo "==> pg_backup_ext: pg_regress"
  trap "cargo pgrx stop pg15 >/dev/null 2>&1 || true" EXIT
  cargo pgrx regress pg15 --resetdb
'
log "all tests passed"
