//! A restore's work on a node's disk: look at the target (pre-flight), stage the
//! node's archive beside its data dir, check what was staged, move it into place,
//! roll a commit back, and clean up.
//!
//! Everything here runs on the node's host — in this process for a local node, in
//! `cairn agent` for one reached through `exec` — and takes and returns plain data,
//! so the coordinator decides and records while the node's disk is only touched on
//! the node. Every path in the data dir is resolved beneath it (never through a
//! link), see [`crate::fsx`].

use super::{Events, NodeEvent, staged};
use crate::archive::unpack;
use crate::checks::Disk;
use crate::cluster::{Cluster, Node, RESERVED_PREFIX, Selection};
use crate::engine::actions::OUTPUT_VERSION;
use crate::manifest::{self, Manifest, NodeInfo, ObjectInfo};
use crate::store::Store;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The record of a staged node, inside its staging dir.
pub const STAGED_RECORD: &str = ".cairn-staged.json";

/// A directory's modification time, to the nanosecond.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct DirTime {
    pub path: PathBuf,
    pub secs: i64,
    pub nanos: u32,
}

impl DirTime {
    pub fn of(path: &Path) -> Option<DirTime> {
        let m = std::fs::symlink_metadata(path).ok()?;
        m.is_dir().then(|| {
            let t = filetime::FileTime::from_last_modification_time(&m);
            DirTime {
                path: path.to_path_buf(),
                secs: t.unix_seconds(),
                nanos: t.nanoseconds(),
            }
        })
    }

    /// Put the time back, if the path is still a directory (never through a link).
    pub fn restore(&self) {
        let Ok(m) = std::fs::symlink_metadata(&self.path) else {
            return;
        };
        if !m.is_dir() {
            return;
        }
        let atime = filetime::FileTime::from_last_access_time(&m);
        let mtime = filetime::FileTime::from_unix_time(self.secs, self.nanos);
        let _ = filetime::set_symlink_file_times(&self.path, atime, mtime);
    }
}

/// What a stage-node step records, and writes next to the staged data as
/// [`STAGED_RECORD`]: commit trusts a staging dir only when both agree and the
/// dir holds exactly what was staged.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct StageOutput {
    pub v: u32,
    pub token: String,
    pub node: u32,
    pub staging: PathBuf,
    pub object_sha256: String,
    /// Entries (files, dirs, links) and file bytes in the staging dir.
    pub entries: u64,
    pub bytes: u64,
    /// The digest of every entry's path, kind, mode, size, time, content and link
    /// target (see [`staged`]).
    pub tree: String,
    /// The directories above the paths of a partial restore, with their mode and
    /// time as staged (the digest leaves their times out: moves change them).
    #[serde(default)]
    pub parents: Vec<CreatedDir>,
    /// Every staged file's inode and change time (see [`staged::Tree::changes`]):
    /// the check before the commit, which trusts the manifest's hashes, refuses a
    /// file written since it was staged even when its size and mtime were put back.
    #[serde(default)]
    pub changes: String,
    /// Bytes read from the store to stage it (less than the object when only the
    /// blocks of a partial restore's files were read).
    #[serde(default)]
    pub read: u64,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct CreatedDir {
    pub path: PathBuf,
    pub mode: u32,
    pub mtime: i64,
}

/// One entry the commit moves from a staging dir into its data dir.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct Move {
    /// The node whose disk holds it.
    #[serde(default)]
    pub node: Option<u32>,
    pub staging: PathBuf,
    pub data_dir: PathBuf,
    pub rel: PathBuf,
    /// Parents of `rel` inside the data dir that did not exist before the commit
    /// (a partial restore creates them), with the snapshot's mode and mtime read
    /// from staging before anything moved: given to the new dirs after the moves,
    /// removed again (if empty) on rollback.
    #[serde(default)]
    pub created: Vec<CreatedDir>,
    /// The staged entry's (device, inode) before the commit: a rename keeps it, so
    /// a rollback knows an entry in the target as the one it moved.
    #[serde(default)]
    pub ident: Option<(u64, u64)>,
    /// A moved regular file's modification time (ns) and size: with the inode, what
    /// tells the restore's file from one put in its place since.
    #[serde(default)]
    pub stamp: Option<(i64, u64)>,
}

impl Move {
    /// `parents`: the staged parents' metadata as recorded by the stage step.
    fn new(
        node: u32,
        staging: PathBuf,
        data_dir: PathBuf,
        rel: PathBuf,
        parents: &[CreatedDir],
    ) -> Move {
        let created = rel
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .filter(|a| !crate::fsx::exists_beneath(&data_dir, a).unwrap_or(true))
            .filter_map(|a| parents.iter().find(|p| p.path == a).cloned())
            .collect();
        let entry = staging
            .file_name()
            .and_then(|name| crate::fsx::entry_beneath(&data_dir, &Path::new(name).join(&rel)).ok())
            .flatten();
        let (ident, stamp) = (entry.map(|e| e.ident), entry.and_then(|e| e.stamp));
        Move {
            node: Some(node),
            staging,
            data_dir,
            rel,
            created,
            ident,
            stamp,
        }
    }

    /// The staging dir as a path inside the data dir (one name): every move and
    /// rollback resolves beneath the data dir, so a staging dir swapped for a
    /// symlink stops it instead of being followed.
    fn in_staging(&self, rel: &Path) -> std::io::Result<PathBuf> {
        match self.staging.strip_prefix(&self.data_dir) {
            Ok(name) if name.components().count() == 1 => Ok(name.join(rel)),
            _ => Err(std::io::Error::other(format!(
                "{} is not a staging dir of {}",
                self.staging.display(),
                self.data_dir.display()
            ))),
        }
    }

    /// Move the staged entry into the data dir, never through a link, never over
    /// an existing entry.
    fn move_in(&self) -> std::io::Result<()> {
        let from = self.in_staging(&self.rel)?;
        crate::fsx::rename_beneath(&self.data_dir, &from, &self.data_dir, &self.rel)
    }

    /// Move the entry back from the data dir into staging.
    fn move_back(&self) -> std::io::Result<()> {
        let to = self.in_staging(&self.rel)?;
        crate::fsx::rename_beneath(&self.data_dir, &self.rel, &self.data_dir, &to)
    }

