//! What each plan action does. Every action is idempotent for a resume: running it
//! again after a crash produces the same result.

use super::{RunCtx, StepRef};
use crate::archive::{pack, unpack};
use crate::cluster::{Node, RESERVED_PREFIX, hooks, keyspaces_on_disk};
use crate::manager::Manager;
use crate::manifest::{
    self, ClusterInfo, MANAGER_OBJECT, MANIFEST, ManagerInfo, Manifest, NodeInfo, ObjectInfo,
};
use crate::plan::Action;
use crate::progress::Event;
use crate::state::Status;
use crate::store::upload_stream;
use crate::{Error, Result, checks};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a backup-node step records for write-manifest.
#[derive(Debug, Serialize, Deserialize)]
struct NodeOutput {
    node: NodeInfo,
    object: ObjectInfo,
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
            checks::backup(
                &ctx.cluster,
                &ctx.selection,
                &*ctx.store,
                &ctx.snapshot,
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
            let m = checks::restore(
                &ctx.cluster,
                &ctx.selection,
                &*ctx.store,
                &ctx.snapshot,
                &*ctx.disk,
            )
            .await?;
            if let Some(force) = restore_manager_mode(ctx)? {
                let m_ = manager_of(ctx)?;
                check_manager_restore(&m, &m_, force)?;
            }
            // The stage steps use the manifest the checks validated: read once.
            let _ = ctx.manifest.set(m);
            Ok(None)
        }
        Action::StageNode => stage_node(ctx, step, node()?).await.map(Some),
        Action::CommitRestore => commit_restore(ctx).await.map(|()| None),
        Action::BackupManager => backup_manager(ctx, step).await.map(Some),
        Action::RestoreManager => restore_manager(ctx).await,
        Action::DiscardStaging => {
            for n in &ctx.cluster.nodes {
                remove_staging(&staging_dir(ctx, n)).await;
            }
            Ok(None)
        }
    }
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

