#!/usr/bin/env python3
"""One crash drill (bench/crash-drill.sh runs it per mode; read its header).

Usage: crash_drill.py WORKDIR WALSHIPPER MODE SEED

In WORKDIR (fresh, owned by the caller): a PostgreSQL cluster archiving to
a walshipper repository in MODE (archive, async, stream, sync), a full
backup, then pgbench at a fixed rate and a marker row committed every
100 ms; at a moment drawn from SEED the primary is destroyed (SIGKILL to
the postmaster, every backend and every walshipper process of the drill,
then the data directory and the local spool removed: the host is gone),
the latest point is restored from the repository alone and started, and
the markers are compared. Prints one JSON line: the markers committed
(acknowledged to the client) and restored, the RPO as time and as
markers, and the RTO (destruction to a restored server accepting writes).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

WORK, BIN, MODE, SEED = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
RATE = int(os.environ.get("DRILL_RATE", "200"))  # pgbench transactions per second
SCALE = int(os.environ.get("DRILL_SCALE", "5"))
KILL_MIN = float(os.environ.get("DRILL_KILL_MIN", "8"))
KILL_MAX = float(os.environ.get("DRILL_KILL_MAX", "20"))
ARCHIVE_TIMEOUT = int(os.environ.get("DRILL_ARCHIVE_TIMEOUT", "60"))
SOCK = os.path.join(WORK, "sock")
PG = os.path.join(WORK, "pg")
SPOOL = os.path.join(WORK, "spool")
CONF = os.path.join(WORK, "walshipper.toml")


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def psql(sql, data_dir_sock=SOCK):
    out = subprocess.run(
        ["psql", "-h", data_dir_sock, "-U", "postgres", "-qAtX", "-d", "postgres", "-c", sql],
        check=True, capture_output=True, text=True)
    return out.stdout.strip()


def setup():
    os.makedirs(SOCK)
    os.makedirs(SPOOL)
    with open(os.path.join(WORK, "passphrase"), "w") as f:
        f.write(os.urandom(36).hex())
    os.chmod(os.path.join(WORK, "passphrase"), 0o600)
    conf = f"""[pg]
data_dir = "{PG}"
host = "{SOCK}"
[repo]
path = "{WORK}/repo"
[encryption]
passphrase_file = "{WORK}/passphrase"
key_cache_dir = "{WORK}/keycache"
"""
    if MODE == "async":
        conf += f"""[archive]
async = true
spool_dir = "{SPOOL}"
"""
    if MODE in ("stream", "sync"):
        conf += f"""[stream]
slot = "drill"
synchronous = {"true" if MODE == "sync" else "false"}
"""
    with open(CONF, "w") as f:
        f.write(conf)
    sh("initdb", "-D", PG, "-U", "postgres", "-A", "trust", "-k", "--no-sync",
       stdout=subprocess.DEVNULL)
    with open(os.path.join(PG, "postgresql.conf"), "a") as f:
        f.write(f"""