    /// Give the created parents (in the data dir, or in staging) the snapshot's
    /// mode and times, deepest first; never through a link.
    fn set_created_metadata(&self, in_staging: bool) {
        for d in &self.created {
            let rel = if in_staging {
                match self.in_staging(&d.path) {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            } else {
                d.path.clone()
            };
            let _ = crate::fsx::set_dir_meta_beneath(&self.data_dir, &rel, d.mode, d.mtime);
        }
    }

    /// Remove the parents this move created, deepest first, where empty; their
    /// staged counterparts get their times back (moving out changed them).
    fn remove_created(&self) {
        for d in &self.created {
            let _ = crate::fsx::remove_empty_dir_beneath(&self.data_dir, &d.path);
        }
        self.set_created_metadata(true);
    }
}

/// What a restore's pre-flight asks of one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeRequest {
    pub node: u32,
    pub data_dir: PathBuf,
    /// The data dir is RESTORE_DIR's `node-<i>`: a link in its place is refused.
    pub strict: bool,
    /// Keyspaces a full restore writes (each must be absent).
    #[serde(default)]
    pub keyspaces: Vec<String>,
    /// Paths a partial restore writes (each must be absent, none below a link).
    #[serde(default)]
    pub paths: Vec<String>,
    /// `TABLE_MAPPING=by-name`: a keyspace may exist; each of its `tables`
    /// (`ks/table-id` of the snapshot) goes into the target's empty table dir of the
    /// same name.
    #[serde(default)]
    pub by_name: bool,
    #[serde(default)]
    pub tables: Vec<String>,
    /// The target's `owner`: it must resolve on the node's host.
    #[serde(default)]
    pub owner: Option<String>,
}

/// What the node says about its target.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RestoreProbe {
    /// Why the data dir cannot take a restore (a file, a dangling link, …).
    pub unfit: Vec<String>,
    /// What refuses this node's restore (clashes, links), one line each.
    pub problems: Vec<String>,
    /// The file system holding the data dir (or its nearest existing ancestor).
    pub filesystem: Option<u64>,
    pub free: Option<u64>,
    /// Why the file system or its free space could not be read.
    pub disk_error: Option<String>,
    /// The data dir and its parents that do not exist (the restore makes them).
    pub missing_dirs: Vec<PathBuf>,
    /// The data dir's modification time, if it is a directory.
    pub mtime: Option<DirTime>,
    /// Names of staging dirs in the data dir (this run's or others').
    pub staging: Vec<String>,
    /// `TABLE_MAPPING=by-name`: snapshot table dir → the target's (`ks/t-old`,
    /// `ks/t-new`), each target dir empty.
    #[serde(default)]
    pub renames: Vec<(String, String)>,
    /// The cairn version that looked.
    #[serde(default)]
    pub version: String,
}

/// A node's staging: download the node's archive from the snapshot whose manifest
/// the checks passed, unpack it into a fresh staging dir beside the data dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageJob {
    pub node: u32,
    pub data_dir: PathBuf,
    pub staging: PathBuf,
    pub snapshot: String,
    /// The manifest's digest when the checks passed: a different manifest in the
    /// store is refused (a restore never mixes two versions of a snapshot).
    pub manifest_sha256: String,
    pub selection: Selection,
    pub token: String,
    /// What opens an encrypted snapshot (secret: sent over the agent's stdin only).
    #[serde(default)]
    pub keys: Option<crate::crypt::Keys>,
    /// The target's `owner = "user:group"` for every restored entry (else the
    /// snapshot's owners, by name where this host knows them).
    #[serde(default)]
    pub owner: Option<String>,
    /// `TABLE_MAPPING=by-name`: table dirs staged under the target's names.
    #[serde(default)]
    pub renames: Vec<(String, String)>,
}

/// `path` with a renamed table dir (see [`map_tables`]).
pub fn renamed(path: &str, renames: &[(String, String)]) -> String {
    for (old, new) in renames {
        if path == old {
            return new.clone();
        }
        if let Some(rest) = path.strip_prefix(old.as_str())
            && rest.starts_with('/')
        {
            return format!("{new}{rest}");
        }
    }
    path.to_string()
}

/// A node's manifest entry with its table dirs renamed.
fn renamed_info(mut info: NodeInfo, renames: &[(String, String)]) -> NodeInfo {
    if !renames.is_empty() {
        for f in &mut info.files {
            f.path = renamed(&f.path, renames);
        }
        info.files.sort_by(|a, b| a.path.cmp(&b.path));
    }
    info
}

/// Does a staging dir still hold what its step staged?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckStagedJob {
    pub node: u32,
    pub snapshot: String,
    pub manifest_sha256: String,
    pub staging: PathBuf,
    pub out: StageOutput,
    /// Read every byte again (a resume), or trust the manifest's hashes for files
    /// whose size and time are as staged.
    pub read_content: bool,
    /// The paths of a partial restore (the times of their parents are left out).
    pub paths: Vec<String>,
    /// What opens an encrypted snapshot's manifest.
    #[serde(default)]
    pub keys: Option<crate::crypt::Keys>,
    /// `TABLE_MAPPING=by-name`: as staged.
    #[serde(default)]
    pub renames: Vec<(String, String)>,
}

/// Filesystem operations on a node, each one request of the agent protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "fs", rename_all = "snake_case")]
pub enum FsOp {
    /// Look at the target: returns [`RestoreProbe`].
    Probe(ProbeRequest),
    /// Remove a staging dir (a name beginning with the staging prefix, in the data dir).
    RemoveStaging { data_dir: PathBuf, name: String },
    /// What the commit would move: returns `Vec<Move>`.
    PlanMoves {
        node: u32,
        staging: PathBuf,
        data_dir: PathBuf,
        paths: Vec<String>,
        parents: Vec<CreatedDir>,
        /// `TABLE_MAPPING=by-name`: into existing keyspaces, and into the mapped
        /// (empty) table dirs, entry by entry.
        #[serde(default)]
        by_name: bool,
        #[serde(default)]
        renames: Vec<(String, String)>,
    },
    /// Move entries in; on a failure move back what was moved (`first`: the index of
    /// the first move in the run's journal, for fail points).
    Commit { moves: Vec<Move>, first: usize },
    /// After every node committed: created parents get the snapshot's metadata, the
    /// emptied staging dir goes.
    FinishCommit {
        moves: Vec<Move>,
        data_dir: PathBuf,
        staging: PathBuf,
    },
    /// Move back what a commit moved in: returns [`RolledBack`].
    RollBack { moves: Vec<Move> },
    /// A failed restore leaves the target as it was: remove the dirs it made (if
    /// empty, deepest first) and give the data dir its time back.
    Undo {
        made: Vec<PathBuf>,
        mtime: Option<DirTime>,
    },
    /// A backup's point-in-time snapshot of the node: returns
    /// [`super::capture::Taken`].
    TakeSnapshot(super::capture::TakeSnapshot),
    /// Remove it (and the service's own): returns `()`.
    DropSnapshot(super::capture::DropSnapshot),
    /// Whether it exists, complete: returns `bool`.
    SnapshotExists { data_dir: PathBuf, name: String },
    /// A service command (schema dump or load): returns
    /// [`super::command::CommandOut`].
    Command(super::command::CommandJob),
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RolledBack {
    pub problems: Vec<String>,
    pub moved: usize,
}

fn value<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::State(e.to_string()))
}

