//! Storage capacity end to end: what `info --json` reports of each
//! repository's size and room (posix: its file system, checked against
//! df; S3: a configured quota, checked against a listing of the real
//! store), the check before a backup (exit 8 with the figures, nothing
//! written), and through the extension's scheduler: the refused run
//! recorded failed with the reason and hint, repository_status,
//! repository_usage, repository_capacity and the repository_almost_full
//! alert raised and resolved. One cluster for all of it.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);

/// Size and space available of the file system holding `p`, as df sees it.
fn df(p: &std::path::Path) -> (u64, u64) {
    let out = run_ok(
        std::process::Command::new("df")
            .args(["-B1", "--output=size,avail"])
            .arg(p),
    );
    let line = out.lines().nth(1).expect("df prints a line of figures");
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().expect("df figures are numbers"))
        .collect();
    (v[0], v[1])
}

/// Bytes of every file under `p` but walshipper's hidden temporaries and locks.
fn bytes_under(p: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            bytes_under(&e.path())
        } else {
            m.len()
        };
    }
    n
}

fn repo_of<'a>(info: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    info["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no repository {name} in {info}"))
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count"))
}

/// Asserts a refused backup: exit 8, the figures in the message, the
/// no_space error event with its hint.
fn assert_refused(out: &Output, repo: &str, source: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    for want in [
        "backup refused",
        &format!("repository {repo} has"),
        source,
        "is expected to store about",
        "min_free_space",
    ] {
        assert!(stderr.contains(want), "{want:?} missing from {stderr}");
    }
    let event: serde_json::Value = stderr
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "error")
        .unwrap_or_else(|| panic!("no error event in {stderr}"));
    assert_eq!(event["kind"], "no_space", "{event}");
    assert_eq!(event["code"], 8, "{event}");
    assert!(
        event["hint"]
            .as_str()
            .unwrap_or("")
            .contains("min_free_space"),
        "{event}"
    );
    stderr
}

