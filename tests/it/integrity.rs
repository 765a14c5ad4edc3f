//! A run that says COMPLETE is complete: the reproduction, resume refusing
//! changes, and one test per hole found by the adversarial review.

use super::helpers::*;
use sha2::{Digest, Sha256};
use std::path::Path;

fn status_json(sb: &Sandbox, run: u32) -> serde_json::Value {
    let out = sb.ok(&["plan", "status", "--json", &run.to_string()]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn backup(sb: &Sandbox, cluster: &Path, snap: &str) {
    let out = sb.run_v(&start_args("backup-local", cluster, snap, &[]));
    assert!(out.status.success(), "{:?}", text(&out));
}

fn restore(sb: &Sandbox, cluster: &Path, snap: &str, extra: &[&str]) -> std::process::Output {
    sb.run_v(&start_args("restore-local", cluster, snap, extra))
}

fn flip_byte(path: &Path) -> Vec<u8> {
    let good = std::fs::read(path).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(path, bad).unwrap();
    good
}

/// The reproduction: a failed stage discards every node's staging; the
/// resume must stage them again, not claim COMPLETE over empty nodes.
#[test]
fn a_failed_restore_resumed_restores_every_node() {
    for strategy in ["serial", "parallel"] {
        let sb = Sandbox::new();
        let src = source_cluster(sb.dir.path(), 3, 20_000);
        backup(&sb, &src, "s1");
        let good = flip_byte(&sb.path("store/s1/node-2.tar.gz"));
        let tgt = target_cluster(sb.dir.path(), "tgt", 3);
        let out = restore(&sb, &tgt, "s1", &[&format!("STRATEGY={strategy}")]);
        assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
        let v = status_json(&sb, 2);
        assert_eq!(v["run"]["status"], "FAILED");
        for s in v["steps"].as_array().unwrap() {
            if s["id"].as_str().unwrap().starts_with("stage/") {
                assert_eq!(s["status"], "PENDING", "{strategy}: {s}");
            }
        }
        // The failed restore left the target as it was: not even the dirs it made.
        assert!(
            !sb.path("tgt").exists(),
            "{strategy}: target dirs left behind"
        );

        std::fs::write(sb.path("store/s1/node-2.tar.gz"), good).unwrap();
        sb.ok(&["plan", "resume", "2", "-q"]);
        assert_eq!(status_json(&sb, 2)["run"]["status"], "COMPLETE");
        assert_restored(&sb, "tgt", 3);
        assert_no_leftovers(&sb, "tgt", 3);
    }
}

/// No staging dir, record or lock is left once a run is COMPLETE.
pub fn assert_no_leftovers(sb: &Sandbox, target: &str, nodes: u32) {
    for i in 0..nodes {
        let dir = sb.path(&format!("{target}/node-{i}"));
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!name.starts_with(".cairn"), "{name} left in {dir:?}");
            }
        }
    }
    assert!(
        !sb.path("store/.cairn-locks").exists()
            || std::fs::read_dir(sb.path("store/.cairn-locks"))
                .unwrap()
                .next()
                .is_none(),
        "a lock is left"
    );
    if let Ok(rd) = std::fs::read_dir(sb.path("store/.cairn-tmp")) {
        let left: Vec<_> = rd.map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
    }
}

#[test]
fn resume_refuses_parameters_that_change_the_run() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 1000);
    backup(&sb, &src, "s1");
    let good = flip_byte(&sb.path("store/s1/node-1.tar.gz"));
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let out = restore(&sb, &tgt, "s1", &[]);
    assert_eq!(out.status.code(), Some(1));
    std::fs::write(sb.path("store/s1/node-1.tar.gz"), good).unwrap();
    for change in [
        "RESTORE_DIR=elsewhere",
        "NODES=0",
        "PATHS=app",
        "KEYSPACES=metrics",
        "SNAPSHOT_NAME=s2",
    ] {
        let out = sb.run(&["plan", "resume", "2", "-q", "-p", change]);
        assert_eq!(out.status.code(), Some(2), "{change}: {:?}", text(&out));
        let key = change.split('=').next().unwrap();
        let err = text(&out).1;
        assert!(
            err.contains(key) || err.contains("snapshot"),
            "{change}: {err}"
        );
        assert!(!sb.path("elsewhere").exists());
        assert_eq!(status_json(&sb, 2)["run"]["status"], "FAILED");
    }
    // Tunables may change.
    sb.ok(&["plan", "resume", "2", "-q", "-p", "STRATEGY=parallel"]);
    assert_restored(&sb, "tgt", 2);
}