/// An exclusive lock (flock) on a data dir, held while a restore changes it on
/// this host: an agent still finishing its work for a coordinator that died (its
/// rollback going on) and the agent of a resume never move entries at the same
/// time — the second waits. `None` when the dir does not exist.
fn lock_data_dir(dir: &Path) -> Result<Option<std::fs::File>> {
    let f = match std::fs::File::open(dir) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", dir, e)),
    };
    if fs4::FileExt::try_lock(&f).is_ok() {
        return Ok(Some(f));
    }
    tracing::warn!(
        dir = %dir.display(),
        "another cairn is changing this data dir (an earlier agent finishing its work); waiting for it"
    );
    fs4::FileExt::lock(&f).map_err(|e| Error::io("lock", dir, e))?;
    Ok(Some(f))
}

/// Run a filesystem operation here (blocking).
pub fn run_fs(op: FsOp, disk: &dyn Disk, cancel: &CancellationToken) -> Result<serde_json::Value> {
    let locked = match &op {
        FsOp::Commit { moves, .. } | FsOp::RollBack { moves } => {
            moves.first().map(|m| m.data_dir.clone())
        }
        FsOp::FinishCommit { data_dir, .. } | FsOp::RemoveStaging { data_dir, .. } => {
            Some(data_dir.clone())
        }
        FsOp::Probe(_)
        | FsOp::PlanMoves { .. }
        | FsOp::Undo { .. }
        | FsOp::TakeSnapshot(_)
        | FsOp::DropSnapshot(_)
        | FsOp::SnapshotExists { .. }
        | FsOp::Command(_) => None,
    };
    let _lock = match &locked {
        Some(dir) => lock_data_dir(dir)?,
        None => None,
    };
    match op {
        FsOp::Probe(req) => value(&probe(&req, disk)),
        FsOp::TakeSnapshot(job) => value(&super::capture::take(&job, cancel)?),
        FsOp::Command(job) => value(&super::command::run(&job, cancel)?),
        FsOp::DropSnapshot(job) => value(&super::capture::drop_snapshot(&job, cancel)?),
        FsOp::SnapshotExists { data_dir, name } => {
            value(&super::capture::exists(&data_dir, &name)?)
        }
        FsOp::RemoveStaging { data_dir, name } => {
            if !name.starts_with(crate::cluster::STAGING_PREFIX) || name.contains('/') {
                return Err(Error::Usage(format!("{name:?} is no staging dir")));
            }
            remove_staging(&data_dir.join(name));
            value(&())
        }
        FsOp::PlanMoves {
            node,
            staging,
            data_dir,
            paths,
            parents,
            by_name,
            renames,
        } => {
            let paths = if by_name {
                by_name_paths(&staging, &data_dir, &renames)?
            } else {
                paths
            };
            value(&plan_moves(node, &staging, &data_dir, &paths, &parents)?)
        }
        FsOp::Commit { moves, first } => value(&commit(&moves, first, cancel)?),
        FsOp::FinishCommit {
            moves,
            data_dir,
            staging,
        } => value(&finish_commit(&moves, &data_dir, &staging)?),
        FsOp::RollBack { moves } => value(&roll_back(&moves)),
        FsOp::Undo { made, mtime } => {
            let mut made = made;
            made.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in made {
                let _ = std::fs::remove_dir(&d);
            }
            if let Some(t) = mtime {
                t.restore();
            }
            value(&())
        }
    }
}

/// A data dir a restore writes into is a directory, or is missing (it is made).
/// A link in its place is followed only where the cluster description names it
/// (a data dir kept on another disk), and must lead somewhere; under RESTORE_DIR
/// (`strict`), where cairn makes `node-<i>` itself, a link is refused.
pub fn data_dir_fit(node: u32, d: &Path, strict: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(m) = std::fs::symlink_metadata(d) else {
        // Missing: the restore makes it, and its missing parents; the nearest one
        // that exists must be a directory (a dangling link is not).
        let nearest = d.ancestors().skip(1).find(|a| a.symlink_metadata().is_ok());
        if let Some(a) = nearest.filter(|a| !a.is_dir()) {
            problems.push(format!(
                "node {node}: data dir {} cannot be made: {} is not a directory{}",
                d.display(),
                a.display(),
                if a.is_symlink() {
                    " (it is a symbolic link to nothing)"
                } else {
                    ""
                }
            ));
        }
        return problems;
    };
    if m.is_dir() {
        return problems;
    }
    if !m.file_type().is_symlink() {
        problems.push(format!("node {node}: {} is not a directory", d.display()));
        return problems;
    }
    let to = std::fs::read_link(d).unwrap_or_default();
    if strict {
        problems.push(format!(
            "node {node}: {} is a symbolic link (to {}): a restore into RESTORE_DIR writes only into directories, never through a link; remove it or choose another RESTORE_DIR",
            d.display(),
            to.display(),
        ));
    } else if !std::fs::metadata(d).is_ok_and(|m| m.is_dir()) {
        problems.push(format!(
            "node {node}: data dir {} is a symbolic link to {}, which is not an existing directory",
            d.display(),
            to.display()
        ));
    }
    problems
}

