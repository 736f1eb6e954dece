"""Driver of bench/many-files.sh (run as the test user, from it): one
PostgreSQL 15 cluster grown in steps to N small relations (tables of one row,
one 8 KiB file each); at each step both tools take a full backup, 1 % of the
tables change, both take an incremental, and both restore the chain (full +
incr). Measured: wall, CPU and peak RSS of the process tree (measure.py),
objects (files) each backup added to its posix repository and their bytes.
At one step (S3_FILES) the same cycle runs again against the S3 test server
through a counting proxy (s3_count_proxy.py), to count requests per command.

Environment: B (work directory), BIN (walshipper), PGBR (pgBackRest 2.59.1),
HERE (the bench directory), FILES ("25000 50000 100000"), RUNS (1),
S3_FILES (the first of FILES; 0 = no S3 phase), S3_PORT (18333)."""
import json
import os
import subprocess
import sys
import time

B = os.environ["B"]
BIN = os.environ["BIN"]
PGBR = os.environ["PGBR"]
HERE = os.environ["HERE"]
FILES = [int(n) for n in os.environ.get("FILES", "25000 50000 100000").split()]
RUNS = int(os.environ.get("RUNS", "1"))
S3_FILES = int(os.environ.get("S3_FILES", str(FILES[0])))
S3_PORT = int(os.environ.get("S3_PORT", "18333"))
# Ours (issue 17): commands through 18400 (http) / 18401 (TLS), WAL pushes
# through 18402 / 18403 so that they are counted apart.
P_CMD, P_CMD_TLS, P_ARCH, P_ARCH_TLS = 18400, 18401, 18402, 18403
SOCK = f"{B}/sock"
TAG = f"scale-bench-{os.getpid()}"
MEASURE = f"{HERE}/measure.py"
PROXY = f"{HERE}/s3_count_proxy.py"


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, cwd=B, **kw)


