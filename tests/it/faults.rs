//! The fault matrix: at every step boundary of a backup and a restore (and inside
//! the commit's renames, and between discarding's record and its removal), serial
//! and parallel, inject an error and a process kill (fail points, feature
//! `failpoints`); then resume. Asserted on every case: the faulted run is not
//! COMPLETE and (for an injected error) the target is as it was; the resumed run is
//! COMPLETE, the target equals the snapshot byte for byte (content, modes, mtimes,
//! links, empty dirs), and no staging dir, temp file or lock is left.
#![cfg(feature = "failpoints")]

use super::helpers::*;
use super::integrity::assert_no_leftovers;
use std::path::Path;

const NODES: u32 = 2;

fn backup_steps() -> Vec<String> {
    let mut v = vec![
        "preflight/check-backup".to_string(),
        "schema/backup-schema".to_string(),
    ];
    v.extend((0..NODES).map(|i| format!("snapshot/snapshot-node/node-{i}")));
    v.extend((0..NODES).map(|i| format!("backup/backup-node/node-{i}")));
    v.push("finish/backup-manager".into());
    v.push("finish/write-manifest".into());
    v
}

fn restore_steps() -> Vec<String> {
    let mut v = vec!["preflight/check-restore".to_string()];
    v.extend((0..NODES).map(|i| format!("stage/stage-node/node-{i}")));
    v.push("schema/restore-schema".into());
    v.push("commit/restore-manager".into());
    v.push("commit/commit-restore".into());
    v.push("load/load-tables".into());
    v
}

/// FAILPOINTS values: each boundary with an error and with a kill.
fn faults(steps: &[String], extra: &[&str]) -> Vec<(String, bool)> {
    let mut points: Vec<String> = steps
        .iter()
        .flat_map(|s| [format!("before:{s}"), format!("after:{s}")])
        .collect();
    points.extend(extra.iter().map(|s| s.to_string()));
    points
        .into_iter()
        .flat_map(|p| {
            [
                (format!("{p}=return"), false),
                (format!("{p}=return(kill)"), true),
            ]
        })
        .collect()
}

fn status(sb: &Sandbox, home: &str, run: u32) -> String {
    let out = sb
        .command(&["plan", "status", "--json", &run.to_string()])
        .env("CAIRN_HOME", sb.path(home))
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["run"]["status"].as_str().unwrap().to_string()
}

fn cairn(
    sb: &Sandbox,
    home: &str,
    failpoints: Option<&str>,
    args: &[&str],
) -> std::process::Output {
    cairn_v(
        sb,
        home,
        failpoints,
        &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
}

/// Run cairn with its own state home and, optionally, fail points.
fn cairn_v(
    sb: &Sandbox,
    home: &str,
    failpoints: Option<&str>,
    args: &[String],
) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = sb.command(&a);
    c.env("CAIRN_HOME", sb.path(home));
    match failpoints {
        Some(f) => c.env("FAILPOINTS", f),
        None => c.env_remove("FAILPOINTS"),
    };
    c.output().unwrap()
}

/// Back up an `n`-node source (with `extra` parameters) as snapshot `s` in the
/// state home `home`; returns the backup's command line.
fn backed_up(sb: &Sandbox, home: &str, n: u32, extra: &[&str]) -> Vec<String> {
    let src = source_cluster(sb.dir.path(), n, 1000);
    let backup = start_args("backup-local", &src, "s", extra);
    let out = cairn_v(sb, home, None, &backup);
    assert!(out.status.success(), "{:?}", text(&out));
    backup
}

/// Run `args` with the fail point `fp`, which must kill the process.
fn killed_at(sb: &Sandbox, home: &str, fp: &str, args: &[String]) {
    let out = cairn_v(sb, home, Some(fp), args);
    assert_eq!(out.status.code(), None, "{fp}: {:?}", text(&out));
}

