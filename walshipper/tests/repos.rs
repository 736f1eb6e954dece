//! Two repositories (3-2-1): archive-push to both, backups copied by
//! repo-sync, reads falling back when one repository is damaged or gone.
//! The second repository is on the S3 test server when one is given, else
//! a second directory.

mod common;

use std::time::Duration;

use common::*;

const MIN: Duration = Duration::from_secs(60);

/// Rewrites the shipper's configuration with two repositories.
fn two_repo_config(shipper: &Shipper, push_to: &str, second: &str) {
    two_repo_config_with(shipper, push_to, "", second)
}

/// The same, with extra settings (`primary_extra`, e.g. retention) for the primary.
fn two_repo_config_with(shipper: &Shipper, push_to: &str, primary_extra: &str, second: &str) {
    let text = std::fs::read_to_string(&shipper.config).unwrap();
    let start = text.find("[repo]").unwrap();
    let end = text.find("[encryption]").unwrap();
    let primary = format!(
        "[[repo]]\nname = \"main\"\ntype = \"posix\"\npath = \"{}\"\n{primary_extra}",
        shipper.repo.display()
    );
    let rest = text[end..].replace(
        "[archive]\n",
        &format!("[archive]\npush_to = \"{push_to}\"\n"),
    );
    std::fs::write(
        &shipper.config,
        format!("{}{primary}{second}{rest}", &text[..start]),
    )
    .unwrap();
}

fn second_repo(d: &std::path::Path) -> String {
    match s3_repo_config("offsite") {
        Some(mut rc) => {
            rc.name = "offsite".into();
            s3_section("[[repo]]", &rc)
        }
        None => format!(
            "[[repo]]\nname = \"offsite\"\ntype = \"posix\"\npath = \"{}\"\n",
            d.join("offsite").display()
        ),
    }
}

