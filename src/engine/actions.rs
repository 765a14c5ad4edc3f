//! What each plan action does. Every action is idempotent for a resume: running it
//! again after a crash produces the same result.

use super::{RunCtx, StepRef};
use crate::cluster::{Node, RESERVED_PREFIX};
use crate::manager::Manager;
use crate::manifest::{
    self, ClusterInfo, MANAGER_OBJECT, MANIFEST, ManagerInfo, Manifest, NodeInfo, ObjectInfo,
};
use crate::node::restore::{
    CheckStagedJob, CreatedDir, DirTime, FsOp, Move, RestoreProbe, RolledBack, StageJob,
    StageOutput, manifest_digest,
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
pub const OUTPUT_VERSION: u32 = 3;

/// What a backup-node step records for write-manifest.
#[derive(Debug, Serialize, Deserialize)]
struct NodeOutput {
    v: u32,
    node: NodeInfo,
    object: ObjectInfo,
    /// Objects of earlier snapshots holding this node's unchanged files (keys
    /// from the store's root).
    #[serde(default)]
    refs: Vec<ObjectInfo>,
}

/// What a backup's pre-flight decided: the parent of a differential, or why the
/// backup is full.
#[derive(Debug, Serialize, Deserialize, Default)]
struct BackupChoice {
    parent: Option<String>,
    /// The parent's manifest as the pre-flight read it.
    parent_sha256: Option<String>,
    /// This backup's place in its chain of differentials.
    differentials: u32,
    full_because: Option<String>,
}

impl BackupChoice {
    /// The pre-flight's decision, as recorded (none: full).
    fn of(steps: &[crate::state::StepRecord]) -> BackupChoice {
        steps
            .iter()
            .find(|s| s.action == Action::CheckBackup.name() && s.status == Status::Complete)
            .and_then(|s| s.output.as_deref())
            .and_then(|o| serde_json::from_str(o).ok())
            .unwrap_or_default()
    }
}

/// The pre-flight's choice of a parent (`MODE=differential`), after refusing a
/// name whose folder holds objects other snapshots need.
async fn choose_parent(ctx: &RunCtx) -> Result<BackupChoice> {
    let why = match crate::repo::backup_base(
        &*ctx.store,
        &ctx.cluster.name,
        &ctx.spec.snapshot,
        ctx.spec.differential,
        ctx.spec.encrypt_to.is_some(),
        ctx.spec.full_every,
    )
    .await?
    {
        Ok(m) => {
            tracing::info!(parent = %m.snapshot, "differential backup: unchanged files are referenced in the parent's objects");
            return Ok(BackupChoice {
                parent: Some(m.snapshot.clone()),
                parent_sha256: Some(manifest_digest(&m)?),
                differentials: m.differentials.saturating_add(1),
                full_because: None,
            });
        }
        Err(why) => why,
    };
    tracing::info!(because = %why, "full backup");
    Ok(BackupChoice {
        full_because: Some(why),
        ..Default::default()
    })
}

/// What a node's differential backup compares with: the parent's files of the
/// node, each with the object holding it, and the parent's manifest. `None`
/// (a full backup of the node) when the parent changed or went since the
/// pre-flight, or cannot be read in pieces.
async fn base_of(
    ctx: &RunCtx,
    choice: &BackupChoice,
    node: u32,
) -> Option<(crate::node::BackupBase, Manifest)> {
    let (Some(parent), Some(sha)) = (&choice.parent, &choice.parent_sha256) else {
        return None;
    };
    let m = match checks::read_manifest(&*ctx.store, parent).await {
        Ok(m) if manifest_digest(&m).ok().as_ref() == Some(sha) => m,
        Ok(_) | Err(_) => {
            tracing::warn!(node, parent = %parent, "the parent changed or went since the pre-flight: this node is backed up in full");
            return None;
        }
    };
    let info = m.node(node)?;
    let own = m.object(&info.object)?;
    if own.index.is_none() || !crate::archive::seek::seekable(info) {
        return None;
    }
    let holder = crate::repo::key(parent, &info.object);
    let files = info
        .files
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f.object = Some(f.object.clone().unwrap_or_else(|| holder.clone()));
            f
        })
        .collect();
    Some((
        crate::node::BackupBase {
            parent: parent.clone(),
            files,
            rehash: ctx.spec.rehash,
        },
        m,
    ))
}

/// The objects a node's referenced files are held in, each as the parent
/// records it; every referenced file must be the parent's record, unchanged (a
/// node agent's answer is not trusted blindly).
fn refs_of(
    backed: &crate::node::Backed,
    base: Option<&(crate::node::BackupBase, Manifest)>,
) -> Result<Vec<ObjectInfo>> {
    let referencing: Vec<&manifest::FileInfo> = backed
        .node
        .files
        .iter()
        .filter(|f| f.object.is_some())
        .collect();
    if referencing.is_empty() {
        return Ok(Vec::new());
    }
    let Some((b, parent)) = base else {
        return Err(Error::State(format!(
            "node {} answered files held by other snapshots, but it was asked for a full backup",
            backed.node.index
        )));
    };
    let by_path: HashMap<&str, &manifest::FileInfo> =
        b.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut keys = std::collections::BTreeSet::new();
    for f in referencing {
        if by_path.get(f.path.as_str()) != Some(&f) {
            return Err(Error::State(format!(
                "node {}: the file {:?} is said to be unchanged, but is not the parent's record",
                backed.node.index,
                crate::plan::params::shorten(&f.path)
            )));
        }
        keys.insert(f.object.clone().unwrap_or_default());
    }
    keys.into_iter()
        .map(|k| {
            let info = parent.node(backed.node.index);
            let own = info
                .filter(|i| crate::repo::key(&parent.snapshot, &i.object) == k)
                .and_then(|i| parent.object(&i.object))
                .map(|o| ObjectInfo {
                    key: k.clone(),
                    ..o.clone()
                });
            own.or_else(|| parent.reference(&k).cloned())
                .ok_or_else(|| Error::State(format!("the parent names no object {k:?}")))
        })
        .collect()
}

