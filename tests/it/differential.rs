//! Differential backups: a chain full → differential → differential restores
//! byte for byte at every point; deleting and pruning go by reachability, so no
//! kept snapshot loses an object it references; a delete killed midway is
//! finished by the next one.

use super::helpers::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Run cairn, expecting success; the output's stdout.
fn ok(sb: &Sandbox, args: &[&str]) -> String {
    text(&sb.ok(args)).0
}

fn backup(sb: &Sandbox, src: &Path, snap: &str, extra: &[&str]) {
    let a = start_args("backup-local", src, snap, extra);
    let out = sb.run_v(&a);
    assert!(out.status.success(), "backup {snap}: {:?}", text(&out));
}

/// Restore `snap` into a fresh target `name` and return each node's tree.
fn restored(
    sb: &Sandbox,
    snap: &str,
    name: &str,
    nodes: u32,
    extra: &[&str],
) -> Vec<BTreeMap<String, String>> {
    let tgt = target_cluster(sb.dir.path(), name, nodes);
    let a = start_args("restore-local", &tgt, snap, extra);
    let out = sb.run_v(&a);
    assert!(out.status.success(), "restore {snap}: {:?}", text(&out));
    (0..nodes)
        .map(|i| tree(&sb.path(&format!("{name}/node-{i}"))))
        .collect()
}

/// `snapshots verify NAME --read-data` says OK.
fn verified(sb: &Sandbox, snap: &str, store: &str) {
    let out = ok(
        sb,
        &["snapshots", "verify", snap, "--store", store, "--read-data"],
    );
    assert!(out.contains("OK"), "{snap}: {out}");
}

fn source_trees(sb: &Sandbox, nodes: u32) -> Vec<BTreeMap<String, String>> {
    (0..nodes)
        .map(|i| without(tree(&sb.path(&format!("src/node-{i}"))), &["system"]))
        .collect()
}

fn manifest(sb: &Sandbox, snap: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(sb.path(&format!("store/{snap}/manifest.json"))).unwrap())
        .unwrap()
}

fn write_at(path: &Path, data: &[u8], mtime: i64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    let t = filetime::FileTime::from_unix_time(mtime, 0);
    filetime::set_file_times(path, t, t).unwrap();
    // The table dir's time is the source's as well as the restore's to keep.
    let d = path.parent().unwrap();
    filetime::set_file_times(d, t, t).unwrap();
}

/// One night of changes on every node: a new SSTable, a rewritten file and,
/// with `compact`, the SSTable of the night before gone.
fn night(sb: &Sandbox, nodes: u32, n: u64, compact: bool) {
    for i in 0..nodes {
        let d = sb.path(&format!("src/node-{i}"));
        write_at(
            &d.join(format!("app/users-1/nb-{}-Data.db", 100 + n)),
            &noise(1000 * n + u64::from(i), 20_000 + n as usize * 7),
            1_700_100_000 + n as i64,
        );
        write_at(
            &d.join("app/orders-2/ünïcødé – naïve.db"),
            format!("node {i} night {n}\n").as_bytes(),
            1_700_200_000 + n as i64,
        );
        if compact && n >= 2 {
            std::fs::remove_file(d.join(format!("app/users-1/nb-{}-Data.db", 100 + n - 1)))
                .unwrap();
            let t = filetime::FileTime::from_unix_time(1_700_300_000 + n as i64, 0);
            filetime::set_file_times(d.join("app/users-1"), t, t).unwrap();
        }
    }
}

fn node_object_size(sb: &Sandbox, snap: &str, i: u32) -> u64 {
    std::fs::metadata(sb.path(&format!("store/{snap}/node-{i}.tar.gz")))
        .unwrap()
        .len()
}