#[test]
fn bad_selections_are_refused_before_a_run_exists() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 10);
    backup(&sb, &src, "s1");
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    for (bad, says) in [
        ("NODES=,", "NODES"),
        ("NODES=7", "no node 7"),
        ("PATHS=app,app/users-1", "overlap"),
        ("RESTORE_MANAGER=yes", "RESTORE_MANAGER"),
    ] {
        let out = restore(&sb, &tgt, "s1", &[bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {:?}", text(&out));
        assert!(text(&out).1.contains(says), "{bad}: {:?}", text(&out));
    }
    let runs = sb.ok(&["plan", "history", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        1,
        "only the backup was recorded"
    );
    assert!(!sb.path("tgt").exists());
}

/// A plan without a name pattern still cannot nest or reuse reserved names.
#[test]
fn nested_and_reserved_snapshot_names_are_refused_by_the_engine() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10);
    let plan = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/backup-local.toml"),
    )
    .unwrap()
    .replace("name = \"backup-local\"", "name = \"backup-open\"")
    .replace("pattern = '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'\n", "");
    std::fs::create_dir_all(sb.path("plans")).unwrap();
    std::fs::write(sb.path("plans/backup-open.toml"), plan).unwrap();
    for name in ["prod/nightly-1", ".cairn-manager", "..", ".cairn-locks"] {
        let out = sb.run(&[
            "--plans-dir",
            "plans",
            "plan",
            "start",
            "backup-open",
            "--cluster",
            src.to_str().unwrap(),
            "-p",
            &format!("SNAPSHOT_NAME={name}"),
            "-p",
            "BACKUP_DIR=store",
        ]);
        assert_eq!(out.status.code(), Some(2), "{name}: {:?}", text(&out));
        assert!(!sb.path("store").exists() || !sb.path("store/prod").exists());
    }
    // delete and verify refuse reserved names: the manager snapshots survive.
    std::fs::create_dir_all(sb.path("store/.cairn-manager/m1")).unwrap();
    std::fs::write(sb.path("store/.cairn-manager/m1/manager.zip"), b"zip").unwrap();
    let out = sb.run(&["snapshots", "delete", ".cairn-manager", "--store", "store"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(sb.path("store/.cairn-manager/m1/manager.zip").exists());
}

// --- crafted snapshots -------------------------------------------------------

enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
}

