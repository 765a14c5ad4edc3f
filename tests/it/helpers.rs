//! Shared helpers: a sandbox with its own state home, fixture clusters generated
//! with modes, empty dirs, odd names and symlinks, and tree fingerprints.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A `cairn` command with this sandbox's state home and nothing inherited
    /// from the caller's CAIRN_* variables.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("CAIRN_HOME", self.path("home"))
            .env_remove("CAIRN_CLUSTER")
            .env_remove("CAIRN_PLANS")
            .env_remove("CAIRN_STORE")
            .env_remove("CAIRN_CONFIG")
            // Never the caller's own store profiles.
            .env("XDG_CONFIG_HOME", self.path("xdg-config"))
            .env_remove("RUST_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// [`Sandbox::run`] with owned arguments (see [`start_args`]).
    pub fn run_v(&self, args: &[String]) -> Output {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&a)
    }

    /// Run and require success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cairn {args:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn put(path: &Path, data: &[u8], mode: u32, mtime: i64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    let t = filetime::FileTime::from_unix_time(mtime, 0);
    filetime::set_file_times(path, t, t).unwrap();
}

/// Fill a node data dir: keyspaces `app`, `metrics` and `system`, with modes, an
/// empty dir, names with spaces and non-ASCII, a symlink, and `extra` bytes of noise.
pub fn fill_node(dir: &Path, index: u32, extra: usize) {
    let i = index as u64;
    put(
        &dir.join("app/users-1/nb-1-Data.db"),
        &noise(i + 1, 50_000),
        0o640,
        1_700_000_001,
    );
    put(
        &dir.join("app/users-1/nb-1-TOC.txt"),
        b"Data.db\nTOC.txt\n",
        0o644,
        1_700_000_002,
    );
    put(
        &dir.join("app/users-1/run me.sh"),
        b"#!/bin/sh\necho hi\n",
        0o755,
        1_700_000_003,
    );
    put(
        &dir.join("app/orders-2/ünïcødé – naïve.db"),
        format!("node {index}\n").as_bytes(),
        0o600,
        1_700_000_004,
    );
    put(
        &dir.join("app/orders-2/big.db"),
        &noise(i + 100, extra),
        0o644,
        1_700_000_005,
    );
    std::fs::create_dir_all(dir.join("app/empty-table")).unwrap();
    std::fs::set_permissions(
        dir.join("app/empty-table"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::os::unix::fs::symlink("nb-1-Data.db", dir.join("app/users-1/latest")).unwrap();
    put(
        &dir.join("metrics/readings-3/data.db"),
        "reading 1\n".repeat(2000).as_bytes(),
        0o644,
        1_700_000_006,
    );
    put(
        &dir.join("system/local-4/data.db"),
        b"system data",
        0o644,
        1_700_000_007,
    );
    // Directory mtimes last, once their contents exist.
    for d in [
        "app/users-1",
        "app/orders-2",
        "app/empty-table",
        "app",
        "metrics/readings-3",
        "metrics",
    ] {
        let t = filetime::FileTime::from_unix_time(1_690_000_000, 0);
        filetime::set_file_times(dir.join(d), t, t).unwrap();
    }
}

/// Write a cluster description for the given data dirs; returns its path.
pub fn cluster_file(path: &Path, name: &str, nodes: &[(u32, PathBuf)], hooks: &str) -> PathBuf {
    let mut text = format!("name = {name:?}\n");
    for (i, d) in nodes {
        text.push_str(&format!(
            "[[nodes]]\nindex = {i}\ndata_dir = {:?}\n{hooks}\n",
            d.to_str().unwrap()
        ));
    }
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// A source cluster of `n` nodes under `root/src`, and the path of its description.
pub fn source_cluster(root: &Path, n: u32, extra: usize) -> PathBuf {
    let nodes: Vec<(u32, PathBuf)> = (0..n)
        .map(|i| {
            let d = root.join(format!("src/node-{i}"));
            fill_node(&d, i, extra);
            (i, d)
        })
        .collect();
    cluster_file(&root.join("src-cluster.toml"), "src", &nodes, "")
}

/// An empty target cluster of `n` nodes under `root/<name>`.
pub fn target_cluster(root: &Path, name: &str, n: u32) -> PathBuf {
    let nodes: Vec<(u32, PathBuf)> = (0..n)
        .map(|i| (i, root.join(format!("{name}/node-{i}"))))
        .collect();
    cluster_file(&root.join(format!("{name}.toml")), name, &nodes, "")
}

/// Fingerprint of a tree: path → kind, mode, mtime, size, link count and SHA-256 (files) or target
/// (symlinks). Empty directories are included.
pub fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(dir, dir, false, &mut out);
    out
}

/// The tree with times to the nanosecond: for "left untouched", where a change
/// within the same second must show too.
pub fn exact_tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(dir, dir, true, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, exact: bool, out: &mut BTreeMap<String, String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mode = m.mode() & 0o7777;
        let nanos = if exact {
            format!(".{:09}", m.mtime_nsec())
        } else {
            String::new()
        };
        if m.file_type().is_symlink() {
            out.insert(
                rel,
                format!("link {}", std::fs::read_link(&p).unwrap().display()),
            );
        } else if m.is_dir() {
            out.insert(rel, format!("dir {mode:o} {}{nanos}", m.mtime()));
            walk(root, &p, exact, out);
        } else {
            let sha = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
            out.insert(
                rel,
                format!(
                    "file {mode:o} {}{nanos} {} links={} {sha}",
                    m.mtime(),
                    m.len(),
                    m.nlink()
                ),
            );
        }
    }
}

/// The tree without the entries of the given top-level names.
pub fn without(mut t: BTreeMap<String, String>, top: &[&str]) -> BTreeMap<String, String> {
    t.retain(|k, _| {
        !top.iter()
            .any(|x| k == x || k.starts_with(&format!("{x}/")))
    });
    t
}

pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Wait (up to two minutes) until step `step` of run `run` is RUNNING, reading the
/// state through `cairn plan status --json` as an operator would.
pub fn wait_until_running(sb: &Sandbox, run: u32, step: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "step {step} never started"
        );
        if sb.path("home/state.db").exists() {
            let out = sb.run(&["plan", "status", "--json", &run.to_string()]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let running = v["steps"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|s| s["id"] == step && s["status"] == "RUNNING")
                });
                if running {
                    return;
                }
            }
        }
        // Not faster: every poll is a process opening the state store the run
        // writes to, and a busy machine must keep time for the run itself.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Every restored node `<target>/node-<i>` equals its source `src/node-<i>` (system
