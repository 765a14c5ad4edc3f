//! Snapshots in a store: list (complete or not), verify (read everything back and
//! check every checksum), delete.

use crate::cluster::Selection;
use crate::engine::actions::read_object;
use crate::manifest::{self, MANIFEST, Manifest};
use crate::progress::Progress;
use crate::store::Store;
use crate::{Error, Result, checks};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    pub name: String,
    pub complete: bool,
    /// From the manifest when complete.
    pub finished_at: Option<String>,
    pub cluster: Option<String>,
    pub nodes: Option<usize>,
    /// Uncompressed data bytes (from the manifest).
    pub bytes: Option<u64>,
    /// Bytes stored (all objects, listed).
    pub stored_bytes: u64,
    pub objects: usize,
    /// Why a snapshot with a manifest could not be read, if so.
    pub problem: Option<String>,
}

/// All snapshots (top-level folders) of a store, sorted by name.
pub async fn list(store: &dyn Store) -> Result<Vec<SnapshotSummary>> {
    let mut folders: BTreeMap<String, (u64, usize, bool)> = BTreeMap::new();
    for o in store.list("").await? {
        let Some((name, rest)) = o.key.split_once('/') else {
            continue;
        };
        if name.starts_with(crate::cluster::RESERVED_PREFIX) {
            continue;
        }
        let e = folders.entry(name.to_string()).or_default();
        e.0 += o.size;
        e.1 += 1;
        e.2 |= rest == MANIFEST;
    }
    let mut out = Vec::new();
    for (name, (stored_bytes, objects, has_manifest)) in folders {
        let mut s = SnapshotSummary {
            name: name.clone(),
            complete: false,
            finished_at: None,
            cluster: None,
            nodes: None,
            bytes: None,
            stored_bytes,
            objects,
            problem: None,
        };
        if has_manifest {
            match checks::read_manifest(store, &name).await {
                Ok(m) => {
                    s.complete = true;
                    s.finished_at = Some(m.finished_at.clone());
                    s.cluster = Some(m.cluster.name.clone());
                    s.nodes = Some(m.cluster.nodes.len());
                    s.bytes = Some(m.total_bytes());
                }
                Err(e) => s.problem = Some(e.to_string()),
            }
        }
        out.push(s);
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub snapshot: String,
    pub objects: usize,
    pub files: u64,
    pub bytes: u64,
    pub problems: Vec<String>,
}

/// Download every object of a snapshot and check its size and SHA-256, and every
/// file inside against the manifest. Writes nothing.
pub async fn verify(
    store: &dyn Store,
    name: &str,
    progress: Arc<dyn Progress>,
    cancel: &CancellationToken,
) -> Result<VerifyReport> {
    let m: Manifest = checks::read_manifest(store, name).await?;
    let mut report = VerifyReport {
        snapshot: name.to_string(),
        objects: m.objects.len(),
        files: 0,
        bytes: 0,
        problems: checks::objects_present(store, name, &m).await,
    };
    for node in &m.cluster.nodes {
        let Some(object) = m.object(&node.object) else {
            report
                .problems
                .push(format!("node {}: object not listed", node.index));
            continue;
        };
        let key = manifest::key(name, &object.key);
        match read_object(
            store,
            &key,
            node.clone(),
            object.clone(),
            Selection::default(),
            None,
            progress.clone(),
            format!("verify/node-{}", node.index),
            cancel,
        )
        .await
        {
            Ok(u) => {
                report.files += u.files;
                report.bytes += u.bytes;
            }
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    if let Some(object) = m.object(manifest::MANAGER_OBJECT) {
        match verify_manager(store, name, object).await {
            Ok(()) => {}
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            Err(e) => report
                .problems
                .push(format!("{}: {e}", manifest::MANAGER_OBJECT)),
        }
    }
    Ok(report)
}

/// Download `manager.zip` to a temporary file and check every entry.
async fn verify_manager(
    store: &dyn Store,
    name: &str,
    object: &manifest::ObjectInfo,
) -> Result<()> {
    let tmp = tempfile::NamedTempFile::new()
        .map_err(|e| Error::io("create a temporary file in", std::env::temp_dir(), e))?;
    crate::manager::catalog::download_into(
        store,
        &manifest::key(name, &object.key),
        Some(object.size),
        Some(&object.sha256),
        tmp.path(),
    )
    .await?;
    tokio::task::spawn_blocking(move || crate::manager::zipfile::read(tmp.path(), None).map(|_| ()))
        .await
        .map_err(|e| Error::State(format!("verify worker failed: {e}")))?
}

/// Delete a snapshot: the manifest first, so it is marked incomplete at once and
/// never restored half-deleted; then every other object.
pub async fn delete(store: &dyn Store, name: &str) -> Result<usize> {
    crate::store::check_key(name)
        .map_err(|_| Error::Usage(format!("{name:?} is not a snapshot name")))?;
    let objects = store.list(&format!("{name}/")).await?;
    if objects.is_empty() {
        return Err(Error::NotFound(format!(
            "snapshot {name:?} in {}",
            store.describe()
        )));
    }
    let manifest_key = manifest::key(name, MANIFEST);
    store.delete(&manifest_key).await?;
    let mut n = 1;
    for o in objects.iter().filter(|o| o.key != manifest_key) {
        store.delete(&o.key).await?;
        n += 1;
    }
    Ok(n)
}
