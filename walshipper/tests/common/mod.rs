//! Integration-test harness: real PostgreSQL clusters (initdb, pg_ctl) run as
//! the current user, which must not be root (scripts/test.sh arranges that),
//! and the real walshipper binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn pg_bin(tool: &str) -> PathBuf {
    let dir = std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    PathBuf::from(dir).join(tool)
}

pub fn walshipper_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walshipper"))
}

pub fn assert_not_root() {
    // SAFETY: getuid cannot fail and has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_ne!(
        uid, 0,
        "integration tests start PostgreSQL, which refuses to run as root: run them through scripts/test.sh (as user postgres)"
    );
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory under /tmp (short: socket paths are limited to 107 bytes).
/// A TCP port on 127.0.0.1 nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ws-{name}-"))
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// "posix" (default) or "s3": the backend the integration suite runs on.
pub fn test_backend() -> String {
    std::env::var("PGB_TEST_BACKEND").unwrap_or_else(|_| "posix".into())
}

/// An S3 repository configuration on the test server with a fresh prefix,
/// or None when no server was given (PGB_TEST_S3_ENDPOINT).
#[allow(dead_code)]
pub fn s3_repo_config(tag: &str) -> Option<walshipper::config::RepoConfig> {
    let endpoint = std::env::var("PGB_TEST_S3_ENDPOINT").ok()?;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Some(walshipper::config::RepoConfig {
        name: String::new(),
        kind: "s3".into(),
        bucket: std::env::var("PGB_TEST_S3_BUCKET").unwrap_or_else(|_| "walshipper-test".into()),
        prefix: format!(
            "{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ),
        endpoint,
        region: "us-east-1".into(),
        force_path_style: true,
        access_key_id: std::env::var("PGB_TEST_S3_KEY").unwrap_or_else(|_| "testkey".into()),
        secret_access_key: std::env::var("PGB_TEST_S3_SECRET")
            .unwrap_or_else(|_| "testsecret".into()),
        part_size_mib: 5,
        retries: 3,
        request_timeout: 30,
        connect_timeout: 3,
        ..Default::default()
    })
}

/// A TOML table (`[repo]` or `[[repo]]`) for an S3 repository.
#[allow(dead_code)]
pub fn s3_section(header: &str, rc: &walshipper::config::RepoConfig) -> String {
    let open = if header.starts_with("[[") {
        header.to_string()
    } else {
        format!("[{header}]")
    };
    format!(
        "{open}\n{}type = \"s3\"\nbucket = \"{}\"\nprefix = \"{}\"\nendpoint = \"{}\"\nregion = \"{}\"\n\
         force_path_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\npart_size_mib = {}\n\
         retries = {}\nrequest_timeout = {}\nconnect_timeout = {}\n",
        if rc.name.is_empty() { String::new() } else { format!("name = \"{}\"\n", rc.name) },
        rc.bucket,
        rc.prefix,
        rc.endpoint,
        rc.region,
        rc.access_key_id,
        rc.secret_access_key,
        rc.part_size_mib,
        rc.retries,
        rc.request_timeout,
        rc.connect_timeout
    )
}

/// A walshipper configuration for one cluster and one repository.
pub struct Shipper {
    pub config: PathBuf,
    pub repo: PathBuf,
    pub passphrase_file: PathBuf,
}

impl Shipper {
    pub fn new(dir: &Path, data_dir: &Path, socket_dir: &Path, port: u16) -> Shipper {
        let repo = dir.join("repo");
        let passphrase_file = dir.join("passphrase");
        std::fs::write(
            &passphrase_file,
            "integration-test passphrase, long enough\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&passphrase_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = dir.join("walshipper.toml");
        // The suite runs once per backend: PGB_TEST_BACKEND=s3 puts
        // the repository in the S3 server the test script started.
        let repo_section = match s3_repo_config("suite") {
            Some(rc) if test_backend() == "s3" => s3_section("repo", &rc),
            _ => format!("[repo]\ntype = \"posix\"\npath = \"{}\"\n", repo.display()),
        };
        std::fs::write(
            &config,
            format!(
                "[pg]\ndata_dir = \"{}\"\nhost = \"{}\"\nport = {port}\nuser = \"postgres\"\ndatabase = \"postgres\"\n\
                 {repo_section}\
                 [encryption]\npassphrase_file = \"{}\"\nkey_cache_dir = \"{}\"\nretire_settle = 0\n\
                 [compression]\nlevel = 3\n[archive]\ncheck_timeout = 60\n[cache]\ndir = \"{}\"\n",
                data_dir.display(),
                socket_dir.display(),
                passphrase_file.display(),
                dir.join("keycache").display(),
                dir.join("cache").display()
            ),
        )
        .unwrap();
        // It may hold an S3 secret: walshipper refuses such a file unless private.
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        Shipper {
            config,
            repo,
            passphrase_file,
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(walshipper_bin());
        c.arg("--config").arg(&self.config);
        c.env_remove("WALSHIPPER_PASSPHRASE");
        c
    }

    pub fn archive_command(&self) -> String {
        format!(
            "'{} --config {} archive-push %p'",
            walshipper_bin().display(),
            self.config.display()
        )
    }

    pub fn restore_command(&self) -> String {
        format!(
            "'{} --config {} archive-get %f \"%p\"'",
            walshipper_bin().display(),
            self.config.display()
        )
    }

    /// The backup ids repository `name` lists, oldest first, and its
    /// `info --json`.
    pub fn held(&self, name: &str) -> (Vec<String>, serde_json::Value) {
        let out = run_ok(self.cmd().args(["--repo", name, "info", "--json"]));
        let info: serde_json::Value = serde_json::from_str(&out).expect("info --json is JSON");
        let ids = info["backups"]
            .as_array()
            .expect("a backups array")
            .iter()
            .map(|b| b["id"].as_str().unwrap_or_default().to_string())
            .collect();
        (ids, info)
    }

    /// A cluster `name` in `d` archiving through this shipper into its
    /// configured repositories, which are created first; started.
    pub fn start_archiving(&self, d: &Path, name: &str) -> Cluster {
        let cluster = Cluster::init(
            d,
            name,
            &[
                "archive_mode = on".into(),
                format!("archive_command = {}", self.archive_command()),
            ],
        );
        run_ok(self.cmd().args(["repo-init", "--kdf-memory-kib", "8192"]));
        cluster.start();
        cluster
    }

    pub fn info(&self) -> serde_json::Value {
        let out = run_ok(self.cmd().args(["info", "--json"]));
        serde_json::from_str(&out).expect("info --json is JSON")
    }

    /// Every stored object file (not temporaries) under the repository.
    pub fn object_files(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if !e.file_name().to_string_lossy().starts_with('.') {
                    out.push(p);
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.repo, &mut v);
        v.sort();
        v
    }

    /// Replaces the `[repo]` part of the configuration.
    #[allow(dead_code)]
    pub fn set_repo_section(&self, section: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let start = text
            .find("[repo]")
            .or_else(|| text.find("[[repo]]"))
            .unwrap();
        let end = text.find("[encryption]").unwrap();
        std::fs::write(
            &self.config,
            format!("{}{section}{}", &text[..start], &text[end..]),
        )
        .unwrap();
    }

    /// Two repositories: `main` (posix, this shipper's repository) and its
    /// copy `offsite` (on the S3 test server when there is one, else the
    /// posix directory `d/offsite`), WAL pushed to both, no free-space floor
    /// (the shared test machine's disk may be nearly full: not what these
    /// tests are about), scratch (and key retire's S3 spool) under `d`.
    #[allow(dead_code)]
    pub fn use_main_and_offsite(&self, d: &Path, s3_tag: &str) {
        let second = match s3_repo_config(s3_tag) {
            Some(mut rc) => {
                rc.name = "offsite".into();
                s3_section("[[repo]]", &rc)
            }
            None => format!(
                "[[repo]]\nname = \"offsite\"\ntype = \"posix\"\npath = \"{}\"\nmin_free_space = \"0\"\n",
                d.join("offsite").display()
            ),
        };
        self.set_repo_section(&format!(
            "[[repo]]\nname = \"main\"\ntype = \"posix\"\npath = \"{}\"\nmin_free_space = \"0\"\n{second}",
            self.repo.display()
        ));
        let text = std::fs::read_to_string(&self.config)
            .unwrap()
            .replace("[archive]\n", "[archive]\npush_to = \"all\"\n");
        std::fs::write(
            &self.config,
            format!(
                "{text}[restore_test]\nscratch_dir = \"{}\"\n",
                d.join("scratch").display()
            ),
        )
        .unwrap();
    }

    /// Whether WAL file `name` is in the primary repository, whatever its backend.
    #[allow(dead_code)]
    pub fn has_wal(&self, name: &str) -> bool {
        let cfg = walshipper::config::Config::load(Some(&self.config)).unwrap();
        let storage = walshipper::storage::open(cfg.primary()).unwrap();
        let key = if name.ends_with(".history") {
            format!("wal/history/{name}")
        } else {
            format!("wal/{}/{name}", &name[0..16])
        };
        storage.head(&key).unwrap().is_some()
    }

    pub fn wal_object(&self, name: &str) -> PathBuf {
        if name.ends_with(".history") {
            self.repo.join("wal/history").join(name)
        } else {
            self.repo.join("wal").join(&name[0..16]).join(name)
        }
    }
}

pub struct Cluster {
    pub data: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl Cluster {
    /// initdb with data checksums; `conf` lines are appended to postgresql.conf.
    pub fn init(dir: &Path, name: &str, conf: &[String]) -> Cluster {
        Cluster::init_with(dir, name, &[], conf)
    }

    /// The same with more initdb arguments (e.g. `--wal-segsize=1`);
    /// `--no-data-checksums` (initdb's own from PostgreSQL 18 on) leaves
    /// out the default `-k`.
    pub fn init_with(dir: &Path, name: &str, initdb_args: &[&str], conf: &[String]) -> Cluster {
        assert_not_root();
        let data = dir.join(name);
        let checksums = !initdb_args.contains(&"--no-data-checksums");
        let initdb_args: Vec<&str> = initdb_args
            .iter()
            .copied()
            .filter(|a| *a != "--no-data-checksums")
            .collect();
        run_ok(
            Command::new(pg_bin("initdb"))
                .args(["-D"])
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .args(checksums.then_some("-k"))
                .args(initdb_args),
        );
        let c = Cluster::at(dir, name);
        c.configure(conf);
        c
    }

    /// A data directory made some other way (a base backup copy).
    pub fn at(dir: &Path, name: &str) -> Cluster {
        let socket = dir.join(format!("{name}-sock"));
        std::fs::create_dir_all(&socket).unwrap();
        Cluster {
            data: dir.join(name),
            log: dir.join(format!("{name}.log")),
            socket,
            port: 5432,
        }
    }

    pub fn configure(&self, conf: &[String]) {
        let mut text = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = {}\n\
             fsync = off\nshared_buffers = 64MB\nmax_wal_size = 256MB\nlogging_collector = off\n",
            self.socket.display(),
            self.port
        );
        for l in conf {
            text.push_str(l);
            text.push('\n');
        }
        let path = self.data.join("postgresql.conf");
        let mut old = std::fs::read_to_string(&path).unwrap();
        old.push_str(&text);
        std::fs::write(path, old).unwrap();
    }

    pub fn start(&self) {
        run_ok(
            Command::new(pg_bin("pg_ctl"))
                .args(["-D"])
                .arg(&self.data)
                .args(["-l"])
                .arg(&self.log)
                .args(["-w", "-t", "300", "start"]),
        );
    }

    /// Starts without waiting (a recovering cluster may stop by itself).
    pub fn start_nowait(&self) {
        run_ok(
            Command::new(pg_bin("pg_ctl"))
                .args(["-D"])
                .arg(&self.data)
                .args(["-l"])
                .arg(&self.log)
                .args(["-W", "start"]),
        );
    }

    pub fn stop(&self) {
        let _ = run(Command::new(pg_bin("pg_ctl"))
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"]));
    }

    pub fn psql_cmd(&self) -> Command {
        let mut c = Command::new(pg_bin("psql"));
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-h",
        ])
        .arg(&self.socket)
        .args(["-p", &self.port.to_string()]);
        c
    }

    pub fn sql(&self, sql: &str) -> String {
        run_ok(self.psql_cmd().args(["-c", sql])).trim().to_string()
    }

    pub fn try_sql(&self, sql: &str) -> Option<String> {
        let out = run(self.psql_cmd().args(["-c", sql]));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn pgbench(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(pg_bin("pgbench"))
                .args(["-U", "postgres", "-h"])
                .arg(&self.socket)
                .args(["-p", &self.port.to_string()])
                .args(args)
                .arg("postgres"),
        )
    }

    /// Waits until the server answers and is out of recovery.
    pub fn wait_promoted(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.try_sql("SELECT pg_is_in_recovery()").as_deref() == Some("f") {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "cluster {} not promoted within {timeout:?}; log:\n{}",
                    self.data.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Switches WAL and waits until the archiver has archived that segment.
    pub fn switch_and_wait_archived(&self, timeout: Duration) -> String {
        self.sql("SELECT pg_create_restore_point('test-switch')");
        let name = self.sql("SELECT pg_walfile_name(pg_switch_wal())");
        let start = Instant::now();
        loop {
            let last = self.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            if last.as_str() >= name.as_str() && !last.ends_with(".backup") {
                return name;
            }
            if start.elapsed() > timeout {
                panic!(
                    "segment {name} not archived within {timeout:?}: {}",
                    self.sql("SELECT row(s.*) FROM pg_stat_archiver s")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = Command::new(pg_bin("pg_ctl"))
                .args(["-D"])
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

/// Copies a directory tree (a base backup into a new data directory).
pub fn copy_tree(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

impl Shipper {
    /// Runs `backup --json` and returns its final "done" event.
    pub fn backup(&self, extra: &[&str]) -> serde_json::Value {
        let out = run_ok(self.cmd().args(["backup", "--json"]).args(extra));
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "done")
            .unwrap_or_else(|| panic!("no done event in: {out}"))
    }

    /// Runs `restore --target-dir DIR` with extra arguments.
    pub fn restore(&self, dir: &Path, extra: &[&str]) -> Output {
        run(self
            .cmd()
            .arg("restore")
            .arg("--target-dir")
            .arg(dir)
            .args(extra))
    }

    /// Checks a restored directory with pg_verifybackup: every file against
    /// the backup_manifest restore wrote, and the backup's WAL range (fetched
    /// into `walcopy`) parsed with pg_waldump.
    #[allow(dead_code)]
    pub fn verify_restored(&self, done: &serde_json::Value, dir: &Path, walcopy: &Path) {
        self.fetch_wal(
            &segment_range(
                done["wal_start"].as_str().unwrap(),
                done["wal_stop"].as_str().unwrap(),
            ),
            walcopy,
        );
        let out = run_ok(
            Command::new(pg_bin("pg_verifybackup"))
                .arg("-w")
                .arg(walcopy)
                .arg(dir),
        );
        assert!(out.contains("successfully verified"), "{out}");
    }

    /// Fetches WAL segments first..=last (names) into `dir` with archive-get.
    pub fn fetch_wal(&self, names: &[String], dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for n in names {
            run_ok(self.cmd().args(["archive-get", n]).arg(dir.join(n)));
        }
    }
}

/// Segment names from `first` to `last` on one timeline (16 MiB segments).
pub fn segment_range(first: &str, last: &str) -> Vec<String> {
    let num = |n: &str| {
        let log = u64::from_str_radix(&n[8..16], 16).unwrap();
        let seg = u64::from_str_radix(&n[16..24], 16).unwrap();
        log * 256 + seg
    };
    (num(first)..=num(last))
        .map(|s| format!("{}{:08X}{:08X}", &first[0..8], s / 256, s % 256))
        .collect()
}

/// PostgreSQL's own checks of a recovered cluster: pg_amcheck on every
/// database (heap and indexes), then, stopped, pg_checksums (if the
/// cluster has data checksums).
#[allow(dead_code)]
pub fn postgres_checks(c: Cluster) {
    run_ok(
        Command::new(pg_bin("pg_amcheck"))
            .args(["-U", "postgres", "-h"])
            .arg(&c.socket)
            .args(["--all", "--heapallindexed", "--install-missing"]),
    );
    let checksums = c.sql("SHOW data_checksums") == "on";
    c.stop();
    if checksums {
        run_ok(
            Command::new(pg_bin("pg_checksums"))
                .args(["--check", "-D"])
                .arg(&c.data),
        );
    }
}

/// Starts a restored data directory and waits until recovery ends.
pub fn start_restored(d: &Path, name: &str, extra_conf: &[String]) -> Cluster {
    let c = Cluster::at(d, name);
    let mut conf = vec!["archive_mode = off".to_string()];
    conf.extend_from_slice(extra_conf);
    c.configure(&conf);
    c.start_nowait();
    c.wait_promoted(Duration::from_secs(180));
    c
}

/// A started cluster `name` in `d` archiving through walshipper into a fresh
/// encrypted repository (a cheap KDF: tests are not about its cost).
pub fn archiving_cluster(d: &Path, name: &str, extra_conf: &[&str]) -> (Shipper, Cluster) {
    archiving_cluster_with(d, name, &[], extra_conf)
}

/// The same with more initdb arguments (see `Cluster::init_with`).
pub fn archiving_cluster_with(
    d: &Path,
    name: &str,
    initdb_args: &[&str],
    extra_conf: &[&str],
) -> (Shipper, Cluster) {
    let shipper = Shipper::new(d, &d.join(name), &d.join(format!("{name}-sock")), 5432);
    let mut conf = vec![
        "archive_mode = on".to_string(),
        format!("archive_command = {}", shipper.archive_command()),
    ];
    conf.extend(extra_conf.iter().map(|s| s.to_string()));
    let cluster = Cluster::init_with(d, name, initdb_args, &conf);
    run_ok(
        shipper
            .cmd()
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    cluster.start();
    (shipper, cluster)
}

/// SplitMix64: tiny, seedable, good enough to drive mutations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// A cluster with pg_backup_ext (installed by scripts/test.sh) and its
// scheduler: the extension, monitoring and notification tests share these.

/// Polls `sql` until it returns `want` (panics with the catalog and the server log after `timeout`).
pub fn wait_for(c: &Cluster, sql: &str, want: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let got = c.try_sql(sql).unwrap_or_default();
        if got == want {
            return got;
        }
        if start.elapsed() > timeout {
            panic!(
                "waited {timeout:?} for `{sql}` to be {want:?}, last {got:?}\nexecutions: {}\nlog:\n{}",
                c.sql("SELECT json_agg(e) FROM backup.backup_executions e"),
                c.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A cluster with pg_backup_ext preloaded, pointed at the real walshipper.
pub fn preloaded_cluster(d: &std::path::Path, shipper: &Shipper, extra: &[&str]) -> Cluster {
    let mut conf = vec![
        "archive_mode = on".to_string(),
        format!("archive_command = {}", shipper.archive_command()),
        "shared_preload_libraries = 'pg_backup_ext'".into(),
        format!(
            "pg_backup.walshipper_path = '{}'",
            walshipper_bin().display()
        ),
        format!(
            "pg_backup.walshipper_config = '{}'",
            shipper.config.display()
        ),
    ];
    conf.extend(extra.iter().map(|s| s.to_string()));
    Cluster::init(d, "src", &conf)
}

/// Creates the repository, starts the cluster, creates the extension.
pub fn start_with_extension(shipper: &Shipper, c: &Cluster) {
    run_ok(
        shipper
            .cmd()
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    c.start();
    c.sql("CREATE EXTENSION pg_backup_ext");
}