#[test]
fn a_chain_full_differential_differential_restores_byte_for_byte_at_each_point() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 400_000);
    let mut points = Vec::new();
    backup(&sb, &src, "s1", &[]);
    points.push(("s1", source_trees(&sb, 2)));
    night(&sb, 2, 1, false);
    // A dry run says what the backup would build on.
    let mut a = start_args("backup-local", &src, "s2", &[]);
    a.insert(3, "--dry-run".into());
    let out = sb.run_v(&a);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out).0.contains("differential of s1"),
        "{:?}",
        text(&out)
    );
    let mut a = start_args("backup-local", &src, "s2", &["MODE=full"]);
    a.insert(3, "--dry-run".into());
    assert!(text(&sb.run_v(&a)).0.contains("full (MODE=full)"));
    // The run's summary says what the differential left where it was.
    let mut a = start_args("backup-local", &src, "s2", &[]);
    a.insert(0, "--json".into());
    let out = sb.run_v(&a);
    assert!(out.status.success(), "{:?}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &v["summary"]["differential"];
    assert_eq!(d["parent"], "s1", "{v}");
    assert!(d["unchanged_files"].as_u64().unwrap() >= 10, "{v}");
    assert!(d["unchanged_bytes"].as_u64().unwrap() > 400_000, "{v}");
    points.push(("s2", source_trees(&sb, 2)));
    night(&sb, 2, 2, false);
    backup(&sb, &src, "s3", &[]);
    points.push(("s3", source_trees(&sb, 2)));

    let m1 = manifest(&sb, "s1");
    assert!(m1.get("parent").is_none(), "the first backup is full");
    assert_eq!(m1["format_version"], 3);
    for (snap, parent, depth) in [("s2", "s1", 1), ("s3", "s2", 2)] {
        let m = manifest(&sb, snap);
        assert_eq!(m["parent"], parent, "{snap}");
        assert_eq!(m["differentials"], depth, "{snap}");
        // Unchanged files are referenced, not stored again: the big table is
        // in s1's object only.
        let files = m["cluster"]["nodes"][0]["files"].as_array().unwrap();
        let big = files
            .iter()
            .find(|f| f["path"] == "app/orders-2/big.db")
            .unwrap();
        assert_eq!(big["object"], "s1/node-0.tar.gz", "{snap}");
        let changed = files
            .iter()
            .find(|f| f["path"] == "app/orders-2/ünïcødé – naïve.db")
            .unwrap();
        assert!(
            changed.get("object").is_none(),
            "{snap}: a changed file is stored again"
        );
        for i in 0..2 {
            assert!(
                node_object_size(&sb, snap, i) * 5 < node_object_size(&sb, "s1", i),
                "{snap}: a differential's object holds only the changes"
            );
        }
    }
    // s3 references s2's object for the SSTable s2 added, and s1's for the rest.
    let refs: Vec<String> = manifest(&sb, "s3")["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert!(refs.contains(&"s1/node-0.tar.gz".to_string()), "{refs:?}");
    assert!(refs.contains(&"s2/node-0.tar.gz".to_string()), "{refs:?}");

    for (snap, want) in &points {
        let got = restored(&sb, snap, &format!("tgt-{snap}"), 2, &[]);
        for i in 0..2 {
            assert_eq!(
                want[i], got[i],
                "{snap}: node {i} differs from the source at its time"
            );
        }
        verified(&sb, snap, "store");
    }
    // A link keeps its own time (the source's link is as old as its making).
    let link_time = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p).unwrap().mtime()
    };
    assert_eq!(
        link_time(&sb.path("tgt-s3/node-0/app/users-1/latest")),
        link_time(&sb.path("src/node-0/app/users-1/latest"))
    );
    // One referenced file of the last point alone, read from s1's object.
    let got = restored(&sb, "s3", "tgt-part", 2, &["PATHS=app/orders-2/big.db"]);
    let want = &points[2].1[1];
    assert_eq!(
        got[1].get("app/orders-2/big.db"),
        want.get("app/orders-2/big.db")
    );
    assert!(
        !got[1].contains_key("app/users-1/nb-1-Data.db"),
        "only the path asked for"
    );
    // A full backup on request references nothing.
    backup(&sb, &src, "s4", &["MODE=full"]);
    let m4 = manifest(&sb, "s4");
    assert!(m4.get("references").is_none() && m4.get("parent").is_none());
    // FULL_EVERY=1: the differential after one differential is full.
    backup(&sb, &src, "s5", &["FULL_EVERY=1"]);
    assert_eq!(manifest(&sb, "s5")["parent"], "s4");
    backup(&sb, &src, "s6", &["FULL_EVERY=1"]);
    assert!(
        manifest(&sb, "s6").get("parent").is_none(),
        "FULL_EVERY=1 forces a full"
    );
    // Bad values are refused before anything is written.
    for bad in ["MODE=incremental", "FULL_EVERY=-1", "FULL_EVERY=x"] {
        let a = start_args("backup-local", &src, "bad", &[bad]);
        let out = sb.run_v(&a);
        assert_eq!(out.status.code(), Some(2), "{bad}: {:?}", text(&out));
        assert!(!sb.path("store/bad").exists(), "{bad}");
    }
}

