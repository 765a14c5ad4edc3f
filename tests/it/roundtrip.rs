//! Backup → restore round trips through the real binary and the local store.

use super::helpers::*;

fn backup(sb: &Sandbox, cluster: &str, name: &str, extra: &[&str]) {
    let mut args = vec![
        "plan",
        "start",
        "backup-local",
        "--cluster",
        cluster,
        "-p",
        &format!("SNAPSHOT_NAME={name}"),
        "-p",
        "BACKUP_DIR=store",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    sb.ok(&refs);
}

#[test]
fn round_trip_is_byte_identical_with_modes_and_empty_dirs() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 200_000);
    backup(&sb, src.to_str().unwrap(), "snap-1", &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 3);
    let out = sb.ok(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=snap-1",
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert!(text(&out).0.contains("COMPLETE"));
    for i in 0..3 {
        let source = without(tree(&sb.path(&format!("src/node-{i}"))), &["system"]);
        let restored = tree(&sb.path(&format!("tgt/node-{i}")));
        assert!(
            source.contains_key("app/empty-table"),
            "fixture has an empty dir"
        );
        assert!(
            source.values().any(|v| v.starts_with("file 755")),
            "fixture has modes"
        );
        assert_eq!(source, restored, "node {i} differs");
    }
    // The system keyspace was left out of the snapshot.
    let manifest = std::fs::read_to_string(sb.path("store/snap-1/manifest.json")).unwrap();
    assert!(!manifest.contains("\"system\""));
    // Verify reads everything back.
    sb.ok(&[
        "snapshots",
        "verify",
        "snap-1",
        "--store",
        "store",
        "--read-data",
    ]);
}

#[test]
fn serial_and_parallel_backups_give_the_same_bytes() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 100_000);
    let c = src.to_str().unwrap();
    backup(&sb, c, "serial", &["-p", "STRATEGY=serial"]);
    backup(
        &sb,
        c,
        "parallel",
        &[
            "-p",
            "STRATEGY=parallel",
            "-p",
            "MAX_CONCURRENCY=3",
            "-p",
            "MODE=full",
        ],
    );
    for i in 0..3 {
        let a = std::fs::read(sb.path(&format!("store/serial/node-{i}.tar.gz"))).unwrap();
        let b = std::fs::read(sb.path(&format!("store/parallel/node-{i}.tar.gz"))).unwrap();
        assert!(!a.is_empty());
        assert_eq!(a, b, "node {i}");
    }
}

#[test]
fn keyspace_selection_limits_backup_and_restore() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    backup(
        &sb,
        src.to_str().unwrap(),
        "s",
        &["-p", "KEYSPACES=metrics system"],
    );
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    sb.ok(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "KEYSPACES=metrics",
    ]);
    let restored = tree(&sb.path("tgt/node-0"));
    let expected = without(tree(&sb.path("src/node-0")), &["app", "system"]);
    assert_eq!(restored, expected);
}

#[test]
fn restore_onto_existing_keyspace_is_refused_and_target_untouched() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 1000);
    backup(&sb, src.to_str().unwrap(), "s", &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    std::fs::create_dir_all(sb.path("tgt/node-1/app/existing-table")).unwrap();
    std::fs::write(sb.path("tgt/node-1/app/existing-table/f"), b"keep me").unwrap();
    std::fs::create_dir_all(sb.path("tgt/node-0")).unwrap();
    let before = exact_tree(&sb.path("tgt"));
    let out = sb.run(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let (_, err) = text(&out);
    assert!(err.contains("node 1: keyspace(s) already exist"), "{err}");
    assert!(err.contains(": app"), "{err}");
    assert_eq!(before, exact_tree(&sb.path("tgt")));
}

#[test]
fn corrupted_object_is_refused_by_restore_and_verify() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 300_000);
    backup(&sb, src.to_str().unwrap(), "s", &[]);
    // Flip one byte in the middle of node 1's object, keeping its size.
    let obj = sb.path("store/s/node-1.tar.gz");
    let mut data = std::fs::read(&obj).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x01;
    std::fs::write(&obj, &data).unwrap();

    let out = sb.run(&[
        "snapshots",
        "verify",
        "s",
        "--store",
        "store",
        "--read-data",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).0.contains("node-1.tar.gz"), "{:?}", text(&out));

    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    std::fs::create_dir_all(sb.path("tgt/node-0")).unwrap();
    std::fs::create_dir_all(sb.path("tgt/node-1")).unwrap();
    let before = exact_tree(&sb.path("tgt"));
    let out = sb.run(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "STRATEGY=parallel",
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).1.contains("node-1.tar.gz"), "{:?}", text(&out));
    // Node 0 staged fine, node 1 failed: nothing was moved into place anywhere.
    assert_eq!(before, exact_tree(&sb.path("tgt")));
}

#[test]
fn incomplete_snapshot_is_listed_and_never_restored_and_complete_never_overwritten() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    backup(&sb, src.to_str().unwrap(), "s", &[]);
    // A second backup with the same name is refused by the checks.
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        src.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).1.contains("never overwritten"));
    // Without its manifest the snapshot is incomplete.
    std::fs::remove_file(sb.path("store/s/manifest.json")).unwrap();
    let out = sb.ok(&["snapshots", "list", "--store", "store", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "s");
    assert_eq!(v[0]["complete"], false);
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let out = sb.run(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "BACKUP_DIR=store",
    ]);
    // Not found (exit 5), as verify and delete say of it; refused, nothing made.
    assert_eq!(out.status.code(), Some(5), "{:?}", text(&out));
    assert!(text(&out).1.contains("no manifest.json"));
    assert!(text(&out).1.contains("REFUSED"), "{:?}", text(&out));
    assert!(!sb.path("tgt/node-0").exists());
    let out = sb.run(&["snapshots", "verify", "s", "--store", "store"]);
    assert_eq!(out.status.code(), Some(5), "{:?}", text(&out));
    let out = sb.run(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=never-made",
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert_eq!(out.status.code(), Some(5), "{:?}", text(&out));
    // Delete removes it.
    sb.ok(&["snapshots", "delete", "s", "--store", "store"]);
    assert!(!sb.path("store/s").exists());
}

/// A full disk is refused by the pre-flight check (through a fake `Disk`), before
/// anything is staged.
#[test]
fn restore_onto_a_full_disk_is_refused_before_anything_is_written() {
    struct Full;
    impl cairn::checks::Disk for Full {
        fn available(&self, _: &std::path::Path) -> std::io::Result<u64> {
            Ok(1 << 20)
        }
    }
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 4 << 20);
    backup(&sb, src.to_str().unwrap(), "s", &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        let state = cairn::state::StateStore::open(&sb.path("home2")).unwrap();
        let mut engine =
            cairn::engine::Engine::new(state, std::sync::Arc::new(cairn::progress::Silent));
        engine.disk = std::sync::Arc::new(Full);
        let plan = cairn::plan::Plan::find("restore-local", None).unwrap();
        let cluster = cairn::cluster::Cluster::load(&tgt).unwrap();
        let params: Vec<cairn::plan::params::CliParam> = [
            "SNAPSHOT_NAME=s",
            &format!("BACKUP_DIR={}", sb.path("store").display()),
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        let env: std::collections::BTreeMap<String, String> = Default::default();
        engine
            .start(plan, &params, &env, cluster)
            .await
            .unwrap()
            .into_result()
            .expect_err("refused")
    });
    assert_eq!(err.exit_code(), 3, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("node 0") && msg.contains("1.0 MiB free"),
        "{msg}"
    );
    assert!(!sb.path("tgt/node-0").exists(), "nothing was created");
}
