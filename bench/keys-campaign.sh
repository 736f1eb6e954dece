#!/usr/bin/env bash
# The key-management campaign of issue 16 at full size (CI runs the short
# setting): walshipper/tests/keys_{passphrase,rotation,retire}.rs with
# PGB_KEY_CAMPAIGN=full, against a posix repository and its copy on the S3
# test server:
# - keys_passphrase: the change killed at each of its steps, plus --keep-old
#   and --finish walked the same way;
# - keys_rotation: the rotation crash walk three times under pgbench;
# - keys_retire: more crash points and seeded SIGKILLs of key retire under a
#   bandwidth limit, every object verified after each.
# Prints the seed (PGB_KEY_SEED=N replays keys_retire's kills).
# Run as root: bash bench/keys-campaign.sh   (about 3 minutes; passed 2026-11-26)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" = 0 ]; then
  source "$here/../scripts/lib.sh"
  bash "$REPO_TOP/scripts/setup.sh" >/dev/null
  sync_tree
  as_test_user bash "$PGB_ROOT/src/scripts/s3-server.sh" start
  trap 'as_test_user bash "$PGB_ROOT/src/scripts/s3-server.sh" stop || true' EXIT
  as_test_user env PGB_KEY_SEED="${PGB_KEY_SEED:-}" PGB_TEST_S3_ENDPOINT=http://127.0.0.1:18333 \
    bash "$PGB_ROOT/src/bench/keys-campaign.sh"
  exit
fi
cd "$here/.."
export PGB_KEY_CAMPAIGN=full
exec cargo test -p walshipper --locked --test keys_passphrase --test keys_rotation --test keys_retire \
  -- --nocapture --test-threads=1