#[test]
fn rehash_tells_a_touched_file_by_its_content() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10_000);
    backup(&sb, &src, "s1", &[]);
    // Same bytes, new time: by time it changed, by content it did not.
    let f = sb.path("src/node-0/app/orders-2/big.db");
    let t = filetime::FileTime::from_unix_time(1_800_000_000, 0);
    filetime::set_file_times(&f, t, t).unwrap();
    backup(&sb, &src, "s2", &[]);
    let held = |snap: &str| {
        manifest(&sb, snap)["cluster"]["nodes"][0]["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["path"] == "app/orders-2/big.db")
            .unwrap()["object"]
            .clone()
    };
    assert!(held("s2").is_null(), "a touched file is stored again");
    let mut a = start_args("backup-local", &src, "s3", &[]);
    a.insert(3, "--rehash".into());
    let out = sb.run_v(&a);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        held("s3"),
        "s2/node-0.tar.gz",
        "--rehash: same content, referenced"
    );
    // Restored with the time the referenced entry has: the same as the source.
    let got = restored(&sb, "s3", "tgt", 1, &[]);
    assert_eq!(got[0], source_trees(&sb, 1)[0]);
}

/// A history of nightly differentials, then deletes and prunes: every kept
/// snapshot still verifies, reading every byte, and restores.
#[test]
fn deleting_and_pruning_keep_what_kept_differentials_need() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 200_000);
    let mut points = BTreeMap::new();
    for n in 0..7u64 {
        if n > 0 {
            night(&sb, 2, n, false);
        }
        let snap = format!("n{n}");
        backup(&sb, &src, &snap, &["FULL_EVERY=4"]);
        points.insert(snap, source_trees(&sb, 2));
    }
    assert!(
        manifest(&sb, "n5").get("parent").is_none(),
        "FULL_EVERY=4 made n5 full"
    );
    // The full at the root of the chain goes: its objects stay for n1…n4.
    let out = ok(&sb, &["snapshots", "delete", "n0", "--store", "store"]);
    assert!(out.contains("kept"), "{out}");
    assert!(out.contains("n1"), "it says for which snapshots: {out}");
    assert!(!sb.path("store/n0/manifest.json").exists());
    assert!(sb.path("store/n0/node-0.tar.gz").exists());
    let list = ok(&sb, &["snapshots", "list", "--store", "store"]);
    let n0 = list.lines().find(|l| l.starts_with("n0 ")).unwrap();
    assert!(n0.contains("held"), "{list}");
    // A new snapshot may not take the held folder's name.
    let a = start_args("backup-local", &src, "n0", &[]);
    let out = sb.run_v(&a);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(sb.path("store/n0/node-0.tar.gz").exists());
    // n2 (in the middle) goes too; then a prune keeps the newest two.
    ok(&sb, &["snapshots", "delete", "n2", "--store", "store"]);
    let out = ok(
        &sb,
        &[
            "snapshots",
            "prune",
            "--store",
            "store",
            "--policy",
            "1s",
            "--keep-last",
            "2",
            "--now",
            "2100-01-01T00:00:00Z",
        ],
    );
    assert!(out.contains("delete"), "{out}");
    let list = ok(&sb, &["snapshots", "list", "--store", "store"]);
    let complete: Vec<&str> = list
        .lines()
        .filter(|l| l.contains(" complete "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(complete, ["n5", "n6"], "{list}");
    for snap in &complete {
        verified(&sb, snap, "store");
        let got = restored(&sb, snap, &format!("tgt-{snap}"), 2, &[]);
        for i in 0..2 {
            assert_eq!(points[*snap][i], got[i], "{snap}: node {i}");
        }
    }
    // n5 was full: nothing of n0…n4 is needed any more, and nothing is left.
    let mut folders: Vec<String> = std::fs::read_dir(sb.path("store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    folders.sort();
    assert_eq!(folders, ["n5", "n6"], "{list}");
}

/// Deleting a differential's parent and then the differential, the second
/// killed in the middle of its sweep: the next delete finishes it, and what the
/// kept snapshot needs is all there.
#[cfg(feature = "failpoints")]
#[test]
fn a_delete_killed_in_its_sweep_is_finished_by_the_next_one_and_loses_nothing() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 100_000);
    backup(&sb, &src, "a", &[]);
    night(&sb, 3, 1, true);
    backup(&sb, &src, "b", &[]);
    night(&sb, 3, 2, true);
    backup(&sb, &src, "c", &[]);
    let want = source_trees(&sb, 3);
    backup(&sb, &src, "other", &["MODE=full"]);
    ok(&sb, &["snapshots", "delete", "a", "--store", "store"]);
    // b's delete dies at its first sweep, its manifest gone. Its candidates are
    // its own objects, which c does not need (the SSTable b added was compacted
    // away), and a's, which c needs.
    let mut cmd = sb.command(&["snapshots", "delete", "b", "--store", "store"]);
    cmd.env("FAILPOINTS", "gc:sweep=return(kill)");
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "the fail point kills the delete: {:?}",
        text(&out)
    );
    assert!(
        sb.path("store/.cairn-gc/b.json").exists(),
        "its record is left"
    );
    assert!(!sb.path("store/b/manifest.json").exists());
    assert!(
        sb.path("store/b/node-0.tar.gz").exists(),
        "killed before it swept"
    );
    let out = sb.run(&["snapshots", "delete", "other", "--store", "store"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let said = text(&out).0;
    assert!(said.contains("finished the delete of b"), "{said}");
    assert!(!sb.path("store/.cairn-gc/b.json").exists());
    // c needs objects of a and b: all there, every byte checked.
    verified(&sb, "c", "store");
    let got = restored(&sb, "c", "tgt", 3, &[]);
    assert_eq!(want, got);
    // What only b had is gone; a's objects stay for c.
    assert!(!sb.path("store/b").exists());
    assert!(sb.path("store/a/node-0.tar.gz").exists());
}

/// A differential copied to another store brings what it references, and
/// restores there.
#[test]
fn a_copied_differential_brings_its_references_and_restores() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 50_000);
    backup(&sb, &src, "s1", &[]);
    night(&sb, 2, 1, false);
    backup(&sb, &src, "s2", &[]);
    let want = source_trees(&sb, 2);
    ok(
        &sb,
        &[
            "snapshots",
            "copy",
            "s2",
            "--from",
            "./store",
            "--to",
            "./second",
        ],
    );
    assert!(
        sb.path("second/s1/node-0.tar.gz").exists(),
        "its reference came along"
    );
    assert!(
        !sb.path("second/s1/manifest.json").exists(),
        "not s1 itself"
    );
    let list = ok(&sb, &["snapshots", "list", "--store", "./second"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("s1 ") && l.contains("held")),
        "{list}"
    );
    verified(&sb, "s2", "./second");
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let mut a = start_args("restore-local", &tgt, "s2", &[]);
    for x in a.iter_mut() {
        if x == "BACKUP_DIR=store" {
            *x = "BACKUP_DIR=second".into();
        }
    }
    let out = sb.run_v(&a);
    assert!(out.status.success(), "{:?}", text(&out));
    for (i, w) in want.iter().enumerate() {
        assert_eq!(*w, tree(&sb.path(&format!("tgt/node-{i}"))));
    }
    // Deleting it there takes the held objects with it.
    ok(&sb, &["snapshots", "delete", "s2", "--store", "./second"]);
    assert!(!sb.path("second/s1").exists());
}