/// Write `store/<snap>/node-0.tar.gz` holding `entries` and a manifest that
/// declares `declared` (path, bytes) for keyspace `ks`.
fn craft(sb: &Sandbox, snap: &str, entries: &[Entry], declared: &[(&str, &[u8])]) {
    let dir = sb.path(&format!("store/{snap}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, format!("{p}/"), std::io::empty())
                    .unwrap();
            }
            Entry::File(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, p, *data).unwrap();
            }
            Entry::Link(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, p, t).unwrap();
            }
        }
    }
    let bytes = tar.into_inner().unwrap().finish().unwrap();
    std::fs::write(dir.join("node-0.tar.gz"), &bytes).unwrap();
    let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
    let files: Vec<serde_json::Value> = declared
        .iter()
        .map(|(p, d)| serde_json::json!({"path": p, "size": d.len(), "sha256": sha(d)}))
        .collect();
    let manifest = serde_json::json!({
        "format_version": 1, "cairn_version": "0.1.0", "snapshot": snap, "plan": "backup-local",
        "started_at": "2026-11-01T00:00:00Z", "finished_at": "2026-11-01T00:00:01Z",
        "cluster": {"name": "x", "nodes": [{"index": 0, "object": "node-0.tar.gz", "keyspaces": ["ks"],
            "file_count": files.len(), "bytes": 0, "compressed_bytes": bytes.len(), "files": files}]},
        "objects": [{"key": "node-0.tar.gz", "size": bytes.len(), "sha256": sha(&bytes)}],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

fn one_node_target(sb: &Sandbox) -> std::path::PathBuf {
    target_cluster(sb.dir.path(), "tgt", 1)
}

/// Hole 1: a link chain (`a -> .`, `b -> a/a/../../outside`) is refused, and a
/// later partial restore cannot write through a link already in the target.
#[test]
fn link_chains_are_refused_and_commit_never_follows_target_links() {
    let sb = Sandbox::new();
    craft(
        &sb,
        "chain",
        &[
            Entry::Dir("ks"),
            Entry::Link("ks/a", "."),
            Entry::Link("ks/b", "a/a/../../outside"),
        ],
        &[],
    );
    let tgt = one_node_target(&sb);
    let out = restore(&sb, &tgt, "chain", &[]);
    assert_ne!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("through the symlink"),
        "{:?}",
        text(&out)
    );
    assert!(!sb.path("tgt/node-0/ks").exists());

    // A target that already holds a link out of it (planted, or from an old
    // restore): a partial restore under it is refused, nothing written outside.
    craft(
        &sb,
        "plain",
        &[
            Entry::Dir("ks"),
            Entry::Dir("ks/b"),
            Entry::File("ks/b/pwned", b"owned"),
        ],
        &[("ks/b/pwned", b"owned")],
    );
    std::fs::create_dir_all(sb.path("tgt/node-0/ks")).unwrap();
    std::fs::create_dir_all(sb.path("outside")).unwrap();
    std::os::unix::fs::symlink(sb.path("outside"), sb.path("tgt/node-0/ks/b")).unwrap();
    let out = restore(&sb, &tgt, "plain", &["PATHS=ks/b/pwned"]);
    assert_ne!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(!sb.path("outside/pwned").exists(), "written through a link");
}

/// Hole 2: a declared file must be a regular file in the archive.
#[test]
fn a_declared_file_satisfied_by_a_link_or_dir_is_refused() {
    let sb = Sandbox::new();
    craft(
        &sb,
        "s",
        &[Entry::Dir("ks"), Entry::Link("ks/data.db", "other")],
        &[("ks/data.db", b"")],
    );
    let out = sb.run(&[
        "snapshots",
        "verify",
        "s",
        "--store",
        "store",
        "--read-data",
    ]);
    assert_ne!(out.status.code(), Some(0), "{:?}", text(&out));
    let tgt = one_node_target(&sb);
    let out = restore(&sb, &tgt, "s", &[]);
    assert_ne!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("declared as a file"),
        "{:?}",
        text(&out)
    );
    assert!(!sb.path("tgt/node-0/ks").exists());
}

/// Hole 3: symlinked keyspaces and tables are refused by name, never dropped.
#[test]
fn symlinked_keyspaces_and_tables_are_refused_by_name() {
    let sb = Sandbox::new();
    let node = sb.path("src/node-0");
    fill_node(&node, 0, 10);
    fill_node(&sb.path("otherdisk"), 0, 10);
    std::os::unix::fs::symlink(sb.path("otherdisk/app"), node.join("ks2")).unwrap();
    let c = cluster_file(&sb.path("c.toml"), "c", &[(0, node.clone())], "");
    let out = sb.run_v(&start_args("backup-local", &c, "s", &[]));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("keyspace ks2"), "{:?}", text(&out));
    std::fs::remove_file(node.join("ks2")).unwrap();
    std::os::unix::fs::symlink(sb.path("otherdisk/metrics/readings-3"), node.join("app/t9"))
        .unwrap();
    let out = sb.run_v(&start_args("backup-local", &c, "s", &[]));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let err = text(&out).1;
    assert_eq!(
        err.matches("table app/t9").count(),
        1,
        "printed once: {err}"
    );
    assert!(!sb.path("store/s/manifest.json").exists());
    let v = status_json(&sb, 2);
    assert_eq!(v["run"]["status"], "REFUSED");
    let out = sb.run(&["plan", "resume", "2"]);
    assert_eq!(out.status.code(), Some(2), "a refused run is not resumable");
}

