//! What each plan action does. Every action is idempotent for a resume: running it
//! again after a crash produces the same result.

use super::{RunCtx, StepRef, staged};
use crate::archive::unpack;
use crate::cluster::{Node, RESERVED_PREFIX};
use crate::manager::Manager;
use crate::manifest::{
    self, ClusterInfo, MANAGER_OBJECT, MANIFEST, ManagerInfo, Manifest, NodeInfo, ObjectInfo,
};
use crate::node::{BackupJob, NodeEvent};
use crate::plan::Action;
use crate::progress::Event;
use crate::spec::RestoreManager;
use crate::state::Status;
use crate::{Error, Result, checks};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Version of the step outputs below; a stored output of another version is not
/// trusted (its step is redone).
pub const OUTPUT_VERSION: u32 = 2;

/// What a backup-node step records for write-manifest.
#[derive(Debug, Serialize, Deserialize)]
struct NodeOutput {
    v: u32,
    node: NodeInfo,
    object: ObjectInfo,
}

/// What a check-restore step records: the directories the restore will create
/// (a data dir that did not exist, its missing parents), so that a failed restore
/// removes them again when they are empty.
#[derive(Debug, Serialize, Deserialize, Default)]
struct CheckRestoreOutput {
    v: u32,
    created_dirs: Vec<PathBuf>,
    /// The SHA-256 of the manifest the checks passed: a resume refuses a snapshot
    /// that changed in the store since (it would mix two versions of it).
    manifest_sha256: String,
    /// Each existing data dir's modification time when the checks passed: making
    /// and removing a staging dir inside it changes it, and a failed restore puts
    /// it back, so that the target is left as it was.
    #[serde(default)]
    data_dir_mtimes: Vec<DirTime>,
}

/// A directory's modification time, to the nanosecond.
#[derive(Debug, Serialize, Deserialize, Clone)]
struct DirTime {
    path: PathBuf,
    secs: i64,
    nanos: u32,
}