/// A lock of a backup of `snap` that runs now (its heartbeat fresh).
fn backup_running(sb: &Sandbox, snap: &str) {
    lock_file(
        &sb.path("store"),
        snap,
        "backup",
        chrono::Utc::now().timestamp(),
    );
}

/// A delete while a backup runs (its lock's heartbeat fresh) takes the snapshot
/// away but leaves the sweep for later: the running backup may build on what it
/// would take. The next delete, with no backup running, sweeps.
#[test]
fn a_delete_while_a_backup_runs_leaves_the_sweep_to_the_next_one() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10_000);
    backup(&sb, &src, "a", &[]);
    backup(&sb, &src, "b", &["MODE=full"]);
    backup_running(&sb, "tonight");
    let out = ok(&sb, &["snapshots", "delete", "a", "--store", "store"]);
    assert!(out.contains("is running"), "{out}");
    assert!(
        !sb.path("store/a/manifest.json").exists(),
        "a is gone at once"
    );
    assert!(
        sb.path("store/a/node-0.tar.gz").exists(),
        "its objects wait"
    );
    assert!(sb.path("store/.cairn-gc/a.json").exists());
    std::fs::remove_dir_all(sb.path("store/.cairn-locks/tonight")).unwrap();
    let out = ok(&sb, &["snapshots", "delete", "b", "--store", "store"]);
    assert!(out.contains("finished the delete of a"), "{out}");
    assert!(!sb.path("store/a").exists() && !sb.path("store/b").exists());
    assert!(!sb.path("store/.cairn-gc/a.json").exists());
}

