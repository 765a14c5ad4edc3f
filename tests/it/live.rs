//! A live service: point-in-time snapshots (hard links, or the service's own),
//! what is left out, file owners, the schema artifact.

use super::helpers::*;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The `.cairn-snap-*` dirs in a data dir.
fn snaps(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".cairn-snap-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A live table: new SSTables written as `-tmp-` files and renamed (as Cassandra
/// does), the oldest deleted (compaction), a commit log appended to. Every state
/// of the table dir (its set of files) is recorded, in order.
struct Live {
    stop: Arc<AtomicBool>,
    states: Arc<Mutex<Vec<BTreeSet<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn sstable(k: u64) -> Vec<u8> {
    noise(10_000 + k, 30_000)
}

impl Live {
    fn start(data_dir: &Path) -> Live {
        let table = data_dir.join("app/live-9");
        let log = data_dir.join("commitlog/CommitLog-7-1.log");
        std::fs::create_dir_all(&table).unwrap();
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let states = Arc::new(Mutex::new(vec![BTreeSet::new()]));
        let (s, st) = (stop.clone(), states.clone());
        let thread = std::thread::spawn(move || {
            let mut alive: std::collections::VecDeque<String> = Default::default();
            let mut k = 0u64;
            while !s.load(Ordering::SeqCst) {
                k += 1;
                let name = format!("nb-{k}-big-Data.db");
                let tmp = table.join(format!("nb-{k}-tmp-big-Data.db"));
                std::fs::write(&tmp, sstable(k)).unwrap();
                std::fs::rename(&tmp, table.join(&name)).unwrap();
                alive.push_back(name);
                st.lock().unwrap().push(alive.iter().cloned().collect());
                if alive.len() > 4 {
                    let old = alive.pop_front().unwrap();
                    std::fs::remove_file(table.join(&old)).unwrap();
                    st.lock().unwrap().push(alive.iter().cloned().collect());
                }
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap();
                writeln!(f, "mutation {k}").unwrap();
                std::thread::sleep(Duration::from_millis(15));
            }
        });
        // A few states before any backup starts.
        while states.lock().unwrap().len() < 8 {
            std::thread::sleep(Duration::from_millis(5));
        }
        Live {
            stop,
            states,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<BTreeSet<String>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.states.lock().unwrap().clone()
    }
}

/// The restored live table: each file's bytes are the ones written under its
/// name (nothing torn), and its set of files is a state the table was in.
fn assert_a_recorded_state(restored: &Path, states: &[BTreeSet<String>]) -> usize {
    let table = restored.join("app/live-9");
    let mut got = BTreeSet::new();
    for e in std::fs::read_dir(&table).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains("-tmp-"),
            "a file being written was restored: {name}"
        );
        let k: u64 = name
            .strip_prefix("nb-")
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected file {name}"));
        assert_eq!(
            std::fs::read(table.join(&name)).unwrap(),
            sstable(k),
            "{name} torn"
        );
        got.insert(name);
    }
    states.iter().position(|s| *s == got).unwrap_or_else(|| {
        panic!(
            "the restored table {got:?} was never the table's state (last: {:?})",
            states.last()
        )
    })
}

/// Add top-level lines to a cluster description (after its top-level keys,
/// before its first table).
fn describe(path: &Path, lines: &str) {
    let text_ = std::fs::read_to_string(path).unwrap();
    let at = text_.find("\n[").map_or(text_.len(), |i| i + 1);
    std::fs::write(path, format!("{}{lines}\n{}", &text_[..at], &text_[at..])).unwrap();
}

/// A local restore's command line (progress shown: tests read its messages).
fn restore_args(cluster: &Path, snapshot: &str, extra: &[&str]) -> Vec<String> {
    let mut args = start_args("restore-local", cluster, snapshot, extra);
    args.retain(|a| a != "-q");
    args
}

fn restore_into(sb: &Sandbox, snapshot: &str, target: &str, n: u32, extra: &[&str]) -> PathBuf {
    let tgt = target_cluster(sb.dir.path(), target, n);
    let out = sb.run_v(&restore_args(&tgt, snapshot, extra));
    let (o, e) = text(&out);
    assert!(out.status.success(), "restore failed: {o}\n{e}");
    sb.path(target)
}

#[test]
fn a_live_node_is_backed_up_as_of_its_snapshot_and_no_snapshot_stays_behind() {
    let sb = Sandbox::new();
    let cluster = source_cluster(sb.dir.path(), 2, 600_000);
    let node0 = sb.path("src/node-0");
    let live = Live::start(&node0);
    // A parallel backup, slow enough that the table changes many times after the
    // snapshots were taken and while node 0 is uploaded.
    let out = sb.run_v(&start_args(
        "backup-local",
        &cluster,
        "live",
        &["STRATEGY=parallel", "MAX_BANDWIDTH=300KiB/s"],
    ));
    let states = live.stop();
    let (o, e) = text(&out);
    assert!(out.status.success(), "backup failed: {o}\n{e}");
    for i in 0..2 {
        assert!(
            snaps(&sb.path(&format!("src/node-{i}"))).is_empty(),
            "node {i} kept a snapshot"
        );
    }
    let tgt = restore_into(&sb, "live", "tgt", 2, &[]);
    let at = assert_a_recorded_state(&tgt.join("node-0"), &states);
    assert!(
        at + 10 < states.len(),
        "the backup read the table as it was at the end ({at} of {} states), not at its snapshot",
        states.len()
    );
    // The commit log is left out; everything else of the node is as it was.
    assert!(!tgt.join("node-0/commitlog").exists());
    let live_free = |t: std::collections::BTreeMap<String, String>| {
        t.into_iter()
            .filter(|(k, _)| !k.starts_with("app/live-9") && !k.starts_with("commitlog"))
            .filter(|(k, _)| k != "app")
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        live_free(without(tree(&node0), &["system"])),
        live_free(tree(&tgt.join("node-0")))
    );
    assert_eq!(
        without(tree(&sb.path("src/node-1")), &["system"]),
        tree(&tgt.join("node-1"))
    );
}

#[test]
fn a_failed_or_killed_backup_leaves_no_snapshot_and_its_resume_completes() {
    let sb = Sandbox::new();
    let cluster = source_cluster(sb.dir.path(), 3, 1000);
    let all_clean = |sb: &Sandbox| {
        for i in 0..3 {
            assert!(
                snaps(&sb.path(&format!("src/node-{i}"))).is_empty(),
                "node {i} kept a snapshot"
            );
        }
    };
    // A failure after every node's snapshot: the run removes them all.
    let out = sb
        .command(
            &start_args("backup-local", &cluster, "f1", &[])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .env("FAILPOINTS", "before:backup/backup-node/node-1=return")
        .output()
        .unwrap();
    assert!(!out.status.success());
    all_clean(&sb);
    // Its resume takes the snapshots again and completes.
    let out = sb.run(&["plan", "resume", "1", "-q"]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "resume failed: {o}\n{e}");
    all_clean(&sb);

    // Killed right after the snapshots: they stay for the resume, which uses
    // them and removes them.
    let out = sb
        .command(
            &start_args("backup-local", &cluster, "k1", &[])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .env(
            "FAILPOINTS",
            "after:snapshot/snapshot-node/node-2=return(kill)",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let left: usize = (0..3)
        .map(|i| snaps(&sb.path(&format!("src/node-{i}"))).len())
        .sum();
    assert!(left >= 1, "a kill leaves the snapshots taken so far");
    // The next backup of this home removes what the dead run left (it is not
    // resumed yet), and the dead run's resume takes its snapshots again.
    sb.ok(&start_args("backup-local", &cluster, "n1", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    all_clean(&sb);
    let out = sb.run(&["plan", "resume", "2", "-q"]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "resume failed: {o}\n{e}");
    all_clean(&sb);
    restore_into(&sb, "f1", "t1", 3, &[]);
    assert_restored(&sb, "t1", 3);
    restore_into(&sb, "k1", "t2", 3, &[]);
    assert_restored(&sb, "t2", 3);
}

/// A stand-in `nodetool`: `snapshot -t NAME` hard-links each table's files into
/// `snapshots/NAME/` (with a manifest.json, as the real one does);
/// `clearsnapshot -t NAME` removes them and says so in a log.
fn fake_nodetool(sb: &Sandbox) -> PathBuf {
    let p = sb.path("bin/nodetool");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let log = sb.path("nodetool.log");
    std::fs::write(
        &p,
        format!(
            r#"#!/bin/sh
set -e
cmd="$1"; name="$3"
for t in "$CAIRN_DATA_DIR"/*/*/; do
  case "$cmd" in
    snapshot)
      mkdir -p "$t/snapshots/$name"
      for f in "$t"*; do [ -f "$f" ] && ln "$f" "$t/snapshots/$name/"; done
      echo '{{"files":[]}}' > "$t/snapshots/$name/manifest.json" ;;
    clearsnapshot)
      rm -rf "$t/snapshots/$name" ;;
  esac
done
echo "$cmd $name node $CAIRN_NODE_INDEX" >> {log:?}
"#
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_service_snapshot_is_read_at_its_table_paths_and_cleaned_up() {
    let sb = Sandbox::new();
    let nt = fake_nodetool(&sb);
    let nodes: Vec<(u32, PathBuf)> = (0..2)
        .map(|i| {
            let d = sb.path(&format!("src/node-{i}"));
            fill_node(&d, i, 500);
            (i, d)
        })
        .collect();
    let path = sb.path("svc.toml");
    cluster_file(&path, "src", &nodes, "");
    describe(
        &path,
        &format!(
            "snapshot = \"service\"\n[service_snapshot]\ncreate = [{nt:?}, \"snapshot\", \"-t\", \"{{snapshot}}\"]\ncleanup = [{nt:?}, \"clearsnapshot\", \"-t\", \"{{snapshot}}\"]"
        ),
    );
    // Files written after the service's snapshot are not in it: the nodetool
    // stand-in runs first, then this file appears (a pre-hook of the upload).
    let before: Vec<_> = (0..2)
        .map(|i| without(tree(&sb.path(&format!("src/node-{i}"))), &["system"]))
        .collect();
    let out = sb.run_v(&start_args("backup-local", &path, "svc1", &[]));
    let (o, e) = text(&out);
    assert!(out.status.success(), "backup failed: {o}\n{e}");
    let log = std::fs::read_to_string(sb.path("nodetool.log")).unwrap();
    for i in 0..2 {
        assert!(log.contains(&format!("snapshot svc1 node {i}")), "{log}");
        assert!(
            log.contains(&format!("clearsnapshot svc1 node {i}")),
            "{log}"
        );
        let d = sb.path(&format!("src/node-{i}"));
        assert!(snaps(&d).is_empty());
        assert!(
            !d.join("app/users-1/snapshots/svc1").exists(),
            "cleanup ran"
        );
    }
    let tgt = restore_into(&sb, "svc1", "tgt", 2, &[]);
    for (i, b) in before.iter().enumerate() {
        let got = tree(&tgt.join(format!("node-{i}")));
        // Files: exactly the table's files, at their table paths; no
        // manifest.json of the service's snapshot.
        let files = |t: &std::collections::BTreeMap<String, String>| {
            t.iter()
                .filter(|(_, v)| v.starts_with("file") || v.starts_with("link"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(files(b), files(&got), "node {i}");
        assert!(!got.keys().any(|k| k.ends_with("manifest.json")));
    }

    // A service snapshot that is a link out of the node is never read; a table
    // holding data that the service did not snapshot is never backed up empty.
    let outside = sb.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.db"), b"not the node's").unwrap();
    let snapdir = sb.path("src/node-0/app/users-1/snapshots");
    std::fs::create_dir_all(&snapdir).unwrap();
    std::os::unix::fs::symlink(&outside, snapdir.join("svc2")).unwrap();
    let out = sb.run_v(&start_args("backup-local", &path, "svc2", &[]));
    assert!(!out.status.success());
    assert!(text(&out).1.contains("not a directory"), "{}", text(&out).1);
    assert!(!sb.path("store/svc2/manifest.json").exists());
    // (The stand-in's cleanup may have removed the link already.)
    let _ = std::fs::remove_file(snapdir.join("svc2"));
    let _ = std::fs::remove_dir_all(&snapdir);
    let quiet = sb.path("bin/quiet-nodetool");
    std::fs::write(&quiet, "#!/bin/sh\nexit 0\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&quiet, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p2 = sb.path("svc-quiet.toml");
    cluster_file(&p2, "src", &nodes, "");
    describe(
        &p2,
        &format!("snapshot = \"service\"\n[service_snapshot]\ncreate = [{quiet:?}]"),
    );
    let out = sb.run_v(&start_args("backup-local", &p2, "svc3", &[]));
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("made no snapshot"),
        "{}",
        text(&out).1
    );
    for i in 0..2 {
        assert!(snaps(&sb.path(&format!("src/node-{i}"))).is_empty());
    }
}

fn ensure_user(name: &str, uid: u32) {
    let _ = std::process::Command::new("groupadd")
        .args(["-g", &uid.to_string(), name])
        .output();
    let _ = std::process::Command::new("useradd")
        .args([
            "-u",
            &uid.to_string(),
            "-g",
            name,
            "-M",
            "-s",
            "/usr/sbin/nologin",
            name,
        ])
        .output();
    let out = std::process::Command::new("id").arg(name).output().unwrap();
    assert!(out.status.success(), "could not create user {name}");
}

#[test]
fn owners_come_back_by_name_by_number_or_as_the_target_says() {
    if !nix_is_root() {
        eprintln!("skipped: setting owners needs root");
        return;
    }
    let sb = Sandbox::new();
    ensure_user("cairnown", 4711);
    let cluster = source_cluster(sb.dir.path(), 1, 100);
    let d = sb.path("src/node-0");
    let chown =
        |p: &str, u: u32, g: u32| std::os::unix::fs::lchown(d.join(p), Some(u), Some(g)).unwrap();
    chown("app/users-1/nb-1-Data.db", 4711, 4711);
    chown("app/users-1", 4711, 4711);
    chown("app/users-1/latest", 4711, 4711);
    // No name for this one anywhere: it comes back by number.
    chown("app/orders-2/big.db", 54321, 54322);
    sb.ok(&start_args("backup-local", &cluster, "own", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.path("store/own/manifest.json")).unwrap())
            .unwrap();
    let f = m["cluster"]["nodes"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "app/users-1/nb-1-Data.db")
        .unwrap()
        .clone();
    assert_eq!(
        (f["uid"].as_u64(), f["user"].as_str()),
        (Some(4711), Some("cairnown"))
    );
    assert_eq!(f["group"].as_str(), Some("cairnown"));
    let tgt = restore_into(&sb, "own", "tgt", 1, &[]);
    let owner = |p: &str| {
        let m = std::fs::symlink_metadata(tgt.join("node-0").join(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("app/users-1/nb-1-Data.db"), (4711, 4711));
    assert_eq!(owner("app/users-1"), (4711, 4711));
    assert_eq!(owner("app/users-1/latest"), (4711, 4711));
    assert_eq!(owner("app/orders-2/big.db"), (54321, 54322));
    assert_restored(&sb, "tgt", 1);

    // The target's description names the owner of everything restored.
    let t2 = target_cluster(sb.dir.path(), "t2", 1);
    describe(&t2, "owner = \"cairnown:cairnown\"");
    let args = restore_args(&t2, "own", &[]);
    sb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for p in [
        "app/orders-2/big.db",
        "app/users-1/nb-1-TOC.txt",
        "app/empty-table",
    ] {
        let m = std::fs::symlink_metadata(sb.path("t2/node-0").join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (4711, 4711), "{p}");
    }
    // An owner the target host does not know is refused, nothing restored.
    let t3 = target_cluster(sb.dir.path(), "t3", 1);
    describe(&t3, "owner = \"nosuchuser-x:nosuchuser-x\"");
    let args = restore_args(&t3, "own", &[]);
    let out = sb.run_v(&args);
    assert_eq!(out.status.code(), Some(3), "refused by the pre-flight");
    assert!(text(&out).1.contains("nosuchuser-x"), "{}", text(&out).1);
    assert!(tree(&sb.path("t3/node-0")).is_empty());
    // A user alone: its own group, as chown does.
    let t4 = target_cluster(sb.dir.path(), "t4", 1);
    describe(&t4, "owner = \"cairnown\"");
    let args = restore_args(&t4, "own", &[]);
    sb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let m = std::fs::symlink_metadata(sb.path("t4/node-0/app/orders-2/big.db")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4711, 4711));
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A cluster description with a schema artifact whose dump prints `schema` and
/// whose load runs `load` (a shell script, `{file}` its first argument).
fn schema_cluster(sb: &Sandbox, name: &str, dirs: &[(u32, PathBuf)], load: &str) -> PathBuf {
    let path = sb.path(&format!("{name}.toml"));
    cluster_file(&path, name, dirs, "");
    let script = sb.path(&format!("{name}-load.sh"));
    std::fs::write(&script, format!("#!/bin/sh\n{load}\n")).unwrap();
    describe(
        &path,
        &format!(
            "[artifacts.schema]\ndump = [\"sh\", \"-c\", \"printf 'CREATE KEYSPACE app;\\\\nCREATE TABLE app.users (id int);\\\\n'\"]\nload = [\"sh\", {:?}, \"{{file}}\"]",
            script.to_str().unwrap()
        ),
    );
    path
}

#[test]
fn the_schema_is_stored_verified_and_loaded_before_any_data() {
    let sb = Sandbox::new();
    let src: Vec<(u32, PathBuf)> = (0..2)
        .map(|i| {
            let d = sb.path(&format!("src/node-{i}"));
            fill_node(&d, i, 100);
            (i, d)
        })
        .collect();
    let cluster = schema_cluster(&sb, "src", &src, "exit 9");
    sb.ok(&start_args("backup-local", &cluster, "sc", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let schema = "CREATE KEYSPACE app;\nCREATE TABLE app.users (id int);\n";
    assert_eq!(
        std::fs::read_to_string(sb.path("store/sc/schema.cql")).unwrap(),
        schema
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.path("store/sc/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["artifacts"][0]["object"], "schema.cql");
    sb.ok(&[
        "snapshots",
        "verify",
        "sc",
        "--store",
        "store",
        "--read-data",
    ]);

    // The load sees the schema and a target with no data moved in yet.
    let tgt: Vec<(u32, PathBuf)> = (0..2)
        .map(|i| (i, sb.path(&format!("tgt/node-{i}"))))
        .collect();
    let seen = sb.path("seen");
    let t = schema_cluster(
        &sb,
        "tgt",
        &tgt,
        &format!(
            "cp \"$1\" {seen:?}.cql; ls {:?} > {seen:?}.ls 2>&1; true",
            sb.path("tgt/node-0").to_str().unwrap()
        ),
    );
    let args = restore_args(&t, "sc", &["RESTORE_SCHEMA=true"]);
    let out = sb.run_v(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        std::fs::read_to_string(sb.path("seen.cql")).unwrap(),
        schema
    );
    let ls = std::fs::read_to_string(sb.path("seen.ls")).unwrap_or_default();
    assert!(
        !ls.contains("app"),
        "data was in place before the schema load: {ls}"
    );
    assert_restored(&sb, "tgt", 2);

    // A failing load fails the restore, names the command, and leaves the
    // target untouched.
    let bad: Vec<(u32, PathBuf)> = (0..2)
        .map(|i| (i, sb.path(&format!("bad/node-{i}"))))
        .collect();
    for (_, d) in &bad {
        std::fs::create_dir_all(d).unwrap();
    }
    let before: Vec<_> = bad.iter().map(|(_, d)| exact_tree(d)).collect();
    let b = schema_cluster(
        &sb,
        "bad",
        &bad,
        "echo 'InvalidRequest: keyspace app exists' >&2; exit 3",
    );
    let args = restore_args(&b, "sc", &["RESTORE_SCHEMA=true"]);
    let out = sb.run_v(&args);
    assert!(!out.status.success());
    let (_, e) = text(&out);
    assert!(
        e.contains("schema load") && e.contains("InvalidRequest"),
        "{e}"
    );
    let after: Vec<_> = bad.iter().map(|(_, d)| exact_tree(d)).collect();
    assert_eq!(before, after, "the target changed");
    for (_, d) in &bad {
        assert!(
            std::fs::read_dir(d).unwrap().next().is_none(),
            "{d:?} not empty"
        );
    }

    // A snapshot without a schema cannot be restored with RESTORE_SCHEMA=true:
    // refused before anything is written.
    let plain = source_cluster(&sb.path("p"), 1, 10);
    std::fs::create_dir_all(sb.path("p")).unwrap();
    sb.ok(&start_args("backup-local", &plain, "noschema", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let fresh: Vec<(u32, PathBuf)> = vec![(0, sb.path("fresh/node-0"))];
    let t = schema_cluster(&sb, "fresh", &fresh, "true");
    let args = restore_args(&t, "noschema", &["RESTORE_SCHEMA=true"]);
    let out = sb.run_v(&args);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("holds no schema"), "{}", text(&out).1);

    // A damaged schema object is found by verify.
    // Same size, one byte changed: only reading it back finds it.
    let mut bytes = std::fs::read(sb.path("store/sc/schema.cql")).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(sb.path("store/sc/schema.cql"), bytes).unwrap();
    let out = sb.run(&[
        "snapshots",
        "verify",
        "sc",
        "--store",
        "store",
        "--read-data",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).0.contains("schema.cql") || text(&out).1.contains("schema.cql"));
}

#[test]
fn post_restore_runs_once_per_restored_table_with_its_data_in_place() {
    let sb = Sandbox::new();
    let cluster = source_cluster(sb.dir.path(), 2, 100);
    sb.ok(&start_args("backup-local", &cluster, "pr", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let log = sb.path("imports.log");
    let t = target_cluster(sb.dir.path(), "tgt", 2);
    describe(
        &t,
        &format!(
            "post_restore = [\"sh\", \"-c\", \"echo \\\"$CAIRN_NODE_INDEX $0 $1 $(ls \\\"$2\\\" | wc -l)\\\" >> {}\", \"{{keyspace}}\", \"{{table}}\", \"{{dir}}\"]",
            log.to_str().unwrap()
        ),
    );
    let args = restore_args(&t, "pr", &["KEYSPACES=app"]);
    let out = sb.run_v(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    let mut lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    // Per node: app/orders-2 (2 files) and app/users-1 (4 entries); the table's
    // name without its id; its files already in place.
    assert_eq!(
        lines,
        [
            "0 app orders 2",
            "0 app users 4",
            "1 app orders 2",
            "1 app users 4"
        ]
    );
}

#[test]
fn by_name_table_mapping_fills_a_recreated_schemas_empty_tables_and_refuses_full_ones() {
    let sb = Sandbox::new();
    let cluster = source_cluster(sb.dir.path(), 1, 100);
    sb.ok(&start_args("backup-local", &cluster, "tm", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    // The target's schema was recreated: keyspace app with new table ids, empty.
    let t = target_cluster(sb.dir.path(), "tgt", 1);
    let node = sb.path("tgt/node-0");
    for d in ["app/users-9f9f", "app/orders-abcd", "app/empty-table-77"] {
        std::fs::create_dir_all(node.join(d)).unwrap();
    }
    let untouched = exact_tree(&node);
    // By default a keyspace that exists is refused, the target untouched.
    let args = restore_args(&t, "tm", &[]);
    let out = sb.run_v(&args);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("app"), "{}", text(&out).1);
    assert_eq!(exact_tree(&node), untouched);

    // post_restore is given the table dir the data went into.
    let imports = sb.path("imports.log");
    describe(
        &t,
        &format!(
            "post_restore = [\"sh\", \"-c\", \"echo \\\"$0 $1\\\" >> {}\", \"{{table}}\", \"{{dir}}\"]",
            imports.display()
        ),
    );
    // Killed in the middle of its moves, then resumed: rolled back and redone.
    let args = restore_args(&t, "tm", &["TABLE_MAPPING=by-name"]);
    let out = sb
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("FAILPOINTS", "commit-rename:3=return(kill)")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "{:?}", text(&out));
    let out = sb.run(&["plan", "resume", "3", "-q"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let src = sb.path("src/node-0");
    let files = |d: &Path| {
        tree(d)
            .into_iter()
            .filter(|(_, v)| !v.starts_with("dir"))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        files(&src.join("app/users-1")),
        files(&node.join("app/users-9f9f"))
    );
    let log = std::fs::read_to_string(&imports).unwrap();
    assert!(
        log.contains(&format!("users {}", node.join("app/users-9f9f").display())),
        "{log}"
    );
    assert!(!log.contains("users-1\n"), "{log}");
    assert_eq!(
        files(&src.join("app/orders-2")),
        files(&node.join("app/orders-abcd"))
    );
    assert!(!node.join("app/users-1").exists() && !node.join("app/orders-2").exists());
    // The snapshot's empty table adds nothing beside the target's; metrics,
    // absent from the target, comes whole.
    assert!(!node.join("app/empty-table").exists());
    assert_eq!(
        tree(&src.join("metrics")),
        tree(&node.join("metrics")),
        "metrics restored as it was"
    );
    let left: Vec<String> = std::fs::read_dir(&node)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cairn"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A table dir that holds data is refused by name, nothing moved.
    let t2 = target_cluster(sb.dir.path(), "t2", 1);
    let n2 = sb.path("t2/node-0");
    std::fs::create_dir_all(n2.join("app/users-9f9f")).unwrap();
    std::fs::create_dir_all(n2.join("app/orders-abcd")).unwrap();
    std::fs::write(n2.join("app/orders-abcd/nb-9-big-Data.db"), b"live data").unwrap();
    let before = exact_tree(&n2);
    let args = restore_args(&t2, "tm", &["TABLE_MAPPING=by-name"]);
    let out = sb.run_v(&args);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("app/orders-abcd already holds data"),
        "{}",
        text(&out).1
    );
    assert_eq!(exact_tree(&n2), before);
    // Written into after the pre-flight (here: while the run was down): the
    // resumed commit refuses it, and the writer's file stays as it is.
    let t3 = target_cluster(sb.dir.path(), "t3", 1);
    let n3 = sb.path("t3/node-0");
    for d in ["app/users-9f9f", "app/orders-abcd"] {
        std::fs::create_dir_all(n3.join(d)).unwrap();
    }
    let args = restore_args(&t3, "tm", &["TABLE_MAPPING=by-name"]);
    let out = sb
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("FAILPOINTS", "before:commit/commit-restore=return(kill)")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "{:?}", text(&out));
    std::fs::write(n3.join("app/users-9f9f/intruder.db"), b"written meanwhile").unwrap();
    let out = sb.run(&["plan", "resume", "5", "-q"]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("no longer an empty directory"),
        "{}",
        text(&out).1
    );
    let names: Vec<String> = std::fs::read_dir(n3.join("app/users-9f9f"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["intruder.db"]);

    // A file the commit had moved in, replaced by someone after a kill: the
    // rollback leaves theirs alone, and the resume refuses rather than replace it.
    let t4 = target_cluster(sb.dir.path(), "t4", 1);
    let n4 = sb.path("t4/node-0");
    for d in ["app/users-9f9f", "app/orders-abcd"] {
        std::fs::create_dir_all(n4.join(d)).unwrap();
    }
    let args = restore_args(&t4, "tm", &["TABLE_MAPPING=by-name"]);
    let out = sb
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("FAILPOINTS", "commit-rename:3=return(kill)")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "{:?}", text(&out));
    let moved = n4.join("app/orders-abcd/big.db");
    assert!(moved.exists(), "the first moves happened");
    std::fs::remove_file(&moved).unwrap();
    std::fs::write(&moved, b"USER").unwrap();
    let out = sb.run(&["plan", "resume", "6", "-q"]);
    assert!(!out.status.success(), "{:?}", text(&out));
    assert_eq!(std::fs::read(&moved).unwrap(), b"USER");

    // A link (or a file) where a table dir should be is refused by name.
    let t5 = target_cluster(sb.dir.path(), "t5", 1);
    let n5 = sb.path("t5/node-0");
    std::fs::create_dir_all(n5.join("app/orders-abcd")).unwrap();
    std::fs::create_dir_all(sb.path("elsewhere")).unwrap();
    std::os::unix::fs::symlink(sb.path("elsewhere"), n5.join("app/users-9f9f")).unwrap();
    let before = exact_tree(&n5);
    let args = restore_args(&t5, "tm", &["TABLE_MAPPING=by-name"]);
    let out = sb.run_v(&args);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("app/users-9f9f is not a directory"),
        "{}",
        text(&out).1
    );
    assert_eq!(exact_tree(&n5), before);
    assert!(
        std::fs::read_dir(sb.path("elsewhere"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn snapshots_schema_and_loads_run_on_the_hosts_of_exec_nodes() {
    let sb = Sandbox::new();
    let bin = super::nodes::agent_bin(&sb);
    let prefix = |_| vec!["env".to_string(), "CAIRN_ON_NODE=1".to_string()];
    let cluster = super::nodes::exec_cluster(&sb, 2, 1000, &bin, prefix);
    // The dump proves it ran through the node's exec prefix.
    describe(
        &cluster,
        "[artifacts.schema]\ndump = [\"sh\", \"-c\", \"echo \\\"schema from node $CAIRN_NODE_INDEX on=$CAIRN_ON_NODE\\\"\"]",
    );
    let store = sb.path("store");
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "-q",
        "--cluster",
        cluster.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=ex",
        "-p",
        &format!("BACKUP_DIR={}", store.display()),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        std::fs::read_to_string(store.join("ex/schema.cql")).unwrap(),
        "schema from node 0 on=1\n"
    );
    for i in 0..2 {
        assert!(snaps(&sb.path(&format!("src/node-{i}"))).is_empty());
    }
    // Restore onto exec nodes: the load and the post_restore run there too.
    let seen = sb.path("seen");
    let mut text_ = format!(
        "name = \"tgt\"\nagent_path = {bin:?}\npost_restore = [\"sh\", \"-c\", \"echo \\\"$CAIRN_ON_NODE $0/$1\\\" >> {}.imports\", \"{{keyspace}}\", \"{{table}}\"]\n[artifacts.schema]\ndump = [\"true\"]\nload = [\"sh\", \"-c\", \"echo \\\"on=$CAIRN_ON_NODE\\\" > {}.load; cat \\\"$0\\\" >> {}.load\", \"{{file}}\"]\n",
        seen.display(),
        seen.display(),
        seen.display()
    );
    for i in 0..2 {
        text_.push_str(&format!(
            "[[nodes]]\nindex = {i}\ndata_dir = {:?}\nexec = [\"env\", \"CAIRN_ON_NODE=1\"]\n",
            sb.path(&format!("tgt/node-{i}")).to_str().unwrap()
        ));
    }
    let t = sb.path("tgt.toml");
    std::fs::write(&t, text_).unwrap();
    let out = sb.run(&[
        "plan",
        "start",
        "restore-local",
        "-q",
        "--cluster",
        t.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=ex",
        "-p",
        &format!("BACKUP_DIR={}", store.display()),
        "-p",
        "RESTORE_SCHEMA=true",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        std::fs::read_to_string(sb.path("seen.load")).unwrap(),
        "on=1\nschema from node 0 on=1\n"
    );
    let imports = std::fs::read_to_string(sb.path("seen.imports")).unwrap();
    assert_eq!(imports.lines().count(), 6, "{imports}");
    assert!(imports.lines().all(|l| l.starts_with("1 ")), "{imports}");
    assert_restored(&sb, "tgt", 2);
}

#[test]
fn a_backup_the_patterns_empty_is_refused_and_a_stopped_dump_ends_with_its_run() {
    let sb = Sandbox::new();
    let cluster = source_cluster(sb.dir.path(), 1, 100);
    describe(&cluster, "exclude = [\"app\"]");
    let out = sb.run_v(&start_args(
        "backup-local",
        &cluster,
        "x1",
        &["KEYSPACES=app"],
    ));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out)
            .1
            .contains("left out by the cluster's exclude patterns")
    );
    // A dump that hangs: `plan stop` ends it (and what it started) with the run.
    let c2 = source_cluster(&sb.path("b"), 1, 100);
    let pids = sb.path("dump.pid");
    describe(
        &c2,
        &format!(
            "[artifacts.schema]\ndump = [\"sh\", \"-c\", \"sleep 1000 & echo $! > {}; wait\"]",
            pids.display()
        ),
    );
    let mut child = sb
        .command(
            &start_args("backup-local", &c2, "x2", &[])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !pids.exists() || std::fs::read_to_string(&pids).unwrap().trim().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dump never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = std::fs::read_to_string(&pids).unwrap().trim().to_string();
    // Run 1 was the refused backup.
    sb.ok(&["plan", "stop", "2"]);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dump's sleep outlived its stopped run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