#[test]
fn capacity_free_space_check_and_almost_full_alert() {
    assert_not_root();
    let dir = scratch("capacity");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    // The primary on posix whatever the suite's backend; the second on the
    // real S3 test server, with a quota: its only capacity.
    let mut s3 = s3_repo_config("capacity")
        .expect("PGB_TEST_S3_ENDPOINT must name the S3 test server (scripts/test.sh starts one)");
    s3.name = "offsite".into();
    // Small enough that what the test stores is over 1 % of it.
    let quota: u64 = 256 << 20;
    let text = std::fs::read_to_string(&shipper.config).unwrap();
    let (start, end) = (
        text.find("[repo]").unwrap(),
        text.find("[encryption]").unwrap(),
    );
    let repos = |main_extra: &str| {
        format!(
            "{}[[repo]]\nname = \"main\"\ntype = \"posix\"\npath = \"{}\"\n{main_extra}{}quota = \"256MiB\"\n{}",
            &text[..start],
            shipper.repo.display(),
            s3_section("[[repo]]", &s3),
            &text[end..]
        )
    };
    std::fs::write(&shipper.config, repos("")).unwrap();
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.database = 'postgres'",
            "pg_backup.retry_max = 0",
            "pg_backup.repo_status_interval = 1",
            "pg_backup.storage_sample_interval = 1",
            // Only this test's own settings raise the alert.
            "pg_backup.storage_warn_percent = 100",
            "pg_backup.storage_warn_days = 0",
        ],
    );
    start_with_extension(&shipper, &c);
    let store = walshipper::storage::open(&s3).unwrap();
    let s3_bytes = || -> u64 { store.list("").unwrap().iter().map(|o| o.size).sum() };

    // info --json: the posix repository's figures are its file system's.
    let before = bytes_under(&shipper.repo);
    let info = shipper.info();
    let after = bytes_under(&shipper.repo);
    let (size, avail) = df(&shipper.repo);
    let main = repo_of(&info, "main");
    assert_eq!(main["capacity_source"], "filesystem", "{main}");
    assert_eq!(u(&main["capacity_bytes"]), size, "{main}");
    // Others write to this disk meanwhile: close, not equal.
    assert!(
        u(&main["free_bytes"]).abs_diff(avail) < 2 << 30,
        "free {} vs df {avail}",
        main["free_bytes"]
    );
    assert_eq!(
        u(&main["min_free_bytes"]),
        (size as f64 * 0.05) as u64,
        "5 % of the capacity by default: {main}"
    );
    let stored = u(&main["stored_bytes"]);
    assert!(
        (before..=after).contains(&stored) && stored > 0,
        "{stored} not in {before}..={after}"
    );
    assert_eq!(main["encryption"], "aes-256-gcm");
    let key_at = chrono::DateTime::parse_from_rfc3339(main["key_created_at"].as_str().unwrap())
        .expect("key_created_at is RFC 3339");
    assert!((chrono::Utc::now() - key_at.to_utc()).num_minutes() < 10);
    assert!(main["first_backup_stop_time"].is_null(), "{main}");
    // The S3 repository: the quota, and what it holds as the store lists it.
    let off = repo_of(&info, "offsite");
    assert_eq!(off["capacity_source"], "quota", "{off}");
    assert_eq!(u(&off["capacity_bytes"]), quota);
    assert_eq!(u(&off["stored_bytes"]), s3_bytes(), "{off}");
    assert_eq!(u(&off["free_bytes"]), quota - u(&off["stored_bytes"]));
    assert_eq!(u(&off["min_free_bytes"]), quota / 20);
    // The human form says it too.
    let human = run_ok(shipper.cmd().arg("info"));
    assert!(
        human.contains("capacity") && human.contains("(filesystem)"),
        "{human}"
    );

    // A minimum beyond the file system: refused before anything is written
    // or PostgreSQL starts a backup.
    c.pgbench(&["-i", "-s", "2", "-q"]);
    // PostgreSQL's archiver may push a segment pgbench filled at any moment
    // meanwhile: what the backup must not write is the rest.
    let not_wal = |v: Vec<std::path::PathBuf>| -> Vec<std::path::PathBuf> {
        v.into_iter()
            .filter(|p| !p.components().any(|c| c.as_os_str() == "wal"))
            .collect()
    };
    let files = not_wal(shipper.object_files());
    let out = run(shipper
        .cmd()
        .env("WALSHIPPER_REPO_MIN_FREE_SPACE", "100000TiB")
        .args(["backup", "--json"]));
    let msg = assert_refused(&out, "main", "(its file system)");
    assert!(msg.contains("100000.0 TiB"), "{msg}");
    assert!(msg.contains("the size of the data directory"), "{msg}");
    assert_eq!(
        not_wal(shipper.object_files()),
        files,
        "the refused backup wrote"
    );

    // The S3 repository with a quota just above what it holds: the first
    // full backup (the data directory's size) does not fit.
    let held = s3_bytes();
    let listed = || -> Vec<String> {
        store
            .list("")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .filter(|k| !k.starts_with("wal/"))
            .collect()
    };
    let keys = listed();
    let out = run(shipper
        .cmd()
        .env("WALSHIPPER_REPO2_QUOTA", (held + (1 << 20)).to_string())
        .args(["--repo", "offsite", "backup", "--json"]));
    assert_refused(&out, "offsite", "(its quota)");
    assert_eq!(listed(), keys, "the refused backup wrote to S3");

    // Room enough (5 % of the file system, a 256 MiB quota): both are taken.
    shipper.backup(&[]);
    run_ok(shipper.cmd().args(["--repo", "offsite", "backup"]));
    let info = shipper.info();
    let main = repo_of(&info, "main");
    assert_eq!(
        main["first_backup_stop_time"], info["backups"][0]["stop_time"],
        "{main}"
    );
    let off = repo_of(&info, "offsite");
    assert!(u(&off["stored_bytes"]) > held, "{off}");
    assert_eq!(u(&off["free_bytes"]), quota - u(&off["stored_bytes"]));

    // Through the extension: the refused run is recorded failed, with
    // walshipper's reason and hint.
    std::fs::write(&shipper.config, repos("min_free_space = \"100000TiB\"\n")).unwrap();
    let id = c.sql("SELECT backup.backup_run()");
    wait_for(
        &c,
        &format!("SELECT status FROM backup.backup_executions WHERE execution_id = {id}"),
        "failed",
        WAIT,
    );
    let row: serde_json::Value = serde_json::from_str(&c.sql(&format!(
        "SELECT json_build_object('error', error, 'hint', error_hint) FROM backup.backup_executions WHERE execution_id = {id}"
    )))
    .unwrap();
    let err = row["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("backup refused: repository main has")
            && err.contains("min_free_space of 100000.0 TiB"),
        "{row}"
    );
    assert!(
        row["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("lower the repository's min_free_space"),
        "{row}"
    );
    std::fs::write(&shipper.config, repos("")).unwrap();

    // repository_status holds the new figures; repository_usage gets samples;
    // repository_capacity computes from them.
    wait_for(
        &c,
        "SELECT string_agg(name || ':' || capacity_source || ':' || (stored_bytes > 0) || ':' || encryption \
           || ':' || (key_created_at IS NOT NULL) || ':' || (first_backup_stop IS NOT NULL), ' ' ORDER BY position) \
           FROM backup.repository_status",
        "main:filesystem:true:aes-256-gcm:true:true offsite:quota:true:aes-256-gcm:true:true",
        WAIT,
    );
    assert_eq!(
        c.sql("SELECT capacity_bytes FROM backup.repository_status WHERE name = 'main'"),
        size.to_string()
    );
    assert_eq!(
        c.sql("SELECT capacity_bytes FROM backup.repository_status WHERE name = 'offsite'"),
        quota.to_string()
    );
    wait_for(
        &c,
        "SELECT count(*) >= 3 FROM backup.repository_usage WHERE repository = 'offsite'",
        "t",
        WAIT,
    );
    // On the quota: used is what it stores; growth from at least two samples.
    assert_eq!(
        c.sql(
            "SELECT used_ratio = round(stored_bytes::numeric / capacity_bytes, 4) AND growth_bytes_per_day IS NOT NULL \
               AND free_bytes = capacity_bytes - stored_bytes FROM backup.repository_capacity WHERE repository = 'offsite'"
        ),
        "t"
    );
    let used: f64 = c
        .sql("SELECT used_ratio FROM backup.repository_capacity WHERE repository = 'main'")
        .parse()
        .unwrap();
    let (size, avail) = df(&shipper.repo);
    assert!(
        (used - (size - avail) as f64 / size as f64).abs() < 0.02,
        "used_ratio {used} vs df"
    );

    // The warning threshold at 1 %: repository_almost_full for both; back
    // at 100 % (and the projection's warning off: this test's own WAL
    // makes the growth steep) it is resolved.
    let open =
        "SELECT string_agg(subject || ':' || severity, ' ' ORDER BY subject) FROM backup.alerts \
                WHERE kind = 'repository_almost_full' AND resolved_at IS NULL";
    c.sql("ALTER SYSTEM SET pg_backup.storage_warn_percent = 1");
    c.sql("SELECT pg_reload_conf()");
    wait_for(&c, open, "main:warning offsite:warning", WAIT);
    let message = c.sql(
        "SELECT message FROM backup.alerts WHERE kind = 'repository_almost_full' AND subject = 'offsite' AND resolved_at IS NULL",
    );
    assert!(
        message.contains("used (pg_backup.storage_warn_percent = 1)"),
        "{message}"
    );
    c.sql("ALTER SYSTEM SET pg_backup.storage_warn_percent = 100");
    c.sql("SELECT pg_reload_conf()");
    wait_for(&c, open, "", WAIT);
    // (main's also while its minimum was beyond the file system, above.)
    assert_eq!(
        c.sql("SELECT count(DISTINCT subject) FROM backup.alerts WHERE kind = 'repository_almost_full' AND resolved_at IS NOT NULL"),
        "2"
    );
    let _ = store.delete_prefix("");
}