/// Look at a restore's target on this host.
pub fn probe(req: &ProbeRequest, disk: &dyn Disk) -> RestoreProbe {
    let (n, dir) = (req.node, &req.data_dir);
    let mut out = RestoreProbe {
        unfit: data_dir_fit(n, dir, req.strict),
        version: crate::VERSION.to_string(),
        ..RestoreProbe::default()
    };
    if let Err(e) = unpack::Owners::new(req.owner.as_deref()) {
        out.problems.push(format!("node {n}: {e}"));
    }
    let mut d = dir.as_path();
    while std::fs::symlink_metadata(d).is_err() {
        out.missing_dirs.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    out.mtime = DirTime::of(dir);
    if let Ok(rd) = std::fs::read_dir(dir) {
        out.staging = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(crate::cluster::STAGING_PREFIX))
            .collect();
        out.staging.sort();
    }
    if !req.paths.is_empty() {
        // A partial restore never overwrites: each restored path must be absent,
        // and is never written through a link in the target.
        let clash: Vec<&str> = req
            .paths
            .iter()
            .map(String::as_str)
            .filter(|p| std::fs::symlink_metadata(dir.join(p)).is_ok())
            .collect();
        for p in &req.paths {
            let mut at = dir.clone();
            let parts: Vec<&str> = p.split('/').collect();
            for part in &parts[..parts.len().saturating_sub(1)] {
                at.push(part);
                if at
                    .symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_symlink())
                {
                    out.problems.push(format!(
                        "node {n}: {} is a symbolic link: a restore of {p} never writes through a link",
                        at.display()
                    ));
                    break;
                }
            }
        }
        if !clash.is_empty() {
            out.problems.push(format!(
                "node {n}: already present in {}: {} (restore never overwrites; move them away or restore into another directory with RESTORE_DIR)",
                dir.display(),
                clash.join(", ")
            ));
        }
    } else {
        // Anything in a keyspace's place clashes: a dir, a link (dangling or not),
        // a file; the commit never replaces an entry.
        let mut clash = Vec::new();
        for k in &req.keyspaces {
            match std::fs::symlink_metadata(dir.join(k)) {
                // A keyspace whose schema was recreated: its tables are mapped.
                Ok(m) if req.by_name && m.is_dir() => match map_tables(n, dir, k, &req.tables) {
                    Ok(r) => out.renames.extend(r),
                    Err(p) => out.problems.extend(p),
                },
                Ok(_) => clash.push(k.as_str()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => out.problems.push(format!(
                    "node {n}: cannot tell whether keyspace {k} exists in {}: {e}",
                    dir.display()
                )),
            }
        }
        if !clash.is_empty() {
            out.problems.push(format!(
                "node {n}: keyspace(s) already exist in {}: {} (restore never overwrites a keyspace; drop or move them first)",
                dir.display(),
                clash.join(", ")
            ));
        }
    }
    match disk
        .filesystem(dir)
        .and_then(|fs| Ok((fs, disk.available(dir)?)))
    {
        Ok((fs, free)) => {
            out.filesystem = Some(fs);
            out.free = Some(free);
        }
        Err(e) => {
            out.disk_error = Some(format!(
                "node {n}: cannot read the file system or free space of {}: {e}",
                dir.display()
            ))
        }
    }
    out
}

/// A table dir's name without its id (`orders-3c4d…` → `orders`).
pub fn table_name(dir: &str) -> &str {
    match dir.rsplit_once('-') {
        Some((name, id))
            if !name.is_empty() && !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            name
        }
        _ => dir,
    }
}

/// `TABLE_MAPPING=by-name` in an existing keyspace `k`: each snapshot table goes
/// into the one target table dir of the same name, which must be empty; a table
/// the target lacks is restored under its own name. Anything else is a problem.
fn map_tables(
    n: u32,
    dir: &Path,
    k: &str,
    tables: &[String],
) -> std::result::Result<Vec<(String, String)>, Vec<String>> {
    let ks = dir.join(k);
    // Every entry, dirs or not: a link or a file where a table dir should be is
    // refused, never restored beside.
    let mut existing: Vec<(String, bool)> = Vec::new();
    match std::fs::read_dir(&ks) {
        Ok(rd) => {
            for e in rd.flatten() {
                let real_dir = e.file_type().is_ok_and(|t| t.is_dir());
                existing.push((e.file_name().to_string_lossy().into_owned(), real_dir));
            }
        }
        Err(e) => return Err(vec![format!("node {n}: cannot list {}: {e}", ks.display())]),
    }
    let (mut renames, mut problems) = (Vec::new(), Vec::<String>::new());
    for t in tables {
        let Some(old) = t.strip_prefix(&format!("{k}/")) else {
            continue;
        };
        let named: Vec<&(String, bool)> = existing
            .iter()
            .filter(|(e, _)| table_name(e) == table_name(old))
            .collect();
        if let Some((bad, _)) = named.iter().find(|(_, real_dir)| !real_dir) {
            let p = format!(
                "node {n}: {k}/{bad} is not a directory (a link or a file) where table {} should be; TABLE_MAPPING=by-name restores only into real table dirs",
                table_name(old)
            );
            if !problems.contains(&p) {
                problems.push(p);
            }
            continue;
        }
        let same: Vec<&String> = named.iter().map(|(e, _)| e).collect();
        match same.as_slice() {
            [] => {}
            [new] if renames.iter().any(|(_, n): &(String, String)| *n == format!("{k}/{new}")) => {
                problems.push(format!(
                    "node {n}: two tables of the snapshot would go into {k}/{new}; TABLE_MAPPING=by-name maps one table to one"
                ))
            }
            [new] => {
                let target = ks.join(new);
                match std::fs::read_dir(&target).map(|mut rd| rd.next().is_none()) {
                    Ok(true) => renames.push((format!("{k}/{old}"), format!("{k}/{new}"))),
                    Ok(false) => problems.push(format!(
                        "node {n}: table {k}/{new} already holds data (restore never overwrites a table; TABLE_MAPPING=by-name fills only empty table dirs)"
                    )),
                    Err(e) => problems.push(format!("node {n}: cannot list {}: {e}", target.display())),
                }
            }
            many => {
                let p = format!(
                    "node {n}: keyspace {k} has {} table dirs named {:?} ({}); TABLE_MAPPING=by-name needs exactly one",
                    many.len(),
                    table_name(old),
                    many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                );
                if !problems.contains(&p) {
                    problems.push(p);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(renames)
    } else {
        Err(problems)
    }
}

/// What a node's probe asks: the keyspaces (or paths) of the snapshot the
/// restore writes on it, which must be absent.
pub fn probe_request(
    node: &Node,
    selection: &Selection,
    strict: bool,
    m: Option<&Manifest>,
) -> ProbeRequest {
    let info = m.and_then(|m| m.node(node.index));
    let keyspaces = info.map_or_else(Vec::new, |info| {
        info.keyspaces
            .iter()
            .filter(|k| selection.includes_restored(k))
            .cloned()
            .collect()
    });
    let paths = info.map_or_else(Vec::new, |info| {
        selection
            .paths
            .iter()
            .filter(|p| info.files.iter().any(|f| crate::cluster::under(&f.path, p)))
            .cloned()
            .collect()
    });
    ProbeRequest {
        node: node.index,
        data_dir: node.data_dir.clone(),
        strict,
        keyspaces,
        paths,
        by_name: false,
        tables: Vec::new(),
        owner: None,
    }
}

/// Every node of `cluster` looks at its target through `exec`, all at once. A
/// node that cannot be asked is a problem of the pre-flight, named.
pub async fn probe_nodes<'a>(
    cluster: &'a Cluster,
    selection: &Selection,
    strict: bool,
    by_name: bool,
    m: Option<&Manifest>,
    exec: impl Fn(&'a Node) -> Box<dyn super::NodeExec>,
) -> (HashMap<u32, RestoreProbe>, Vec<String>) {
    let looks = futures::future::join_all(cluster.nodes.iter().map(|n| {
        let mut req = probe_request(n, selection, strict, m);
        req.owner = cluster.owner.clone();
        if by_name {
            req.by_name = true;
            req.tables = m
                .and_then(|m| m.node(n.index))
                .map(|info| {
                    let set: std::collections::BTreeSet<String> = info
                        .files
                        .iter()
                        .filter(|f| selection.restores_file(&f.path))
                        .filter_map(|f| {
                            let mut p = f.path.split('/');
                            let (k, t) = (p.next()?, p.next()?);
                            p.next()?;
                            Some(format!("{k}/{t}"))
                        })
                        .collect();
                    set.into_iter().collect()
                })
                .unwrap_or_default();
        }
        let exec = exec(n);
        async move {
            (
                n.index,
                super::fs::<RestoreProbe>(&*exec, n.index, FsOp::Probe(req)).await,
            )
        }
    }))
    .await;
    let mut probes = HashMap::new();
    let mut problems = Vec::new();
    for (n, look) in looks {
        match look {
            Ok(p) => {
                probes.insert(n, p);
            }
            Err(e) => problems.extend(super::problems_of(n, e)),
        }
    }
    (probes, problems)
}

/// Remove a staging dir, if there (logged when it cannot be).
pub fn remove_staging(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), "could not remove staging dir: {e}"),
    }
}

