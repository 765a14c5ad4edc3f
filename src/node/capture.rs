//! Point-in-time snapshots of a node, taken on its host before any upload.
//!
//! `hardlink`: every selected file is hard-linked into `<data_dir>/.cairn-snap-<run>/`
//! (the same file system, so no data is copied — what `nodetool snapshot` does on
//! disk). A compaction that deletes an SSTable afterwards removes only its live
//! name; the snapshot's link keeps the bytes until the upload is done.
//! `service`: the service's own snapshot command runs (`nodetool snapshot -t NAME`)
//! and its `<ks>/<table>/snapshots/<NAME>/` dirs are linked into the same tree as
//! `<ks>/<table>/`, so the backup reads both alike.

use crate::cluster::{Capture, Excludes, SNAP_PREFIX, Selection, SnapshotMode};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Take a node's snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TakeSnapshot {
    pub node: u32,
    pub data_dir: PathBuf,
    /// `.cairn-snap-<token>`.
    pub name: String,
    pub selection: Selection,
    pub capture: Capture,
    /// The snapshot's name (`{snapshot}` in the service's commands).
    pub snapshot: String,
    /// The environment of the service's commands.
    pub env: Vec<(String, String)>,
}

/// What a snapshot holds, and what it cost.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Taken {
    pub files: u64,
    pub bytes: u64,
    /// Entries the patterns left out.
    pub excluded: u64,
    /// Seconds to make it.
    pub secs: f64,
}

/// Remove a node's snapshot (and the service's, with its cleanup command).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropSnapshot {
    pub node: u32,
    pub data_dir: PathBuf,
    pub name: String,
    pub capture: Capture,
    pub snapshot: String,
    pub env: Vec<(String, String)>,
}

fn check_name(name: &str) -> Result<()> {
    if !name.starts_with(SNAP_PREFIX) || name.contains('/') || name.len() <= SNAP_PREFIX.len() {
        return Err(Error::Usage(format!("{name:?} is no snapshot dir")));
    }
    Ok(())
}