fn backup_matrix(strategy: &str) -> usize {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), NODES, 30_000);
    let cases = faults(&backup_steps(), &[]);
    for (i, (fp, kill)) in cases.iter().enumerate() {
        let (home, snap) = (format!("home-{i}"), format!("snap-{i}"));
        let args = start_args(
            "backup-local",
            &src,
            &snap,
            &[&format!("STRATEGY={strategy}")],
        );
        let out = cairn_v(&sb, &home, Some(fp), &args);
        assert!(!out.status.success(), "{fp}: the fault did not fire");
        if *kill {
            assert_eq!(out.status.code(), None, "{fp}: {:?}", text(&out));
        }
        let st = status(&sb, &home, 1);
        assert_ne!(st, "COMPLETE", "{fp}");
        let out = cairn(&sb, &home, None, &["plan", "resume", "1", "-q"]);
        assert!(out.status.success(), "{fp}: resume: {:?}", text(&out));
        assert_eq!(status(&sb, &home, 1), "COMPLETE", "{fp}");
        let out = cairn(
            &sb,
            &home,
            None,
            &[
                "snapshots",
                "verify",
                &snap,
                "--store",
                "store",
                "-q",
                "--read-data",
            ],
        );
        assert!(out.status.success(), "{fp}: verify: {:?}", text(&out));
        // No snapshot is left on a source node, whatever the fault.
        assert_no_leftovers(&sb, "src", NODES);
        // A restore of the resumed snapshot proves the bytes.
        let tgt = target_cluster(sb.dir.path(), &format!("tgt-{i}"), NODES);
        let args = start_args("restore-local", &tgt, &snap, &[]);
        let out = cairn_v(&sb, "home-r", None, &args);
        assert!(out.status.success(), "{fp}: {:?}", text(&out));
        for n in 0..NODES {
            let source = without(tree(&sb.path(&format!("src/node-{n}"))), &["system"]);
            let restored = tree(&sb.path(&format!("tgt-{i}/node-{n}")));
            assert_eq!(source, restored, "{fp}: node {n} differs");
        }
    }
    cases.len()
}

fn restore_matrix(strategy: &str) -> usize {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), NODES, 30_000);
    let out = cairn_v(
        &sb,
        "home-b",
        None,
        &start_args("backup-local", &src, "s", &[]),
    );
    assert!(out.status.success(), "{:?}", text(&out));
    // Each node stages two keyspaces: four renames in the commit.
    let mut cases = faults(
        &restore_steps(),
        &["commit-rename:0", "commit-rename:1", "commit-rename:3"],
    );
    // Killed between discarding's record and its removal (after a failed stage).
    cases.push((
        format!(
            "after:stage/stage-node/node-{}=return;discard:recorded=return(kill)",
            NODES - 1
        ),
        true,
    ));
    for (i, (fp, kill)) in cases.iter().enumerate() {
        let home = format!("home-{i}");
        let name = format!("tgt-{i}");
        let tgt = target_cluster(sb.dir.path(), &name, NODES);
        let args = start_args(
            "restore-local",
            &tgt,
            "s",
            &[&format!("STRATEGY={strategy}")],
        );
        let out = cairn_v(&sb, &home, Some(fp), &args);
        assert!(!out.status.success(), "{fp}: the fault did not fire");
        let st = status(&sb, &home, 1);
        assert_ne!(st, "COMPLETE", "{fp}");
        if *kill {
            assert_eq!(out.status.code(), None, "{fp}: {:?}", text(&out));
            assert_eq!(st, "INTERRUPTED", "{fp}");
        } else if fp.contains("load/load-tables") {
            // After the commit: the data is in place, complete; only the
            // loading into the service is left for the resume.
            assert_restored(&sb, &name, NODES);
        } else {
            // A failed restore leaves the target as it was: it did not exist.
            assert!(
                !Path::new(&sb.path(&name)).exists(),
                "{fp}: the failed restore left {:?}",
                tree(&sb.path(&name))
            );
        }
        let out = cairn(&sb, &home, None, &["plan", "resume", "1", "-q"]);
        assert!(out.status.success(), "{fp}: resume: {:?}", text(&out));
        assert_eq!(status(&sb, &home, 1), "COMPLETE", "{fp}");
        assert_restored(&sb, &name, NODES);
        assert_no_leftovers(&sb, &name, NODES);
    }
    cases.len()
}