/// The manifest the checks passed, read again from the store, with this node's
/// entry and object.
async fn checked_manifest(
    store: &dyn Store,
    snapshot: &str,
    digest: &str,
    node: u32,
    keys: Option<&crate::crypt::Keys>,
) -> Result<(
    NodeInfo,
    ObjectInfo,
    Vec<ObjectInfo>,
    Option<crate::crypt::Keys>,
)> {
    let m = crate::checks::read_manifest(store, snapshot)
        .await?
        .open(keys)?;
    // The objects of an encrypted snapshot are age files: the keys open them.
    let keys = keys.filter(|_| m.encryption.is_some());
    if manifest_digest(&m)? != digest {
        return Err(Error::Refused(vec![format!(
            "snapshot {snapshot:?} changed in {} since the restore checked it (its manifest is another); a restore never mixes two versions of a snapshot: start a new restore",
            store.describe()
        )]));
    }
    let info = m
        .node(node)
        .ok_or_else(|| Error::Checks(vec![format!("the snapshot has no node {node}")]))?
        .clone();
    let object = m
        .object(&info.object)
        .ok_or_else(|| Error::archive(&info.object, "not listed in the manifest"))?
        .clone();
    Ok((info, object, m.references.clone(), keys.cloned()))
}

/// SHA-256 of a manifest as cairn reads it.
pub fn manifest_digest(m: &Manifest) -> Result<String> {
    let bytes = serde_json::to_vec(m).map_err(|e| Error::State(e.to_string()))?;
    Ok(crate::archive::hex_digest(
        <sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes),
    ))
}

/// Stage a node: its archive downloaded and unpacked into a fresh staging dir,
/// every file checked against the manifest, then the record written.
pub async fn stage(
    store: &dyn Store,
    job: &StageJob,
    events: Arc<dyn Events>,
    cancel: &CancellationToken,
) -> Result<StageOutput> {
    let (info, object, references, keys) = checked_manifest(
        store,
        &job.snapshot,
        &job.manifest_sha256,
        job.node,
        job.keys.as_ref(),
    )
    .await?;
    if job.staging.parent() != Some(job.data_dir.as_path()) {
        return Err(Error::Usage(format!(
            "{} is not a staging dir of {}",
            job.staging.display(),
            job.data_dir.display()
        )));
    }
    let staging = job.staging.clone();
    // A staging dir left by a killed attempt is redone from scratch.
    let dir = staging.clone();
    let data_dir = job.data_dir.clone();
    tokio::task::spawn_blocking(move || {
        remove_staging(&dir);
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| Error::io("create data dir", &data_dir, e))?;
        // Made here, not found: never a dir (or link) someone put in its place.
        std::fs::create_dir(&dir).map_err(|e| Error::io("create staging dir", &dir, e))
    })
    .await
    .map_err(|e| Error::State(format!("stage worker failed: {e}")))??;
    let info = renamed_info(info, &job.renames);
    let result = stage_into(store, job, info, object, &references, keys, events, cancel).await;
    if result.is_err() {
        let dir = staging.clone();
        let _ = tokio::task::spawn_blocking(move || remove_staging(&dir)).await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn stage_into(
    store: &dyn Store,
    job: &StageJob,
    info: NodeInfo,
    object: ObjectInfo,
    references: &[ObjectInfo],
    keys: Option<crate::crypt::Keys>,
    events: Arc<dyn Events>,
    cancel: &CancellationToken,
) -> Result<StageOutput> {
    let restoring = info
        .files
        .iter()
        .filter(|f| job.selection.restores_file(&f.path))
        .try_fold(0u64, |a, f| a.checked_add(f.size))
        .ok_or_else(|| Error::archive(&object.key, "the file sizes in the manifest overflow"))?;
    events.event(NodeEvent::Started { total: restoring });
    let on_bytes = events.clone();
    let done = read_node(
        store,
        &job.snapshot,
        info.clone(),
        object,
        references,
        job.selection.clone(),
        Some(job.staging.clone()),
        keys,
        Some(unpack::Owners::new(job.owner.as_deref())?),
        job.renames.clone(),
        move |done| on_bytes.event(NodeEvent::Bytes { done }),
        cancel,
    )
    .await?;
    let out = StageOutput {
        v: OUTPUT_VERSION,
        token: job.token.clone(),
        node: job.node,
        staging: job.staging.clone(),
        object_sha256: done.object_sha256,
        read: done.read,
        entries: 0,
        bytes: 0,
        tree: String::new(),
        parents: Vec::new(),
        changes: String::new(),
    };
    let dir = job.staging.clone();
    let paths = job.selection.paths.clone();
    tokio::task::spawn_blocking(move || {
        // Unpacking verified every file against the manifest: its hashes stand in
        // for a second read.
        let files: HashMap<&str, &str> = info
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.sha256.as_str()))
            .collect();
        let above = staged::parents_of(&paths);
        let moved: HashSet<String> = paths.iter().cloned().collect();
        let tree = staged::tree(
            &dir,
            STAGED_RECORD,
            &staged::Content::Recorded(&files),
            &above,
            &moved,
        )
        .map_err(|e| Error::io("measure", &dir, e))?;
        let mut parents: Vec<CreatedDir> = above
            .iter()
            .filter_map(|a| {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::symlink_metadata(dir.join(a)).ok()?;
                m.is_dir().then(|| CreatedDir {
                    path: PathBuf::from(a),
                    mode: m.mode() & 0o777,
                    mtime: m.mtime(),
                })
            })
            .collect();
        parents.sort_by(|a, b| a.path.cmp(&b.path));
        let out = StageOutput {
            entries: tree.entries,
            bytes: tree.bytes,
            tree: tree.digest,
            changes: tree.changes,
            parents,
            ..out
        };
        let path = dir.join(STAGED_RECORD);
        let text = serde_json::to_string(&out).map_err(|e| Error::State(e.to_string()))?;
        let f = std::fs::File::create(&path).map_err(|e| Error::io("write", &path, e))?;
        std::io::Write::write_all(&mut &f, text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("write", &path, e))?;
        Ok::<_, Error>(out)
    })
    .await
    .map_err(|e| Error::State(format!("stage worker failed: {e}")))?
}