/// `RESTORE_MANAGER`: `None` (false, the default), `Some(false)` (true: only onto a
/// clean manager) or `Some(true)` (force).
fn restore_manager_mode(ctx: &RunCtx) -> Result<Option<bool>> {
    match ctx.params.get("RESTORE_MANAGER") {
        "" | "false" => Ok(None),
        "true" => Ok(Some(false)),
        "force" => Ok(Some(true)),
        other => Err(Error::Params(vec![format!(
            "RESTORE_MANAGER {other:?} is none of true, false, force"
        )])),
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
    manager: ManagerInfo,
    object: ObjectInfo,
}

async fn backup_manager(ctx: &Arc<RunCtx>, step: &StepRef) -> Result<String> {
    let m = manager_of(ctx)?;
    let include_credentials = ctx.params.get("MANAGER_CREDENTIALS") == "true";
    let key = manifest::key(&ctx.snapshot, MANAGER_OBJECT);
    tracing::info!(state_dir = %m.state_dir.display(), key = %key, "snapshotting the manager");
    abort_leftover_upload(ctx, step, &key).await?;
    let target = crate::manager::catalog::Target {
        key: &key,
        id: &ctx.snapshot,
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
    serde_json::to_string(&out).map_err(|e| Error::State(e.to_string()))
}

async fn restore_manager(ctx: &Arc<RunCtx>) -> Result<Option<String>> {
    let Some(force) = restore_manager_mode(ctx)? else {
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
    let status = crate::manager::catalog::from_manifest(&ctx.snapshot, info, obj);
    let report = crate::manager::catalog::restore_key(
        &*ctx.store,
        &manifest::key(&ctx.snapshot, MANAGER_OBJECT),
        &status,
        &target,
        force,
        ctx.disk.clone(),
        &ctx.cancel,
    )
    .await?;
    serde_json::to_string(&report)
        .map(Some)
        .map_err(|e| Error::State(e.to_string()))
}

async fn backup_node(ctx: &Arc<RunCtx>, step: &StepRef, node: &Node) -> Result<String> {
    hooks::run(
        hooks::Which::Pre,
        node,
        &step.phase,
        &ctx.snapshot,
        &ctx.params,
        &ctx.cancel,
    )
    .await?;
    let work = stream_node(ctx, step, node).await;
    let post = hooks::run(
        hooks::Which::Post,
        node,
        &step.phase,
        &ctx.snapshot,
        &ctx.params,
        &ctx.cancel,
    )
    .await;
    let out = work?;
    post?;
    Ok(out)
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

async fn stream_node(ctx: &Arc<RunCtx>, step: &StepRef, node: &Node) -> Result<String> {
    let data_dir = node.data_dir.clone();
    let selection = ctx.selection.clone();
    let scan = tokio::task::spawn_blocking(move || {
        let keyspaces: Vec<String> = keyspaces_on_disk(&data_dir)?
            .into_iter()
            .filter(|k| selection.includes(k))
            .collect();
        let scan = pack::scan(&data_dir, &keyspaces)?;
        Ok::<_, Error>((keyspaces, scan))
    })
    .await
    .map_err(|e| Error::State(format!("scan worker failed: {e}")))?;
    let (keyspaces, scan) = scan?;
    let object = manifest::node_object(node.index);
    let key = manifest::key(&ctx.snapshot, &object);
    abort_leftover_upload(ctx, step, &key).await?;
    ctx.progress.event(Event::StepStarted {
        step: &step.id,
        total: Some(scan.total_bytes),
    });
    tracing::info!(node = node.index, files = scan.file_count, bytes = scan.total_bytes, key = %key, "backing up node");
    let progress = ctx.progress.clone();
    let step_id = step.id.clone();
    let (file_count, total_bytes) = (scan.file_count, scan.total_bytes);
    let (files, size, sha256) = upload_stream(
        &*ctx.store,
        &key,
        total_bytes,
        &ctx.cancel,
        record_upload_id(ctx, step),
        move |sink| {
            let (files, _) = pack::pack(&scan, sink, |done| {
                progress.event(Event::Bytes {
                    step: &step_id,
                    done,
                })
            })?;
            Ok(files)
        },
    )
    .await?;
    ctx.state.set_scratch(ctx.run_id, &step.id, None)?;
    let out = NodeOutput {
        node: NodeInfo {
            index: node.index,
            object: object.clone(),
            keyspaces,
            file_count,
            bytes: total_bytes,
            compressed_bytes: size,
            files,
        },
        object: ObjectInfo {
            key: object,
            size,
            sha256,
        },
    };
    serde_json::to_string(&out).map_err(|e| Error::State(e.to_string()))
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
            let (Status::Complete, Some(out)) = (s.status, &s.output) else {
                return Err(Error::State(format!("step {} has not completed", s.id)));
            };
            serde_json::from_str(out)
                .map_err(|e| Error::State(format!("step {} output: {e}", s.id)))
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
        snapshot: ctx.snapshot.clone(),
        plan: ctx.plan.name.clone(),
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
    let missing = checks::objects_present(&*ctx.store, &ctx.snapshot, &m).await;
    if !missing.is_empty() {
        return Err(Error::store("verify", &ctx.snapshot, missing.join("; ")));
    }
    let key = manifest::key(&ctx.snapshot, MANIFEST);
    if ctx.store.head(&key).await?.is_some() {
        return Err(Error::Checks(vec![format!(
            "snapshot {:?} became complete while this run was writing it; it is never overwritten",
            ctx.snapshot
        )]));
    }
    ctx.store.put(&key, m.to_bytes()?.into()).await
}

/// `<data_dir>/.cairn-staging-<run>`: on the target file system, so moving into place
/// is a rename.
fn staging_dir(ctx: &RunCtx, node: &Node) -> PathBuf {
    node.data_dir
        .join(format!("{RESERVED_PREFIX}-staging-{}", ctx.run_id))
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
    std::fs::create_dir_all(&staging).map_err(|e| Error::io("create staging dir", &staging, e))?;
    let result =
        download_and_unpack(ctx, step, &info, &object, unpack::Mode::Extract(&staging)).await;
    match result {
        Ok(done) => Ok(serde_json::json!({"files": done.files, "bytes": done.bytes}).to_string()),
        Err(e) => {
            remove_staging(&staging).await;
            Err(e)
        }
    }
}

/// Stream an object from the store through [`unpack::unpack`] on a blocking thread.
pub async fn download_and_unpack(
    ctx: &RunCtx,
    step: &StepRef,
    info: &NodeInfo,
    object: &ObjectInfo,
    mode: unpack::Mode<'_>,
) -> Result<unpack::Unpacked> {
    let restoring: u64 = info
        .files
        .iter()
        .filter(|f| ctx.selection.restores_file(&f.path))
        .map(|f| f.size)
        .sum();
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
        &manifest::key(&ctx.snapshot, &object.key),
        info.clone(),
        object.clone(),
        ctx.selection.clone(),
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

async fn commit_restore(ctx: &Arc<RunCtx>) -> Result<()> {
    let plan: Vec<(PathBuf, PathBuf)> = ctx
        .cluster
        .nodes
        .iter()
        .map(|n| (staging_dir(ctx, n), n.data_dir.clone()))
        .collect();
    let paths = ctx.selection.paths.clone();
    let result = tokio::task::spawn_blocking(move || commit_blocking(&plan, &paths))
        .await
        .map_err(|e| Error::State(format!("commit worker failed: {e}")))?;
    if result.is_err() {
        undo_manager_restore(ctx).await;
    }
    result
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
    let Some(report) = step
        .output
        .as_deref()
        .and_then(|o| serde_json::from_str::<serde_json::Value>(o).ok())
    else {
        return;
    };
    let pre = report["pre_restore"].as_str().map(PathBuf::from);
    let undone = manager_of(ctx).and_then(|m| crate::manager::restore::undo(&m, pre.as_deref()));
    match undone {
        Ok(_) => {
            tracing::warn!("the node commit failed: the manager's previous state is back");
            if let Err(e) = ctx
                .state
                .set_step(run, &step.id, Status::Pending, None, None)
            {
                tracing::error!("could not mark {} to be redone: {e}", step.id);
            }
        }
        Err(e) => tracing::error!(
            "the node commit failed and the manager state could not be put back: {e}; `cairn manager-snapshot rollback` does it"
        ),
    }
}

/// Move every staged keyspace (or, for a partial restore, every staged path) into
/// its data dir; on any failure move back what was moved, so the target is as it
/// was.
fn commit_blocking(plan: &[(PathBuf, PathBuf)], paths: &[String]) -> Result<()> {
    let mut moves = Vec::new();
    for (staging, data_dir) in plan {
        if !paths.is_empty() {
            for p in paths {
                let from = staging.join(p);
                if std::fs::symlink_metadata(&from).is_ok() {
                    moves.push((from, data_dir.join(p)));
                }
            }
            continue;
        }
        let rd = match std::fs::read_dir(staging) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("list", staging, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("list", staging, e))?;
            moves.push((entry.path(), data_dir.join(entry.file_name())));
        }
    }
    moves.sort();
    let mut done: Vec<&(PathBuf, PathBuf)> = Vec::new();
    let mut failure = None;
    for m in &moves {
        if m.1.exists() {
            failure = Some(Error::Checks(vec![format!(
                "{} appeared while the restore ran; nothing was moved into place",
                m.1.display()
            )]));
            break;
        }
        if let Some(parent) = m.1.parent()
            && let Err(e) = std::fs::create_dir_all(parent)
        {
            failure = Some(Error::io("create", parent, e));
            break;
        }
        if let Err(e) = std::fs::rename(&m.0, &m.1) {
            failure = Some(Error::io("move into place", &m.1, e));
            break;
        }
        done.push(m);
    }
    if let Some(e) = failure {
        for (from, to) in done.into_iter().rev() {
            if let Err(err) = std::fs::rename(to, from) {
                tracing::error!(path = %to.display(), "could not roll back: {err}");
            }
        }
        return Err(e);
    }
    for (staging, data_dir) in plan {
        // What is left of a partial restore's staging dir are the empty parents of
        // the paths moved out.
        let removed = if paths.is_empty() {
            std::fs::remove_dir(staging)
        } else {
            std::fs::remove_dir_all(staging)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove staging dir", staging, e)),
        }
        if let Ok(d) = std::fs::File::open(data_dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
