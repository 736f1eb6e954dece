# Sourced by the backup benchmarks, as the test user, with B (a fresh
# directory), BIN (walshipper) and PGBR (pgBackRest 2.59.1) set: one
# PostgreSQL 15 cluster (data checksums on) archiving to both tools, each
# with its best settings and configured alike: zstd level 3, encryption,
# 2 processes, posix repositories; pgBackRest with file bundling and block
# incremental (repo1-bundle, repo1-block). Started.
# archive_command runs both tools' archive-push at once (the script
# archive-walshipper-pgbackrest.sh), so neither tool's backup waits for the
# other's push to finish first, but each backup's WAL wait shares the cores
# with both pushes.
cd "$B"; mkdir sock pgbr-log
head -c 48 /dev/urandom | base64 > passphrase; chmod 600 passphrase
cat > walshipper.toml <<CONF
[pg]
data_dir = "$B/pg"
host = "$B/sock"
[repo]
path = "$B/ws-repo"
[encryption]
passphrase_file = "$B/passphrase"
key_cache_dir = "$B/keycache"
[compression]
level = 3
CONF
cat > pgbackrest.conf <<CONF
[global]
repo1-path=$B/pgbr-repo
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$(cat passphrase)
repo1-bundle=y
repo1-block=y
compress-type=zst
compress-level=3
process-max=2
start-fast=y
repo1-retention-full=99
log-path=$B/pgbr-log
lock-path=$B/pgbr-log
log-level-console=warn
log-level-file=off
[bench]
pg1-path=$B/pg
pg1-socket-path=$B/sock
CONF
cat > archive-walshipper-pgbackrest.sh <<SH
#!/bin/bash
# archive_command: both pushes at once; fails if either fails. (pgBackRest
# refuses an archive_command without "pgbackrest" in it.)
"$BIN" --config "$B/walshipper.toml" archive-push "\$1" & ws=\$!
"$PGBR" --config="$B/pgbackrest.conf" --stanza=bench archive-push "\$1" & pb=\$!
wait \$ws; rc=\$?; wait \$pb || exit
exit \$rc
SH
chmod +x archive-walshipper-pgbackrest.sh
initdb -D pg -U postgres -A trust -k >/dev/null
cat >> pg/postgresql.conf <<CONF
listen_addresses = ''
unix_socket_directories = '$B/sock'
archive_mode = on
archive_command = '$B/archive-walshipper-pgbackrest.sh %p'
max_wal_size = 4GB
shared_buffers = 256MB
CONF
"$BIN" --config walshipper.toml repo-init >/dev/null
pg_ctl -D pg -l pg.log -w start >/dev/null
"$PGBR" --config="$B/pgbackrest.conf" --stanza=bench stanza-create >/dev/null
