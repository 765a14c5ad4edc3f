//! Nightly operations: retention, locks, verification, partial restore, templates,
//! the --json summary line and `snapshots last`.

use crate::it::helpers::{
    Sandbox, lock_file, source_cluster, target_cluster, text, tree, wait_until_running,
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use std::collections::BTreeSet;
use std::path::Path;

fn name_of(t: DateTime<Utc>) -> String {
    format!("h-{}", t.format("%Y%m%dT%H"))
}

/// A complete snapshot with no nodes, finished at `t`, written straight into a
/// directory store.
fn synthetic(store: &Path, name: &str, t: DateTime<Utc>) {
    let m = serde_json::json!({
        "format_version": 1, "cairn_version": "0.1.0", "snapshot": name, "plan": "backup-local",
        "started_at": t.to_rfc3339(), "finished_at": t.to_rfc3339(),
        "cluster": {"name": "synthetic", "nodes": []}, "objects": []
    });
    std::fs::create_dir_all(store.join(name)).unwrap();
    std::fs::write(store.join(name).join("manifest.json"), m.to_string()).unwrap();
}

fn names_in(store: &Path) -> BTreeSet<String> {
    std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .filter(|n| !n.starts_with(".cairn"))
        .collect()
}

#[test]
fn prune_keeps_exactly_what_the_tiered_policy_names() {
    let sb = Sandbox::new();
    let store = sb.path("store");
    let midnight = Utc.with_ymd_and_hms(2026, 11, 20, 0, 0, 0).unwrap();
    let now = midnight + Duration::minutes(30);
    // 20 days of hourly snapshots: k hours before midnight, k = 0..479.
    let at = |k: i64| midnight - Duration::hours(k);
    for k in 0..480 {
        synthetic(&store, &name_of(at(k)), at(k));
    }
    // One snapshot verified good: its 12 h window keeps it rather than the newest.
    let verified = Utc.with_ymd_and_hms(2026, 11, 17, 5, 0, 0).unwrap();
    std::fs::create_dir_all(store.join(".cairn-verify")).unwrap();
    std::fs::write(
        store.join(format!(".cairn-verify/{}.json", name_of(verified))),
        r#"{"at":"2026-11-18T00:00:00Z","mode":"read-data","sample_percent":null,"ok":true,"problems":0}"#,
    )
    .unwrap();
    // One old snapshot that a restore elsewhere is reading (live lock).
    let in_use = Utc.with_ymd_and_hms(2026, 11, 2, 7, 0, 0).unwrap();
    lock_file(&store, &name_of(in_use), "restore", Utc::now().timestamp());
    // Two incomplete snapshots: one abandoned long ago, one just written.
    for (name, age_secs) in [("abandoned", 3 * 86_400), ("fresh", 60)] {
        let f = store.join(name).join("node-0.tar.gz");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"partial").unwrap();
        // Ages are judged against the prune's --now.
        let t = filetime::FileTime::from_unix_time(now.timestamp() - age_secs, 0);
        filetime::set_file_mtime(&f, t).unwrap();
    }
    // A prune killed midway through deleting an old snapshot: its manifest is gone,
    // one object is left, and so is the dead prune's (stale) lock.
    let half = store.join("half-deleted");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("node-1.tar.gz"), b"rest").unwrap();
    let t = filetime::FileTime::from_unix_time(now.timestamp() - 30 * 86_400, 0);
    filetime::set_file_mtime(half.join("node-1.tar.gz"), t).unwrap();
    lock_file(
        &store,
        "half-deleted",
        "prune",
        Utc::now().timestamp() - 3600,
    );

    // Worked out by hand for now = 2026-11-20T00:30Z and policy 24h,12h:7d,24h:15d:
    let mut expected = BTreeSet::new();
    // younger than 24 h: k = 0..23 (ages 0.5 h … 23.5 h);
    for k in 0..24 {
        expected.insert(name_of(at(k)));
    }
    let t = |d: u32, h: u32| name_of(Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap());
    // 24 h – 7 d (k = 24..167, 11-19 00:00 back to 11-13 01:00), newest per 12 h
    // window [00:00, 12:00) / [12:00, 24:00): 11-19 00:00 is alone in its window's
    // part of this tier; then 11:00 and 23:00 of 11-13 … 11-18, except that 11-17's
    // morning window keeps its verified 05:00.
    expected.insert(t(19, 0));
    for d in 13..=18 {
        expected.insert(t(d, 23));
        expected.insert(if d == 17 { t(17, 5) } else { t(d, 11) });
    }
    // 7 d – 15 d (k = 168..359, 11-13 00:00 back to 11-05 01:00), newest per day:
    // 11-13 00:00 (alone in its day's part of this tier), 23:00 of 11-05 … 11-12.
    expected.insert(t(13, 0));
    for d in 5..=12 {
        expected.insert(t(d, 23));
    }
    assert_eq!(expected.len(), 24 + 13 + 9);
    // Older than 15 d goes, except the locked one; incomplete: the abandoned one goes.
    expected.insert(name_of(in_use));
    expected.insert("fresh".into());

    let all = names_in(&store);
    let url = format!("file://{}", store.display());
    let now_arg = now.to_rfc3339();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "snapshots",
            "prune",
            "--store",
            url.as_str(),
            "--now",
            now_arg.as_str(),
            "--json",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        sb.run(&refs)
    };
    // --dry-run deletes nothing and says what would go.
    let out = run(args(&["--dry-run"]));
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(names_in(&store), all, "a dry run deleted something");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let would_keep: BTreeSet<String> = report["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .map(|d| d["snapshot"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(would_keep, expected);

    let out = run(args(&[]));
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(names_in(&store), expected);
    assert!(
        !store
            .join(".cairn-locks/half-deleted/other-host-1.json")
            .exists()
    );
    // Run again (as after a prune killed midway): nothing more to do.
    let out = run(args(&[]));
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(names_in(&store), expected);
    assert!(
        !store
            .join(format!(".cairn-verify/{}.json", name_of(at(30))))
            .exists()
    );

    // A policy that keeps nothing still never deletes the newest complete snapshot.
    let later = (now + Duration::days(400)).to_rfc3339();
    let out = sb.run(&[
        "snapshots",
        "prune",
        "--store",
        &url,
        "--now",
        &later,
        "--policy",
        "1h",
        "--keep-last",
        "0",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let left = names_in(&store);
    assert!(
        left.contains(&name_of(at(0))),
        "the newest complete snapshot was pruned"
    );
    assert_eq!(
        left,
        // 400 days on, the once fresh incomplete snapshot is past its grace too.
        BTreeSet::from([name_of(at(0)), name_of(in_use)])
    );
}

fn backup_args<'a>(cluster: &'a str, name: &'a str, dir: &'a str) -> Vec<String> {
    [
        "plan",
        "start",
        "backup-local",
        "--cluster",
        cluster,
        "-p",
        &format!("SNAPSHOT_NAME={name}"),
        "-p",
        &format!("BACKUP_DIR={dir}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_second_backup_of_the_same_snapshot_is_refused_while_the_first_runs() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 6 << 20);
    let dir = sb.path("store");
    let mut first = backup_args(src.to_str().unwrap(), "nightly", dir.to_str().unwrap());
    // Slow enough (about 6 s a node) that a busy machine's status polls see
    // node 0 running: at 3 MiB/s a poll could miss its two seconds.
    first.extend(["-p".into(), "MAX_BANDWIDTH=1MiB/s".into(), "-q".into()]);
    let mut child = sb.command(&refs(&first)).spawn().unwrap();
    wait_until_running(&sb, 1, "backup/backup-node/node-0");
    // Another machine (its own state home) starts the same backup.
    let second = backup_args(src.to_str().unwrap(), "nightly", dir.to_str().unwrap());
    let mut args = refs(&second);
    args.push("--json");
    let out = sb
        .command(&args)
        .env("CAIRN_HOME", sb.path("other-home"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{:?}", text(&out));
    let (stdout, stderr) = text(&out);
    assert!(
        stderr.contains("locked by plan backup-local (backup)"),
        "{stderr}"
    );
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["outcome"], "locked");
    assert_eq!(line["exit_code"], 4);
    assert!(child.wait().unwrap().success());
    // The first finished and released its lock.
    assert!(dir.join("nightly/manifest.json").exists());
    let locks = dir.join(".cairn-locks/nightly");
    assert!(!locks.exists() || std::fs::read_dir(&locks).unwrap().count() == 0);
}

#[test]
fn a_stale_lock_is_reported_and_broken_only_with_the_flag() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    let dir = sb.path("store");
    lock_file(&dir, "nightly", "backup", Utc::now().timestamp() - 3600);
    let args = backup_args(src.to_str().unwrap(), "nightly", dir.to_str().unwrap());
    let out = sb.run(&refs(&args));
    assert_eq!(out.status.code(), Some(4), "{:?}", text(&out));
    let stderr = text(&out).1;
    assert!(
        stderr.contains("stale lock")
            && stderr.contains("other-host")
            && stderr.contains("--break-lock"),
        "{stderr}"
    );
    assert!(
        !dir.join("nightly").exists(),
        "a refused run wrote to the store"
    );
    let mut with_flag = refs(&args);
    with_flag.push("--break-lock");
    sb.ok(&with_flag);
    assert!(dir.join("nightly/manifest.json").exists());
    let locks = dir.join(".cairn-locks/nightly");
    assert!(!locks.exists() || std::fs::read_dir(&locks).unwrap().count() == 0);
}

#[test]
fn verify_read_data_catches_one_flipped_byte_and_the_result_is_recorded() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 100_000);
    let dir = sb.path("store");
    sb.ok(&refs(&backup_args(
        src.to_str().unwrap(),
        "s",
        dir.to_str().unwrap(),
    )));
    let url = format!("file://{}", dir.display());
    let obj = dir.join("s/node-1.tar.gz");
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&obj, bytes).unwrap();
    // Metadata only: the object is there with its size.
    sb.ok(&["snapshots", "verify", "s", "--store", &url]);
    let out = sb.run(&["snapshots", "verify", "s", "--store", &url, "--read-data"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).0.contains("node-1.tar.gz"), "{:?}", text(&out));
    let list = sb.ok(&["snapshots", "list", "--store", &url, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v[0]["verified"]["mode"], "read-data");
    assert_eq!(v[0]["verified"]["ok"], false);
    // A 100 % sample reads every node object, so it catches it too.
    let out = sb.run(&[
        "snapshots",
        "verify",
        "s",
        "--store",
        &url,
        "--sample",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
}

#[test]
fn partial_restore_restores_exactly_what_was_asked() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 10_000);
    let dir = sb.path("store");
    sb.ok(&refs(&backup_args(
        src.to_str().unwrap(),
        "s",
        dir.to_str().unwrap(),
    )));
    let restore = |cluster: &Path, extra: &[&str]| {
        let mut a = vec![
            "plan".to_string(),
            "restore-local".into(),
            "--cluster".into(),
            cluster.to_str().unwrap().into(),
            "-p".into(),
            "SNAPSHOT_NAME=s".into(),
            "-p".into(),
            format!("BACKUP_DIR={}", dir.display()),
        ];
        a.insert(1, "start".into());
        for e in extra {
            a.push("-p".into());
            a.push(e.to_string());
        }
        sb.run(&refs(&a))
    };
    // One keyspace into nodes that already hold another (different) `metrics`.
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    for i in 0..2 {
        std::fs::create_dir_all(sb.path(&format!("tgt/node-{i}/metrics/mine"))).unwrap();
        std::fs::write(sb.path(&format!("tgt/node-{i}/metrics/mine/x")), b"keep me").unwrap();
    }
    let before: Vec<_> = (0..2)
        .map(|i| tree(&sb.path(&format!("tgt/node-{i}/metrics"))))
        .collect();
    let out = restore(&tgt, &["KEYSPACES=app"]);
    assert!(out.status.success(), "{:?}", text(&out));
    for (i, metrics_before) in before.iter().enumerate() {
        let node = sb.path(&format!("tgt/node-{i}"));
        let got = tree(&node);
        let app = tree(&sb.path(&format!("src/node-{i}/app")));
        assert_eq!(tree(&node.join("app")), app, "node {i}: app differs");
        assert_eq!(
            &tree(&node.join("metrics")),
            metrics_before,
            "node {i}: metrics touched"
        );
        let tops: BTreeSet<&str> = got.keys().map(|k| k.split('/').next().unwrap()).collect();
        assert_eq!(tops, BTreeSet::from(["app", "metrics"]), "node {i}");
    }
    // One table of node 1 only, into a separate directory.
    let out = restore(
        &tgt,
        &[
            "PATHS=app/users-1",
            "NODES=1",
            &format!("RESTORE_DIR={}", sb.path("inspect").display()),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let got = tree(&sb.path("inspect"));
    let files: BTreeSet<&str> = got.keys().map(String::as_str).collect();
    assert!(
        files
            .iter()
            .all(|f| *f == "node-1" || f.starts_with("node-1/app")),
        "{files:?}"
    );
    assert_eq!(
        tree(&sb.path("inspect/node-1/app/users-1")),
        tree(&sb.path("src/node-1/app/users-1"))
    );
    assert!(!sb.path("inspect/node-1/app/orders-2").exists());
    assert!(!sb.path("inspect/node-0").exists());
    // The same path again: it exists now, so the restore is refused and changes nothing.
    let snapshot_of_inspect = tree(&sb.path("inspect"));
    let out = restore(
        &tgt,
        &[
            "PATHS=app/users-1",
            "NODES=1",
            &format!("RESTORE_DIR={}", sb.path("inspect").display()),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("app/users-1"), "{:?}", text(&out));
    assert_eq!(tree(&sb.path("inspect")), snapshot_of_inspect);
    // A path that is in no file of the snapshot is refused.
    let out = restore(
        &tgt,
        &[
            "PATHS=app/nope",
            &format!("RESTORE_DIR={}", sb.path("other").display()),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("PATHS entry \"app/nope\""),
        "{:?}",
        text(&out)
    );
}

#[test]
fn snapshot_name_templates_expand_and_the_json_summary_line_says_what_happened() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    let dir = sb.path("store");
    let before = Utc::now().format("%Y-%m-%d").to_string();
    let mut args = backup_args(
        src.to_str().unwrap(),
        "nightly-{date}",
        dir.to_str().unwrap(),
    );
    args.push("--json".into());
    let out = sb.ok(&refs(&args));
    let after = Utc::now().format("%Y-%m-%d").to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let last = stdout.trim().lines().last().unwrap();
    let line: serde_json::Value = serde_json::from_str(last).unwrap();
    let name = line["snapshot"].as_str().unwrap().to_string();
    assert!(
        name == format!("nightly-{before}") || name == format!("nightly-{after}"),
        "{name}"
    );
    assert_eq!(line["outcome"], "success");
    assert_eq!(line["exit_code"], 0);
    assert!(dir.join(&name).join("manifest.json").exists());
    let mut args = backup_args(src.to_str().unwrap(), "n-{datetime}", dir.to_str().unwrap());
    args.push("-q".into());
    sb.ok(&refs(&args));
    let dt = names_in(&dir)
        .into_iter()
        .find(|n| n.starts_with("n-"))
        .unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(&dt[2..], "%Y%m%dT%H%M%SZ").is_ok(),
        "{dt}"
    );
    // An unknown template is refused before anything runs, with a summary line.
    let mut args = backup_args(src.to_str().unwrap(), "n-{week}", dir.to_str().unwrap());
    args.push("--json".into());
    let out = sb.run(&refs(&args));
    assert_eq!(out.status.code(), Some(2));
    let line: serde_json::Value = serde_json::from_str(text(&out).0.trim()).unwrap();
    assert_eq!(line["outcome"], "invalid");
    assert_eq!(line["status"], "NOT_STARTED");
}

#[test]
fn last_reports_the_newest_complete_snapshot_and_its_age() {
    let sb = Sandbox::new();
    let store = sb.path("store");
    std::fs::create_dir_all(&store).unwrap();
    let url = format!("file://{}", store.display());
    let out = sb.run(&["snapshots", "last", "--store", &url]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "no snapshot at all: {:?}",
        text(&out)
    );
    let t = Utc.with_ymd_and_hms(2026, 11, 20, 2, 0, 0).unwrap();
    synthetic(&store, "old", t - Duration::days(1));
    synthetic(&store, "new", t);
    // A newer incomplete one does not count.
    std::fs::create_dir_all(store.join("newest-incomplete")).unwrap();
    std::fs::write(store.join("newest-incomplete/node-0.tar.gz"), b"x").unwrap();
    let at = |now: DateTime<Utc>, max: &str| {
        sb.run(&[
            "snapshots",
            "last",
            "--store",
            &url,
            "--max-age",
            max,
            "--now",
            &now.to_rfc3339(),
            "--json",
        ])
    };
    let out = at(t + Duration::hours(3), "26h");
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshot"], "new");
    assert_eq!(v["age_secs"], 3 * 3600);
    let out = at(t + Duration::hours(27), "26h");
    assert_eq!(out.status.code(), Some(6), "{:?}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stale"], true);
}

/// A complete synthetic snapshot of `cluster` with `tags`, finished at `t`.
fn synthetic_of(store: &Path, name: &str, t: DateTime<Utc>, cluster: &str, tags: &[&str]) {
    let mut m = serde_json::json!({
        "format_version": 1, "cairn_version": "0.1.0", "snapshot": name, "plan": "backup-local",
        "started_at": t.to_rfc3339(), "finished_at": t.to_rfc3339(),
        "cluster": {"name": cluster, "nodes": []}, "objects": []
    });
    if !tags.is_empty() {
        m["tags"] = serde_json::json!(tags);
    }
    std::fs::create_dir_all(store.join(name)).unwrap();
    std::fs::write(store.join(name).join("manifest.json"), m.to_string()).unwrap();
}

/// Retention per cluster and by tag: a short policy never deletes the only
/// snapshot of another cluster, nor a hand-made tagged one; `--tag` applies the
/// policy to the tagged ones (each cluster on its own), `--keep-tag` keeps them,
/// `--cluster` limits the prune to one cluster. A backup's TAGS reach its manifest
/// and `snapshots list --json`.
#[test]
fn prune_works_per_cluster_and_leaves_tagged_snapshots_unless_asked() {
    let sb = Sandbox::new();
    let store = sb.path("store");
    let now = Utc.with_ymd_and_hms(2026, 11, 20, 0, 0, 0).unwrap();
    let ago = |h: i64| now - Duration::hours(h);
    synthetic_of(&store, "a-1", ago(24), "alpha", &[]);
    synthetic_of(&store, "a-2", ago(48), "alpha", &[]);
    synthetic_of(&store, "a-3", ago(72), "alpha", &[]);
    synthetic_of(&store, "b-1", ago(96), "beta", &[]);
    synthetic_of(&store, "a-up-1", ago(100), "alpha", &["pre-upgrade"]);
    synthetic_of(&store, "a-up-2", ago(200), "alpha", &["pre-upgrade"]);
    synthetic_of(&store, "b-up-1", ago(300), "beta", &["pre-upgrade"]);
    let prune = |extra: &[&str]| {
        let mut a = vec![
            "snapshots",
            "prune",
            "--store",
            "store",
            "--policy",
            "1h",
            "--keep-last",
            "1",
            "--now",
            "2026-11-20T00:00:00Z",
        ];
        a.extend_from_slice(extra);
        let out = sb.ok(&a);
        text(&out).0
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    // Untagged, each cluster on its own: alpha keeps its newest, beta its only one.
    let said = prune(&[]);
    assert!(
        said.contains("newest complete snapshot of cluster beta"),
        "{said}"
    );
    assert!(
        said.contains("a pre-upgrade") || said.contains("tagged pre-upgrade"),
        "{said}"
    );
    assert_eq!(
        names_in(&store),
        set(&["a-1", "b-1", "a-up-1", "a-up-2", "b-up-1"])
    );

    // Limited to beta and kept tags: nothing of alpha's or of the tag goes.
    prune(&["--tag", "pre-upgrade", "--cluster", "beta"]);
    prune(&["--tag", "pre-upgrade", "--keep-tag", "pre-upgrade"]);
    assert_eq!(
        names_in(&store),
        set(&["a-1", "b-1", "a-up-1", "a-up-2", "b-up-1"])
    );

    // The tag's own policy: alpha's older tagged snapshot goes, beta's stays.
    prune(&["--tag", "pre-upgrade"]);
    assert_eq!(names_in(&store), set(&["a-1", "b-1", "a-up-1", "b-up-1"]));

    // A real backup carries its tags.
    let src = source_cluster(sb.dir.path(), 1, 10);
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "-q",
        "--cluster",
        src.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=tagged",
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "TAGS=pre-upgrade, audit",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("tagged/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["tags"], serde_json::json!(["audit", "pre-upgrade"]));
    let out = sb.ok(&["snapshots", "list", "--store", "store", "--json"]);
    assert!(text(&out).0.contains("\"audit\""), "{:?}", text(&out));
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        src.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=bad-tag",
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "TAGS=no/slash",
    ]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
}
