#!/usr/bin/env bash
# Fuzzing campaign of issue 12 (not part of CI): every parser of repository
# bytes fed ~10 million mutated inputs by walshipper/tests/fuzz.rs in a
# release build, two targets at a time, each case in a child process under
# an address-space limit. Prints per target the cases, panics, timeouts
# (> 1 s) and crashes (aborts, failed allocations), and the seed; exits
# non-zero on any finding. About 3 minutes on 2 cores after the release build (10.6 million cases).
# Run as root: bash bench/fuzz.sh   (or, as the test user inside a built
# source tree, the same command: it then runs in place).
# Environment (all optional):
#   PGB_FUZZ_SEED=N          replay a run (printed at the start and end)
#   PGB_FUZZ_SCALE=full      or ci, or a number of cases per target
#   PGB_FUZZ_TARGETS=a,b     only these targets (header, object, manifest,
#                            blockmap, delta, keyfile, descriptor, walname,
#                            walpage, layout, lease)
#   PGB_FUZZ_JOBS=2          targets run at once
#   PGB_FUZZ_REPLAY=t:n      rebuild case n of target t from the seed, print
#                            and run it
#   FUZZ_MEM_KIB=4194304     ulimit -v of the whole run (children: 2 GiB)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" = 0 ]; then
  source "$here/../scripts/lib.sh"
  bash "$REPO_TOP/scripts/setup.sh" --minimal >/dev/null
  sync_tree
  as_test_user env PGB_FUZZ_SEED="${PGB_FUZZ_SEED:-}" PGB_FUZZ_SCALE="${PGB_FUZZ_SCALE:-full}" \
    PGB_FUZZ_TARGETS="${PGB_FUZZ_TARGETS:-}" PGB_FUZZ_JOBS="${PGB_FUZZ_JOBS:-2}" \
    PGB_FUZZ_REPLAY="${PGB_FUZZ_REPLAY:-}" FUZZ_MEM_KIB="${FUZZ_MEM_KIB:-4194304}" \
    bash "$PGB_ROOT/src/bench/fuzz.sh"
  exit
fi
cd "$here/.."
# Integer overflow is a finding too (a release build would wrap silently).
export CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true
cargo test --release -p walshipper --locked --test fuzz --no-run -q
# Nothing a repository holds may make a parser allocate without limit.
ulimit -v "${FUZZ_MEM_KIB:-4194304}"
export PGB_FUZZ_SCALE="${PGB_FUZZ_SCALE:-full}" PGB_FUZZ_STRICT=1
exec cargo test --release -p walshipper --locked --test fuzz fuzz_campaign -- --nocapture