/// Which object of a node [`read_object`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The node's own object, read last: it sets the directories' modes and times.
    Own,
    /// An earlier snapshot's object holding unchanged files: only their blocks
    /// are read; the directories are left for the own object's read.
    Referenced,
}

/// The objects a node is read from: its own, and those of earlier snapshots
/// holding its unchanged files, each with the part of `info` it holds. The own
/// one is last.
pub fn parts_of(
    snapshot: &str,
    info: &NodeInfo,
    object: &ObjectInfo,
    references: &[ObjectInfo],
) -> Result<Vec<(String, NodeInfo, ObjectInfo, Part)>> {
    let mut by_object: std::collections::BTreeMap<&str, Vec<manifest::FileInfo>> =
        std::collections::BTreeMap::new();
    let mut own = Vec::new();
    for f in &info.files {
        match &f.object {
            Some(o) => by_object.entry(o.as_str()).or_default().push(f.clone()),
            None => own.push(f.clone()),
        }
    }
    let mut out = Vec::new();
    for (key, files) in by_object {
        let r = references
            .iter()
            .find(|r| r.key == key)
            .ok_or_else(|| Error::archive(key, "not referenced by the manifest"))?;
        let name = key.rsplit('/').next().unwrap_or(key).to_string();
        let part = NodeInfo {
            object: name.clone(),
            files,
            // Directories only: the links are the own object's to make.
            tree: info
                .tree
                .iter()
                .filter(|t| t.link.is_none())
                .cloned()
                .collect(),
            ..info.clone()
        };
        out.push((
            key.to_string(),
            part,
            ObjectInfo {
                key: name,
                ..r.clone()
            },
            Part::Referenced,
        ));
    }
    out.push((
        crate::repo::key(snapshot, &object.key),
        NodeInfo {
            files: own,
            ..info.clone()
        },
        object.clone(),
        Part::Own,
    ));
    Ok(out)
}

/// Read a node from every object that holds its files (see [`parts_of`]) into
/// `root`, or verify them: the sum of what each read found.
#[allow(clippy::too_many_arguments)]
pub async fn read_node(
    store: &dyn Store,
    snapshot: &str,
    info: NodeInfo,
    object: ObjectInfo,
    references: &[ObjectInfo],
    selection: Selection,
    root: Option<PathBuf>,
    keys: Option<crate::crypt::Keys>,
    owners: Option<unpack::Owners>,
    renames: Vec<(String, String)>,
    on_bytes: impl Fn(u64) + Send + Sync + 'static,
    cancel: &CancellationToken,
) -> Result<unpack::Unpacked> {
    let on_bytes = Arc::new(on_bytes);
    let mut total = unpack::Unpacked::default();
    for (key, part_info, part_object, part) in parts_of(snapshot, &info, &object, references)? {
        if part == Part::Referenced
            && !part_info
                .files
                .iter()
                .any(|f| selection.restores_file(&f.path))
        {
            continue;
        }
        let (base, report) = (total.bytes, on_bytes.clone());
        let out = read_object(
            store,
            &key,
            part_info,
            part_object,
            selection.clone(),
            root.clone(),
            keys.clone(),
            owners.clone(),
            renames.clone(),
            move |done| report(base + done),
            cancel,
            part,
        )
        .await?;
        total.read += out.read;
        total.files += out.files;
        total.bytes += out.bytes;
        if part == Part::Own {
            total.heads = out.heads;
            total.stream_bytes = out.stream_bytes;
            total.object_size = out.object_size;
            total.object_sha256 = out.object_sha256;
        }
    }
    Ok(total)
}

/// Download `key` and unpack (into `root`) or verify it against the manifest.
///
/// Unpacking only some files (a partial restore) of an object whose manifest says
/// where they are reads just the blocks that hold them, when that is less than half
/// the object; everything else reads the whole object and checks its checksum too.
#[allow(clippy::too_many_arguments)]
pub async fn read_object(
    store: &dyn Store,
    key: &str,
    info: NodeInfo,
    object: ObjectInfo,
    selection: Selection,
    root: Option<PathBuf>,
    keys: Option<crate::crypt::Keys>,
    owners: Option<unpack::Owners>,
    renames: Vec<(String, String)>,
    on_bytes: impl Fn(u64) + Send + 'static,
    cancel: &CancellationToken,
    part: Part,
) -> Result<unpack::Unpacked> {
    let name = key.to_string();
    // Only a restore that leaves some files out can read less than the object;
    // another snapshot's object holds more than the files read from it.
    let partial =
        part == Part::Referenced || info.files.iter().any(|f| !selection.restores_file(&f.path));
    let ranged = root.is_some() || part == Part::Referenced;
    if let (true, Some(index), None, true) = (ranged, &object.index, &keys, partial)
        && crate::archive::seek::seekable(&info)
    {
        let plan = crate::archive::seek::plan(key, &info, index, &renames, |f| {
            selection.restores_file(&f.path)
        })?;
        if plan.read_bytes() < object.size / 2 || part == Part::Referenced {
            tracing::info!(
                key,
                ranges = plan.ranges.len(),
                read = plan.read_bytes(),
                size = object.size,
                "reading only the blocks that hold the selected files"
            );
            let root = root.clone();
            let ranges = plan.ranges.clone();
            let read = plan.read_bytes();
            return crate::store::read_ranges(store, key, ranges, cancel, move |reader| {
                let mut assembled = crate::archive::seek::Assembled::new(&plan, reader);
                let expected = unpack::Expected {
                    object: &name,
                    node: &info,
                    object_size: object.size,
                    object_sha256: &object.sha256,
                    keys: None,
                    owners: owners.as_ref(),
                    renames: &renames,
                    partial: true,
                    dirs_open: part == Part::Referenced,
                };
                let mode = match &root {
                    Some(r) => unpack::Mode::Extract(r),
                    None => unpack::Mode::Verify,
                };
                let mut out =
                    unpack::unpack(&mut assembled, &expected, &selection, mode, on_bytes)?;
                // What the ranged reads fetched (the counting of chunks taken off
                // the channel would leave out what the pump read ahead).
                drop(assembled);
                out.read = read;
                // The pieces came from the object the checked manifest names; each
                // file was checked against its SHA-256.
                out.object_size = object.size;
                out.object_sha256 = object.sha256.clone();
                Ok(out)
            })
            .await;
        }
    }
    crate::store::read_stream(store, key, cancel, move |reader| {
        let expected = unpack::Expected {
            object: &name,
            node: &info,
            object_size: object.size,
            object_sha256: &object.sha256,
            keys: keys.as_ref(),
            owners: owners.as_ref(),
            renames: &renames,
            partial: false,
            dirs_open: false,
        };
        let mode = match &root {
            Some(r) => unpack::Mode::Extract(r),
            None => unpack::Mode::Verify,
        };
        let mut out = unpack::unpack(reader, &expected, &selection, mode, on_bytes)?;
        out.read = out.object_size;
        Ok(out)
    })
    .await
}