/// What a check-restore step records: per node, the directories the restore will
/// create (a data dir that did not exist, its missing parents) and the data dir's
/// time, so that a failed restore leaves the target as it was.
#[derive(Debug, Serialize, Deserialize, Default)]
struct CheckRestoreOutput {
    v: u32,
    /// The SHA-256 of the manifest the checks passed: a resume refuses a snapshot
    /// that changed in the store since (it would mix two versions of it).
    manifest_sha256: String,
    nodes: Vec<NodeTarget>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct NodeTarget {
    node: u32,
    /// Missing dirs the restore makes (removed again, if empty, when it fails).
    made: Vec<PathBuf>,
    /// The data dir's modification time (making and removing a staging dir
    /// inside it changes it; a failed restore puts it back).
    mtime: Option<DirTime>,
    /// `TABLE_MAPPING=by-name`: snapshot table dir → the target's.
    #[serde(default)]
    renames: Vec<(String, String)>,
}

/// `TABLE_MAPPING=by-name`: the table dirs the pre-flight mapped on a node.
fn renames_of(ctx: &RunCtx, node: u32) -> Result<Vec<(String, String)>> {
    if !ctx.spec.table_by_name {
        return Ok(Vec::new());
    }
    let steps = ctx.state.steps(ctx.run_id)?;
    let rec = steps
        .iter()
        .find(|s| s.action == Action::CheckRestore.name() && s.status == Status::Complete)
        .ok_or_else(|| Error::State("the restore's pre-flight has not passed".into()))?;
    let out = decode::<CheckRestoreOutput>(&rec.id, rec.output.as_deref())?;
    Ok(out
        .nodes
        .into_iter()
        .find(|t| t.node == node)
        .map(|t| t.renames)
        .unwrap_or_default())
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
            let probe = crate::repo::probe_key(ctx.run_id, std::process::id());
            // Every node looks at itself, on its own host, all at once; every
            // problem of every node is reported together.
            let looks = futures::future::join_all(ctx.cluster.nodes.iter().map(|n| async move {
                (
                    n,
                    ctx.exec(n)
                        .inspect_backup(n, &ctx.spec.selection, &ctx.cluster.capture)
                        .await,
                )
            }))
            .await;
            let mut problems = Vec::new();
            let mut found = std::collections::BTreeSet::new();
            let mut stale = Vec::new();
            for (n, look) in looks {
                match look {
                    Ok(facts) => {
                        stale.extend(
                            facts
                                .snaps
                                .iter()
                                .filter(|s| **s != ctx.spec.snap_name())
                                .map(|s| (n, s.clone())),
                        );
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
                    Err(e) => problems.extend(crate::node::problems_of(n.index, e)),
                }
            }
            if problems.is_empty() && !stale.is_empty() {
                clean_dead_snapshots(ctx, &stale).await?;
            }
            checks::backup(
                problems,
                &found,
                &ctx.spec.selection,
                &*ctx.store,
                &ctx.spec.snapshot,
                Some(&probe),
            )
            .await?;
            let choice = choose_parent(ctx).await?;
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
            encode(&choice).map(Some)
        }
        Action::BackupNode => backup_node(ctx, step, node()?).await.map(Some),
        Action::WriteManifest => write_manifest(ctx).await.map(|()| None),
        Action::CheckRestore => check_restore(ctx).await.map(Some),
        Action::StageNode => stage_node(ctx, step, node()?).await.map(Some),
        Action::CommitRestore => commit_restore(ctx, step).await.map(|()| None),
        Action::BackupManager => backup_manager(ctx, step).await.map(Some),
        Action::RestoreManager => restore_manager(ctx).await,
        Action::DiscardStaging => discard_staging(ctx).await.map(|()| None),
        Action::SnapshotNode => snapshot_node(ctx, node()?).await.map(Some),
        Action::DropSnapshots => drop_snapshots(ctx).await.map(|()| None),
        Action::BackupSchema => backup_schema(ctx, step).await.map(Some),
        Action::RestoreSchema => restore_schema(ctx).await.map(Some),
        Action::LoadTables => load_tables(ctx).await.map(Some),
    }
}

/// After the commit: each node's `post_restore` once per restored table, on the
/// node's host (`nodetool import` loads it into the running service). A failure
/// fails the run with the data in place; its resume runs this step again.
async fn load_tables(ctx: &Arc<RunCtx>) -> Result<String> {
    let m = ctx.manifest().await?.clone();
    let mut loaded = 0usize;
    for n in &ctx.cluster.nodes {
        if n.post_restore.is_empty() {
            continue;
        }
        let Some(info) = m.node(n.index) else {
            continue;
        };
        let tables: std::collections::BTreeSet<(String, String)> = info
            .files
            .iter()
            .filter(|f| ctx.spec.selection.restores_file(&f.path))
            .filter_map(|f| {
                let mut parts = f.path.split('/');
                let (ks, table) = (parts.next()?, parts.next()?);
                parts.next()?;
                Some((ks.to_string(), table.to_string()))
            })
            .collect();
        // Into a recreated schema the table is in the target's dir of its name.
        let renames = renames_of(ctx, n.index)?;
        for (ks, table) in tables {
            let placed = crate::node::restore::renamed(&format!("{ks}/{table}"), &renames);
            let table = placed
                .split_once('/')
                .map_or(table.clone(), |(_, t)| t.to_string());
            let dir = n.data_dir.join(&ks).join(&table);
            let argv: Vec<String> =
                crate::node::capture::expand(&n.post_restore, &ctx.spec.snapshot)
                    .iter()
                    .map(|a| {
                        a.replace("{keyspace}", &ks)
                            .replace("{table}", crate::node::restore::table_name(&table))
                            .replace("{dir}", &dir.to_string_lossy())
                    })
                    .collect();
            let job = crate::node::command::CommandJob {
                node: n.index,
                what: format!("post_restore of {ks}/{table}"),
                argv,
                env: hook_params(ctx),
                input_hex: None,
            };
            let _: crate::node::command::CommandOut =
                crate::node::fs_until(&*ctx.exec(n), n.index, FsOp::Command(job), &ctx.cancel)
                    .await?;
            loaded += 1;
        }
    }
    encode(&serde_json::json!({ "v": OUTPUT_VERSION, "tables": loaded }))
}