/// The node's `.cairn-snap-*` dirs (any run's).
pub fn list(data_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(data_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with(SNAP_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Whether the snapshot exists, complete (its marker written last), and is the
/// one cairn made: a real dir, this user's, closed to others (anything else is
/// taken again rather than trusted).
pub fn exists(data_dir: &Path, name: &str) -> Result<bool> {
    check_name(name)?;
    let root = data_dir.join(name);
    let ours = std::fs::symlink_metadata(&root).is_ok_and(|m| {
        m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o077 == 0
    });
    Ok(ours && std::fs::symlink_metadata(root.join(DONE)).is_ok_and(|m| m.is_file()))
}

/// Written last into a snapshot dir: a tree without it is a killed attempt's.
const DONE: &str = ".cairn-done";

/// Take the snapshot (blocking). A leftover of a killed attempt is removed first.
pub fn take(job: &TakeSnapshot, cancel: &CancellationToken) -> Result<Taken> {
    check_name(&job.name)?;
    let began = std::time::Instant::now();
    let root = job.data_dir.join(&job.name);
    remove_tree(&root)?;
    let excludes = job.capture.excludes()?;
    let keyspaces: Vec<String> = crate::cluster::keyspaces_on_disk(&job.data_dir)?
        .into_iter()
        .filter(|k| job.selection.includes(k))
        .collect();
    if job.capture.mode == SnapshotMode::Service {
        run_command(
            &job.capture.service_create,
            job,
            "service snapshot",
            &job.env,
            cancel,
        )?;
    }
    make_dir_like(&job.data_dir, &root, true)?;
    let mut t = Taken::default();
    let mut dirs = Vec::new();
    for ks in &keyspaces {
        if excludes.excludes(ks) {
            t.excluded += 1;
            continue;
        }
        let src = job.data_dir.join(ks);
        match job.capture.mode {
            SnapshotMode::Service => {
                service_keyspace(&src, &root.join(ks), ks, job, &excludes, &mut t, &mut dirs)?
            }
            _ => link_tree(&src, &root.join(ks), ks, &excludes, &mut t, &mut dirs)?,
        }
    }
    // Directory times last, deepest first, once their entries exist.
    dirs.sort_by(|a: &(PathBuf, PathBuf), b| b.1.cmp(&a.1));
    for (src, dst) in &dirs {
        if let Ok(m) = std::fs::metadata(src) {
            let t = filetime::FileTime::from_last_modification_time(&m);
            let _ = filetime::set_file_times(dst, t, t);
        }
    }
    std::fs::write(root.join(DONE), b"").map_err(|e| Error::io("write", root.join(DONE), e))?;
    t.secs = began.elapsed().as_secs_f64();
    tracing::info!(node = job.node, files = t.files, bytes = t.bytes, excluded = t.excluded, secs = t.secs, dir = %root.display(), "snapshot taken");
    Ok(t)
}

/// Remove the snapshot (blocking); the service's cleanup command runs too.
pub fn drop_snapshot(job: &DropSnapshot, cancel: &CancellationToken) -> Result<()> {
    check_name(&job.name)?;
    let began = std::time::Instant::now();
    let root = job.data_dir.join(&job.name);
    let existed = root.exists();
    remove_tree(&root)?;
    if existed {
        tracing::info!(node = job.node, secs = began.elapsed().as_secs_f64(), dir = %root.display(), "snapshot removed");
    }
    if job.capture.mode == SnapshotMode::Service && !job.capture.service_cleanup.is_empty() {
        let take = TakeSnapshot {
            node: job.node,
            data_dir: job.data_dir.clone(),
            name: job.name.clone(),
            selection: Selection::default(),
            capture: job.capture.clone(),
            snapshot: job.snapshot.clone(),
            env: job.env.clone(),
        };
        run_command(
            &job.capture.service_cleanup,
            &take,
            "service snapshot cleanup",
            &job.env,
            cancel,
        )?;
    }
    Ok(())
}

/// Remove a snapshot tree. Its dirs are cairn's own (made writable first, so a
/// read-only table dir's copy goes too); its files are links, never changed.
fn remove_tree(root: &Path) -> Result<()> {
    match std::fs::symlink_metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", root, e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::Usage(format!(
                "{} is not a directory; cairn leaves it alone",
                root.display()
            )));
        }
        Ok(_) => {}
    }
    // The marker goes first: a removal killed halfway leaves a tree that no
    // resume takes for a complete snapshot (it is taken again).
    match std::fs::remove_file(root.join(DONE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove", root.join(DONE), e)),
    }
    fn writable(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    writable(&e.path());
                }
            }
        }
    }
    writable(root);
    std::fs::remove_dir_all(root).map_err(|e| Error::io("remove", root, e))
}

/// A directory `dst` with `src`'s mode and owner (times are set last).
fn make_dir_like(src: &Path, dst: &Path, private: bool) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let m = std::fs::metadata(src).map_err(|e| Error::io("stat", src, e))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dst)
        .map_err(|e| Error::io("create", dst, e))?;
    if !private {
        // Owner first: a chown clears setgid bits, and the mode is what the tar
        // header records.
        if m.uid() != dst_meta_uid(dst) || m.gid() != dst_meta_gid(dst) {
            let _ = std::os::unix::fs::chown(dst, Some(m.uid()), Some(m.gid()));
        }
        std::fs::set_permissions(
            dst,
            std::fs::Permissions::from_mode(m.mode() & 0o7777 | 0o700),
        )
        .map_err(|e| Error::io("chmod", dst, e))?;
    }
    Ok(())
}

fn dst_meta_uid(p: &Path) -> u32 {
    std::fs::metadata(p).map(|m| m.uid()).unwrap_or(u32::MAX)
}

fn dst_meta_gid(p: &Path) -> u32 {
    std::fs::metadata(p).map(|m| m.gid()).unwrap_or(u32::MAX)
}

