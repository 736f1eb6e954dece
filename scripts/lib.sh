# Shared settings for the scripts. Sourced, not run.
# Everything slow to rebuild (toolchain copy, crates, target/) lives under
# $PGB_ROOT, outside the clone, so a fresh clone reuses it.
PGB_ROOT=${PGB_ROOT:-/var/tmp/pg_backup}
PG_MAJOR=${PG_MAJOR:-15}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/$PG_MAJOR/bin}
PGRX_VERSION=0.18.1
TEST_USER=${TEST_USER:-postgres}
# The S3-compatible test server (SeaweedFS), installed by setup.sh.
S3_VENV=${S3_VENV:-$PGB_ROOT/s3-venv}
SEAWEEDFS_VERSION=4.48
REPO_TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The Rust toolchain copy readable by $TEST_USER (/root is 0700).
rust_copy_dir() {
  local ver; ver=$(rustc --version | awk '{print $2}')
  echo "/opt/rust-$ver"
}

# Runs a command as $TEST_USER with the project's toolchain and caches.
as_test_user() {
  runuser -u "$TEST_USER" -- env -i \
    HOME="$PGB_ROOT/home" USER="$TEST_USER" LOGNAME="$TEST_USER" LANG=C.UTF-8 \
    PATH="$(rust_copy_dir)/bin:/usr/local/bin:$PG_BIN:/usr/bin:/bin" \
    CARGO_HOME="$PGB_ROOT/cargo-home" PGRX_HOME="$PGB_ROOT/pgrx-home" \
    CARGO_TARGET_DIR="$PGB_ROOT/target" CARGO_TERM_COLOR=never \
    PG_CONFIG="$PG_CONFIG" PG_BIN="$PG_BIN" CI="${CI:-}" \
    WEED="$S3_VENV/bin/weed" S3_DIR="$PGB_ROOT/s3" \
    "$@"
}

# An empty directory DIR for a benchmark, owned by $TEST_USER. A server an
# earlier, aborted run left running in it is stopped first: removed from
# under it, it would notice its lock file gone a minute later and, shutting
# down, remove the socket files of the new run's server at the same path.
fresh_bench_dir() {
  local pid
  if [ -d "$1" ]; then
    while IFS= read -r pid; do
      as_test_user pg_ctl -D "$(dirname "$pid")" -m immediate -w stop >/dev/null 2>&1 || true
    done < <(find "$1" -maxdepth 3 -name postmaster.pid 2>/dev/null)
  fi
  rm -rf "$1"; install -d -o "$TEST_USER" "$1"
}

# Copies the working tree (without target/ and .git) to where $TEST_USER builds.
sync_tree() {
  local dest="$PGB_ROOT/src"
  rm -rf "$dest.new"
  mkdir -p "$dest.new"
  tar -C "$REPO_TOP" --exclude=./target --exclude=./.git -cf - . | tar -C "$dest.new" -xf -
  rm -rf "$dest"
  mv "$dest.new" "$dest"
  chown -R "$TEST_USER:$TEST_USER" "$dest"
}