/// Hole 6: secrets with a trailing newline, short secrets, hooks' environment.
#[test]
fn secrets_are_masked_in_any_shape_and_hooks_get_only_listed_ones() {
    let sb = Sandbox::new();
    let plan = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/backup-local.toml"),
    )
    .unwrap()
    .replace("name = \"backup-local\"", "name = \"backup-secret\"")
    .replace(
        "[parameters.BACKUP_DIR]",
        "[parameters.API_TOKEN]\nrequired = true\nsecret = true\nenv = true\n\n[parameters.OTHER_TOKEN]\ndefault = \"\"\nsecret = true\n\n[parameters.BACKUP_DIR]",
    );
    std::fs::create_dir_all(sb.path("plans")).unwrap();
    std::fs::write(sb.path("plans/backup-secret.toml"), plan).unwrap();
    fill_node(&sb.path("n0"), 0, 10);
    let hook = "pre_hook = [\"sh\", \"-c\", \"echo api=$API_TOKEN other=${OTHER_TOKEN:-withheld} > hook.out; echo failing with $API_TOKEN >&2; exit 3\"]";
    std::fs::write(
        sb.path("c.toml"),
        format!("name = \"s\"\nhook_secrets = [\"API_TOKEN\"]\n[[nodes]]\nindex = 0\ndata_dir = \"n0\"\n{hook}\n"),
    )
    .unwrap();
    let secret = "k8s-Secret-Value-77";
    let out = sb
        .command(&[
            "--plans-dir",
            "plans",
            "--json",
            "-v",
            "plan",
            "start",
            "backup-secret",
            "--cluster",
            "c.toml",
            "-p",
            "SNAPSHOT_NAME=s1",
            "-p",
            "BACKUP_DIR=store",
            "-p",
            "OTHER_TOKEN=other-secret-value",
        ])
        .env("API_TOKEN", format!("{secret}\n"))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let hook_out = std::fs::read_to_string(sb.path("hook.out")).unwrap();
    assert!(hook_out.contains(secret), "listed secret reaches the hook");
    assert!(hook_out.contains("other=withheld"), "{hook_out}");
    let status = sb.ok(&["plan", "status", "--json", "1"]);
    let db = std::fs::read(sb.path("home/state.db")).unwrap();
    let all = [
        out.stdout.clone(),
        out.stderr.clone(),
        status.stdout.clone(),
        db,
    ]
    .concat();
    let all = String::from_utf8_lossy(&all);
    assert!(!all.contains(secret), "the secret leaked");
    assert!(!all.contains("other-secret-value"), "the secret leaked");
    // The JSON line is still JSON.
    let last = String::from_utf8_lossy(&out.stdout);
    let line = last.lines().last().unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(line).is_ok(),
        "{line}"
    );

    // A secret too short to mask safely is refused before anything runs.
    let out = sb.run(&[
        "--plans-dir",
        "plans",
        "plan",
        "start",
        "backup-secret",
        "--cluster",
        "c.toml",
        "-p",
        "SNAPSHOT_NAME=s2",
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "API_TOKEN=e",
    ]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("shorter than"), "{:?}", text(&out));
}

/// Hole 7: the directory store never follows a link inside its root.
#[test]
fn the_local_store_never_follows_links_inside_its_root() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10);
    std::fs::create_dir_all(sb.path("store")).unwrap();
    std::fs::create_dir_all(sb.path("elsewhere")).unwrap();
    std::os::unix::fs::symlink(sb.path("elsewhere"), sb.path("store/s1")).unwrap();
    let out = sb.run_v(&start_args("backup-local", &src, "s1", &[]));
    assert_ne!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(
        std::fs::read_dir(sb.path("elsewhere"))
            .unwrap()
            .next()
            .is_none(),
        "written through the link"
    );
    std::fs::remove_file(sb.path("store/s1")).unwrap();
    backup(&sb, &src, "s1");
    std::os::unix::fs::symlink(sb.path("elsewhere"), sb.path("store/.cairn-verify")).unwrap();
    let _ = sb.run(&["snapshots", "verify", "s1", "--store", "store", "-q"]);
    assert!(
        std::fs::read_dir(sb.path("elsewhere"))
            .unwrap()
            .next()
            .is_none(),
        "verify record written through the link"
    );
}