/// Hard-link the tree at `src` into `dst`. An entry that goes away while it is
/// walked (a compaction deleting an SSTable) was not there at the snapshot.
fn link_tree(
    src: &Path,
    dst: &Path,
    rel: &str,
    excludes: &Excludes,
    t: &mut Taken,
    dirs: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<()> {
    let meta = match std::fs::symlink_metadata(src) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", src, e)),
    };
    if !meta.is_dir() {
        return link_entry(src, dst, &meta, t);
    }
    match make_dir_like(src, dst, false) {
        Ok(()) => {}
        Err(_) if !src.exists() => return Ok(()),
        Err(e) => return Err(e),
    }
    dirs.push((src.to_path_buf(), dst.to_path_buf()));
    let rd = match std::fs::read_dir(src) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list", src, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", src, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(Error::Usage(format!(
                "{}: file name is not UTF-8; cairn refuses rather than lose it",
                entry.path().display()
            )));
        };
        let child = format!("{rel}/{name}");
        if name.starts_with(crate::cluster::RESERVED_PREFIX) {
            // Refused by the backup's scan of the live dir; never linked.
            continue;
        }
        if excludes.excludes(&child) {
            t.excluded += 1;
            continue;
        }
        link_tree(&entry.path(), &dst.join(name), &child, excludes, t, dirs)?;
    }
    Ok(())
}

/// One file or symlink: a hard link (a link to a symlink is the symlink itself,
/// with its own time).
fn link_entry(src: &Path, dst: &Path, meta: &std::fs::Metadata, t: &mut Taken) -> Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => {
            if meta.is_file() {
                t.files += 1;
                t.bytes += meta.len();
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(18) => Err(Error::Usage(format!(
            "{} is on another file system than its data dir, so a hard-link snapshot cannot hold it; keep a node's data on one file system, or set snapshot = \"service\" or \"none\" (stopped services only) in the cluster description",
            src.display()
        ))),
        Err(e) => Err(Error::io("hard-link", src, e)),
    }
}