/// Whether a staging dir still holds what its step staged; `Some(why)` when not.
pub async fn check_staged(store: &dyn Store, job: &CheckStagedJob) -> Result<Option<String>> {
    let (info, _, _, _) = match checked_manifest(
        store,
        &job.snapshot,
        &job.manifest_sha256,
        job.node,
        job.keys.as_ref(),
    )
    .await
    {
        Ok(found) => found,
        Err(e @ (Error::Refused(_) | Error::Checks(_))) => return Ok(Some(e.to_string())),
        Err(e) => return Err(e),
    };
    let job = job.clone();
    let info = renamed_info(info, &job.renames);
    tokio::task::spawn_blocking(move || {
        let recorded: HashMap<&str, &str> = info
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.sha256.as_str()))
            .collect();
        let content = if job.read_content {
            staged::Content::Read
        } else {
            staged::Content::Recorded(&recorded)
        };
        let above = staged::parents_of(&job.paths);
        let moved: HashSet<String> = job.paths.iter().cloned().collect();
        staged_ok(&job.staging, &job.out, &content, &above, &moved).err()
    })
    .await
    .map_err(|e| Error::State(format!("check worker failed: {e}")))
}

/// A staging dir holds what its step staged: the dir (not a link), its record
/// equal to the step's output, and the same tree (see [`staged::tree`]).
fn staged_ok(
    dir: &Path,
    out: &StageOutput,
    content: &staged::Content<'_>,
    moving_parents: &HashSet<String>,
    moved: &HashSet<String>,
) -> std::result::Result<(), String> {
    if out.staging != dir {
        return Err(format!(
            "staged into {}, but this run stages into {}",
            out.staging.display(),
            dir.display()
        ));
    }
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", dir.display())),
        Err(e) => return Err(format!("staging dir {}: {e}", dir.display())),
    }
    let record = std::fs::read(dir.join(STAGED_RECORD))
        .map_err(|e| format!("staging record in {}: {e}", dir.display()))?;
    let rec: StageOutput = serde_json::from_slice(&record)
        .map_err(|e| format!("staging record in {}: {e}", dir.display()))?;
    if &rec != out {
        return Err(format!(
            "the staging record in {} is not this step's",
            dir.display()
        ));
    }
    let tree = staged::tree(dir, STAGED_RECORD, content, moving_parents, moved)
        .map_err(|e| format!("staging dir {}: {e}", dir.display()))?;
    if (tree.entries, tree.bytes) != (out.entries, out.bytes) {
        return Err(format!(
            "staging dir {} holds {} entries and {} bytes, {} and {} were staged",
            dir.display(),
            tree.entries,
            tree.bytes,
            out.entries,
            out.bytes
        ));
    }
    // Without reading the bytes again, a changed inode or change time is a file
    // written (or replaced) since it was staged. A resume reads every byte
    // instead: a rollback's moves change times legitimately.
    if matches!(content, staged::Content::Recorded(_))
        && !out.changes.is_empty()
        && tree.changes != out.changes
    {
        return Err(format!(
            "staging dir {} no longer holds what was staged (a file was written or replaced since)",
            dir.display()
        ));
    }
    if tree.digest != out.tree {
        return Err(format!(
            "staging dir {} no longer holds what was staged (a file's content, mode or time, or a link, changed)",
            dir.display()
        ));
    }
    Ok(())
}

/// What the commit moves for one node: each staged keyspace (or, for a partial
/// restore, each staged path) to the same place in its data dir.
/// What a `TABLE_MAPPING=by-name` commit moves, as paths: a keyspace the target
/// lacks whole; in a keyspace it has, each table it lacks whole, and the entries
/// of each mapped (empty) table dir one by one. An empty staged table whose name
/// the target already has is nothing to restore.
fn by_name_paths(
    staging: &Path,
    data_dir: &Path,
    renames: &[(String, String)],
) -> Result<Vec<String>> {
    let names = |d: &Path| -> Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(d).map_err(|e| Error::io("list", d, e))? {
            let e = e.map_err(|e| Error::io("list", d, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(RESERVED_PREFIX) {
                v.push(name);
            }
        }
        v.sort();
        Ok(v)
    };
    let real_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    let mut out = Vec::new();
    for k in names(staging)? {
        if !real_dir(&data_dir.join(&k)) {
            out.push(k);
            continue;
        }
        let existing = names(&data_dir.join(&k))?;
        for t in names(&staging.join(&k))? {
            let rel = format!("{k}/{t}");
            if renames.iter().any(|(_, new)| *new == rel) {
                // Checked again here, on every node before anything moves (and on
                // a resume): the table dir must still be an empty real dir.
                let target = data_dir.join(&rel);
                let empty = std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir())
                    && std::fs::read_dir(&target).is_ok_and(|mut rd| rd.next().is_none());
                if !empty {
                    return Err(Error::Refused(vec![format!(
                        "table dir {} is no longer an empty directory (something was written into it since the pre-flight); nothing was moved into place",
                        target.display()
                    )]));
                }
                for e in names(&staging.join(&rel))? {
                    out.push(format!("{rel}/{e}"));
                }
                continue;
            }
            let staged = staging.join(&rel);
            let empty = real_dir(&staged) && names(&staged)?.is_empty();
            if empty && existing.iter().any(|e| table_name(e) == table_name(&t)) {
                continue;
            }
            out.push(rel);
        }
    }
    Ok(out)
}