/// What a backup's schema step stored.
#[derive(Debug, Serialize, Deserialize)]
struct SchemaOutput {
    v: u32,
    artifacts: Vec<StoredArtifact>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredArtifact {
    name: String,
    object: ObjectInfo,
}

/// The node whose host runs the service's commands: the run's first node.
fn command_node(ctx: &RunCtx) -> Result<&Node> {
    ctx.cluster
        .nodes
        .first()
        .ok_or_else(|| Error::State("the run has no node to run the service's commands on".into()))
}

/// Run each artifact's dump once, on the first node's host, and store its output
/// beside the node archives (encrypted like them).
async fn backup_schema(ctx: &Arc<RunCtx>, step: &StepRef) -> Result<String> {
    let mut stored = Vec::new();
    for a in &ctx.cluster.artifacts {
        if a.dump.is_empty() {
            return Err(Error::Usage(format!(
                "artifact {} declares no dump command, so a backup cannot store it: add dump, or leave [artifacts.{}] to restore-only descriptions",
                a.name, a.name
            )));
        }
        let node = command_node(ctx)?;
        let job = crate::node::command::CommandJob {
            node: node.index,
            what: format!("{} dump", a.name),
            argv: crate::node::capture::expand(&a.dump, &ctx.spec.snapshot),
            env: hook_params(ctx),
            input_hex: None,
        };
        let out: crate::node::command::CommandOut = crate::node::fs_until(
            &*ctx.exec(node),
            node.index,
            FsOp::Command(job),
            &ctx.cancel,
        )
        .await?;
        let bytes = hex::decode(&out.stdout_hex)
            .map_err(|e| Error::State(format!("the {} dump's output: {e}", a.name)))?;
        if bytes.is_empty() {
            return Err(Error::Hook {
                hook: "service command",
                node: node.index,
                message: format!(
                    "the {} dump printed nothing; a snapshot without it could not be restored as asked",
                    a.name
                ),
            });
        }
        // Encrypting (a passphrase's scrypt takes a second) and hashing run off
        // the async threads.
        let (to, file) = (ctx.spec.encrypt_to.clone(), a.file.clone());
        let (body, sha256) = tokio::task::spawn_blocking(move || {
            let body = match &to {
                None => bytes,
                Some(to) => {
                    use std::io::Write;
                    let mut w = to.wrap(Vec::new())?;
                    w.write_all(&bytes)
                        .map_err(|e| Error::io("encrypt", Path::new(&file), e))?;
                    w.finish()
                        .map_err(|e| Error::io("encrypt", Path::new(&file), e))?
                }
            };
            let sha = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&body))
            };
            Ok::<_, Error>((body, sha))
        })
        .await
        .map_err(|e| Error::State(format!("artifact worker failed: {e}")))??;
        let object = ObjectInfo {
            key: a.file.clone(),
            size: body.len() as u64,
            sha256,
            index: None,
        };
        let key = crate::repo::key(&ctx.spec.snapshot, &a.file);
        ctx.store.put(&key, body.into()).await?;
        tracing::info!(step = %step.id, artifact = %a.name, key, bytes = object.size, "artifact stored");
        stored.push(StoredArtifact {
            name: a.name.clone(),
            object,
        });
    }
    encode(&SchemaOutput {
        v: OUTPUT_VERSION,
        artifacts: stored,
    })
}

/// With `RESTORE_SCHEMA=true`: each artifact of the snapshot is read, checked
/// against the manifest and given to the target's load command (on the first
/// node's host), before any node's data is moved in. A failed load fails the run
/// with the target untouched.
async fn restore_schema(ctx: &Arc<RunCtx>) -> Result<String> {
    if !ctx.spec.restore_schema {
        return encode(&serde_json::json!({ "v": OUTPUT_VERSION, "loaded": [] }));
    }
    let m = ctx.manifest().await?.clone();
    let plan = schema_plan(ctx, &m).map_err(Error::Checks)?;
    let mut loaded = Vec::new();
    for (art, a) in plan {
        let object = m
            .object(&art.object)
            .ok_or_else(|| Error::archive(&art.object, "not listed in the manifest's objects"))?;
        let key = crate::repo::key(&ctx.spec.snapshot, &art.object);
        let body = crate::store::get_bytes(
            &*ctx.store,
            &key,
            2 * crate::node::command::MAX_OUTPUT as u64,
        )
        .await?;
        if m.encryption.is_some() && ctx.spec.keys.is_none() {
            return Err(Error::Refused(vec![format!(
                "snapshot {:?} is encrypted: give AGE_IDENTITY or AGE_PASSPHRASE",
                ctx.spec.snapshot
            )]));
        }
        // Hashing and decrypting (a passphrase's scrypt) run off the async threads.
        let (keys, name, want) = (
            ctx.spec.keys.clone().filter(|_| m.encryption.is_some()),
            art.object.clone(),
            (object.size, object.sha256.clone()),
        );
        let plain = tokio::task::spawn_blocking(move || {
            let sha = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&body))
            };
            if body.len() as u64 != want.0 || sha != want.1 {
                return Err(Error::archive(
                    &name,
                    format!(
                        "is {} bytes with SHA-256 {sha}, the manifest says {} bytes with {}",
                        body.len(),
                        want.0,
                        want.1
                    ),
                ));
            }
            match keys {
                None => Ok(body.to_vec()),
                Some(keys) => {
                    use std::io::Read;
                    let mut r = keys.reader(&body[..], &name)?;
                    let mut v = Vec::new();
                    r.read_to_end(&mut v)
                        .map_err(|e| Error::archive(&name, format!("cannot be decrypted: {e}")))?;
                    Ok(v)
                }
            }
        })
        .await
        .map_err(|e| Error::State(format!("artifact worker failed: {e}")))??;
        let node = command_node(ctx)?;
        let job = crate::node::command::CommandJob {
            node: node.index,
            what: format!("{} load", a.name),
            argv: crate::node::capture::expand(&a.load, &ctx.spec.snapshot),
            env: hook_params(ctx),
            input_hex: Some(hex::encode(&plain)),
        };
        let _: crate::node::command::CommandOut = crate::node::fs_until(
            &*ctx.exec(node),
            node.index,
            FsOp::Command(job),
            &ctx.cancel,
        )
        .await?;
        tracing::info!(artifact = %a.name, "artifact loaded");
        loaded.push(a.name.clone());
    }
    encode(&serde_json::json!({ "v": OUTPUT_VERSION, "loaded": loaded }))
}