/// A differential backup killed after its first node, its parent deleted while
/// it waited: its resume finds the node's references gone, backs the node up
/// again (in full, the parent being gone) and completes with nothing missing.
#[cfg(feature = "failpoints")]
#[test]
fn a_differential_resumed_after_its_parent_went_backs_the_node_up_again() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 50_000);
    backup(&sb, &src, "p", &[]);
    night(&sb, 2, 1, false);
    let a = start_args("backup-local", &src, "d", &["STRATEGY=serial"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut cmd = sb.command(&a);
    cmd.env("FAILPOINTS", "after:backup/backup-node/node-0=return(kill)");
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{:?}", text(&out));
    assert!(sb.path("store/d/node-0.tar.gz").exists());
    // The killed backup's lock goes stale at once here; p is deleted and swept.
    let mut cmd = sb.command(&["snapshots", "delete", "p", "--store", "store"]);
    cmd.env("CAIRN_LOCK_STALE_SECS", "1");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        !sb.path("store/p").exists(),
        "nothing complete needs p: swept"
    );
    let mut cmd = sb.command(&["plan", "resume", "2", "--break-lock"]);
    cmd.env("CAIRN_LOCK_STALE_SECS", "1");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let m = manifest(&sb, "d");
    assert!(
        m.get("references").is_none(),
        "nothing references the deleted p: {m}"
    );
    verified(&sb, "d", "store");
    let want = source_trees(&sb, 2);
    assert_eq!(restored(&sb, "d", "tgt", 2, &[]), want);
}