fn plan_moves(
    node: u32,
    staging: &Path,
    data_dir: &Path,
    paths: &[String],
    parents: &[CreatedDir],
) -> Result<Vec<Move>> {
    let mut moves = Vec::new();
    if !paths.is_empty() {
        for p in paths {
            if std::fs::symlink_metadata(staging.join(p)).is_ok() {
                moves.push(Move::new(
                    node,
                    staging.to_path_buf(),
                    data_dir.to_path_buf(),
                    PathBuf::from(p),
                    parents,
                ));
            }
        }
    } else {
        let rd = match std::fs::read_dir(staging) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("list", staging, e)),
        };
        for entry in rd.into_iter().flatten() {
            let entry = entry.map_err(|e| Error::io("list", staging, e))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(RESERVED_PREFIX) {
                continue;
            }
            moves.push(Move::new(
                node,
                staging.to_path_buf(),
                data_dir.to_path_buf(),
                PathBuf::from(name),
                parents,
            ));
        }
    }
    moves.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(moves)
}

/// Move every planned entry into its data dir, never through a symlink and never
/// over an existing entry; on any failure move back what was moved, so the target
/// is as it was.
fn commit(moves: &[Move], first: usize, cancel: &CancellationToken) -> Result<()> {
    let mut done: Vec<&Move> = Vec::new();
    let mut failure = None;
    for (i, m) in moves.iter().enumerate() {
        // Stopped, or the coordinator went away: no further move, and back out
        // what was moved (a resume must not race a commit still going on).
        if cancel.is_cancelled() {
            failure = Some(Error::Cancelled);
            break;
        }
        if let Err(e) = crate::failpoint::hit(&format!("commit-rename:{}", first + i)) {
            failure = Some(e);
            break;
        }
        match m.move_in() {
            Ok(()) => done.push(m),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                failure = Some(Error::Refused(vec![format!(
                    "{} appeared in the target while the restore ran; nothing was moved into place",
                    m.data_dir.join(&m.rel).display()
                )]));
                break;
            }
            Err(e) => {
                failure = Some(Error::io("move into place", m.data_dir.join(&m.rel), e));
                break;
            }
        }
    }
    if let Some(e) = failure {
        for m in done.into_iter().rev() {
            match m.move_back() {
                Ok(()) => m.remove_created(),
                Err(err) => {
                    tracing::error!(path = %m.data_dir.join(&m.rel).display(), "could not roll back: {err}");
                }
            }
        }
        return Err(e);
    }
    Ok(())
}

/// Every node committed: the created parents get the snapshot's metadata and the
/// staging dir goes (what is left in it: the record, and for a partial restore the
/// empty parents of the paths moved out, and the unselected rest).
fn finish_commit(moves: &[Move], data_dir: &Path, staging: &Path) -> Result<()> {
    // The staging dir goes only when every move is in place: the entry in the
    // target is the one staged (a rename keeps its identity).
    for m in moves {
        let there = crate::fsx::ident_beneath(&m.data_dir, &m.rel)
            .map_err(|e| Error::io("check", m.data_dir.join(&m.rel), e))?;
        if there.is_none() || (m.ident.is_some() && there != m.ident) {
            return Err(Error::State(format!(
                "{} is not the entry the commit moved there; the staging dir {} was not removed",
                m.data_dir.join(&m.rel).display(),
                staging.display()
            )));
        }
    }
    for m in moves {
        m.set_created_metadata(false);
    }
    match std::fs::remove_dir_all(staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove staging dir", staging, e)),
    }
    if let Ok(d) = std::fs::File::open(data_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Move back, from the journal, what a commit moved into a data dir: only the
/// entries that are the ones moved (a rename keeps the inode); a place where both
/// the target and staging hold an entry is reported, never guessed.
fn roll_back(moves: &[Move]) -> RolledBack {
    let mut out = RolledBack::default();
    for m in moves.iter().rev() {
        let staged = match m.in_staging(&m.rel) {
            Ok(p) => p,
            Err(e) => {
                out.problems.push(e.to_string());
                continue;
            }
        };
        let target = m.data_dir.join(&m.rel);
        // The entry the commit moved: same inode and, for a file, same time and
        // size (one step, one stat).
        let ours = crate::fsx::entry_beneath(&m.data_dir, &m.rel).map(|now| {
            now.is_some_and(|e| {
                Some(e.ident) == m.ident && (m.stamp.is_none() || e.stamp == m.stamp)
            })
        });
        let in_staging = crate::fsx::exists_beneath(&m.data_dir, &staged);
        match (ours, in_staging) {
            (Err(e), _) | (_, Err(e)) => {
                out.problems.push(format!("{}: {e}", target.display()));
                continue;
            }
            (Ok(true), Ok(false)) => {
                // The commit removes each staging dir once emptied: the move back
                // makes it again, beneath the data dir, never through a link.
                if let Err(e) = m.move_back() {
                    out.problems.push(format!("{}: {e}", target.display()));
                    continue;
                }
                out.moved += 1;
            }
            (Ok(true), Ok(true)) => {
                // A kill is between renames, never inside one: one of the two was
                // put there since, and which is the restore's is unknown.
                out.problems.push(format!(
                    "{} is in the target and {} in staging: the commit had moved it, and something was put in its place since; move one of them away (the other is the restore's or yours) and resume",
                    target.display(),
                    m.data_dir.join(&staged).display()
                ));
                continue;
            }
            (Ok(false), _) => {}
        }
        m.remove_created();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent of a resume waits for an agent still working in the same data
    /// dir (one whose coordinator died mid-commit) instead of racing it.
    #[test]
    fn a_second_agent_waits_for_the_first_in_a_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock_data_dir(dir.path()).expect("lock").expect("a dir");
        let path = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let lock = lock_data_dir(&path).expect("lock");
            tx.send(std::time::Instant::now()).expect("send");
            drop(lock);
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(rx.try_recv().is_err(), "the second lock did not wait");
        let released = std::time::Instant::now();
        drop(held);
        let got = rx.recv().expect("recv");
        assert!(got >= released);
        waiter.join().expect("join");
        assert!(
            lock_data_dir(&dir.path().join("missing"))
                .expect("ok")
                .is_none()
        );
    }
}