#[test]
fn primary_deleted_point_in_time_restore_from_the_second() {
    let dir = scratch("repos");
    let d = dir.path();
    let src_dir = d.join("src");
    let shipper = Shipper::new(d, &src_dir, &d.join("src-sock"), 5432);
    two_repo_config(&shipper, "all", &second_repo(d));
    let src = Cluster::init(
        d,
        "src",
        &[
            "archive_mode = on".into(),
            format!("archive_command = {}", shipper.archive_command()),
            "track_commit_timestamp = on".into(),
        ],
    );
    let out = run_ok(
        shipper
            .cmd()
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    assert!(
        out.contains("repository main") && out.contains("repository offsite"),
        "{out}"
    );
    src.start();
    src.pgbench(&["-i", "-s", "2", "-q"]);
    src.sql("CREATE TABLE marker (id int PRIMARY KEY)");
    shipper.backup(&[]);
    // The backup went to the primary only; repo-sync copies it over.
    let out = run_ok(shipper.cmd().arg("repo-sync"));
    assert!(
        out.contains("offsite: copied") && out.contains("1 backups"),
        "{out}"
    );
    // A second sync finds nothing to do.
    let out = run_ok(shipper.cmd().arg("repo-sync"));
    assert!(
        out.contains("offsite: copied 0 WAL files, 0 backups"),
        "{out}"
    );

    for i in 1..=30 {
        src.sql(&format!(
            "INSERT INTO marker VALUES ({i}); UPDATE pgbench_accounts SET abalance = abalance + {i} WHERE aid = {i}"
        ));
        if i == 15 {
            src.sql("SELECT pg_switch_wal()");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    src.switch_and_wait_archived(MIN);
    let target = src.sql(
        "SELECT (a + (b - a) / 2)::text FROM \
           (SELECT pg_xact_commit_timestamp(xmin) a FROM marker WHERE id = 20) x, \
           (SELECT pg_xact_commit_timestamp(xmin) b FROM marker WHERE id = 21) y",
    );
    assert_eq!(src.sql("SELECT failed_count FROM pg_stat_archiver"), "0");
    let info = shipper.info();
    let repos = info["repositories"].as_array().unwrap();
    assert_eq!(repos.len(), 2, "{info}");
    assert_eq!(repos[0]["last_wal"], repos[1]["last_wal"], "{info}");
    assert_eq!(repos[1]["backups"], 1, "{info}");
    let expected_at_target =
        src.sql("SELECT count(*) || ':' || coalesce(max(id), 0) FROM marker WHERE id <= 20");
    src.stop();

    // A damaged file in the primary: restore reads that file from the second.
    let objects: Vec<_> = shipper
        .object_files()
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            s.contains("/backups/")
                && !s.ends_with("/manifest")
                && !s.contains("backup_label")
                && p.metadata().unwrap().len() > 10_000
        })
        .collect();
    let victim = &objects[objects.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(victim, &bytes).unwrap();
    let r1 = d.join("r1");
    let out = shipper.restore(
        &r1,
        &["--target", "immediate", "--target-action", "promote"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reading it from repository offsite"),
        "{stderr}"
    );
    let c1 = start_restored(
        d,
        "r1",
        &[format!("restore_command = {}", shipper.restore_command())],
    );
    assert_eq!(c1.sql("SELECT count(*) FROM marker"), "0");
    c1.stop();

    // The primary repository is gone entirely.
    std::fs::remove_dir_all(&shipper.repo).unwrap();
    let r2 = d.join("r2");
    let out = shipper.restore(
        &r2,
        &["--target-time", &target, "--target-action", "promote"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // archive-get cannot tell the end of the archive from a configured
    // repository that does not answer (it would stop recovery, exit 128):
    // the DBA names the survivor.
    let survivor = format!(
        "'{} --config {} --repo offsite archive-get %f \"%p\"'",
        walshipper_bin().display(),
        shipper.config.display()
    );
    // (in postgresql.auto.conf, after the line restore wrote: the last one wins)
    let auto = r2.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto).unwrap();
    std::fs::write(&auto, format!("{text}restore_command = {survivor}\n")).unwrap();
    let c2 = start_restored(d, "r2", &[]);
    assert_eq!(
        c2.sql("SELECT count(*) || ':' || coalesce(max(id), 0) FROM marker"),
        expected_at_target,
        "point-in-time restore from the second repository"
    );
    assert!(c2.log_text().contains("restored log file"));
    c2.stop();
    let out = run(shipper.cmd().args(["--repo", "offsite", "verify"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn push_to_primary_lets_a_lagging_repository_catch_up() {
    let dir = scratch("lag");
    let d = dir.path();
    let src_dir = d.join("src");
    let shipper = Shipper::new(d, &src_dir, &d.join("src-sock"), 5432);
    let offsite = d.join("offsite");
    let second = format!(
        "[[repo]]\nname = \"offsite\"\ntype = \"posix\"\npath = \"{}\"\n",
        offsite.display()
    );
    two_repo_config(&shipper, "primary", &second);
    let src = shipper.start_archiving(d, "src");
    // The second repository becomes unwritable: pushes still succeed (primary has them).
    use std::os::unix::fs::PermissionsExt;
    let wal_dir = offsite.join("wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    std::fs::set_permissions(&wal_dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    src.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) g");
    let last = src.switch_and_wait_archived(MIN);
    assert_eq!(src.sql("SELECT failed_count FROM pg_stat_archiver"), "0");
    assert!(
        src.log_text().contains("repository offsite lags"),
        "{}",
        src.log_text()
    );
    let info = shipper.info();
    assert_eq!(info["repositories"][0]["last_wal"], last.as_str(), "{info}");
    assert_ne!(info["repositories"][1]["last_wal"], last.as_str(), "{info}");

    // With push_to = all the same failure makes archive-push fail.
    let seg = src.data.join("pg_wal").join(&last);
    if seg.exists() {
        let out = run(shipper
            .cmd()
            .env("WALSHIPPER_ARCHIVE_PUSH_TO", "all")
            .arg("archive-push")
            .arg(&seg));
        assert!(
            !out.status.success(),
            "push_to = all succeeded without the second repository"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("offsite"));
    }

    // Writable again: repo-sync catches the second repository up.
    std::fs::set_permissions(&wal_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run_ok(shipper.cmd().arg("repo-sync"));
    assert!(
        out.contains("offsite: copied") && !out.contains("offsite: copied 0 WAL"),
        "{out}"
    );
    let info = shipper.info();
    assert_eq!(info["repositories"][1]["last_wal"], last.as_str(), "{info}");
    src.stop();
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The tombstones repository `name` holds, each read back (decoded,
/// authenticated, bound to its key) and naming its own backup.
fn tombstones(shipper: &Shipper, name: &str) -> Vec<String> {
    let cfg = walshipper::config::Config::load(Some(&shipper.config)).unwrap();
    let rc = cfg.find_repo(Some(name)).unwrap();
    let repo = walshipper::repo::Repository::open_repo(&cfg, rc).unwrap();
    let mut ids: Vec<String> = repo
        .storage
        .list("expired/")
        .unwrap()
        .into_iter()
        .map(|m| m.key.strip_prefix("expired/").unwrap().to_string())
        .collect();
    ids.sort();
    for id in &ids {
        let t = walshipper::commands::expire::read_tombstone(&repo, id)
            .unwrap_or_else(|e| panic!("tombstone {id} in {name}: {e}"));
        assert_eq!(&t.backup_id, id);
        assert!(t.policy.keep_full.is_some(), "{t:?}");
    }
    ids
}

/// Issue 13: two repositories with different policies (main keeps 1 full,
/// offsite 3). Each round: a backup (to main), `expire` (every repository,
/// each with its own policy), `repo-sync`; then each repository holds what
/// its own policy keeps, nothing it expired came back (backups: tombstones;
/// WAL: nothing before its oldest backup), and the tombstones are there.
/// Then the error events and the refusal of policy flags without --repo.
#[test]
fn each_repository_keeps_its_own_retention_through_repo_sync() {
    let dir = scratch("retain");
    let d = dir.path();
    let src_dir = d.join("src");
    let shipper = Shipper::new(d, &src_dir, &d.join("src-sock"), 5432);
    let second = format!("{}retention_full = 3\n", second_repo(d));
    two_repo_config_with(&shipper, "all", "retention_full = 1\n", &second);
    let src = shipper.start_archiving(d, "src");
    src.sql("CREATE TABLE t AS SELECT generate_series(1, 10000) g");
    let keep = |ids: &[String], n: usize| ids[ids.len().saturating_sub(n)..].to_vec();
    let mut ids: Vec<String> = Vec::new();
    for round in 1..=4 {
        // WAL between backups, archived to both repositories (push_to = all).
        src.sql(&format!(
            "INSERT INTO t SELECT generate_series(1, 1000) * {round}"
        ));
        src.switch_and_wait_archived(MIN);
        ids.push(
            shipper.backup(&[])["backup_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        let offsite_before = shipper.held("offsite").0;

        let reports = json_lines(&run_ok(shipper.cmd().args(["expire", "--json"])));
        let names: Vec<&str> = reports
            .iter()
            .map(|r| {
                assert_eq!(r["event"], "expire", "{r}");
                r["repository"].as_str().unwrap()
            })
            .collect();
        assert_eq!(names, ["main", "offsite"], "one report per repository");
        assert_eq!(reports[0]["policy"]["keep_full"], 1, "{}", reports[0]);
        assert_eq!(reports[1]["policy"]["keep_full"], 3, "{}", reports[1]);

        let sync = json_lines(&run_ok(shipper.cmd().args(["repo-sync", "--json"])));
        assert_eq!(sync.len(), 2, "{sync:?}");
        assert!(
            sync.iter()
                .all(|r| r["failed"].as_array().unwrap().is_empty()),
            "{sync:?}"
        );

        // main: its newest backup only; offsite: its newest 3 as of its
        // expire, and the new backup repo-sync brought.
        let (main, main_info) = shipper.held("main");
        let (offsite, offsite_info) = shipper.held("offsite");
        assert_eq!(main, keep(&ids, 1), "round {round}: main");
        let mut want = keep(&offsite_before, 3);
        want.push(ids.last().unwrap().clone());
        assert_eq!(offsite, want, "round {round}: offsite");
        // What main expired is offsite's, and stays out of main.
        let expired_main: Vec<String> = ids[..ids.len() - 1].to_vec();
        assert_eq!(tombstones(&shipper, "main"), expired_main, "round {round}");
        let to_main = sync.iter().find(|r| r["repository"] == "main").unwrap();
        let skipped: Vec<String> = to_main["backups_skipped_expired"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let offsite_expired_main: Vec<String> = offsite_before
            .iter()
            .filter(|id| expired_main.contains(id))
            .cloned()
            .collect();
        assert_eq!(skipped, offsite_expired_main, "round {round}: {to_main}");
        let expired_offsite: Vec<String> = ids
            .iter()
            .filter(|id| !offsite.contains(id))
            .cloned()
            .collect();
        assert_eq!(
            tombstones(&shipper, "offsite"),
            expired_offsite,
            "round {round}"
        );
        // No WAL (segments, backup history files) before the oldest kept
        // backup's start came back.
        for (name, info) in [("main", &main_info), ("offsite", &offsite_info)] {
            // offsite got its WAL from archive-push before it held any
            // backup; its own expire trims it from round 2 on.
            if name == "offsite" && round == 1 {
                continue;
            }
            let oldest = info["backups"][0]["wal_start"].as_str().unwrap();
            let w = &info["wal"];
            for t in w["timelines"].as_array().unwrap() {
                let first = t["first"].as_str().unwrap();
                assert!(
                    first >= oldest,
                    "round {round}: {name} holds WAL {first} before its oldest backup's {oldest}"
                );
            }
            for b in w["backup_history_files"].as_array().unwrap() {
                assert!(b.as_str().unwrap() >= oldest, "round {round}: {name}: {b}");
            }
        }
        if round >= 2 {
            assert!(
                to_main["wal_skipped"].as_u64().unwrap() > 0,
                "round {round}: offsite holds WAL main expired: {to_main}"
            );
        }
    }
    // Steady state: another expire and sync change nothing.
    run_ok(shipper.cmd().arg("expire"));
    let out = run_ok(shipper.cmd().arg("repo-sync"));
    assert!(
        out.contains("main: copied 0 WAL files, 0 backups")
            && out.contains("offsite: copied 0 WAL files, 0 backups"),
        "{out}"
    );
    assert_eq!(shipper.held("main").0, keep(&ids, 1));
    assert_eq!(shipper.held("offsite").0, keep(&ids, 3));

    // Policy flags need --repo with several repositories: exit 2, and an
    // error event on stdout with --json.
    let o = run(shipper.cmd().args(["expire", "--keep-full", "2", "--json"]));
    assert_eq!(o.status.code(), Some(2));
    let lines = json_lines(&String::from_utf8_lossy(&o.stdout));
    let e = lines.last().expect("an error event");
    assert_eq!(e["event"], "error", "{e}");
    assert_eq!(e["code"], 2, "{e}");
    assert_eq!(e["kind"], "usage", "{e}");
    assert!(e["message"].as_str().unwrap().contains("--repo"), "{e}");
    assert!(e["hint"].is_string(), "{e}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--repo"));
    // With --repo the flags apply to that repository only.
    let v = json_lines(&run_ok(shipper.cmd().args([
        "--repo",
        "offsite",
        "expire",
        "--dry-run",
        "--keep-full",
        "2",
        "--json",
    ])));
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0]["repository"], "offsite");
    assert_eq!(v[0]["removed"].as_array().unwrap().len(), 1, "{}", v[0]);

    // A repository that cannot be opened does not stop the others: each
    // is expired, the failure is an error event naming it, and the run
    // ends with an error (exit 3, unavailable).
    let mut text = std::fs::read_to_string(&shipper.config).unwrap();
    text.push_str(&format!(
        "[[repo]]\nname = \"gone\"\ntype = \"posix\"\npath = \"{}\"\nretention_full = 1\n",
        d.join("gone").display()
    ));
    std::fs::write(&shipper.config, text).unwrap();
    let o = run(shipper.cmd().args(["expire", "--json"]));
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let lines = json_lines(&String::from_utf8_lossy(&o.stdout));
    let events: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["event"].as_str().unwrap(),
                l["repository"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("expire", "main"),
            ("expire", "offsite"),
            ("error", "gone"),
            ("error", "-")
        ],
        "{lines:?}"
    );
    for e in &lines[2..] {
        assert_eq!(e["code"], 3, "{e}");
        assert_eq!(e["kind"], "unavailable", "{e}");
        assert!(e["hint"].as_str().is_some_and(|h| !h.is_empty()), "{e}");
    }
    assert!(lines[3]["message"].as_str().unwrap().contains("gone"));
    src.stop();
}
