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
    let text = std::fs::read_to_string(&shipper.config).unwrap();
    let start = text.find("[repo]").unwrap();
    let end = text.find("[encryption]").unwrap();
    let primary = format!(
        "[[repo]]\nname = \"main\"\ntype = \"posix\"\npath = \"{}\"\n",
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
    let src = Cluster::init(
        d,
        "src",
        &[
            "archive_mode = on".into(),
            format!("archive_command = {}", shipper.archive_command()),
        ],
    );
    run_ok(
        shipper
            .cmd()
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    src.start();
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