listen_addresses = ''
unix_socket_directories = '{SOCK}'
archive_mode = on
archive_command = '{BIN} --config {CONF} archive-push %p'
archive_timeout = {ARCHIVE_TIMEOUT}
max_wal_senders = 5
max_replication_slots = 5
""")
    sh(BIN, "--config", CONF, "repo-init", stdout=subprocess.DEVNULL)
    sh("pg_ctl", "-D", PG, "-l", os.path.join(WORK, "pg.log"), "-w", "start",
       stdout=subprocess.DEVNULL)
    sh("pgbench", "-h", SOCK, "-U", "postgres", "-i", "-s", str(SCALE), "-q", "postgres",
       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    psql("CREATE TABLE marker (n integer PRIMARY KEY, t timestamptz NOT NULL)")
    sh(BIN, "--config", CONF, "backup", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def destroy(procs):
    """The host is gone: every process of the drill killed at once, then its disk."""
    pid = int(open(os.path.join(PG, "postmaster.pid")).readline())
    victims = [pid]
    # Backends, the archiver and what it runs, and any walshipper of this drill.
    out = subprocess.run(["pgrep", "-f", f"{PG}|{CONF}"], capture_output=True, text=True).stdout
    victims += [int(p) for p in out.split() if int(p) != os.getpid()]
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    victims += [int(p) for p in out.split()]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t0 = time.time()
    for p in procs:
        try:
            p.kill()
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    shutil.rmtree(PG, ignore_errors=True)
    shutil.rmtree(SPOOL, ignore_errors=True)
    # The socket's lock file names the dead postmaster (a new host starts
    # without it; a not yet reaped pid would look alive to the next one).
    for f in os.listdir(SOCK):
        os.remove(os.path.join(SOCK, f))
    return t0


def markers(stop, acked):
    """Commits a marker every 100 ms on one connection; records each one
    the server acknowledged, with the time the acknowledgement came."""
    p = subprocess.Popen(
        ["psql", "-h", SOCK, "-U", "postgres", "-qAtX", "-d", "postgres", "-v", "ON_ERROR_STOP=1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            p.stdin.write(f"INSERT INTO marker VALUES ({n}, clock_timestamp()) RETURNING n;\n")
            p.stdin.flush()
            line = p.stdout.readline()
        except (BrokenPipeError, OSError):
            break
        if not line.strip().isdigit():
            break
        acked.append((int(line), time.time()))
        time.sleep(0.1)
    p.kill()


def main():
    setup()
    procs = []
    if MODE in ("stream", "sync"):
        log = open(os.path.join(WORK, "receiver.log"), "w")
        procs.append(subprocess.Popen([BIN, "--config", CONF, "wal-receive"],
                                      stdout=log, stderr=log))
        time.sleep(2)
        if MODE == "sync":
            # Only now: with no synchronous standby connected, every
            # commit before (the set-up's) would wait.
            psql("ALTER SYSTEM SET synchronous_standby_names = 'walshipper'")
            psql("SELECT pg_reload_conf()")
    procs.append(subprocess.Popen(
        ["pgbench", "-h", SOCK, "-U", "postgres", "-n", "-c", "2", "-R", str(RATE), "-T", "600", "postgres"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    stop, acked = threading.Event(), []
    th = threading.Thread(target=markers, args=(stop, acked))
    th.start()
    time.sleep(random.Random(SEED).uniform(KILL_MIN, KILL_MAX))
    t0 = destroy(procs)
    stop.set()
    th.join()
    last_n, last_t = acked[-1] if acked else (0, t0)

    restored_dir = os.path.join(WORK, "restored")
    sh(BIN, "--config", CONF, "restore", "--target-dir", restored_dir, "--target-action", "promote",
       stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "restore.log"), "w"))
    with open(os.path.join(restored_dir, "postgresql.auto.conf"), "a") as f:
        f.write("\narchive_mode = off\nsynchronous_standby_names = ''\n")
    sh("pg_ctl", "-D", restored_dir, "-l", os.path.join(WORK, "restored.log"), "-w", "-t", "600", "start",
       stdout=subprocess.DEVNULL)
    while psql("SELECT pg_is_in_recovery()") != "f":
        time.sleep(0.05)
    t1 = time.time()
    got = psql("SELECT coalesce(max(n), 0) FROM marker")
    restored_n = int(got)
    sh("pg_ctl", "-D", restored_dir, "-m", "immediate", "-w", "stop", stdout=subprocess.DEVNULL)
    ack_time = dict(acked)
    lost = max(0, last_n - restored_n)
    # Time between the last marker acknowledged and the last one restored
    # (from before the first marker when none came back).
    first_t = acked[0][1] - 0.1 if acked else t0
    rpo = 0.0 if lost == 0 else last_t - ack_time.get(restored_n, first_t)
    print(json.dumps({"mode": MODE, "seed": SEED, "markers_acked": last_n, "markers_restored": restored_n,
                      "rpo_markers": lost, "rpo_s": round(rpo, 3), "rto_s": round(t1 - t0, 3)}))


main()