/// The artifacts a `RESTORE_SCHEMA=true` restore loads, each with the target's
/// declaration; or every reason it cannot.
fn schema_plan<'a>(
    ctx: &'a RunCtx,
    m: &Manifest,
) -> std::result::Result<Vec<(manifest::ArtifactInfo, &'a crate::cluster::Artifact)>, Vec<String>> {
    if m.artifacts.is_empty() {
        return Err(vec![format!(
            "RESTORE_SCHEMA=true, but snapshot {:?} holds no schema (its cluster description declared no [artifacts])",
            ctx.spec.snapshot
        )]);
    }
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for art in &m.artifacts {
        match ctx.cluster.artifacts.iter().find(|a| a.name == art.name) {
            Some(a) if !a.load.is_empty() => out.push((art.clone(), a)),
            _ => problems.push(format!(
                "RESTORE_SCHEMA=true, but the target's cluster description has no load command for artifact {:?} ([artifacts.{}] load = [...])",
                art.name, art.name
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// What a node's snapshot step made.
#[derive(Debug, Serialize, Deserialize)]
struct SnapOutput {
    v: u32,
    mode: String,
    #[serde(default)]
    taken: crate::node::capture::Taken,
}

fn take_job(ctx: &RunCtx, node: &Node) -> crate::node::capture::TakeSnapshot {
    crate::node::capture::TakeSnapshot {
        node: node.index,
        data_dir: node.data_dir.clone(),
        name: ctx.spec.snap_name(),
        selection: ctx.spec.selection.clone(),
        capture: ctx.cluster.capture.clone(),
        snapshot: ctx.spec.snapshot.clone(),
        env: hook_params(ctx),
    }
}

/// Take a node's point-in-time snapshot on its host (the phase runs every node
/// at once: no upload starts before every node has its snapshot).
async fn snapshot_node(ctx: &Arc<RunCtx>, node: &Node) -> Result<String> {
    let mode = ctx.cluster.capture.mode;
    let taken = if mode == crate::cluster::SnapshotMode::None {
        Default::default()
    } else {
        let op = FsOp::TakeSnapshot(take_job(ctx, node));
        crate::node::fs_until(&*ctx.exec(node), node.index, op, &ctx.cancel).await?
    };
    encode(&SnapOutput {
        v: OUTPUT_VERSION,
        mode: mode.name().into(),
        taken,
    })
}

/// Remove this run's snapshots from every node, all at once; what cannot be
/// removed is named (a resume or the next run of this home removes it).
async fn drop_snapshots(ctx: &Arc<RunCtx>) -> Result<()> {
    if ctx.cluster.capture.mode == crate::cluster::SnapshotMode::None {
        return Ok(());
    }
    let results = futures::future::join_all(ctx.cluster.nodes.iter().map(|n| async move {
        let t = take_job(ctx, n);
        let op = FsOp::DropSnapshot(crate::node::capture::DropSnapshot {
            node: n.index,
            data_dir: t.data_dir,
            name: t.name,
            capture: t.capture,
            snapshot: t.snapshot,
            env: t.env,
        });
        (
            n.index,
            crate::node::fs::<()>(&*ctx.exec(n), n.index, op).await,
        )
    }))
    .await;
    let mut first = None;
    for (i, r) in results {
        if let Err(e) = r {
            tracing::warn!(node = i, "could not remove the run's snapshot: {e}");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Every node looks at its target, on its own host, all at once.
async fn probe_nodes(
    ctx: &Arc<RunCtx>,
    m: Option<&Manifest>,
) -> (HashMap<u32, RestoreProbe>, Vec<String>) {
    crate::node::restore::probe_nodes(
        &ctx.cluster,
        &ctx.spec.selection,
        ctx.spec.restore_dir.is_some(),
        ctx.spec.table_by_name,
        m,
        |n| ctx.exec(n),
    )
    .await
}

/// Whether every data dir can still take the restore (a data dir swapped for a
/// link since the run began is never followed): the problems, one per line.
pub async fn data_dirs_fit(ctx: &Arc<RunCtx>) -> Vec<String> {
    let (probes, mut problems) = probe_nodes(ctx, None).await;
    let mut nodes: Vec<_> = probes.into_iter().collect();
    nodes.sort_by_key(|(n, _)| *n);
    problems.extend(nodes.into_iter().flat_map(|(_, p)| p.unfit));
    problems
}

async fn check_restore(ctx: &Arc<RunCtx>) -> Result<String> {
    let m =
        checks::restore_manifest(&*ctx.store, &ctx.spec.snapshot, ctx.spec.keys.as_ref()).await?;
    if ctx.spec.keys.is_some() && m.encryption.is_none() {
        // Said, not refused: a key given for a clear snapshot is harmless, but a
        // snapshot expected to be encrypted that is not may have been replaced.
        crate::say!(
            "cairn: warning: snapshot {:?} is not encrypted; the identity given was not used",
            ctx.spec.snapshot
        );
    }
    let (mut probes, mut unreachable) = probe_nodes(ctx, Some(&m)).await;
    let mut unfit: Vec<String> = Vec::new();
    for n in &ctx.cluster.nodes {
        if let Some(p) = probes.get(&n.index) {
            unfit.extend(p.unfit.iter().cloned());
        }
    }
    if !unfit.is_empty() || !unreachable.is_empty() {
        unreachable.extend(unfit);
        return Err(Error::Checks(unreachable));
    }
    if clean_dead_staging(ctx, &probes).await? {
        // Space was freed: look again.
        let (again, problems) = probe_nodes(ctx, Some(&m)).await;
        if !problems.is_empty() {
            return Err(Error::Checks(problems));
        }
        probes = again;
    }
    checks::restore(
        &ctx.cluster,
        &ctx.spec.selection,
        &*ctx.store,
        &ctx.spec.snapshot,
        &m,
        &probes,
    )
    .await?;
    if let Some(force) = restore_manager_mode(ctx) {
        let m_ = manager_of(ctx)?;
        check_manager_restore(&m, &m_, force)?;
    }
    if ctx.spec.restore_schema {
        schema_plan(ctx, &m).map_err(Error::Checks)?;
    }
    let manifest_sha256 = manifest_digest(&m)?;
    // The stage steps use the manifest the checks validated: read once.
    let _ = ctx.manifest.set(m);
    let nodes = ctx
        .cluster
        .nodes
        .iter()
        .filter_map(|n| {
            let p = probes.get(&n.index)?;
            Some(NodeTarget {
                node: n.index,
                made: p.missing_dirs.clone(),
                mtime: p.mtime.clone(),
                renames: p.renames.clone(),
            })
        })
        .collect();
    encode(&CheckRestoreOutput {
        v: OUTPUT_VERSION,
        manifest_sha256,
        nodes,
    })
}

/// Remove every node's staging dir, and the dirs the restore created that are left
/// empty. The stage steps are marked to be redone first, in one transaction, so
/// the record never claims staged data that is gone.
async fn discard_staging(ctx: &Arc<RunCtx>) -> Result<()> {
    // A run that failed after its commit completed (loading the tables into the
    // service) has its data in place and nothing staged: nothing to discard, and
    // its stage steps stay done (a resume must not stage again what is in place).
    let run = ctx.run_id;
    let committed = ctx
        .state
        .call(move |s| s.steps(run))
        .await?
        .iter()
        .any(|s| s.action == Action::CommitRestore.name() && s.status == Status::Complete);
    if committed {
        tracing::info!(
            run,
            "the restore's data is in place; nothing staged to discard"
        );
        return Ok(());
    }
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
    let name = ctx.spec.staging_name();
    let mut unreached = Vec::new();
    for n in &ctx.cluster.nodes {
        let op = FsOp::RemoveStaging {
            data_dir: n.data_dir.clone(),
            name: name.clone(),
        };
        if let Err(e) = crate::node::fs::<()>(&*ctx.exec(n), n.index, op).await {
            unreached.push(format!("node {}: {e}", n.index));
        }
    }
    // Dirs the restore created, deepest first, if empty; the data dirs' times.
    let run = ctx.run_id;
    let steps = ctx.state.call(move |s| s.steps(run)).await?;
    if let Some(rec) = steps
        .iter()
        .find(|s| s.action == Action::CheckRestore.name() && s.status == Status::Complete)
        && let Ok(out) = decode::<CheckRestoreOutput>(&rec.id, rec.output.as_deref())
    {
        for t in out.nodes {
            let Some(n) = ctx.cluster.node(t.node) else {
                continue;
            };
            let op = FsOp::Undo {
                made: t.made,
                mtime: t.mtime,
            };
            if let Err(e) = crate::node::fs::<()>(&*ctx.exec(n), n.index, op).await {
                unreached.push(format!("node {}: {e}", n.index));
            }
        }
    }
    if !unreached.is_empty() {
        return Err(Error::Unfinished(format!(
            "the staging dirs of run {run} could not all be removed ({}); `cairn plan resume {run}` or a new restore into the same target removes them",
            unreached.join("; ")
        )));
    }
    Ok(())
}

/// Staging dirs that runs of this state home left in the target and that are no
/// longer running (failed, cancelled, interrupted) are removed — their stage steps
/// marked to be redone first. Staging of runs this home does not know (another
/// home, an earlier cairn) is left alone and named in a warning. Returns whether
/// any was removed.
async fn clean_dead_staging(
    ctx: &Arc<RunCtx>,
    probes: &HashMap<u32, RestoreProbe>,
) -> Result<bool> {
    let prefix = crate::cluster::STAGING_PREFIX;
    if probes.values().all(|p| p.staging.is_empty()) {
        return Ok(false);
    }
    let owners = runs_by(ctx, Action::StageNode, |spec| spec.token.clone()).await?;
    let mut removed = false;
    for n in &ctx.cluster.nodes {
        let Some(probe) = probes.get(&n.index) else {
            continue;
        };
        for name in &probe.staging {
            let Some(token) = name.strip_prefix(prefix) else {
                continue;
            };
            if token == ctx.spec.token {
                continue;
            }
            let path = n.data_dir.join(name);
            match owners.get(token) {
                Some((run, status, _, stage))
                    if !matches!(status, Status::Running | Status::Pending) =>
                {
                    let (run, stage) = (*run, stage.clone());
                    let why = format!("its staging dir was removed by run {}", ctx.run_id);
                    ctx.state
                        .call(move |s| s.set_pending(run, &stage, &why))
                        .await?;
                    tracing::warn!(node = n.index, dir = %path.display(), "removing the staging dir run {run} ({status}) left");
                    let op = FsOp::RemoveStaging {
                        data_dir: n.data_dir.clone(),
                        name: name.clone(),
                    };
                    crate::node::fs::<()>(&*ctx.exec(n), n.index, op).await?;
                    removed = true;
                }
                Some((run, status, _, _)) => tracing::warn!(
                    node = n.index,
                    dir = %path.display(),
                    "run {run} ({status}) is staging into this target too"
                ),
                None => tracing::warn!(
                    node = n.index,
                    dir = %path.display(),
                    "a staging dir of a run this state home does not know is in the target; left alone (remove it if no restore is running)"
                ),
            }
        }
    }
    Ok(removed)
}

/// Snapshots that runs of this state home left on nodes and no longer need (the
/// run failed, was cancelled or was killed, and was never resumed) pin files the
/// service has deleted: removed, the runs' snapshot steps marked to be redone
/// first. A snapshot of a running run, or of a run this home does not know, is
/// left alone and named in a warning.
async fn clean_dead_snapshots(ctx: &Arc<RunCtx>, stale: &[(&Node, String)]) -> Result<()> {
    let owners = runs_by(ctx, Action::SnapshotNode, |spec| spec.snap_name()).await?;
    for (n, name) in stale {
        let path = n.data_dir.join(name);
        match owners.get(name) {
            Some((run, status, snapshot, steps))
                if !matches!(status, Status::Running | Status::Pending) =>
            {
                let (run, steps) = (*run, steps.clone());
                let why = format!("its node snapshots were removed by run {}", ctx.run_id);
                ctx.state
                    .call(move |s| s.set_pending(run, &steps, &why))
                    .await?;
                tracing::warn!(node = n.index, dir = %path.display(), "removing the snapshot run {run} ({status}) left");
                let mut t = take_job(ctx, n);
                t.snapshot = snapshot.clone();
                let op = FsOp::DropSnapshot(crate::node::capture::DropSnapshot {
                    node: n.index,
                    data_dir: t.data_dir,
                    name: name.clone(),
                    capture: t.capture,
                    snapshot: t.snapshot,
                    env: t.env,
                });
                crate::node::fs::<()>(&*ctx.exec(n), n.index, op).await?;
            }
            Some((run, status, _, _)) => tracing::warn!(
                node = n.index,
                dir = %path.display(),
                "run {run} ({status}) is taking a snapshot of this node too"
            ),
            None => tracing::warn!(
                node = n.index,
                dir = %path.display(),
                "a snapshot of a run this state home does not know is in the data dir; left alone (remove it if no backup is running)"
            ),
        }
    }
    Ok(())
}

/// The runs this state home knows, by `key` of their spec (their staging or
/// snapshot dir's name): id, status, snapshot name and their steps of `action`.
async fn runs_by(
    ctx: &RunCtx,
    action: Action,
    key: fn(&crate::spec::RunSpec) -> String,
) -> Result<HashMap<String, (i64, Status, String, Vec<String>)>> {
    let runs = ctx.state.call(|s| s.runs(10_000)).await?;
    Ok(runs
        .into_iter()
        .filter_map(|r| {
            let spec = crate::spec::RunSpec::from_json(r.spec_json.as_deref()?).ok()?;
            let steps = spec
                .steps
                .iter()
                .filter(|s| s.action == action)
                .map(|s| s.id.clone())
                .collect();
            Some((key(&spec), (r.id, r.status, spec.snapshot.clone(), steps)))
        })
        .collect())
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
            let out = decode::<NodeOutput>(&step.id, output).map_err(|e| e.to_string())?;
            // The earlier snapshots' objects holding its unchanged files: a delete
            // while this run waited may have taken them (the node is then backed up
            // again, in full).
            for r in &out.refs {
                match ctx.store.head(&r.key).await {
                    Ok(Some(meta)) if meta.size == r.size => {}
                    Ok(_) => {
                        return Err(format!(
                            "{} holding unchanged files of node {} is gone or changed",
                            r.key, out.node.index
                        ));
                    }
                    Err(e) => return Err(format!("object {}: {e}", r.key)),
                }
            }
            out.object
        }
        Action::BackupManager => {
            decode::<ManagerOutput>(&step.id, output)
                .map_err(|e| e.to_string())?
                .object
        }
        Action::StageNode => {
            // Staged data has served once the commit moved it in (its staging dir
            // is gone then): the commit's own record stands for it.
            let committed = ctx
                .state
                .steps(ctx.run_id)
                .map_err(|e| e.to_string())?
                .iter()
                .any(|r| {
                    r.action == Action::CommitRestore.name()
                        && r.status == crate::state::Status::Complete
                });
            if committed {
                return Ok(());
            }
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
            let job = CheckStagedJob {
                node: node.index,
                snapshot: ctx.spec.snapshot.clone(),
                manifest_sha256: manifest_digest(m).map_err(|e| e.to_string())?,
                staging: staging_dir(ctx, node),
                out,
                read_content: depth == Depth::Content,
                paths: ctx.spec.selection.paths.clone(),
                keys: ctx.spec.keys.clone(),
                renames: renames_of(ctx, node.index).map_err(|e| e.to_string())?,
            };
            return match ctx.exec(node).check_staged(&job).await {
                Ok(None) => Ok(()),
                Ok(Some(why)) => Err(why),
                Err(e) => Err(e.to_string()),
            };
        }
        Action::SnapshotNode => {
            // A snapshot has served once its node's backup is done; until then it
            // must still be on the node, complete.
            let node = step
                .node
                .and_then(|i| ctx.cluster.node(i))
                .ok_or_else(|| format!("step {} has no node", step.id))?;
            if ctx.cluster.capture.mode == crate::cluster::SnapshotMode::None {
                return Ok(());
            }
            let backed_up = ctx
                .state
                .steps(ctx.run_id)
                .map_err(|e| e.to_string())?
                .iter()
                .any(|r| {
                    r.action == Action::BackupNode.name()
                        && r.target == format!("node-{}", node.index)
                        && r.status == crate::state::Status::Complete
                });
            if backed_up {
                return Ok(());
            }
            let op = FsOp::SnapshotExists {
                data_dir: node.data_dir.clone(),
                name: ctx.spec.snap_name(),
            };
            return match crate::node::fs::<bool>(&*ctx.exec(node), node.index, op).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!(
                    "the snapshot of node {} is gone (removed after a failure): taken again",
                    node.index
                )),
                Err(e) => Err(e.to_string()),
            };
        }
        Action::BackupSchema => {
            let out = decode::<SchemaOutput>(&step.id, output).map_err(|e| e.to_string())?;
            for a in &out.artifacts {
                object_holds(ctx, None, &a.object, depth).await?;
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    object_holds(
        ctx,
        step.node.and_then(|i| ctx.cluster.node(i)),
        &object,
        depth,
    )
    .await
}

/// Whether an object a step wrote is in the store as it was written.
async fn object_holds(
    ctx: &Arc<RunCtx>,
    node: Option<&Node>,
    object: &ObjectInfo,
    depth: Depth,
) -> std::result::Result<(), String> {
    let key = crate::repo::key(&ctx.spec.snapshot, &object.key);
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
        // A node's object is read again on its node, never through this machine.
        let sha = match node {
            Some(n) => ctx.exec(n).hash_object(&key, &ctx.cancel).await,
            None => crate::node::hash_object(&*ctx.store, &key, &ctx.cancel).await,
        }
        .map_err(|e| format!("object {key}: {e}"))?;
        if sha != object.sha256 {
            return Err(format!(
                "object {key} has SHA-256 {sha}, the step wrote {}",
                object.sha256
            ));
        }
    }
    // A passphrase is not stored: the one given to this resume must open what
    // the earlier attempt encrypted, or the object is made again with it (a
    // snapshot under two passphrases would open with neither).
    if let Some(crate::crypt::EncryptTo::Passphrase(p)) = &ctx.spec.encrypt_to {
        let keys = crate::crypt::Keys::Passphrase(p.clone());
        keys.opens_object(&*ctx.store, &key, &ctx.cancel)
            .await
            .map_err(|e| format!("object {key}: {e}"))?;
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
    let key = crate::repo::key(&ctx.spec.snapshot, MANAGER_OBJECT);
    tracing::info!(state_dir = %m.state_dir.display(), key = %key, "snapshotting the manager");
    abort_leftover_upload(ctx, step, &key).await?;
    let target = crate::manager::catalog::Target {
        key: &key,
        id: &ctx.spec.snapshot,
        include_credentials,
        progress: ctx.progress.clone(),
        step: &step.id,
        encrypt: ctx.spec.encrypt_to.clone(),
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
            index: None,
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
        &crate::repo::key(&ctx.spec.snapshot, MANAGER_OBJECT),
        &status,
        &target,
        force,
        ctx.disk.clone(),
        ctx.spec.keys.as_ref(),
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
    let run = ctx.run_id;
    let steps = ctx.state.call(move |s| s.steps(run)).await?;
    let choice = BackupChoice::of(&steps);
    let base = base_of(ctx, &choice, node.index).await;
    let job = BackupJob {
        base: base.as_ref().map(|(b, _)| b.clone()),
        snapshot: ctx.spec.snapshot.clone(),
        selection: ctx.spec.selection.clone(),
        node: node.clone(),
        phase: step.phase.clone(),
        hook_params: hook_params(ctx),
        leftover_upload,
        encrypt: ctx.spec.encrypt_to.clone(),
        capture: ctx.cluster.capture.clone(),
        snap_name: ctx.spec.snap_name(),
        compression: ctx.spec.compression,
    };
    let events = Arc::new(StepEvents {
        ctx: ctx.clone(),
        step: step.id.clone(),
    });
    let backed = ctx.exec(node).backup(&job, events, &ctx.cancel).await?;
    let refs = refs_of(&backed, base.as_ref())?;
    ctx.state.set_scratch(ctx.run_id, &step.id, None)?;
    encode(&NodeOutput {
        v: OUTPUT_VERSION,
        node: backed.node,
        object: backed.object,
        refs,
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
    let mut references: Vec<ObjectInfo> = Vec::new();
    for out in outputs::<NodeOutput>(&steps, Action::BackupNode)? {
        nodes.push(out.node);
        objects.push(out.object);
        references.extend(out.refs);
    }
    references.sort_by(|a, b| a.key.cmp(&b.key));
    references.dedup_by(|a, b| a.key == b.key);
    let choice = BackupChoice::of(&steps);
    let (parent, differentials) = match (&choice.parent, references.is_empty()) {
        (Some(p), false) => (Some(p.clone()), choice.differentials),
        _ => (None, 0),
    };
    let mut manager = None;
    for out in outputs::<ManagerOutput>(&steps, Action::BackupManager)? {
        objects.push(out.object);
        manager = Some(out.manager);
    }
    let mut artifacts = Vec::new();
    for out in outputs::<SchemaOutput>(&steps, Action::BackupSchema)? {
        for a in out.artifacts {
            artifacts.push(manifest::ArtifactInfo {
                name: a.name,
                object: a.object.key.clone(),
            });
            objects.push(a.object);
        }
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
        tags: ctx.spec.tags.clone(),
        encryption: None,
        artifacts,
        parent,
        differentials,
        references,
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
    let key = crate::repo::key(&ctx.spec.snapshot, MANIFEST);
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
    let stored = match &ctx.spec.encrypt_to {
        Some(to) => m.seal(to)?,
        None => m,
    };
    ctx.store.put(&key, stored.to_bytes()?.into()).await
}

/// `<data_dir>/.cairn-staging-<token>`: on the target file system, so moving into
/// place is a rename; named by the run's token, unique across hosts and homes.
fn staging_dir(ctx: &RunCtx, node: &Node) -> PathBuf {
    node.data_dir.join(ctx.spec.staging_name())
}

async fn stage_node(ctx: &Arc<RunCtx>, step: &StepRef, node: &Node) -> Result<String> {
    let m = ctx.manifest().await?;
    let job = StageJob {
        node: node.index,
        data_dir: node.data_dir.clone(),
        staging: staging_dir(ctx, node),
        snapshot: ctx.spec.snapshot.clone(),
        manifest_sha256: manifest_digest(m)?,
        selection: ctx.spec.selection.clone(),
        token: ctx.spec.token.clone(),
        keys: ctx.spec.keys.clone(),
        owner: ctx.cluster.owner.clone(),
        renames: renames_of(ctx, node.index)?,
    };
    let events = Arc::new(StepEvents {
        ctx: ctx.clone(),
        step: step.id.clone(),
    });
    let out = ctx.exec(node).stage(&job, events, &ctx.cancel).await?;
    encode(&out)
}

async fn commit_restore(ctx: &Arc<RunCtx>, step: &StepRef) -> Result<()> {
    // What pre-flight found may have changed since (a resume): check again.
    let problems = data_dirs_fit(ctx).await;
    if !problems.is_empty() {
        return Err(Error::Refused(problems));
    }
    // Every staged node this commit consumes must hold what its step staged; a
    // missing one is marked to be staged again, never skipped.
    let run = ctx.run_id;
    let records = ctx.state.call(move |s| s.steps(run)).await?;
    // Every node checks its own staging at once (one round trip, not one per node).
    let checks = futures::future::join_all(
        ctx.spec
            .steps
            .iter()
            .filter(|s| s.action == Action::StageNode)
            .map(|s| {
                let rec = records.iter().find(|r| r.id == s.id);
                async move {
                    let ok = match rec {
                        Some(r) if r.status == Status::Complete => {
                            effects_hold(ctx, s, r.output.as_deref(), Depth::Metadata).await
                        }
                        _ => Err("it has not completed".to_string()),
                    };
                    (s.id.clone(), ok)
                }
            }),
    )
    .await;
    let missing: Vec<(String, String)> = checks
        .into_iter()
        .filter_map(|(id, ok)| ok.err().map(|why| (id, why)))
        .collect();
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
        return Err(Error::Refused(vec![format!(
            "nothing was moved into place: staged data is missing or changed ({}); those steps are marked to be redone by `cairn plan resume {run}`",
            lines.join("; ")
        )]));
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
    // What each node would move, in data dir order, as one journal recorded before
    // the first rename, so that a kill mid-commit can be rolled back.
    let mut nodes: Vec<&Node> = ctx.cluster.nodes.iter().collect();
    nodes.sort_by(|a, b| a.data_dir.cmp(&b.data_dir));
    let mut plan: Vec<(&Node, Vec<Move>)> = Vec::new();
    let planned = futures::future::join_all(nodes.iter().map(|n| {
        let op = FsOp::PlanMoves {
            node: n.index,
            staging: staging_dir(ctx, n),
            data_dir: n.data_dir.clone(),
            paths: ctx.spec.selection.paths.clone(),
            parents: parents.get(&n.index).cloned().unwrap_or_default(),
            by_name: ctx.spec.table_by_name,
            renames: renames_of(ctx, n.index).unwrap_or_default(),
        };
        async move { crate::node::fs::<Vec<Move>>(&*ctx.exec(n), n.index, op).await }
    }))
    .await;
    for (n, moves) in nodes.into_iter().zip(planned) {
        let moves = moves?;
        // Nothing is journaled that was not asked for: this node, its staging
        // dir and data dir, a plain relative entry of what is restored.
        if let Some(bad) = moves.iter().find(|m| !move_fits(ctx, n, m)) {
            return Err(Error::Remote {
                node: n.index,
                message: format!(
                    "the node's answer does not hold: it would move {} from {} into {}, which this restore does not",
                    bad.rel.display(),
                    bad.staging.display(),
                    bad.data_dir.display()
                ),
                exit_code: crate::error::exit::FAILED,
                transient: false,
            });
        }
        plan.push((n, moves));
    }
    let journal = encode(&CommitJournal {
        v: OUTPUT_VERSION,
        moves: plan.iter().flat_map(|(_, m)| m.iter().cloned()).collect(),
    })?;
    let sid = step.id.clone();
    ctx.state
        .call(move |s| s.set_scratch(run, &sid, Some(&journal)))
        .await?;
    // Node by node; a node that fails moves back its own, and the nodes before it
    // are rolled back, so that the target is as it was.
    let mut first = 0usize;
    let mut failure = None;
    for (i, (n, moves)) in plan.iter().enumerate() {
        let op = FsOp::Commit {
            moves: moves.clone(),
            first,
        };
        first += moves.len();
        if let Err(e) = crate::node::fs_until::<()>(&*ctx.exec(n), n.index, op, &ctx.cancel).await {
            failure = Some((i, e));
            break;
        }
    }
    if let Some((failed, e)) = failure {
        let mut stuck = Vec::new();
        // The failed node too: it may have died between renames.
        for (n, moves) in plan[..=failed].iter().rev() {
            let op = FsOp::RollBack {
                moves: moves.clone(),
            };
            match crate::node::fs::<RolledBack>(&*ctx.exec(n), n.index, op).await {
                Ok(r) => stuck.extend(r.problems),
                Err(e) => stuck.push(format!("node {}: {e}", n.index)),
            }
        }
        if stuck.is_empty() {
            let sid = step.id.clone();
            ctx.state
                .call(move |s| s.set_scratch(run, &sid, None))
                .await?;
        } else {
            // The journal stays: the next resume or discard rolls back again.
            tracing::error!(
                "the failed commit could not be rolled back everywhere: {}",
                stuck.join("; ")
            );
        }
        undo_manager_restore(ctx).await;
        return Err(e);
    }
    // Every node committed: each finishes (metadata, staging removed) at once.
    let finished = futures::future::join_all(plan.iter().map(|(n, moves)| {
        let op = FsOp::FinishCommit {
            moves: moves.clone(),
            data_dir: n.data_dir.clone(),
            staging: staging_dir(ctx, n),
        };
        async move { crate::node::fs::<()>(&*ctx.exec(n), n.index, op).await }
    }))
    .await;
    finished.into_iter().collect()
}

/// Whether a move a node planned is one this restore makes.
fn move_fits(ctx: &RunCtx, n: &Node, m: &Move) -> bool {
    let plain = |p: &Path| {
        !p.as_os_str().is_empty()
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
    };
    let paths = &ctx.spec.selection.paths;
    let wanted = if ctx.spec.table_by_name {
        // A keyspace, a table in an existing keyspace, an entry of a mapped table.
        (1..=3).contains(&m.rel.components().count())
            && !m
                .rel
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with(RESERVED_PREFIX))
    } else if paths.is_empty() {
        m.rel.components().count() == 1 && !m.rel.to_string_lossy().starts_with(RESERVED_PREFIX)
    } else {
        paths.iter().any(|p| Path::new(p) == m.rel)
    };
    m.node == Some(n.index)
        && m.staging == staging_dir(ctx, n)
        && m.data_dir == n.data_dir
        && plain(&m.rel)
        && wanted
        && m.created
            .iter()
            .all(|c| plain(&c.path) && c.path != m.rel && m.rel.starts_with(&c.path))
}

/// A commit that a kill interrupted is rolled back from its journal: what was moved
/// into a data dir goes back into its staging dir, on each node, so the target is
/// as it was and the staged data is checked again before the commit is redone.
pub async fn roll_back_commit(ctx: &Arc<RunCtx>, step_id: &str) -> Result<()> {
    let (run, sid) = (ctx.run_id, step_id.to_string());
    let rec = ctx.state.call(move |s| s.step(run, &sid)).await?;
    let Some(text) = rec.scratch else {
        return Ok(());
    };
    let journal: CommitJournal = serde_json::from_str(&text)
        .map_err(|e| Error::State(format!("commit journal of run {run}: {e}")))?;
    // Each move to the node whose data dir it is in.
    let mut by_node: Vec<(&Node, Vec<Move>)> = Vec::new();
    let mut problems = Vec::new();
    for m in journal.moves {
        let node = ctx
            .cluster
            .nodes
            .iter()
            .find(|n| m.node.is_none_or(|i| i == n.index) && n.data_dir == m.data_dir);
        let Some(node) = node else {
            problems.push(format!(
                "{}: no node of this run has that data dir",
                m.data_dir.join(&m.rel).display()
            ));
            continue;
        };
        match by_node.iter_mut().find(|(n, _)| n.index == node.index) {
            Some((_, moves)) => moves.push(m),
            None => by_node.push((node, vec![m])),
        }
    }
    let mut moved = 0;
    for (n, moves) in by_node.into_iter().rev() {
        match crate::node::fs::<RolledBack>(&*ctx.exec(n), n.index, FsOp::RollBack { moves }).await
        {
            Ok(r) => {
                problems.extend(r.problems);
                moved += r.moved;
            }
            Err(e) => problems.push(format!("node {}: {e}", n.index)),
        }
    }
    if !problems.is_empty() {
        return Err(Error::Unfinished(format!(
            "the interrupted commit of run {run} could not be rolled back, so nothing else was done: {}",
            problems.join("; ")
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

/// What a complete backup or restore moved (see [`super::Summary`]).
pub async fn summary(ctx: &Arc<RunCtx>, secs: f64) -> Option<super::Summary> {
    let run = ctx.run_id;
    let steps = ctx.state.call(move |s| s.steps(run)).await.ok()?;
    if ctx.plan.has_action(Action::BackupNode) {
        let outs = outputs::<NodeOutput>(&steps, Action::BackupNode).ok()?;
        let referenced = outs
            .iter()
            .flat_map(|o| o.node.files.iter().filter(|f| f.object.is_some()));
        let (files, bytes) =
            referenced.fold((0u64, 0u64), |(n, b), f| (n + 1, b.saturating_add(f.size)));
        let differential = BackupChoice::of(&steps)
            .parent
            .filter(|_| files > 0)
            .map(|parent| super::DifferentialSummary {
                parent,
                unchanged_files: files,
                unchanged_bytes: bytes,
            });
        return Some(
            super::Summary {
                nodes: outs.len(),
                files: outs.iter().map(|o| o.node.file_count).sum(),
                bytes: outs.iter().map(|o| o.node.bytes).sum(),
                stored_bytes: outs.iter().map(|o| o.object.size).sum(),
                duration_secs: secs,
                ratio: 0.0,
                bytes_per_sec: 0.0,
                differential,
            }
            .with_rates(),
        );
    }
    if ctx.plan.has_action(Action::StageNode) {
        let m = ctx.manifest().await.ok()?;
        // What came from the store: the bytes each stage read (a partial restore
        // reads only some blocks), else the objects.
        let read: Vec<u64> = outputs::<StageOutput>(&steps, Action::StageNode)
            .map(|o| o.iter().map(|s| s.read).collect())
            .unwrap_or_default();
        let mut s = super::Summary {
            nodes: 0,
            files: 0,
            bytes: 0,
            stored_bytes: 0,
            duration_secs: secs,
            ratio: 0.0,
            bytes_per_sec: 0.0,
            differential: None,
        };
        for n in &ctx.cluster.nodes {
            let Some(info) = m.node(n.index) else {
                continue;
            };
            s.nodes += 1;
            for f in info
                .files
                .iter()
                .filter(|f| ctx.spec.selection.restores_file(&f.path))
            {
                s.files += 1;
                s.bytes = s.bytes.saturating_add(f.size);
            }
            s.stored_bytes += m.object(&info.object).map_or(0, |o| o.size);
        }
        if !read.is_empty() && read.iter().all(|&r| r > 0) {
            s.stored_bytes = read.iter().sum();
        }
        return Some(s.with_rates());
    }
    None
}