/// A keyspace of a service snapshot: for each table dir, its
/// `snapshots/<name>/` linked in as the table's files.
fn service_keyspace(
    src: &Path,
    dst: &Path,
    ks: &str,
    job: &TakeSnapshot,
    excludes: &Excludes,
    t: &mut Taken,
    dirs: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<()> {
    // Never through a link: the keyspace, a table, its snapshots dir and the
    // snapshot itself are real dirs of the node, or the node is refused.
    let real_dir = |p: &Path| -> Result<bool> {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => Ok(true),
            Ok(_) => Err(Error::Hook {
                hook: "snapshot",
                node: job.node,
                message: format!(
                    "{} is not a directory (a link?): a service snapshot is read only from the node's own directories",
                    p.display()
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat", p, e)),
        }
    };
    real_dir(src)?;
    make_dir_like(src, dst, false)?;
    dirs.push((src.to_path_buf(), dst.to_path_buf()));
    let mut tables: Vec<String> = std::fs::read_dir(src)
        .map_err(|e| Error::io("list", src, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with(crate::cluster::RESERVED_PREFIX))
        .collect();
    tables.sort();
    for table in tables {
        let rel = format!("{ks}/{table}");
        if excludes.excludes(&rel) {
            t.excluded += 1;
            continue;
        }
        let live = src.join(&table);
        let snaps = live.join("snapshots");
        let snap = snaps.join(&job.snapshot);
        let out = dst.join(&table);
        make_dir_like(&live, &out, false)?;
        dirs.push((live.clone(), out.clone()));
        if !(real_dir(&snaps)? && real_dir(&snap)?) {
            // A table the service did not snapshot: only an empty one (made since,
            // or holding no data yet) may be; data without a snapshot is refused.
            let data = std::fs::read_dir(&live)
                .map_err(|e| Error::io("list", &live, e))?
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .find(|name| !excludes.excludes(&format!("{rel}/{name}")));
            if let Some(file) = data {
                return Err(Error::Hook {
                    hook: "snapshot",
                    node: job.node,
                    message: format!(
                        "the service's snapshot command made no snapshot {} of table {rel}, which holds data ({file}); the table would be backed up empty",
                        job.snapshot
                    ),
                });
            }
            continue;
        }
        let rd = std::fs::read_dir(&snap).map_err(|e| Error::io("list", &snap, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("list", &snap, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                return Err(Error::Usage(format!(
                    "{}: file name is not UTF-8",
                    entry.path().display()
                )));
            };
            // The service's own description of its snapshot, not table data.
            if name == "manifest.json" || name == "schema.cql" {
                continue;
            }
            let child = format!("{rel}/{name}");
            if name.starts_with(crate::cluster::RESERVED_PREFIX) || excludes.excludes(&child) {
                t.excluded += 1;
                continue;
            }
            link_tree(&entry.path(), &out.join(&name), &child, excludes, t, dirs)?;
        }
    }
    Ok(())
}

/// `{snapshot}` and `{SNAPSHOT_NAME}` replaced by the snapshot's name (a checked
/// name; no shell ever reads the argv).
pub fn expand(argv: &[String], snapshot: &str) -> Vec<String> {
    argv.iter()
        .map(|a| {
            a.replace("{snapshot}", snapshot)
                .replace("{SNAPSHOT_NAME}", snapshot)
        })
        .collect()
}

/// Run a service command on this host (blocking); its output is logged redacted,
/// a failure names the command and the end of its output.
fn run_command(
    argv: &[String],
    job: &TakeSnapshot,
    what: &str,
    env: &[(String, String)],
    cancel: &CancellationToken,
) -> Result<()> {
    let argv = expand(argv, &job.snapshot);
    let Some((program, args)) = argv.split_first() else {
        return Ok(());
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("CAIRN_NODE_INDEX", job.node.to_string())
        .env("CAIRN_DATA_DIR", &job.data_dir)
        .env("CAIRN_SNAPSHOT", &job.snapshot);
    tracing::info!(node = job.node, program = %program, "running the {what} command");
    let out = match super::command::output(cmd, None, cancel) {
        Ok(out) => out,
        Err(_) if cancel.is_cancelled() => return Err(Error::Cancelled),
        Err(e) => {
            return Err(Error::Hook {
                hook: "snapshot",
                node: job.node,
                message: format!("cannot run {program}: {e}"),
            });
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for line in text.lines() {
        tracing::info!(node = job.node, "{what}: {}", crate::redact::redact(line));
    }
    if out.status.success() {
        return Ok(());
    }
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(Error::Hook {
        hook: "snapshot",
        node: job.node,
        message: crate::redact::redact(&format!(
            "the {what} command {program} exited with {}: {}",
            out.status,
            tail.join(" | ")
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hardlink_snapshot_holds_the_files_of_its_moment_and_goes_without_a_trace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for f in [
            "ks/t-1/a-Data.db",
            "ks/t-1/b-Data.db",
            "ks/t-1/CommitLog-1.log",
        ] {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, f.as_bytes()).expect("write");
        }
        let job = TakeSnapshot {
            node: 0,
            data_dir: d.to_path_buf(),
            name: format!("{SNAP_PREFIX}t1"),
            selection: Selection::default(),
            capture: Capture::default(),
            snapshot: "s".into(),
            env: Vec::new(),
        };
        let none = CancellationToken::new();
        let taken = take(&job, &none).expect("take");
        assert_eq!((taken.files, taken.excluded), (2, 1));
        assert!(exists(d, &job.name).expect("exists"));
        // A compaction: one file replaced by another after the snapshot.
        std::fs::remove_file(d.join("ks/t-1/a-Data.db")).expect("rm");
        std::fs::write(d.join("ks/t-1/c-Data.db"), b"new").expect("write");
        let snap = d.join(&job.name);
        assert_eq!(
            std::fs::read(snap.join("ks/t-1/a-Data.db")).expect("kept"),
            b"ks/t-1/a-Data.db"
        );
        assert!(!snap.join("ks/t-1/c-Data.db").exists());
        assert_eq!(crate::cluster::keyspaces_on_disk(d).expect("ks"), ["ks"]);
        let drop = DropSnapshot {
            node: 0,
            data_dir: d.to_path_buf(),
            name: job.name.clone(),
            capture: Capture::default(),
            snapshot: "s".into(),
            env: Vec::new(),
        };
        // A removal killed halfway never leaves a snapshot that looks complete.
        take(&job, &none).expect("take again");
        std::fs::remove_file(snap.join(DONE)).expect("as a removal does first");
        assert!(!exists(d, &job.name).expect("exists"));
        drop_snapshot(&drop, &none).expect("drop");
        assert!(!snap.exists());
        assert_eq!(
            std::fs::read(d.join("ks/t-1/b-Data.db")).expect("live file stays"),
            b"ks/t-1/b-Data.db"
        );
        assert!(
            take(
                &TakeSnapshot {
                    name: "../x".into(),
                    ..job
                },
                &none
            )
            .is_err()
        );
    }
}
