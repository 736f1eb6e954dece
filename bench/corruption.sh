#!/usr/bin/env bash
# The corruption campaign of issue 12 at full size (CI runs 200 cases):
# walshipper/tests/corruption.rs with 2000 random corruptions of a real
# repository (release build), every one required to be detected by verify
# and refused by archive-get / restore. Prints a table of corruption class x
# object kind and the seed; exits non-zero on any finding (strict: the
# test's list of findings still expected open is ignored).
# Run as root: bash bench/corruption.sh   (or as the test user in place).
# Environment: PGB_CORRUPTIONS=2000, PGB_CORRUPTION_SEED=N (replay),
# PGB_CORRUPTION_CASE=n (one case, its directory kept).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" = 0 ]; then
  source "$here/../scripts/lib.sh"
  bash "$REPO_TOP/scripts/setup.sh" --minimal >/dev/null
  sync_tree
  as_test_user env PGB_CORRUPTIONS="${PGB_CORRUPTIONS:-2000}" \
    PGB_CORRUPTION_SEED="${PGB_CORRUPTION_SEED:-}" PGB_CORRUPTION_CASE="${PGB_CORRUPTION_CASE:-}" \
    PGB_CORRUPTION_STRICT="${PGB_CORRUPTION_STRICT:-1}" \
    bash "$PGB_ROOT/src/bench/corruption.sh"
  exit
fi
cd "$here/.."
# The same release build as bench/fuzz.sh (overflow checks on).
export CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true
export PGB_CORRUPTIONS="${PGB_CORRUPTIONS:-2000}" PGB_CORRUPTION_STRICT="${PGB_CORRUPTION_STRICT:-1}"
exec cargo test --release -p walshipper --locked --test corruption -- --nocapture