/// Hole 8: a temp file a killed upload left is removed by the next writer.
#[test]
fn uploads_left_by_dead_processes_are_swept() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10);
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    std::fs::create_dir_all(sb.path("store/.cairn-tmp")).unwrap();
    let dead = sb.path(&format!("store/.cairn-tmp/upload-{host}-999999999-abc"));
    std::fs::write(&dead, b"half an upload").unwrap();
    backup(&sb, &src, "s1");
    assert!(!dead.exists(), "the dead upload is still there");
}

/// Hole 9: staging is named by the run's token, so two homes restoring into one
/// target never delete each other's staging.
#[test]
fn staging_names_are_unique_across_homes() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    backup(&sb, &src, "s1");
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    // Another home's run left its staging in the same target.
    let other = sb.path("tgt/node-0/.cairn-staging-1");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep"), b"theirs").unwrap();
    let good = flip_byte(&sb.path("store/s1/node-0.tar.gz"));
    let out = restore(&sb, &tgt, "s1", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        other.join("keep").exists(),
        "another run's staging was removed"
    );
    std::fs::write(sb.path("store/s1/node-0.tar.gz"), good).unwrap();
    sb.ok(&["plan", "resume", "2", "-q"]);
    assert!(other.join("keep").exists());
    let restored = without(tree(&sb.path("tgt/node-0")), &[".cairn-staging-1"]);
    let source = without(tree(&sb.path("src/node-0")), &["system"]);
    assert_eq!(restored, source);
}

/// Hole 10: environment fallback only where the plan allows it; big @file values.
#[test]
fn generic_names_never_come_from_the_environment_and_big_files_are_refused() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10);
    let args = start_args("backup-local", &src, "s1", &[]);
    let out = sb
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("KEYSPACES", "metrics")
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.path("store/s1/manifest.json")).unwrap()).unwrap();
    assert_eq!(
        m["cluster"]["nodes"][0]["keyspaces"],
        serde_json::json!(["app", "metrics"]),
        "KEYSPACES from the shell must not narrow the backup"
    );
    let v = status_json(&sb, 1);
    assert_eq!(v["param_sources"]["KEYSPACES"], "default");
    assert_eq!(v["param_sources"]["SNAPSHOT_NAME"], "cli");

    std::fs::write(sb.path("big"), "x".repeat(5 << 20)).unwrap();
    let out = sb.run_v(&start_args("backup-local", &src, "@big", &[]));
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out).1;
    assert!(
        err.len() < 2000,
        "the value was echoed: {} bytes",
        err.len()
    );
}