impl DirTime {
    fn of(path: &Path) -> Option<DirTime> {
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
    fn restore(&self) {
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

/// SHA-256 of a manifest as cairn reads it.
fn manifest_digest(m: &Manifest) -> Result<String> {
    let bytes = serde_json::to_vec(m).map_err(|e| Error::State(e.to_string()))?;
    Ok(crate::archive::hex_digest(
        <sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes),
    ))
}

/// A resumed restore goes on only with the snapshot its checks passed.
pub async fn snapshot_unchanged(ctx: &Arc<RunCtx>) -> Result<()> {
    let run = ctx.run_id;
    let records = ctx.state.call(move |s| s.steps(run)).await?;
    let Some(rec) = records
        .iter()
        .find(|r| r.action == Action::CheckRestore.name() && r.status == Status::Complete)
    else {
        return Ok(());
    };
    let Ok(out) = decode::<CheckRestoreOutput>(&rec.id, rec.output.as_deref()) else {
        // An output cairn cannot read: the checks run again.
        ctx.state.set_pending(
            run,
            std::slice::from_ref(&rec.id),
            "its output is unreadable",
        )?;
        return Ok(());
    };
    let now = manifest_digest(ctx.manifest().await?)?;
    if now != out.manifest_sha256 {
        return Err(Error::Refused(vec![format!(
            "snapshot {:?} changed in {} since run {run} checked it (its manifest is another); a restore never mixes two versions of a snapshot: start a new restore",
            ctx.spec.snapshot,
            ctx.store.describe()
        )]));
    }
    Ok(())
}

/// What a stage-node step records, and writes next to the staged data as
/// `.cairn-staged.json`: commit trusts a staging dir only when both agree and the
/// dir holds exactly what was staged.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
struct StageOutput {
    v: u32,
    token: String,
    node: u32,
    staging: PathBuf,
    object_sha256: String,
    /// Entries (files, dirs, links) and file bytes in the staging dir.
    entries: u64,
    bytes: u64,
    /// The digest of every entry's path, kind, mode, size, time, content and link
    /// target (see [`super::staged`]).
    tree: String,
    /// The directories above the paths of a partial restore, with their mode and
    /// time as staged (the digest leaves their times out: moves change them).
    #[serde(default)]
    parents: Vec<CreatedDir>,
}

/// What a restore-manager step records: where the replaced state was kept.
#[derive(Debug, Serialize, Deserialize)]
struct ManagerRestoreOutput {
    v: u32,
    pre_restore: Option<PathBuf>,
    files: usize,
}

/// The commit's journal, recorded before its first rename so a kill mid-commit can
/// be rolled back: every (staged, target) move, relative to each node's dirs.
#[derive(Debug, Serialize, Deserialize)]
struct CommitJournal {
    v: u32,
    moves: Vec<Move>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
struct Move {
    staging: PathBuf,
    data_dir: PathBuf,
    rel: PathBuf,
    /// Parents of `rel` inside the data dir that did not exist before the commit
    /// (a partial restore creates them), with the snapshot's mode and mtime read
    /// from staging before anything moved: given to the new dirs after the moves,
    /// removed again (if empty) on rollback.
    #[serde(default)]
    created: Vec<CreatedDir>,
    /// The staged entry's (device, inode) before the commit: a rename keeps it, so
    /// a rollback knows an entry in the target as the one it moved.
    #[serde(default)]
    ident: Option<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
struct CreatedDir {
    path: PathBuf,
    mode: u32,
    mtime: i64,
}

impl Move {
    /// `parents`: the staged parents' metadata as recorded by the stage step.
    fn new(staging: PathBuf, data_dir: PathBuf, rel: PathBuf, parents: &[CreatedDir]) -> Move {
        let created = rel
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .filter(|a| !crate::fsx::exists_beneath(&data_dir, a).unwrap_or(true))
            .filter_map(|a| parents.iter().find(|p| p.path == a).cloned())
            .collect();
        let ident = staging
            .file_name()
            .and_then(|name| crate::fsx::ident_beneath(&data_dir, &Path::new(name).join(&rel)).ok())
            .flatten();
        Move {
            staging,
            data_dir,
            rel,
            created,
            ident,
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

/// The record of a staged node, inside its staging dir.
const STAGED_RECORD: &str = ".cairn-staged.json";

fn encode<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::State(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(step: &str, text: Option<&str>) -> Result<T> {
    let text = text.ok_or_else(|| Error::State(format!("step {step} recorded no output")))?;
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::State(format!("step {step} output: {e}")))?;
    if v.get("v").and_then(serde_json::Value::as_u64) != Some(u64::from(OUTPUT_VERSION)) {
        return Err(Error::State(format!(
            "step {step} output is of another version"
        )));
    }
    serde_json::from_value(v).map_err(|e| Error::State(format!("step {step} output: {e}")))
}

/// Run one step's action; returns the output to persist.
pub async fn run(ctx: &Arc<RunCtx>, step: &StepRef) -> Result<Option<String>> {
    let node = || -> Result<&Node> {
        step.node
            .and_then(|i| ctx.cluster.node(i))
            .ok_or_else(|| Error::State(format!("step {} has no node", step.id)))
    };
    match step.action {
        Action::CheckBackup => {
            let probe = format!(
                "{RESERVED_PREFIX}-probe-{}-{}",
                ctx.run_id,
                std::process::id()
            );
            // Every node looks at itself, on its own host, all at once; every
            // problem of every node is reported together.
            let looks = futures::future::join_all(ctx.cluster.nodes.iter().map(|n| async move {
                (n, ctx.exec(n).inspect_backup(n, &ctx.spec.selection).await)
            }))
            .await;
            let mut problems = Vec::new();
            let mut found = std::collections::BTreeSet::new();
            for (n, look) in looks {
                match look {
                    Ok(facts) => {
                        if !facts.loose.is_empty() {
                            tracing::warn!(
                                node = n.index,
                                "left out of the backup, not being keyspace directories: {}",
                                facts.loose.join(", ")
                            );
                        }
                        problems.extend(facts.problems);
                        found.extend(facts.keyspaces);
                    }
                    Err(Error::Checks(p)) => problems.extend(p),
                    Err(e) => problems.push(match e {
                        Error::Remote { .. } => e.to_string(),
                        e => format!("node {}: {e}", n.index),
                    }),
                }
            }
            checks::backup(
                problems,
                &found,
                &ctx.spec.selection,
                &*ctx.store,
                &ctx.spec.snapshot,
                &probe,
            )
            .await?;
            // The manager snapshot is taken at the end: find out now if it cannot be.
            if ctx.plan.has_action(Action::BackupManager) {
                let m = manager_of(ctx).map_err(|e| Error::Checks(vec![e.to_string()]))?;
                if m.kind == crate::manager::Kind::Declared && !m.state_dir.is_dir() {
                    return Err(Error::Checks(vec![format!(
                        "the manager state dir {} does not exist",
                        m.state_dir.display()
                    )]));
                }
            }
            Ok(None)
        }
        Action::BackupNode => backup_node(ctx, step, node()?).await.map(Some),
        Action::WriteManifest => write_manifest(ctx).await.map(|()| None),
        Action::CheckRestore => {
            let problems = data_dirs_fit(ctx);
            if !problems.is_empty() {
                return Err(Error::Checks(problems));
            }
            clean_dead_staging(ctx).await?;
            let m = checks::restore(
                &ctx.cluster,
                &ctx.spec.selection,
                &*ctx.store,
                &ctx.spec.snapshot,
                &*ctx.disk,
            )
            .await?;
            if let Some(force) = restore_manager_mode(ctx) {
                let m_ = manager_of(ctx)?;
                check_manager_restore(&m, &m_, force)?;
            }
            let manifest_sha256 = manifest_digest(&m)?;
            // The stage steps use the manifest the checks validated: read once.
            let _ = ctx.manifest.set(m);
            let mut created_dirs = Vec::new();
            for n in &ctx.cluster.nodes {
                let mut d = n.data_dir.as_path();
                while std::fs::symlink_metadata(d).is_err() {
                    created_dirs.push(d.to_path_buf());
                    match d.parent() {
                        Some(p) => d = p,
                        None => break,
                    }
                }
            }
            let data_dir_mtimes = ctx
                .cluster
                .nodes
                .iter()
                .filter_map(|n| DirTime::of(&n.data_dir))
                .collect();
            encode(&CheckRestoreOutput {
                v: OUTPUT_VERSION,
                created_dirs,
                manifest_sha256,
                data_dir_mtimes,
            })
            .map(Some)
        }
        Action::StageNode => stage_node(ctx, step, node()?).await.map(Some),
        Action::CommitRestore => commit_restore(ctx, step).await.map(|()| None),
        Action::BackupManager => backup_manager(ctx, step).await.map(Some),
        Action::RestoreManager => restore_manager(ctx).await,
        Action::DiscardStaging => discard_staging(ctx).await.map(|()| None),
    }
}

/// A data dir a restore writes into is a directory, or is missing (it is made).
/// A link in its place is followed only where the cluster description names it
/// (a data dir kept on another disk), and must lead somewhere; under RESTORE_DIR,
/// where cairn makes `node-<i>` itself, a link is refused.
pub fn data_dirs_fit(ctx: &RunCtx) -> Vec<String> {
    let mut problems = Vec::new();
    for n in &ctx.cluster.nodes {
        let d = &n.data_dir;
        let Ok(m) = std::fs::symlink_metadata(d) else {
            // Missing: the restore makes it, and its missing parents; the nearest
            // one that exists must be a directory (a dangling link is not).
            let nearest = d.ancestors().skip(1).find(|a| a.symlink_metadata().is_ok());
            if let Some(a) = nearest.filter(|a| !a.is_dir()) {
                problems.push(format!(
                    "node {}: data dir {} cannot be made: {} is not a directory{}",
                    n.index,
                    d.display(),
                    a.display(),
                    if a.is_symlink() {
                        " (it is a symbolic link to nothing)"
                    } else {
                        ""
                    }
                ));
            }
            continue;
        };
        if m.is_dir() {
            continue;
        }
        if !m.file_type().is_symlink() {
            problems.push(format!(
                "node {}: {} is not a directory",
                n.index,
                d.display()
            ));
            continue;
        }
        let to = std::fs::read_link(d).unwrap_or_default();
        if let Some(root) = &ctx.spec.restore_dir {
            problems.push(format!(
                "node {}: {} is a symbolic link (to {}): a restore into RESTORE_DIR {} writes only into directories, never through a link; remove it or choose another RESTORE_DIR",
                n.index,
                d.display(),
                to.display(),
                root.display()
            ));
        } else if !std::fs::metadata(d).is_ok_and(|m| m.is_dir()) {
            problems.push(format!(
                "node {}: data dir {} is a symbolic link to {}, which is not an existing directory",
                n.index,
                d.display(),
                to.display()
            ));
        }
    }
    problems
}

/// Remove every node's staging dir, and the dirs the restore created that are left
/// empty. The stage steps are marked to be redone first, in one transaction, so
/// the record never claims staged data that is gone.
async fn discard_staging(ctx: &Arc<RunCtx>) -> Result<()> {
    let stage_steps: Vec<String> = ctx
        .spec
        .steps
        .iter()
        .filter(|s| s.action == Action::StageNode)
        .map(|s| s.id.clone())
        .collect();
    let (run, ids) = (ctx.run_id, stage_steps);
    ctx.state
        .call(move |s| {
            s.set_pending(
                run,
                &ids,
                "its staging dir was discarded after the run failed",
            )
        })
        .await?;
    crate::failpoint::hit("discard:recorded")?;
    // A commit that moved data before the run failed is undone first: a failed
    // restore leaves the target as it was, manager included.
    for s in ctx
        .spec
        .steps
        .iter()
        .filter(|s| s.action == Action::CommitRestore)
    {
        if let Err(e) = roll_back_commit(ctx, &s.id).await {
            undo_manager_restore(ctx).await;
            return Err(e);
        }
    }
    undo_manager_restore(ctx).await;
    for n in &ctx.cluster.nodes {
        remove_staging(&staging_dir(ctx, n)).await;
    }
    // Dirs the restore created, deepest first, if empty.
    let run = ctx.run_id;
    let steps = ctx.state.call(move |s| s.steps(run)).await?;
    if let Some(rec) = steps
        .iter()
        .find(|s| s.action == Action::CheckRestore.name() && s.status == Status::Complete)
        && let Ok(out) = decode::<CheckRestoreOutput>(&rec.id, rec.output.as_deref())
    {
        let mut dirs = out.created_dirs;
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
        for t in &out.data_dir_mtimes {
            t.restore();
        }
    }
    Ok(())
}

/// Staging dirs that runs of this state home left in the target and that are no
/// longer running (failed, cancelled, interrupted) are removed — their stage steps
/// marked to be redone first. Staging of runs this home does not know (another
/// home, an earlier cairn) is left alone and named in a warning.
async fn clean_dead_staging(ctx: &Arc<RunCtx>) -> Result<()> {
    let prefix = format!("{RESERVED_PREFIX}-staging-");
    let runs = ctx.state.call(|s| s.runs(10_000)).await?;
    let owners: std::collections::HashMap<String, (i64, Status, Vec<String>)> = runs
        .into_iter()
        .filter_map(|r| {
            let spec = crate::spec::RunSpec::from_json(r.spec_json.as_deref()?).ok()?;
            let stage = spec
                .steps
                .iter()
                .filter(|s| s.action == Action::StageNode)
                .map(|s| s.id.clone())
                .collect();
            Some((spec.token, (r.id, r.status, stage)))
        })
        .collect();
    for n in &ctx.cluster.nodes {
        let Ok(rd) = std::fs::read_dir(&n.data_dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(token) = name.strip_prefix(&prefix) else {
                continue;
            };
            if token == ctx.spec.token {
                continue;
            }
            match owners.get(token) {
                Some((run, status, stage))
                    if !matches!(status, Status::Running | Status::Pending) =>
                {
                    let (run, stage) = (*run, stage.clone());
                    let why = format!("its staging dir was removed by run {}", ctx.run_id);
                    ctx.state
                        .call(move |s| s.set_pending(run, &stage, &why))
                        .await?;
                    tracing::warn!(dir = %e.path().display(), "removing the staging dir run {run} ({status}) left");
                    remove_staging(&e.path()).await;
                }
                Some((run, status, _)) => tracing::warn!(
                    dir = %e.path().display(),
                    "run {run} ({status}) is staging into this target too"
                ),
                None => tracing::warn!(
                    dir = %e.path().display(),
                    "a staging dir of a run this state home does not know is in the target; left alone (remove it if no restore is running)"
                ),
            }
        }
    }
    Ok(())
}

/// How closely [`effects_hold`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Metadata only (sizes, times, modes, links): for effects this process made.
    Metadata,
    /// Every byte read again: for effects a previous process made, which anything
    /// may have changed since (a resume trusts nothing it cannot see).
    Content,
}

/// Whether a finished step's effects still exist; `Err` says what is missing.
pub async fn effects_hold(
    ctx: &Arc<RunCtx>,
    step: &StepRef,
    output: Option<&str>,
    depth: Depth,
) -> std::result::Result<(), String> {
    let object = match step.action {
        Action::BackupNode => {
            decode::<NodeOutput>(&step.id, output)
                .map_err(|e| e.to_string())?
                .object
        }
        Action::BackupManager => {
            decode::<ManagerOutput>(&step.id, output)
                .map_err(|e| e.to_string())?
                .object
        }
        Action::StageNode => {
            let out = decode::<StageOutput>(&step.id, output).map_err(|e| e.to_string())?;
            let node = step
                .node
                .and_then(|i| ctx.cluster.node(i))
                .ok_or_else(|| format!("step {} has no node", step.id))?;
            let m = ctx.manifest().await.map_err(|e| e.to_string())?;
            let info = m
                .node(node.index)
                .ok_or_else(|| format!("the snapshot has no node {}", node.index))?;
            if m.object(&info.object).map(|o| o.sha256.as_str()) != Some(&out.object_sha256) {
                return Err(format!(
                    "node {} was staged from another version of {}",
                    node.index, info.object
                ));
            }
            let files = info.files.clone();
            let expected_dir = staging_dir(ctx, node);
            let above = staged::parents_of(&ctx.spec.selection.paths);
            return tokio::task::spawn_blocking(move || {
                let recorded: HashMap<&str, &str> = files
                    .iter()
                    .map(|f| (f.path.as_str(), f.sha256.as_str()))
                    .collect();
                let content = match depth {
                    Depth::Metadata => staged::Content::Recorded(&recorded),
                    Depth::Content => staged::Content::Read,
                };
                staged_ok(&expected_dir, &out, &content, &above)
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        _ => return Ok(()),
    };
    let key = manifest::key(&ctx.spec.snapshot, &object.key);
    match ctx.store.head(&key).await {
        Ok(Some(meta)) if meta.size == object.size => {}
        Ok(Some(meta)) => {
            return Err(format!(
                "object {key} is {} bytes, the step wrote {}",
                meta.size, object.size
            ));
        }
        Ok(None) => return Err(format!("object {key} is missing")),
        Err(e) => return Err(format!("object {key}: {e}")),
    }
    if depth == Depth::Content {
        let sha = crate::store::read_stream(&*ctx.store, &key, &ctx.cancel, |mut r| {
            let mut h = crate::archive::io::HashingReader::new(&mut r);
            std::io::copy(&mut h, &mut std::io::sink())
                .map_err(|e| Error::io("read", std::path::Path::new("object"), e))?;
            Ok(h.finish().1)
        })
        .await
        .map_err(|e| format!("object {key}: {e}"))?;
        if sha != object.sha256 {
            return Err(format!(
                "object {key} has SHA-256 {sha}, the step wrote {}",
                object.sha256
            ));
        }
    }
    Ok(())
}

/// A staging dir holds what its step staged: the dir (not a link), its record
/// equal to the step's output, and the same tree (see [`staged::tree`]).
fn staged_ok(
    dir: &Path,
    out: &StageOutput,
    content: &staged::Content<'_>,
    moving_parents: &std::collections::HashSet<String>,
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
    let tree = staged::tree(dir, STAGED_RECORD, content, moving_parents)
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
    if tree.digest != out.tree {
        return Err(format!(
            "staging dir {} no longer holds what was staged (a file's content, mode or time, or a link, changed)",
            dir.display()
        ));
    }
    Ok(())
}

/// The manager of the run's cluster (cairn's own state when it declares none).
fn manager_of(ctx: &RunCtx) -> Result<Manager> {
    let home = ctx
        .state
        .path()
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    Manager::resolve(Some(&ctx.cluster), ctx.cluster.source.as_deref(), &home)
}

/// The manager restore this run does: `None`, or `Some(force)`.
fn restore_manager_mode(ctx: &RunCtx) -> Option<bool> {
    match ctx.spec.restore_manager {
        RestoreManager::No => None,
        RestoreManager::Clean => Some(false),
        RestoreManager::Force => Some(true),
    }
}

/// Everything that would refuse a manager restore, checked before any node is touched.
fn check_manager_restore(m: &Manifest, target: &Manager, force: bool) -> Result<()> {
    let Some(info) = &m.manager else {
        return Err(Error::Checks(vec![format!(
            "RESTORE_MANAGER is set but snapshot {:?} holds no manager snapshot",
            m.snapshot
        )]));
    };
    if target.kind == crate::manager::Kind::Own {
        return Err(Error::Checks(vec![
            "the cluster description has no [manager]: cairn's own state is in use by this run; restore it with `cairn manager-snapshot restore` or `cairn recover`".into(),
        ]));
    }
    crate::manager::restore::check_clean(target, force)?;
    crate::manager::restore::check_version(target, &info.manager_version)
}

/// What a backup-manager step records for write-manifest.
#[derive(Debug, Serialize, Deserialize)]
struct ManagerOutput {
    v: u32,
    manager: ManagerInfo,
    object: ObjectInfo,
}

async fn backup_manager(ctx: &Arc<RunCtx>, step: &StepRef) -> Result<String> {
    let m = manager_of(ctx)?;
    let include_credentials = ctx.spec.manager_credentials;
    let key = manifest::key(&ctx.spec.snapshot, MANAGER_OBJECT);
    tracing::info!(state_dir = %m.state_dir.display(), key = %key, "snapshotting the manager");
    abort_leftover_upload(ctx, step, &key).await?;
    let target = crate::manager::catalog::Target {
        key: &key,
        id: &ctx.spec.snapshot,
        include_credentials,
        progress: ctx.progress.clone(),
        step: &step.id,
    };
    let (meta, size, sha256) = crate::manager::catalog::write_object(
        &*ctx.store,
        &m,
        target,
        &ctx.cancel,
        record_upload_id(ctx, step),
    )
    .await?;
    ctx.state.set_scratch(ctx.run_id, &step.id, None)?;
    let out = ManagerOutput {
        v: OUTPUT_VERSION,
        manager: ManagerInfo {
            format: meta.format_version,
            manager_version: meta.manager_version,
            include_credentials: meta.credentials_included,
            created_at: meta.created_at,
        },
        object: ObjectInfo {
            key: MANAGER_OBJECT.to_string(),
            size,
            sha256,
        },
    };
    encode(&out)
}

async fn restore_manager(ctx: &Arc<RunCtx>) -> Result<Option<String>> {
    let Some(force) = restore_manager_mode(ctx) else {
        return Ok(None);
    };
    let m = ctx.manifest().await?;
    let target = manager_of(ctx)?;
    check_manager_restore(m, &target, force)?;
    let (Some(info), Some(obj)) = (&m.manager, m.object(MANAGER_OBJECT)) else {
        return Err(Error::State(
            "manager snapshot vanished from the manifest".into(),
        ));
    };
    let status = crate::manager::catalog::from_manifest(&ctx.spec.snapshot, info, obj);
    let report = crate::manager::catalog::restore_key(
        &*ctx.store,
        &manifest::key(&ctx.spec.snapshot, MANAGER_OBJECT),
        &status,
        &target,
        force,
        ctx.disk.clone(),
        &ctx.cancel,
    )
    .await?;
    encode(&ManagerRestoreOutput {
        v: OUTPUT_VERSION,
        pre_restore: report.pre_restore,
        files: report.files,
    })
    .map(Some)
}

async fn backup_node(ctx: &Arc<RunCtx>, step: &StepRef, node: &Node) -> Result<String> {
    let (run, sid) = (ctx.run_id, step.id.clone());
    let rec = ctx.state.call(move |s| s.step(run, &sid)).await?;
    let leftover_upload = rec.scratch.and_then(|note| {
        serde_json::from_str::<serde_json::Value>(&note)
            .ok()
            .and_then(|v| v["upload_id"].as_str().map(str::to_string))
    });
    let job = BackupJob {
        snapshot: ctx.spec.snapshot.clone(),
        selection: ctx.spec.selection.clone(),
        node: node.clone(),
        phase: step.phase.clone(),
        hook_params: hook_params(ctx),
        leftover_upload,
    };
    let events = Arc::new(StepEvents {
        ctx: ctx.clone(),
        step: step.id.clone(),
    });
    let backed = ctx.exec(node).backup(&job, events, &ctx.cancel).await?;
    ctx.state.set_scratch(ctx.run_id, &step.id, None)?;
    encode(&NodeOutput {
        v: OUTPUT_VERSION,
        node: backed.node,
        object: backed.object,
    })
}

/// A node's events, into the run's progress and state: the upload id is recorded
/// before any part is sent, so a killed run's upload is aborted when the step is
/// redone.
struct StepEvents {
    ctx: Arc<RunCtx>,
    step: String,
}

impl crate::node::Events for StepEvents {
    fn event(&self, e: NodeEvent) {
        match e {
            NodeEvent::Started { total } => self.ctx.progress.event(Event::StepStarted {
                step: &self.step,
                total: Some(total),
            }),
            NodeEvent::Bytes { done } => self.ctx.progress.event(Event::Bytes {
                step: &self.step,
                done,
            }),
            NodeEvent::UploadId { id } => {
                let note = serde_json::json!({ "upload_id": id }).to_string();
                if let Err(e) = self
                    .ctx
                    .state
                    .set_scratch(self.ctx.run_id, &self.step, Some(&note))
                {
                    tracing::warn!("could not record the upload id: {e}");
                }
            }
        }
    }
}

/// The parameters a hook sees: the non-secret ones, and the secrets the cluster
/// description lists in `hook_secrets`.
fn hook_params(ctx: &RunCtx) -> Vec<(String, String)> {
    ctx.params
        .iter()
        .filter(|(k, _)| !ctx.params.is_secret(k) || ctx.cluster.hook_secrets.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Abort the multipart upload an earlier, killed attempt of this step left open.
/// Best effort: the upload may have completed just before the kill, and a failed
/// clean-up must not stop the backup (it is logged).
async fn abort_leftover_upload(ctx: &RunCtx, step: &StepRef, key: &str) -> Result<()> {
    let (run, sid) = (ctx.run_id, step.id.clone());
    let rec = ctx.state.call(move |s| s.step(run, &sid)).await?;
    let Some(note) = rec.scratch else {
        return Ok(());
    };
    if let Some(id) = serde_json::from_str::<serde_json::Value>(&note)
        .ok()
        .and_then(|v| v["upload_id"].as_str().map(str::to_string))
    {
        tracing::info!(key, "aborting the upload a killed attempt left open");
        if let Err(e) = ctx.store.abort_multipart(key, &id).await {
            tracing::warn!(
                key,
                "could not abort the upload a killed attempt left open: {e}"
            );
        }
    }
    ctx.state.set_scratch(ctx.run_id, &step.id, None)
}

/// Records a step's multipart upload id before any part is sent, so a killed run's
/// upload is aborted when the step is redone ([`abort_leftover_upload`]).
fn record_upload_id<'a>(ctx: &'a RunCtx, step: &'a StepRef) -> impl FnOnce(&str) + 'a {
    move |id| {
        let note = serde_json::json!({"upload_id": id}).to_string();
        if let Err(e) = ctx.state.set_scratch(ctx.run_id, &step.id, Some(&note)) {
            tracing::warn!("could not record the upload id: {e}");
        }
    }
}

/// The recorded outputs of every step of `action`, all of which must be complete.
fn outputs<T: serde::de::DeserializeOwned>(
    steps: &[crate::state::StepRecord],
    action: Action,
) -> Result<Vec<T>> {
    steps
        .iter()
        .filter(|s| s.action == action.name())
        .map(|s| {
            if s.status != Status::Complete {
                return Err(Error::State(format!("step {} has not completed", s.id)));
            }
            decode(&s.id, s.output.as_deref())
        })
        .collect()
}

async fn write_manifest(ctx: &Arc<RunCtx>) -> Result<()> {
    let run = ctx.run_id;
    let steps = ctx.state.call(move |s| s.steps(run)).await?;
    let mut nodes = Vec::new();
    let mut objects = Vec::new();
    for out in outputs::<NodeOutput>(&steps, Action::BackupNode)? {
        nodes.push(out.node);
        objects.push(out.object);
    }
    let mut manager = None;
    for out in outputs::<ManagerOutput>(&steps, Action::BackupManager)? {
        objects.push(out.object);
        manager = Some(out.manager);
    }
    nodes.sort_by_key(|n| n.index);
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let m = Manifest {
        format_version: manifest::FORMAT_VERSION,
        cairn_version: crate::VERSION.to_string(),
        snapshot: ctx.spec.snapshot.clone(),
        plan: ctx.spec.plan.clone(),
        started_at: ctx.started_at.clone(),
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        cluster: ClusterInfo {
            name: ctx.cluster.name.clone(),
            nodes,
        },
        objects,
        manager,
    };
    // Every object must be there with its size before the snapshot is declared complete.
    let missing = checks::objects_present(&*ctx.store, &ctx.spec.snapshot, &m).await;
    if !missing.is_empty() {
        return Err(Error::store(
            "verify",
            &ctx.spec.snapshot,
            missing.join("; "),
        ));
    }
    let key = manifest::key(&ctx.spec.snapshot, MANIFEST);
    if ctx.store.head(&key).await?.is_some() {
        // Written by this run before a kill (same start, same objects): done.
        if let Ok(existing) = checks::read_manifest(&*ctx.store, &ctx.spec.snapshot).await
            && existing.started_at == m.started_at
            && existing.objects == m.objects
        {
            return Ok(());
        }
        return Err(Error::Checks(vec![format!(
            "snapshot {:?} became complete while this run was writing it; it is never overwritten",
            ctx.spec.snapshot
        )]));
    }
    ctx.store.put(&key, m.to_bytes()?.into()).await
}

/// `<data_dir>/.cairn-staging-<token>`: on the target file system, so moving into
/// place is a rename; named by the run's token, unique across hosts and homes.
fn staging_dir(ctx: &RunCtx, node: &Node) -> PathBuf {
    node.data_dir.join(ctx.spec.staging_name())
}

async fn remove_staging(dir: &Path) {
    let dir = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), "could not remove staging dir: {e}"),
    })
    .await;
}

async fn stage_node(ctx: &Arc<RunCtx>, step: &StepRef, node: &Node) -> Result<String> {
    let m = ctx.manifest().await?;
    let info = m
        .node(node.index)
        .ok_or_else(|| Error::Checks(vec![format!("the snapshot has no node {}", node.index)]))?
        .clone();
    let object = m
        .object(&info.object)
        .ok_or_else(|| Error::archive(&info.object, "not listed in the manifest"))?
        .clone();
    let staging = staging_dir(ctx, node);
    // A staging dir left by a killed attempt is redone from scratch.
    remove_staging(&staging).await;
    std::fs::create_dir_all(&node.data_dir)
        .map_err(|e| Error::io("create data dir", &node.data_dir, e))?;
    // Made here, not found: never a dir (or link) someone put in its place.
    std::fs::create_dir(&staging).map_err(|e| Error::io("create staging dir", &staging, e))?;
    let result =
        download_and_unpack(ctx, step, &info, &object, unpack::Mode::Extract(&staging)).await;
    let done = match result {
        Ok(done) => done,
        Err(e) => {
            remove_staging(&staging).await;
            return Err(e);
        }
    };
    let dir = staging.clone();
    let out = StageOutput {
        v: OUTPUT_VERSION,
        token: ctx.spec.token.clone(),
        node: node.index,
        staging: staging.clone(),
        object_sha256: done.object_sha256,
        entries: 0,
        bytes: 0,
        tree: String::new(),
        parents: Vec::new(),
    };
    let paths = ctx.spec.selection.paths.clone();
    let recorded = tokio::task::spawn_blocking(move || {
        // Unpacking verified every file against the manifest: its hashes stand in
        // for a second read.
        let files: HashMap<&str, &str> = info
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.sha256.as_str()))
            .collect();
        let above = staged::parents_of(&paths);
        let tree = staged::tree(
            &dir,
            STAGED_RECORD,
            &staged::Content::Recorded(&files),
            &above,
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
            parents,
            ..out
        };
        let path = dir.join(STAGED_RECORD);
        let text = encode(&out)?;
        let f = std::fs::File::create(&path).map_err(|e| Error::io("write", &path, e))?;
        std::io::Write::write_all(&mut &f, text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("write", &path, e))?;
        Ok::<_, Error>(text)
    })
    .await
    .map_err(|e| Error::State(format!("stage worker failed: {e}")))?;
    if recorded.is_err() {
        remove_staging(&staging).await;
    }
    recorded
}

/// Stream an object from the store through [`unpack::unpack`] on a blocking thread.
pub async fn download_and_unpack(
    ctx: &RunCtx,
    step: &StepRef,
    info: &NodeInfo,
    object: &ObjectInfo,
    mode: unpack::Mode<'_>,
) -> Result<unpack::Unpacked> {
    let restoring = info
        .files
        .iter()
        .filter(|f| ctx.spec.selection.restores_file(&f.path))
        .try_fold(0u64, |a, f| a.checked_add(f.size))
        .ok_or_else(|| Error::archive(&object.key, "the file sizes in the manifest overflow"))?;
    ctx.progress.event(Event::StepStarted {
        step: &step.id,
        total: Some(restoring),
    });
    let root = match mode {
        unpack::Mode::Extract(p) => Some(p.to_path_buf()),
        unpack::Mode::Verify => None,
    };
    read_object(
        &*ctx.store,
        &manifest::key(&ctx.spec.snapshot, &object.key),
        info.clone(),
        object.clone(),
        ctx.spec.selection.clone(),
        root,
        ctx.progress.clone(),
        step.id.clone(),
        &ctx.cancel,
    )
    .await
}

/// Download `key` and unpack (into `root`) or verify it against the manifest.
#[allow(clippy::too_many_arguments)]
pub async fn read_object(
    store: &dyn crate::store::Store,
    key: &str,
    info: NodeInfo,
    object: ObjectInfo,
    selection: crate::cluster::Selection,
    root: Option<PathBuf>,
    progress: Arc<dyn crate::progress::Progress>,
    step_id: String,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<unpack::Unpacked> {
    let name = key.to_string();
    crate::store::read_stream(store, key, cancel, move |reader| {
        let expected = unpack::Expected {
            object: &name,
            node: &info,
            object_size: object.size,
            object_sha256: &object.sha256,
        };
        let mode = match &root {
            Some(r) => unpack::Mode::Extract(r),
            None => unpack::Mode::Verify,
        };
        unpack::unpack(reader, &expected, &selection, mode, |done| {
            progress.event(Event::Bytes {
                step: &step_id,
                done,
            })
        })
    })
    .await
}

async fn commit_restore(ctx: &Arc<RunCtx>, step: &StepRef) -> Result<()> {
    // What pre-flight found may have changed since (a resume): check again.
    let problems = data_dirs_fit(ctx);
    if !problems.is_empty() {
        return Err(Error::Refused(problems));
    }
    // Every staged node this commit consumes must hold what its step staged; a
    // missing one is marked to be staged again, never skipped.
    let run = ctx.run_id;
    let records = ctx.state.call(move |s| s.steps(run)).await?;
    let mut missing = Vec::new();
    for s in ctx
        .spec
        .steps
        .iter()
        .filter(|s| s.action == Action::StageNode)
    {
        let rec = records.iter().find(|r| r.id == s.id);
        let ok = match rec {
            Some(r) if r.status == Status::Complete => {
                effects_hold(ctx, s, r.output.as_deref(), Depth::Metadata).await
            }
            _ => Err("it has not completed".to_string()),
        };
        if let Err(why) = ok {
            missing.push((s.id.clone(), why));
        }
    }
    if !missing.is_empty() {
        let ids: Vec<String> = missing.iter().map(|m| m.0.clone()).collect();
        let why = "its staged data was gone when the commit began";
        ctx.state
            .call(move |s| s.set_pending(run, &ids, why))
            .await?;
        let lines: Vec<String> = missing
            .iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        return Err(Error::State(format!(
            "nothing was moved into place: staged data is missing ({}); those steps are marked to be redone by `cairn plan resume {run}`",
            lines.join("; ")
        )));
    }
    // The staged parents' metadata as recorded when staged (their times in
    // staging are not trusted: moves change them).
    let mut parents: HashMap<u32, Vec<CreatedDir>> = HashMap::new();
    for s in ctx
        .spec
        .steps
        .iter()
        .filter(|s| s.action == Action::StageNode)
    {
        let rec = records.iter().find(|r| r.id == s.id);
        if let (Some(n), Some(r)) = (s.node, rec)
            && let Ok(out) = decode::<StageOutput>(&s.id, r.output.as_deref())
        {
            parents.insert(n, out.parents);
        }
    }
    let moves = planned_moves(ctx, &parents)?;
    let journal = encode(&CommitJournal {
        v: OUTPUT_VERSION,
        moves: moves.clone(),
    })?;
    let sid = step.id.clone();
    ctx.state
        .call(move |s| s.set_scratch(run, &sid, Some(&journal)))
        .await?;
    let staging: Vec<(PathBuf, PathBuf)> = ctx
        .cluster
        .nodes
        .iter()
        .map(|n| (staging_dir(ctx, n), n.data_dir.clone()))
        .collect();
    let result = tokio::task::spawn_blocking(move || commit_blocking(&moves, &staging))
        .await
        .map_err(|e| Error::State(format!("commit worker failed: {e}")))?;
    if result.is_err() {
        undo_manager_restore(ctx).await;
    }
    result
}

/// What the commit moves: each staged keyspace (or, for a partial restore, each
/// staged path) to the same place in its data dir.
fn planned_moves(ctx: &RunCtx, parents: &HashMap<u32, Vec<CreatedDir>>) -> Result<Vec<Move>> {
    let paths = &ctx.spec.selection.paths;
    let mut moves = Vec::new();
    for n in &ctx.cluster.nodes {
        let staging = staging_dir(ctx, n);
        let recorded = parents.get(&n.index).map_or(&[][..], Vec::as_slice);
        if !paths.is_empty() {
            for p in paths {
                if std::fs::symlink_metadata(staging.join(p)).is_ok() {
                    moves.push(Move::new(
                        staging.clone(),
                        n.data_dir.clone(),
                        PathBuf::from(p),
                        recorded,
                    ));
                }
            }
            continue;
        }
        let rd = match std::fs::read_dir(&staging) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("list", &staging, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("list", &staging, e))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(RESERVED_PREFIX) {
                continue;
            }
            moves.push(Move::new(
                staging.clone(),
                n.data_dir.clone(),
                PathBuf::from(name),
                recorded,
            ));
        }
    }
    moves.sort_by(|a, b| (&a.data_dir, &a.rel).cmp(&(&b.data_dir, &b.rel)));
    Ok(moves)
}

/// A commit that a kill interrupted is rolled back from its journal: what was moved
/// into a data dir goes back into its staging dir, so the target is as it was and
/// the staged data is checked again before the commit is redone.
pub async fn roll_back_commit(ctx: &Arc<RunCtx>, step_id: &str) -> Result<()> {
    let (run, sid) = (ctx.run_id, step_id.to_string());
    let rec = ctx.state.call(move |s| s.step(run, &sid)).await?;
    let Some(text) = rec.scratch else {
        return Ok(());
    };
    let journal: CommitJournal = serde_json::from_str(&text)
        .map_err(|e| Error::State(format!("commit journal of run {run}: {e}")))?;
    let undone = tokio::task::spawn_blocking(move || {
        let mut problems = Vec::new();
        let mut moved = 0usize;
        for m in journal.moves.iter().rev() {
            let staged = match m.in_staging(&m.rel) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            let target = m.data_dir.join(&m.rel);
            // Moved by the commit: the entry in the target is the one staged (a
            // rename keeps its identity); anything else there was never moved.
            let ours = crate::fsx::ident_beneath(&m.data_dir, &m.rel)
                .map(|id| id.is_some() && id == m.ident);
            let in_staging = crate::fsx::exists_beneath(&m.data_dir, &staged);
            match (ours, in_staging) {
                (Err(e), _) | (_, Err(e)) => {
                    problems.push(format!("{}: {e}", target.display()));
                    continue;
                }
                (Ok(true), Ok(false)) => {
                    // The commit removes each staging dir once emptied: the move
                    // back makes it again, beneath the data dir, never through a
                    // link.
                    if let Err(e) = m.move_back() {
                        problems.push(format!("{}: {e}", target.display()));
                        continue;
                    }
                    moved += 1;
                }
                (Ok(true), Ok(true)) => {
                    // A kill is between renames, never inside one: one of the two
                    // was put there since, and which is the restore's is unknown.
                    problems.push(format!(
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
        (problems, moved)
    })
    .await
    .map_err(|e| Error::State(format!("rollback worker failed: {e}")))?;
    let (undone, moved) = undone;
    if !undone.is_empty() {
        return Err(Error::Unfinished(format!(
            "the interrupted commit of run {run} could not be rolled back, so nothing else was done: {}",
            undone.join("; ")
        )));
    }
    if moved > 0 {
        tracing::warn!(
            run,
            "an interrupted commit was rolled back: {moved} entries moved back out of the target into staging"
        );
    }
    let sid = step_id.to_string();
    ctx.state
        .call(move |s| s.set_scratch(run, &sid, None))
        .await
}

/// The nodes could not be committed: put back the manager state this run swapped
/// in, and mark its step to be redone, so a failed restore leaves manager and
/// nodes as they were and `plan resume` does both again.
async fn undo_manager_restore(ctx: &Arc<RunCtx>) {
    let run = ctx.run_id;
    let Ok(steps) = ctx.state.call(move |s| s.steps(run)).await else {
        return;
    };
    let Some(step) = steps
        .iter()
        .find(|s| s.action == Action::RestoreManager.name() && s.status == Status::Complete)
    else {
        return;
    };
    let Ok(report) = decode::<ManagerRestoreOutput>(&step.id, step.output.as_deref()) else {
        return;
    };
    // The record first: once the state is put back, nothing may claim it restored.
    if let Err(e) = ctx.state.set_pending(
        run,
        std::slice::from_ref(&step.id),
        "the node commit failed; the manager's previous state was put back",
    ) {
        tracing::error!("could not mark {} to be redone: {e}", step.id);
        return;
    }
    let undone = manager_of(ctx)
        .and_then(|m| crate::manager::restore::undo(&m, report.pre_restore.as_deref()));
    match undone {
        Ok(_) => tracing::warn!("the node commit failed: the manager's previous state is back"),
        Err(e) => tracing::error!(
            "the node commit failed and the manager state could not be put back: {e}; `cairn manager-snapshot rollback` does it"
        ),
    }
}

/// Move every planned entry into its data dir, never through a symlink and never
/// over an existing entry; on any failure move back what was moved, so the target
/// is as it was. Then remove the emptied staging dirs.
fn commit_blocking(moves: &[Move], staging: &[(PathBuf, PathBuf)]) -> Result<()> {
    let mut done: Vec<&Move> = Vec::new();
    let mut failure = None;
    for (i, m) in moves.iter().enumerate() {
        if let Err(e) = crate::failpoint::hit(&format!("commit-rename:{i}")) {
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
    for m in moves {
        m.set_created_metadata(false);
    }
    for (dir, data_dir) in staging {
        // What is left: the record, and for a partial restore the empty parents of
        // the paths moved out (and the unselected rest).
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove staging dir", dir, e)),
        }
        if let Ok(d) = std::fs::File::open(data_dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