#[test]
fn fault_matrix_backup_serial() {
    let n = backup_matrix("serial");
    eprintln!("fault matrix: backup serial, {n} cases");
}

#[test]
fn fault_matrix_backup_parallel() {
    let n = backup_matrix("parallel");
    eprintln!("fault matrix: backup parallel, {n} cases");
}

#[test]
fn fault_matrix_restore_serial() {
    let n = restore_matrix("serial");
    eprintln!("fault matrix: restore serial, {n} cases");
}

#[test]
fn fault_matrix_restore_parallel() {
    let n = restore_matrix("parallel");
    eprintln!("fault matrix: restore parallel, {n} cases");
}

/// A killed restore's staging is cleaned up by the next restore of the same home
/// into that target; the dead run's stage steps are marked to be redone.
#[test]
fn a_dead_runs_staging_is_removed_by_the_next_restore() {
    let sb = Sandbox::new();
    backed_up(&sb, "home", 1, &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let restore = start_args("restore-local", &tgt, "s", &[]);
    killed_at(
        &sb,
        "home",
        "after:stage/stage-node/node-0=return(kill)",
        &restore,
    );
    let staging = |sb: &Sandbox| -> Vec<String> {
        std::fs::read_dir(sb.path("tgt/node-0"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".cairn-staging-"))
            .collect()
    };
    assert_eq!(staging(&sb).len(), 1, "the killed run left its staging");
    let out = cairn_v(&sb, "home", None, &restore);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 1);
    assert!(staging(&sb).is_empty(), "{:?}", staging(&sb));
    let out = cairn(&sb, "home", None, &["plan", "status", "--json", "2"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stage = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "stage/stage-node/node-0")
        .unwrap()
        .clone();
    assert_eq!(stage["status"], "PENDING", "{stage}");
}

/// A partial restore that fails inside its commit leaves no parent dirs behind,
/// and its resume restores exactly the selected paths.
#[test]
fn a_partial_restore_failing_mid_commit_leaves_the_target_as_it_was() {
    let sb = Sandbox::new();
    backed_up(&sb, "home", 1, &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    std::fs::create_dir_all(sb.path("tgt/node-0/other")).unwrap();
    // The data dir's own mtime changes (staging is made inside it); its contents
    // may not.
    let before = tree(&sb.path("tgt/node-0"));
    let restore = start_args("restore-local", &tgt, "s", &["PATHS=app/users-1,metrics"]);
    for (fp, kill) in [
        ("commit-rename:1=return", false),
        ("commit-rename:1=return(kill)", true),
    ] {
        let out = cairn_v(&sb, "home", Some(fp), &restore);
        assert!(!out.status.success(), "{fp}");
        if !kill {
            assert_eq!(tree(&sb.path("tgt/node-0")), before, "{fp}");
        }
        let run = if kill { "3" } else { "2" };
        if kill {
            let out = cairn_v(
                &sb,
                "home",
                None,
                &["plan".into(), "resume".into(), run.into(), "-q".into()],
            );
            assert!(out.status.success(), "{fp}: {:?}", text(&out));
        }
    }
    let restored = tree(&sb.path("tgt/node-0"));
    let source = tree(&sb.path("src/node-0"));
    for (k, v) in &restored {
        if k == "other" {
            continue;
        }
        assert_eq!(source.get(k), Some(v), "{k}");
    }
    assert!(restored.contains_key("app/users-1/nb-1-Data.db"));
    assert!(restored.contains_key("metrics/readings-3/data.db"));
    assert!(!restored.contains_key("app/orders-2"), "not selected");
    assert_no_leftovers(&sb, "tgt", 1);
}

/// The one staging dir of a killed restore in `dir`.
fn staging_of(dir: &Path) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".cairn-staging-")
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// Change a file's bytes, keeping its size and time.
fn edit_same_size(file: &Path) {
    let m = std::fs::metadata(file).unwrap();
    let mut data = std::fs::read(file).unwrap();
    data[0] ^= 0xff;
    std::fs::write(file, &data).unwrap();
    let t = filetime::FileTime::from_last_modification_time(&m);
    filetime::set_file_times(file, t, t).unwrap();
}

/// Whatever happens to staged data between a kill and the resume, the resume
/// restores the snapshot: a resume trusts no staged byte it has not read again.
#[test]
fn staged_data_changed_after_a_kill_is_staged_again() {
    use std::os::unix::fs::PermissionsExt;
    let sb = Sandbox::new();
    backed_up(&sb, "home-b", 1, &[]);
    type Tamper = Box<dyn Fn(&Path)>;
    let tampers: Vec<(&str, Tamper)> = vec![
        (
            "same-size edit, time kept",
            Box::new(|s: &Path| edit_same_size(&s.join("app/users-1/nb-1-Data.db"))),
        ),
        (
            "chmod",
            Box::new(|s: &Path| {
                std::fs::set_permissions(
                    s.join("app/users-1/nb-1-Data.db"),
                    std::fs::Permissions::from_mode(0o666),
                )
                .unwrap()
            }),
        ),
        (
            "touch",
            Box::new(|s: &Path| {
                let t = filetime::FileTime::from_unix_time(1_000_000, 0);
                filetime::set_file_times(s.join("app/users-1/nb-1-Data.db"), t, t).unwrap()
            }),
        ),
        (
            "rename",
            Box::new(|s: &Path| {
                std::fs::rename(
                    s.join("app/users-1/nb-1-Data.db"),
                    s.join("app/users-1/nb-9-Data.db"),
                )
                .unwrap()
            }),
        ),
        (
            "a directory's time",
            Box::new(|s: &Path| {
                let t = filetime::FileTime::from_unix_time(1_600_000_000, 0);
                filetime::set_file_times(s.join("app/empty-table"), t, t).unwrap()
            }),
        ),
        (
            "a hard link to a file outside",
            Box::new(|s: &Path| {
                let f = s.join("app/users-1/nb-1-TOC.txt");
                let outside = s.parent().unwrap().parent().unwrap().join("outside-toc");
                std::fs::copy(&f, &outside).unwrap();
                std::fs::remove_file(&f).unwrap();
                std::fs::hard_link(&outside, &f).unwrap();
            }),
        ),
        (
            "link swapped",
            Box::new(|s: &Path| {
                std::fs::remove_file(s.join("app/users-1/latest")).unwrap();
                std::os::unix::fs::symlink("nb-1-Index.db", s.join("app/users-1/latest")).unwrap()
            }),
        ),
    ];
    for (i, (what, tamper)) in tampers.iter().enumerate() {
        let (home, name) = (format!("home-{i}"), format!("tgt-{i}"));
        let tgt = target_cluster(sb.dir.path(), &name, 1);
        let restore = start_args("restore-local", &tgt, "s", &[]);
        let out = cairn_v(
            &sb,
            &home,
            Some("before:commit/commit-restore=return(kill)"),
            &restore,
        );
        assert_eq!(out.status.code(), None, "{what}: {:?}", text(&out));
        tamper(&staging_of(&sb.path(&format!("{name}/node-0"))));
        let out = cairn(&sb, &home, None, &["plan", "resume", "1", "-q"]);
        assert!(out.status.success(), "{what}: {:?}", text(&out));
        assert_restored(&sb, &name, 1);
        assert_no_leftovers(&sb, &name, 1);
    }
}

/// A commit killed midway, then an edit of a keyspace it had already moved into
/// the target: the rollback takes it back, the resume stages it again.
#[test]
fn a_keyspace_edited_after_a_kill_mid_commit_is_restored_from_the_snapshot() {
    let sb = Sandbox::new();
    backed_up(&sb, "home", 1, &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let restore = start_args("restore-local", &tgt, "s", &[]);
    killed_at(&sb, "home", "commit-rename:1=return(kill)", &restore);
    let moved = sb.path("tgt/node-0/app/users-1/nb-1-Data.db");
    assert!(moved.exists(), "the first rename was done");
    edit_same_size(&moved);
    let out = cairn(&sb, "home", None, &["plan", "resume", "2", "-q"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 1);
    assert_no_leftovers(&sb, "tgt", 1);
}

/// A staging dir replaced by a link after a kill mid-commit: the rollback never
/// follows it, and the resume stops instead of writing outside the target.
#[test]
fn a_rollback_never_follows_a_staging_dir_swapped_for_a_link() {
    let sb = Sandbox::new();
    backed_up(&sb, "home", 1, &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let restore = start_args("restore-local", &tgt, "s", &[]);
    killed_at(&sb, "home", "commit-rename:1=return(kill)", &restore);
    let staging = staging_of(&sb.path("tgt/node-0"));
    std::fs::rename(&staging, sb.path("moved-away")).unwrap();
    std::fs::create_dir(sb.path("outside")).unwrap();
    std::os::unix::fs::symlink(sb.path("outside"), &staging).unwrap();
    let out = cairn(&sb, "home", None, &["plan", "resume", "2", "-q"]);
    assert!(!out.status.success(), "{:?}", text(&out));
    assert!(
        tree(&sb.path("outside")).is_empty(),
        "written through the link: {:?}",
        tree(&sb.path("outside"))
    );
    assert!(text(&out).1.contains("symbolic link"), "{:?}", text(&out).1);
    assert_ne!(status(&sb, "home", 2), "COMPLETE");
}

/// A snapshot replaced in the store between a kill and the resume: the resume is
/// refused (it would mix two versions); a new restore restores the new one.
#[test]
fn a_snapshot_replaced_after_a_kill_is_never_mixed_into_a_restore() {
    let sb = Sandbox::new();
    let backup = backed_up(&sb, "home-b", 2, &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let restore = start_args("restore-local", &tgt, "s", &["STRATEGY=serial"]);
    killed_at(
        &sb,
        "home",
        "after:stage/stage-node/node-0=return(kill)",
        &restore,
    );
    // Another backup under the same name replaces the snapshot.
    std::fs::write(sb.path("src/node-1/app/users-1/nb-1-Data.db"), b"new data").unwrap();
    std::fs::remove_dir_all(sb.path("store/s")).unwrap();
    // The killed restore's lock is refused by name, then broken on request.
    let out = cairn_v(&sb, "home-b", None, &backup);
    assert_eq!(out.status.code(), Some(4), "{:?}", text(&out));
    assert!(text(&out).1.contains("gone"), "{:?}", text(&out).1);
    let mut again = backup.clone();
    again.push("--break-lock".into());
    let out = cairn_v(&sb, "home-b", None, &again);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = cairn(&sb, "home", None, &["plan", "resume", "1", "-q"]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("changed"), "{:?}", text(&out).1);
    assert!(
        !sb.path("tgt/node-0/app").exists(),
        "nothing may be committed from the old version"
    );
    let out = cairn_v(&sb, "home", None, &restore);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);
    assert_no_leftovers(&sb, "tgt", 2);
}

/// A node object changed in the store after a kill (same size): the resume reads
/// it again, uploads it again, and the snapshot verifies.
#[test]
fn a_backup_object_changed_after_a_kill_is_uploaded_again() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 1000);
    let backup = start_args("backup-local", &src, "s", &["STRATEGY=serial"]);
    killed_at(
        &sb,
        "home",
        "after:backup/backup-node/node-0=return(kill)",
        &backup,
    );
    edit_same_size(&sb.path("store/s/node-0.tar.gz"));
    let out = cairn(&sb, "home", None, &["plan", "resume", "1", "-q"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = cairn(
        &sb,
        "home",
        None,
        &[
            "snapshots",
            "verify",
            "s",
            "--store",
            "store",
            "--read-data",
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
}

/// A data dir under RESTORE_DIR swapped for a link between a kill and the
/// resume: the resume refuses it instead of writing through it.
#[test]
fn a_restore_dir_node_swapped_for_a_link_after_a_kill_is_refused() {
    let sb = Sandbox::new();
    backed_up(&sb, "home", 1, &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let rd = format!("RESTORE_DIR={}", sb.path("rd").display());
    let restore = start_args("restore-local", &tgt, "s", &[&rd]);
    killed_at(
        &sb,
        "home",
        "before:commit/commit-restore=return(kill)",
        &restore,
    );
    std::fs::create_dir(sb.path("outside")).unwrap();
    std::fs::rename(sb.path("rd/node-0"), sb.path("outside/n0")).unwrap();
    std::os::unix::fs::symlink(sb.path("outside/n0"), sb.path("rd/node-0")).unwrap();
    let before = tree(&sb.path("outside"));
    let out = cairn(&sb, "home", None, &["plan", "resume", "2", "-q"]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("symbolic link"), "{:?}", text(&out).1);
    assert_eq!(
        tree(&sb.path("outside")),
        before,
        "written through the link"
    );
    assert_eq!(status(&sb, "home", 2), "FAILED");
}

/// After a kill mid-commit, something put in the staging place of an entry the
/// commit had moved: the rollback refuses to guess, and says which two.
#[test]
fn a_rollback_that_cannot_tell_which_entry_is_the_restores_refuses() {
    let sb = Sandbox::new();
    backed_up(&sb, "home", 1, &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let restore = start_args("restore-local", &tgt, "s", &[]);
    killed_at(&sb, "home", "commit-rename:1=return(kill)", &restore);
    let staging = staging_of(&sb.path("tgt/node-0"));
    std::fs::create_dir(staging.join("app")).unwrap();
    let out = cairn(&sb, "home", None, &["plan", "resume", "2", "-q"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("put in its place"),
        "{:?}",
        text(&out).1
    );
    assert_ne!(status(&sb, "home", 2), "COMPLETE");
    // Once the stray dir is gone, the resume completes.
    std::fs::remove_dir(staging.join("app")).unwrap();
    let out = cairn(&sb, "home", None, &["plan", "resume", "2", "-q"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 1);
    assert_no_leftovers(&sb, "tgt", 1);
}

/// `plan stop` while the commit moves entries in: the commit is not dropped
/// halfway — it stops between moves and moves back what it moved, on every node —
/// so the CANCELLED run leaves the target as it was, and a resume completes.
#[test]
fn a_restore_stopped_mid_commit_leaves_the_target_as_it_was() {
    let sb = Sandbox::new();
    backed_up(&sb, "home", 2, &[]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    std::fs::create_dir_all(sb.path("tgt/node-0")).unwrap();
    std::fs::create_dir_all(sb.path("tgt/node-1")).unwrap();
    let before = [0, 1].map(|i| exact_tree(&sb.path(&format!("tgt/node-{i}"))));
    let args = start_args("restore-local", &tgt, "s", &[]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = sb
        .command(&a)
        .env("CAIRN_HOME", sb.path("home"))
        .env("FAILPOINTS", "commit-rename:2=sleep(3000)")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The commit has moved two entries in and sleeps before the third.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the commit never began"
        );
        let moved = [0, 1]
            .iter()
            .flat_map(|i| std::fs::read_dir(sb.path(&format!("tgt/node-{i}"))).unwrap())
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with(".cairn"))
            .count();
        if moved >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = cairn(&sb, "home", None, &["plan", "stop", "2"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{:?}", text(&out));
    assert!(status(&sb, "home", 2).contains("CANCELLED"));
    for (i, t) in before.iter().enumerate() {
        let now: std::collections::BTreeMap<_, _> = exact_tree(&sb.path(&format!("tgt/node-{i}")))
            .into_iter()
            .filter(|(k, _)| !k.starts_with(".cairn-staging-"))
            .collect();
        let was: std::collections::BTreeMap<_, _> = t
            .iter()
            .filter(|(k, _)| !k.starts_with(".cairn-staging-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(
            now.keys().collect::<Vec<_>>(),
            was.keys().collect::<Vec<_>>(),
            "node {i}: the cancelled commit left entries in the target"
        );
    }
    let out = cairn(&sb, "home", None, &["plan", "resume", "2", "-q"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);
}
