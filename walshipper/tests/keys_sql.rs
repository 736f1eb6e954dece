//! Data keys from SQL end to end: a real cluster with pg_backup_ext
//! preloaded, its scheduler running the real walshipper on a posix
//! repository. A rotation asked for in SQL that fails (the scheduler's
//! configuration has a wrong passphrase) is recorded, audited and alerted,
//! nothing changed; fixed, the next one succeeds and the alert resolves;
//! backup.keys follows what `walshipper info --json` reports; a rotation
//! policy is carried out by the scheduler and audited; a retirement policy
//! retires the old keys (their files gone, every object re-sealed by the
//! current key). One cluster for all of it; about 60 s.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);

/// The repository's current key, as its descriptor names it.
fn descriptor_key(shipper: &Shipper) -> String {
    let text = std::fs::read_to_string(shipper.repo.join("repository.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["current_key_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no current_key_id in {text}"))
        .to_string()
}

/// The key files the repository holds (their ids).
fn key_files(shipper: &Shipper) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(shipper.repo.join("keys"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// `walshipper info --json --key-usage`'s keys of the repository.
fn info_keys(shipper: &Shipper) -> Vec<serde_json::Value> {
    let out = run_ok(shipper.cmd().args(["info", "--json", "--key-usage"]));
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    info["repositories"][0]["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys in {info}"))
        .clone()
}

#[test]
fn key_rotation_from_sql_is_carried_out_audited_and_alerted() {
    let dir = scratch("keys-sql");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.database = 'postgres'",
            "pg_backup.retry_max = 0",
            "pg_backup.repo_status_interval = 1",
            "pg_backup.key_retry_delay = 1",
            "pg_backup.key_usage_interval = 3600",
            "pg_backup.verify_after_backup = off",
            // No expire with the wrong configuration below.
            "pg_backup.expire_after_backup = off",
        ],
    );
    start_with_extension(&shipper, &c);
    let first = descriptor_key(&shipper);
    // A backup and WAL sealed by the first key, for the retirement to re-seal.
    c.sql("CREATE TABLE t AS SELECT g AS i, md5(g::text) AS m FROM generate_series(1, 20000) g");
    let id = c.sql("SELECT backup.backup_run(wait => true)");
    assert_eq!(
        c.sql(&format!(
            "SELECT status FROM backup.backup_executions WHERE execution_id = {id}"
        )),
        "succeeded"
    );
    c.switch_and_wait_archived(WAIT);

    // 1. The scheduler's configuration opens the repository with a wrong
    // passphrase: the rotation fails, recorded with walshipper's reason,
    // audited, alerted; the repository keeps its key.
    let wrong_pass = d.join("wrong-passphrase");
    std::fs::write(&wrong_pass, "not the passphrase of this repository\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong_pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong_cfg = d.join("walshipper-wrong.toml");
    let text = std::fs::read_to_string(&shipper.config)
        .unwrap()
        .replace(
            &shipper.passphrase_file.display().to_string(),
            &wrong_pass.display().to_string(),
        )
        .replace(
            &d.join("keycache").display().to_string(),
            &d.join("keycache-wrong").display().to_string(),
        );
    std::fs::write(&wrong_cfg, text).unwrap();
    std::fs::set_permissions(&wrong_cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    c.sql(&format!(
        "ALTER SYSTEM SET pg_backup.walshipper_config = '{}'",
        wrong_cfg.display()
    ));
    c.sql("SELECT pg_reload_conf()");
    let op = c.sql("SELECT backup.rotate_key_now()");
    wait_for(
        &c,
        &format!("SELECT status FROM backup.key_operations WHERE operation_id = {op}"),
        "failed",
        WAIT,
    );
    let error = c.sql(&format!(
        "SELECT error FROM backup.key_operations WHERE operation_id = {op}"
    ));
    assert!(!error.is_empty(), "a failed rotation without its reason");
    assert_eq!(
        c.sql(
            "SELECT severity || ' ' || subject FROM backup.alerts \
              WHERE kind = 'key_rotation_failed' AND resolved_at IS NULL"
        ),
        "warning key rotate"
    );
    assert_eq!(
        c.sql(&format!(
            "SELECT actor || ' ' || (details->>'error' = {}) FROM backup.audit_log \
              WHERE action = 'key_rotation_failed' AND (details->>'operation_id')::bigint = {op}",
            sql_text(&error)
        )),
        "scheduler true"
    );
    assert_eq!(
        descriptor_key(&shipper),
        first,
        "a failed rotation changed the key"
    );
    assert_eq!(key_files(&shipper), vec![first.clone()]);
    // The passphrase is in no catalog table, message or audit row.
    let pass = std::fs::read_to_string(&shipper.passphrase_file).unwrap();
    let wrong = std::fs::read_to_string(&wrong_pass).unwrap();
    for secret in [pass.trim(), wrong.trim()] {
        assert_eq!(
            c.sql(&format!(
                "SELECT (SELECT count(*) FROM backup.audit_log a WHERE a::text LIKE '%' || {0} || '%') \
                      + (SELECT count(*) FROM backup.alerts l WHERE l::text LIKE '%' || {0} || '%') \
                      + (SELECT count(*) FROM backup.key_operations o WHERE o::text LIKE '%' || {0} || '%')",
                sql_text(secret)
            )),
            "0"
        );
    }

    // 2. Fixed: the next rotation succeeds, the alert resolves, and the
    // audit row names the key the repository now seals with.
    c.sql("ALTER SYSTEM RESET pg_backup.walshipper_config");
    c.sql("SELECT pg_reload_conf()");
    let op = c.sql("SELECT backup.rotate_key_now()");
    wait_for(
        &c,
        &format!("SELECT status FROM backup.key_operations WHERE operation_id = {op}"),
        "succeeded",
        WAIT,
    );
    let second = descriptor_key(&shipper);
    assert_ne!(second, first);
    assert_eq!(
        c.sql(&format!(
            "SELECT key_id FROM backup.key_operations WHERE operation_id = {op}"
        )),
        second
    );
    assert_eq!(
        c.sql(&format!(
            "SELECT actor || ' ' || object_name || ' ' || (details->>'reason') FROM backup.audit_log \
              WHERE action = 'key_rotated' AND (details->>'operation_id')::bigint = {op}"
        )),
        format!("scheduler {second} requested")
    );
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.alerts WHERE kind = 'key_rotation_failed' AND resolved_at IS NULL"),
        "0"
    );

    // 3. backup.keys follows walshipper info --json: the new key current,
    // the first previous, with the objects each seals (counted after a key
    // operation; walshipper gives the time of the count to the second).
    let keys = info_keys(&shipper);
    let current: Vec<_> = keys.iter().filter(|k| k["current"] == true).collect();
    assert_eq!(current.len(), 1, "{keys:?}");
    assert_eq!(current[0]["key_id"], second.as_str());
    wait_for(
        &c,
        &format!(
            "SELECT string_agg(key_id || ' ' || status || ' ' || (created_at IS NOT NULL), ', ' ORDER BY status) \
               FROM backup.keys \
              WHERE counted_at >= (SELECT date_trunc('second', finished_at) FROM backup.key_operations WHERE operation_id = {op})"
        ),
        &format!("{second} current true, {first} previous true"),
        WAIT,
    );
    assert_eq!(
        c.sql(&format!(
            "SELECT objects > 0 AND bytes > 0 FROM backup.keys WHERE key_id = '{first}'"
        )),
        "t",
        "the backup and WAL sealed by the first key are counted"
    );

    // 4. A rotation policy: the current key is due at once; the scheduler
    // rotates by itself and audits it as the policy's.
    c.sql("SELECT backup.set_key_rotation('1 second')");
    let third = wait_for_policy_op(&c, "key_rotated");
    c.sql("SELECT backup.set_key_rotation(NULL)");
    assert_eq!(
        c.sql("SELECT action || ' ' || actor FROM backup.audit_log WHERE action = 'key_rotation_policy_set' ORDER BY audit_id DESC LIMIT 1"),
        format!("key_rotation_policy_set {}", c.sql("SELECT session_user"))
    );
    // Any rotation that started before the policy was turned off ends first.
    wait_for(&c, "SELECT backup._sched_key_pending()", "f", WAIT);
    let now_current = descriptor_key(&shipper);
    assert_eq!(
        c.sql(&format!(
            "SELECT count(*) FROM backup.audit_log WHERE action = 'key_rotated' AND object_name = '{third}'"
        )),
        "1",
        "the policy's rotation is audited with its key"
    );
    assert_eq!(
        c.sql(
            "SELECT key_id FROM backup.key_operations WHERE status = 'succeeded' ORDER BY operation_id DESC LIMIT 1"
        ),
        now_current
    );

    // 5. A retirement policy: every key but the current one is retired by
    // the scheduler (walshipper key retire), audited; their files are gone
    // and every object is sealed by the current key.
    c.sql("SELECT backup.set_key_rotation(NULL, '1 second')");
    wait_for(
        &c,
        "SELECT string_agg(DISTINCT status, ',' ORDER BY status) FROM backup.keys",
        "current,retired",
        Duration::from_secs(90),
    );
    c.sql("SELECT backup.set_key_rotation(NULL)");
    assert_eq!(key_files(&shipper), vec![now_current.clone()]);
    assert_eq!(
        c.sql(&format!(
            "SELECT count(*) FROM backup.audit_log WHERE action = 'key_retired' AND object_name = '{first}' AND actor = 'scheduler'"
        )),
        "1"
    );
    for k in info_keys(&shipper) {
        assert_eq!(
            k["key_id"],
            now_current.as_str(),
            "a key left after retirement: {k}"
        );
    }
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.alerts WHERE kind LIKE 'key_rotation%' AND resolved_at IS NULL"),
        "0"
    );
}

/// Waits for an audit row `action` of an operation the policy started;
/// returns its key id.
fn wait_for_policy_op(c: &Cluster, action: &str) -> String {
    let sql = format!(
        "SELECT object_name FROM backup.audit_log WHERE action = '{action}' AND details->>'reason' = 'policy' \
          ORDER BY audit_id LIMIT 1"
    );
    let start = std::time::Instant::now();
    loop {
        let got = c.try_sql(&sql).unwrap_or_default();
        if !got.is_empty() {
            return got;
        }
        if start.elapsed() > WAIT {
            panic!(
                "no {action} by the policy within {WAIT:?}\noperations: {}\nkeys: {}\nlog:\n{}",
                c.sql("SELECT json_agg(o) FROM backup.key_operations o"),
                c.sql("SELECT json_agg(k) FROM backup.keys k"),
                c.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `s` as an SQL string literal.
fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