/// State databases written before the run spec still open; their runs are listed,
/// and a resume is refused with a reason instead of guessing.
#[test]
fn a_state_database_from_the_first_release_opens() {
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path("home")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/state/v1-state.db"),
        sb.path("home/state.db"),
    )
    .unwrap();
    let out = sb.ok(&["plan", "history", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["status"], "COMPLETE");
    assert_eq!(v[0]["status"], "FAILED");
    sb.ok(&["plan", "status", "2"]);
    let out = sb.run(&["plan", "resume", "2"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("earlier cairn"), "{:?}", text(&out));
    // A new run goes into the migrated database.
    let src = source_cluster(sb.dir.path(), 1, 10);
    backup(&sb, &src, "new");
    assert_eq!(status_json(&sb, 3)["run"]["status"], "COMPLETE");
}

/// A run whose process was killed shows as INTERRUPTED, not RUNNING forever.
#[test]
fn a_killed_run_shows_as_interrupted() {
    let sb = Sandbox::new();
    let nodes: Vec<(u32, std::path::PathBuf)> = (0..1)
        .map(|i| {
            let d = sb.path(&format!("src/node-{i}"));
            fill_node(&d, i, 10);
            (i, d)
        })
        .collect();
    let hook = "pre_hook = [\"sh\", \"-c\", \"kill -9 $PPID; sleep 5\"]";
    let c = cluster_file(&sb.path("src.toml"), "src", &nodes, hook);
    let out = sb.run_v(&start_args("backup-local", &c, "s", &[]));
    assert_eq!(out.status.code(), None);
    assert_eq!(status_json(&sb, 1)["run"]["status"], "INTERRUPTED");
}

/// Second review: a backup refuses what its restore would refuse (links through
/// links, reserved names deep inside a table) instead of completing a snapshot
/// nobody can restore; loose files at the top of a data dir are named.
#[test]
fn a_backup_refuses_what_its_restore_would_refuse() {
    let sb = Sandbox::new();
    let node = sb.path("src/node-0");
    fill_node(&node, 0, 10);
    let c = cluster_file(&sb.path("c.toml"), "c", &[(0, node.clone())], "");
    // l2 -> l1 -> file: resolving l2 passes through the link l1.
    std::os::unix::fs::symlink("latest", node.join("app/users-1/l2")).unwrap();
    let out = sb.run_v(&start_args("backup-local", &c, "s", &[]));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("app/users-1/l2"),
        "{:?}",
        text(&out).1
    );
    assert!(!sb.path("store/s/manifest.json").exists());
    std::fs::remove_file(node.join("app/users-1/l2")).unwrap();

    std::fs::write(node.join("app/users-1/.cairn-staged.json"), b"{}").unwrap();
    let out = sb.run_v(&start_args("backup-local", &c, "s", &[]));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("reserved"), "{:?}", text(&out).1);
    std::fs::remove_file(node.join("app/users-1/.cairn-staged.json")).unwrap();

    std::fs::write(node.join("notes.txt"), b"not a keyspace").unwrap();
    let out = sb.run_v(&start_args("backup-local", &c, "s", &[]));
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).1.contains("notes.txt"), "{:?}", text(&out).1);
    // What completed restores.
    let tgt = one_node_target(&sb);
    let out = restore(&sb, &tgt, "s", &[]);
    assert!(out.status.success(), "{:?}", text(&out));
}

/// Second review: links where a restore writes. A link at RESTORE_DIR/node-<i> is
/// refused, a data dir that is a dangling link gets a clear refusal, and a dangling
/// link in a keyspace's place is a clash found before anything is staged.
#[test]
fn links_in_the_way_of_a_restore_are_refused_before_it_starts() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10);
    backup(&sb, &src, "s");
    let tgt = one_node_target(&sb);

    std::fs::create_dir_all(sb.path("rd")).unwrap();
    std::fs::create_dir_all(sb.path("elsewhere")).unwrap();
    std::os::unix::fs::symlink(sb.path("elsewhere"), sb.path("rd/node-0")).unwrap();
    let rd = format!("RESTORE_DIR={}", sb.path("rd").display());
    let out = restore(&sb, &tgt, "s", &[&rd]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("symbolic link"), "{:?}", text(&out).1);
    assert!(tree(&sb.path("elsewhere")).is_empty());

    std::os::unix::fs::symlink(sb.path("nowhere"), sb.path("tgt")).unwrap();
    let out = restore(&sb, &tgt, "s", &[]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    std::fs::remove_file(sb.path("tgt")).unwrap();
    let out = restore(&sb, &tgt, "s", &[]);
    // tgt/node-0 under a dangling tgt link: now tgt is gone, so this one restores.
    assert!(out.status.success(), "{:?}", text(&out));

    let tgt2 = target_cluster(sb.dir.path(), "tgt2", 1);
    std::fs::create_dir_all(sb.path("tgt2/node-0")).unwrap();
    std::os::unix::fs::symlink(sb.path("gone"), sb.path("tgt2/node-0/app")).unwrap();
    let out = restore(&sb, &tgt2, "s", &[]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("already exist"), "{:?}", text(&out).1);
    let last = sb.ok(&["plan", "history", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&last.stdout).unwrap();
    let runs = v.as_array().or_else(|| v["runs"].as_array()).unwrap();
    assert!(
        runs.iter().any(|r| r["status"] == "REFUSED"),
        "refused in pre-flight: {v}"
    );
    assert_eq!(
        std::fs::read_dir(sb.path("tgt2/node-0")).unwrap().count(),
        1,
        "nothing staged"
    );
}