def psql(sql):
    return subprocess.run(
        ["psql", "-h", SOCK, "-U", "postgres", "-qAt", "-d", "postgres", "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def measure(args):
    out = subprocess.run(["python3", MEASURE, *args], cwd=B, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout)


def repo_files(root, skip):
    """{path: size} of the files below root, not under the directories in skip."""
    found = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if os.path.join(d, x) not in skip]
        for f in files:
            p = os.path.join(d, f)
            found[p] = os.path.getsize(p)
    return found


def count_files(d):
    return sum(len(f) for _, _, f in os.walk(d))


def compare_tree(src, dst):
    """Compares the files below src (the live cluster, unchanged since the
    incremental) with their restored copies below dst: (files compared,
    missing from dst, differing). pg_internal.init is not backed up."""
    compared = missing = differ = 0
    for d, _, files in os.walk(src):
        for name in files:
            if name == "pg_internal.init":
                continue
            a = os.path.join(d, name)
            b = os.path.join(dst, os.path.relpath(a, src))
            compared += 1
            try:
                with open(a, "rb") as fa, open(b, "rb") as fb:
                    if fa.read() != fb.read():
                        differ += 1
            except FileNotFoundError:
                missing += 1
    return compared, missing, differ


def write_configs():
    passphrase = open(f"{B}/passphrase").read().strip()
    common = (
        f'[pg]\ndata_dir = "{B}/pg"\nhost = "{SOCK}"\n[encryption]\npassphrase_file = "{B}/passphrase"\n'
        f'key_cache_dir = "{B}/keycache"\n[compression]\nlevel = 3\n'
    )
    # min_free_space 0: the shared disk is often below the default 5 % free,
    # and the few MiB these backups store are not what is measured.
    open(f"{B}/ws.toml", "w").write(f'[repo]\npath = "{B}/ws-repo"\nmin_free_space = "0"\n' + common)
    for name, port in (("ws-s3", P_CMD), ("ws-s3-arch", P_ARCH)):
        open(f"{B}/{name}.toml", "w").write(
            f'[repo]\ntype = "s3"\nbucket = "walshipper-test"\nprefix = "{TAG}/ws"\n'
            f'endpoint = "http://127.0.0.1:{port}"\nforce_path_style = true\nregion = "us-east-1"\n'
            f'access_key_id = "testkey"\nsecret_access_key = "testsecret"\nmin_free_space = "0"\n' + common
        )
        os.chmod(f"{B}/{name}.toml", 0o600)  # a secret: walshipper refuses it otherwise
    best = (
        f"repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass={passphrase}\ncompress-type=zst\n"
        "compress-level=3\nprocess-max=2\nstart-fast=y\nrepo1-retention-full=99\nrepo1-bundle=y\n"
        f"repo1-block=y\nlog-path={B}/pgbr-log\nlock-path={B}/pgbr-log\nlog-level-console=warn\n"
        f"log-level-file=off\n[bench]\npg1-path={B}/pg\npg1-socket-path={SOCK}\n"
    )
    open(f"{B}/pgbr.conf", "w").write(f"[global]\nrepo1-path={B}/pgbr-repo\n" + best)
    open(f"{B}/pgbr-s3.conf", "w").write(
        f"[global]\nrepo1-type=s3\nrepo1-path=/{TAG}/pgbr\nrepo1-s3-bucket=walshipper-test\n"
        f"repo1-s3-endpoint=127.0.0.1\nrepo1-storage-port={P_CMD_TLS}\nrepo1-s3-region=us-east-1\n"
        "repo1-s3-key=testkey\nrepo1-s3-key-secret=testsecret\nrepo1-s3-uri-style=path\n"
        "repo1-storage-verify-tls=n\n" + best
    )


def archive_command(s3):
    cmd = f"{BIN} --config {B}/ws.toml archive-push %p && {PGBR} --config={B}/pgbr.conf --stanza=bench archive-push %p"
    if s3:
        cmd += (
            f" && {BIN} --config {B}/ws-s3-arch.toml archive-push %p"
            f" && {PGBR} --config={B}/pgbr-s3.conf --stanza=bench --repo1-storage-port={P_ARCH_TLS} archive-push %p"
        )
    return cmd


def set_archive(s3):
    psql(f"ALTER SYSTEM SET archive_command = '{archive_command(s3)}'")
    psql("SELECT pg_reload_conf()")


def setup():
    os.makedirs(SOCK)
    os.makedirs(f"{B}/pgbr-log")
    sh("head -c 48 /dev/urandom | base64 > passphrase; chmod 600 passphrase")
    write_configs()
    sh("initdb -D pg -U postgres -A trust -k --no-sync >/dev/null")
    with open(f"{B}/pg/postgresql.conf", "a") as f:
        f.write(
            f"listen_addresses = ''\nunix_socket_directories = '{SOCK}'\narchive_mode = on\n"
            f"archive_command = '{archive_command(False)}'\nmax_wal_size = 4GB\nshared_buffers = 256MB\n"
            # The load is not what is measured: make it quick.
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
    sh(f"{BIN} --config ws.toml repo-init >/dev/null")
    sh("pg_ctl -D pg -l pg.log -w start >/dev/null")
    sh(f"{PGBR} --config={B}/pgbr.conf --stanza=bench stanza-create")


def grow(tables, to):
    """Creates tables t<tables+1>..t<to>, one row each, 1000 per transaction."""
    t0 = time.time()
    for a in range(tables + 1, to + 1, 1000):
        b = min(a + 999, to)
        psql(
            f"DO $$ BEGIN FOR i IN {a}..{b} LOOP "
            "EXECUTE format('CREATE TABLE t%s (v int)', i); "
            "EXECUTE format('INSERT INTO t%s VALUES (1)', i); END LOOP; END $$"
        )
    psql("CHECKPOINT")
    print(f"  created tables {tables + 1}..{to} in {time.time() - t0:.0f} s", flush=True)


def touch(n, round_):
    """Changes 1 % of the tables (every 100th, shifted by the round)."""
    psql(
        f"DO $$ BEGIN FOR i IN 1..{n} LOOP IF i % 100 = {round_ % 100} THEN "
        "EXECUTE format('UPDATE t%s SET v = v + 1', i); END IF; END LOOP; END $$"
    )
    psql("CHECKPOINT")


class Tool:
    def __init__(self, name, s3):
        self.name, self.s3 = name, s3

    def backup(self, kind):
        if self.name == "ws":
            cfg = "ws-s3.toml" if self.s3 else "ws.toml"
            return [BIN, "--config", f"{B}/{cfg}", "backup", "--type", kind, "--jobs", "2"]
        cfg = "pgbr-s3.conf" if self.s3 else "pgbr.conf"
        return [PGBR, f"--config={B}/{cfg}", "--stanza=bench", f"--type={kind}", "backup"]

    def restore(self, target):
        if self.name == "ws":
            cfg = "ws-s3.toml" if self.s3 else "ws.toml"
            return [BIN, "--config", f"{B}/{cfg}", "restore", "--target-dir", target, "--jobs", "2"]
        cfg = "pgbr-s3.conf" if self.s3 else "pgbr.conf"
        return [PGBR, f"--config={B}/{cfg}", "--stanza=bench", f"--pg1-path={target}", "restore"]

    def repo(self):
        """(repository root, directories that are WAL, not backups)."""
        if self.name == "ws":
            return f"{B}/ws-repo", {f"{B}/ws-repo/wal"}
        return f"{B}/pgbr-repo", {f"{B}/pgbr-repo/archive"}


class Proxies:
    def __init__(self):
        cert = f"{B}/proxy-cert.pem"
        key = f"{B}/proxy-key.pem"
        sh(
            f"openssl req -x509 -newkey rsa:2048 -nodes -keyout {key} -out {cert} -days 2 "
            "-subj /CN=127.0.0.1 2>/dev/null"
        )
        self.logs = {"cmd": f"{B}/s3-cmd.log", "arch": f"{B}/s3-arch.log"}
        self.procs = [
            subprocess.Popen(
                ["python3", PROXY, "serve", self.logs[k], str(S3_PORT), str(p), str(t), cert, key]
            )
            for k, p, t in (("cmd", P_CMD, P_CMD_TLS), ("arch", P_ARCH, P_ARCH_TLS))
        ]
        time.sleep(1)

    def mark(self):
        try:
            with open(self.logs["cmd"]) as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def count(self, since):
        out = subprocess.run(
            ["python3", PROXY, "count", self.logs["cmd"], str(since)], check=True, capture_output=True, text=True
        )
        return json.loads(out.stdout)

    def stop(self):
        for p in self.procs:
            p.terminate()
            p.wait()


def cycle(n, run, s3, proxies=None):
    """Full, touch 1 %, incr, restore of the chain: both tools, alternating
    which goes first. Returns {(tool, step): measurement}."""
    order = ["ws", "pb"] if run % 2 else ["pb", "ws"]
    tools = {t: Tool(t, s3) for t in order}
    res = {}

    def one(tool, step, args, before_files=None):
        mark = proxies.mark() if proxies else 0
        before = repo_files(*tool.repo()) if before_files and not s3 else None
        m = measure(args)
        if before is not None:
            after = repo_files(*tool.repo())
            added = [p for p in after if p not in before]
            m["objects"] = len(added)
            m["stored"] = sum(after[p] for p in added)
        if proxies:
            m["s3"] = proxies.count(mark)
        res[(tool.name, step)] = m

    for t in order:
        one(tools[t], "full", tools[t].backup("full"), True)
    touch(n, run)
    for t in order:
        one(tools[t], "incr", tools[t].backup("incr"), True)
    for t in order:
        target = f"{B}/r-{t}"
        sh(f"rm -rf {target}")
        one(tools[t], "restore", tools[t].restore(target))
        got = count_files(f"{target}/base")
        if got < n:
            sys.exit(f"{t} restored {got} files under base/, fewer than the {n} tables")
        # Restored data compared with the source, byte for byte (base/: the
        # tables; nothing has written to them since the incremental).
        res[(t, "restore")]["compare"] = compare_tree(f"{B}/pg/base", f"{target}/base")
        sh(f"rm -rf {target}")
    return res


def main():
    setup()
    tables = 0
    results = []
    for n in FILES:
        grow(tables, n)
        tables = n
        src = count_files(f"{B}/pg") - count_files(f"{B}/pg/pg_wal")
        print(f"{n} tables: {src} files in the data directory", flush=True)
        for run in range(1, RUNS + 1):
            results.append({"tables": n, "files": src, "storage": "posix", "run": run, "m": cycle(n, run, False)})
        if n == S3_FILES:
            proxies = Proxies()
            try:
                set_archive(True)
                psql("SELECT pg_switch_wal()")
                sh(f"{BIN} --config ws-s3.toml repo-init >/dev/null")
                sh(f"{PGBR} --config={B}/pgbr-s3.conf --stanza=bench stanza-create")
                results.append({"tables": n, "files": src, "storage": "s3", "run": 1, "m": cycle(n, 1, True, proxies)})
            finally:
                set_archive(False)
                proxies.stop()
                # Our prefix on the shared server, through its filer.
                subprocess.run(
                    ["curl", "-s", "-X", "DELETE", f"http://127.0.0.1:8888/buckets/walshipper-test/{TAG}?recursive=true"],
                    check=False,
                )
    sh("pg_ctl -D pg -m fast -w stop >/dev/null")
    with open(f"{B}/results.json", "w") as f:
        json.dump([{**r, "m": {f"{k[0]}-{k[1]}": v for k, v in r["m"].items()}} for r in results], f)
    report(results)


def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def report(results):
    posix = [r for r in results if r["storage"] == "posix"]
    sizes = sorted({r["tables"] for r in posix})
    print(f"\nmedians of {RUNS} run(s) per size; posix repositories; both tools zstd 3, encryption, 2 processes;")
    print("pgBackRest 2.59.1 with repo1-bundle=y, repo1-block=y. 'ms/1k' = wall per 1000 files.\n")
    hdr = f"{'files':>7} {'step':8} {'ws wall':>8} {'pb wall':>8} {'ratio':>6} {'ws CPU':>7} {'pb CPU':>7} {'ws MiB':>7} {'pb MiB':>7} {'ratio':>6} {'ws obj':>7} {'pb obj':>7} {'ws ms/1k':>9} {'pb ms/1k':>9}"
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        rs = [r for r in posix if r["tables"] == n]
        files = rs[0]["files"]
        for step in ("full", "incr", "restore"):
            def g(tool, key):
                return med([r["m"][(tool, step)].get(key, 0) for r in rs])
            ww, pw = g("ws", "wall"), g("pb", "wall")
            wr, pr = g("ws", "peak_mib"), g("pb", "peak_mib")
            obj = lambda t: f"{g(t, 'objects'):7.0f}" if step != "restore" else f"{'':7}"
            print(
                f"{files:7d} {step:8} {ww:8.2f} {pw:8.2f} {ww / pw:6.2f} {g('ws', 'cpu'):7.2f} {g('pb', 'cpu'):7.2f} "
                f"{wr:7.1f} {pr:7.1f} {wr / pr:6.2f} {obj('ws')} {obj('pb')} {ww * 1000 / files * 1000:9.1f} {pw * 1000 / files * 1000:9.1f}"
            )
    print("\nrestored base/ compared with the source (files compared / missing / differing):")
    for r in posix:
        line = [f"{tool} {'/'.join(map(str, r['m'][(tool, 'restore')]['compare']))}" for tool in ("ws", "pb")]
        print(f"  {r['files']} files, run {r['run']}: " + "; ".join(line))
    if len(sizes) > 1:
        a, z = sizes[0], sizes[-1]
        print(f"\ngrowth from {a} to {z} tables ({z / a:.1f}x the files): wall and peak RSS, largest / smallest")
        for step in ("full", "incr", "restore"):
            line = []
            for tool in ("ws", "pb"):
                ga = [r["m"][(tool, step)] for r in posix if r["tables"] == a]
                gz = [r["m"][(tool, step)] for r in posix if r["tables"] == z]
                line.append(
                    f"{tool} wall x{med([m['wall'] for m in gz]) / med([m['wall'] for m in ga]):.2f}, "
                    f"RSS x{med([m['peak_mib'] for m in gz]) / med([m['peak_mib'] for m in ga]):.2f}"
                )
            print(f"  {step:8} " + "; ".join(line))
    for r in results:
        if r["storage"] != "s3":
            continue
        print(f"\nS3 requests per command ({r['files']} files; SeaweedFS through the counting proxy; pgBackRest over TLS;")
        print("WAL pushes counted apart and not included)")
        for step in ("full", "incr", "restore"):
            for tool in ("ws", "pb"):
                m = r["m"][(tool, step)]
                s = m["s3"]
                ops = ", ".join(f"{k} {v}" for k, v in sorted(s["by_operation"].items()))
                meth = " ".join(f"{k} {v}" for k, v in sorted(s["by_method"].items()))
                print(
                    f"  {step:8} {tool}: {s['requests']:7d} requests ({meth}) [{ops}], "
                    f"{s['bytes_up'] / 2**20:.1f} MiB up, {s['bytes_down'] / 2**20:.1f} MiB down, wall {m['wall']:.2f} s, "
                    f"peak {m['peak_mib']:.0f} MiB{'' if not s['errors'] else ', %d errors (5xx)' % s['errors']}"
                )


if __name__ == "__main__":
    main()