/// keyspaces, which backups leave out, excepted): content, modes, mtimes, links.
pub fn assert_restored(sb: &Sandbox, target: &str, nodes: u32) {
    for i in 0..nodes {
        let source = without(tree(&sb.path(&format!("src/node-{i}"))), &["system"]);
        let restored = tree(&sb.path(&format!("{target}/node-{i}")));
        assert!(!restored.is_empty(), "node {i} restored nothing");
        assert_eq!(source, restored, "node {i} differs");
    }
}

/// `plan start PLAN -q --cluster CLUSTER -p SNAPSHOT_NAME=SNAP -p BACKUP_DIR=store`
/// and `-p X` for each of `extra`: the command line of a local backup or restore.
pub fn start_args(plan: &str, cluster: &Path, snap: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["plan", "start", plan, "-q", "--cluster"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(cluster.to_str().unwrap().to_string());
    for p in [
        format!("SNAPSHOT_NAME={snap}"),
        "BACKUP_DIR=store".to_string(),
    ]
    .into_iter()
    .chain(extra.iter().map(|e| e.to_string()))
    {
        v.push("-p".into());
        v.push(p);
    }
    v
}

/// A lock on `snapshot` in a directory store, held by a process of another host
/// (its liveness unknowable here) with the given heartbeat (Unix seconds).
pub fn lock_file(store: &Path, snapshot: &str, purpose: &str, heartbeat: i64) {
    let dir = store.join(format!(".cairn-locks/{snapshot}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("other-host-1.json"),
        serde_json::json!({
            "token": "other-host-1", "snapshot": snapshot, "mode": "exclusive",
            "purpose": purpose, "owner": "plan backup-local", "host": "other-host",
            "pid": 4242, "created_at": "2026-11-20T00:00:00Z", "heartbeat": heartbeat
        })
        .to_string(),
    )
    .unwrap();
}
