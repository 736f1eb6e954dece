# Sourced (as root) by the benchmarks that run pgBackRest, after scripts/lib.sh.
# pgbackrest_bin prints the path of pgBackRest 2.59.1 (the newest release: file
# bundling and block incremental, which Debian's 2.45 lacks), building it with
# ../shared/peers/build-pgbackrest.sh when it is missing, and checks that the
# test user can run it. PGBR=/path/to/pgbackrest overrides.
pgbackrest_bin() {
  local bin=${PGBR:-} script
  if [ -z "$bin" ]; then
    for script in "${PGBR_BUILD_SCRIPT:-}" "$REPO_TOP/../shared/peers/build-pgbackrest.sh" \
                  /work/shared/peers/build-pgbackrest.sh; do
      [ -n "$script" ] && [ -f "$script" ] && break
    done
    [ -f "$script" ] || die "build-pgbackrest.sh not found (set PGBR_BUILD_SCRIPT, or PGBR to a pgBackRest 2.59.1 binary)"
    bin=$(bash "$script" | tail -1)
  fi
  as_test_user "$bin" version | grep -q '^pgBackRest 2\.59\.1$' \
    || die "$bin is not pgBackRest 2.59.1 runnable by $TEST_USER (chmod -R a+rX its directory)"
  echo "$bin"
}