/// A one-node store with a full backup `a` and its differential `b`, whose
/// manifest `edit` changes.
fn full_then_differential(edit: impl FnOnce(&mut serde_json::Value)) -> Sandbox {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10_000);
    backup(&sb, &src, "a", &[]);
    night(&sb, 1, 1, false);
    backup(&sb, &src, "b", &[]);
    let mut m = manifest(&sb, "b");
    edit(&mut m);
    std::fs::write(
        sb.path("store/b/manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
    sb
}

/// A manifest that does not read (here: it references a stray object) stops a
/// delete of another snapshot before anything changes; the unreadable snapshot
/// itself can still be deleted, and then the other one.
#[test]
fn an_unreadable_manifest_stops_a_delete_before_it_changes_anything() {
    let sb = full_then_differential(|m| {
        let mut stray = m["references"][0].clone();
        stray["key"] = "junk/node-0.tar.gz".into();
        // Smaller than its block index says: the manifest no longer reads.
        stray["size"] = 2.into();
        m["references"].as_array_mut().unwrap().push(stray);
    });
    let out = sb.run(&["snapshots", "delete", "a", "--store", "store"]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("nothing of \"a\" was deleted"),
        "{:?}",
        text(&out)
    );
    assert!(sb.path("store/a/manifest.json").exists(), "a is untouched");
    assert!(
        !sb.path("store/.cairn-gc").exists()
            || std::fs::read_dir(sb.path("store/.cairn-gc"))
                .unwrap()
                .next()
                .is_none()
    );
    ok(&sb, &["snapshots", "delete", "b", "--store", "store"]);
    ok(&sb, &["snapshots", "delete", "a", "--store", "store"]);
    assert!(!sb.path("store/a").exists() && !sb.path("store/b").exists());
}

/// verify --read-data checks the objects a differential references against the
/// checksums its manifest records for them, not only the files it reads there.
#[test]
fn verify_reads_referenced_objects_against_their_recorded_checksums() {
    let sb = full_then_differential(|m| {
        m["references"][0]["sha256"] = "0".repeat(64).into();
    });
    let out = sb.run(&[
        "snapshots",
        "verify",
        "b",
        "--store",
        "store",
        "--read-data",
    ]);
    assert!(!out.status.success(), "{:?}", text(&out));
    let (o, e) = text(&out);
    assert!(
        o.contains("a/node-0.tar.gz") || e.contains("a/node-0.tar.gz"),
        "{o}{e}"
    );
}

/// A record of a delete never removes a snapshot written under that name since
/// (a deferred delete, then a new backup of the same name), nor a complete
/// snapshot a hand-made record names.
#[test]
fn a_delete_record_never_removes_a_snapshot_written_under_its_name_since() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10_000);
    backup(&sb, &src, "a", &[]);
    backup(&sb, &src, "b", &["MODE=full"]);
    backup_running(&sb, "tonight");
    ok(&sb, &["snapshots", "delete", "b", "--store", "store"]);
    assert!(sb.path("store/.cairn-gc/b.json").exists(), "deferred");
    std::fs::remove_dir_all(sb.path("store/.cairn-locks/tonight")).unwrap();
    night(&sb, 1, 1, false);
    backup(&sb, &src, "b", &[]);
    let want = source_trees(&sb, 1);
    // A hand-made record for the complete a.
    std::fs::write(
        sb.path("store/.cairn-gc/a.json"),
        r#"{"snapshot":"a","referenced":[],"at":"2026-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    backup(&sb, &src, "c", &["MODE=full"]);
    ok(&sb, &["snapshots", "delete", "c", "--store", "store"]);
    assert!(
        !sb.path("store/.cairn-gc/b.json").exists(),
        "the record is done"
    );
    for snap in ["a", "b"] {
        assert!(
            sb.path(&format!("store/{snap}/manifest.json")).exists(),
            "{snap} kept"
        );
        verified(&sb, snap, "store");
    }
    assert_eq!(restored(&sb, "b", "tgt", 1, &[]), want);
}

/// The parent is the newest snapshot by its finish time, not by its manifest's
/// file time: an old snapshot copied or touched later is not taken for it.
#[test]
fn an_old_manifest_written_later_is_not_taken_for_the_newest() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10_000);
    backup(&sb, &src, "s1", &[]);
    night(&sb, 1, 1, false);
    backup(&sb, &src, "s2", &[]);
    let later = filetime::FileTime::from_unix_time(chrono::Utc::now().timestamp() + 3600, 0);
    filetime::set_file_times(sb.path("store/s1/manifest.json"), later, later).unwrap();
    let mut a = start_args("backup-local", &src, "s3", &[]);
    a.insert(3, "--dry-run".into());
    let out = sb.run_v(&a);
    assert!(
        text(&out).0.contains("differential of s2"),
        "{:?}",
        text(&out)
    );
}
