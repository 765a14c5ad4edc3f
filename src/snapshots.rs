//! Snapshots in a store: list (complete or not), verify (read everything back and
//! check every checksum), delete.

use crate::cluster::Selection;
use crate::manifest::{self, MANIFEST, Manifest};
use crate::node::restore::read_object;
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
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// How long the backup took (from the manifest's times).
    pub duration_secs: Option<i64>,
    pub cluster: Option<String>,
    /// Tags given at backup time.
    #[serde(default)]
    pub tags: Vec<String>,
    pub nodes: Option<usize>,
    /// Uncompressed data bytes (from the manifest).
    pub bytes: Option<u64>,
    /// Bytes stored (all objects, listed).
    pub stored_bytes: u64,
    pub objects: usize,
    /// Why a snapshot with a manifest could not be read, if so.
    pub problem: Option<String>,
    /// Newest modification of its objects (Unix seconds), where the store says.
    pub modified: Option<i64>,
    /// The last verification recorded in the store.
    pub verified: Option<VerifyRecord>,
    /// A lock on it (a run writing or reading it, or a stale one).
    pub lock: Option<crate::lock::LockInfo>,
}

/// Where the last verification of each snapshot is recorded.
pub const VERIFY_PREFIX: &str = ".cairn-verify";

fn verify_key(name: &str) -> String {
    format!("{VERIFY_PREFIX}/{name}.json")
}

/// The last verification of a snapshot, kept in the store.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct VerifyRecord {
    pub at: String,
    /// `metadata`, `read-data` or `sample`.
    pub mode: String,
    pub sample_percent: Option<f64>,
    pub ok: bool,
    pub problems: usize,
}

impl VerifyRecord {
    /// Whether data was read back and found good.
    pub fn data_ok(&self) -> bool {
        self.ok && self.mode != "metadata"
    }
}

/// When a snapshot was made: its manifest's finish time, else (incomplete) the
/// newest modification of its objects, in Unix seconds.
pub fn when(s: &SnapshotSummary) -> Option<i64> {
    s.finished_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp())
        .or(s.modified)
}

/// All snapshots (top-level folders) of a store, sorted by name.
pub async fn list(store: &dyn Store) -> Result<Vec<SnapshotSummary>> {
    let mut folders: BTreeMap<String, (u64, usize, bool, Option<i64>)> = BTreeMap::new();
    let mut records = Vec::new();
    let mut locked = BTreeMap::new();
    for o in store.list("").await? {
        let Some((name, rest)) = o.key.split_once('/') else {
            continue;
        };
        if name == VERIFY_PREFIX {
            records.push(o.key.clone());
            continue;
        }
        if name == crate::lock::PREFIX {
            if let Some((snap, _)) = rest.split_once('/') {
                locked.entry(snap.to_string()).or_insert(o.key.clone());
            }
            continue;
        }
        if name.starts_with(crate::cluster::RESERVED_PREFIX) {
            continue;
        }
        let e = folders.entry(name.to_string()).or_default();
        e.0 = e.0.saturating_add(o.size);
        e.1 += 1;
        e.2 |= rest == MANIFEST;
        e.3 = e.3.max(o.modified);
    }
    let mut out = Vec::new();
    for (name, (stored_bytes, objects, has_manifest, modified)) in folders {
        let verified = if records.contains(&verify_key(&name)) {
            crate::store::get_bytes(store, &verify_key(&name), 1 << 20)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        } else {
            None
        };
        let lock = if locked.contains_key(&name) {
            crate::lock::is_locked(store, &name).await?
        } else {
            None
        };
        let mut s = SnapshotSummary {
            name: name.clone(),
            complete: false,
            started_at: None,
            finished_at: None,
            duration_secs: None,
            cluster: None,
            tags: Vec::new(),
            nodes: None,
            bytes: None,
            stored_bytes,
            objects,
            problem: None,
            modified,
            verified,
            lock,
        };
        if has_manifest {
            match checks::read_manifest(store, &name).await {
                Ok(m) => {
                    s.complete = true;
                    s.started_at = Some(m.started_at.clone());
                    s.finished_at = Some(m.finished_at.clone());
                    s.duration_secs = match (
                        chrono::DateTime::parse_from_rfc3339(&m.started_at),
                        chrono::DateTime::parse_from_rfc3339(&m.finished_at),
                    ) {
                        (Ok(a), Ok(b)) => Some((b - a).num_seconds().max(0)),
                        _ => None,
                    };
                    s.cluster = Some(m.cluster.name.clone());
                    s.tags = m.tags.clone();
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
    /// `metadata`, `read-data` or `sample`.
    pub mode: String,
    pub objects: usize,
    /// Node objects read back (all of them with `--read-data`, some with `--sample`).
    pub objects_read: usize,
    pub files: u64,
    pub bytes: u64,
    pub problems: Vec<String>,
    /// What was not checked, and why (an encrypted snapshot read without its key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// How much `verify` checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VerifyMode {
    /// The manifest is valid; every object exists with its recorded size.
    Metadata,
    /// Also download every object and check every checksum.
    ReadData,
    /// Download a random `percent` of the node objects (at least one) and check
    /// everything in them, and the manager snapshot. A node archive is one gzip
    /// stream, so the sample is drawn by object: reading one file means reading
    /// what precedes it.
    Sample(f64),
}

/// Verify a snapshot and record the result in the store (`.cairn-verify/`).
pub async fn verify(
    store: &dyn Store,
    name: &str,
    mode: VerifyMode,
    keys: Option<&crate::crypt::Keys>,
    progress: Arc<dyn Progress>,
    cancel: &CancellationToken,
) -> Result<VerifyReport> {
    crate::spec::check_snapshot_name(name).map_err(Error::Usage)?;
    let outer: Manifest = checks::read_manifest(store, name).await?;
    // An encrypted snapshot without its key: every object's stored bytes are
    // still checked against the manifest, the files inside them cannot be.
    let mut sealed = outer.encryption.is_some() && keys.is_none();
    // A key that does not fit is the caller's problem (refused, nothing
    // recorded); a sealed part that disagrees with the clear part is the
    // snapshot's, and the failed verification is recorded.
    let mut altered = None;
    let m = if sealed {
        outer
    } else {
        match outer.open(keys) {
            Ok(m) => m,
            Err(e @ Error::Archive { .. }) => {
                altered = Some(e.to_string());
                sealed = true;
                outer
            }
            Err(e) => return Err(e),
        }
    };
    // Keys open the objects of an encrypted snapshot; a clear one's are read as is.
    let keys = keys.filter(|_| m.encryption.is_some());
    let mut report = VerifyReport {
        snapshot: name.to_string(),
        mode: match (mode, sealed) {
            (VerifyMode::Metadata, _) => "metadata",
            // What was read is recorded as it was: the stored bytes only.
            (VerifyMode::ReadData, true) => "read-data (encrypted: stored bytes)",
            (VerifyMode::Sample(_), true) => "sample (encrypted: stored bytes)",
            (VerifyMode::ReadData, false) => "read-data",
            (VerifyMode::Sample(_), false) => "sample",
        }
        .into(),
        objects: m.objects.len(),
        objects_read: 0,
        files: 0,
        bytes: 0,
        problems: checks::objects_present(store, name, &m).await,
        note: None,
    };
    report.problems.extend(altered);
    if sealed && keys.is_none() && mode != VerifyMode::Metadata {
        report.note = Some(
            "encrypted snapshot: objects checked byte for byte against the manifest, the files inside them not (give --identity or --passphrase-file)"
                .into(),
        );
    }
    let chosen: Vec<&manifest::NodeInfo> = match mode {
        VerifyMode::Metadata => Vec::new(),
        VerifyMode::ReadData => m.cluster.nodes.iter().collect(),
        VerifyMode::Sample(p) => sample(&m.cluster.nodes, p),
    };
    for node in chosen {
        let Some(object) = m.object(&node.object) else {
            report
                .problems
                .push(format!("node {}: object not listed", node.index));
            continue;
        };
        let key = manifest::key(name, &object.key);
        report.objects_read += 1;
        if sealed {
            if let Err(e) = object_intact(store, &key, object, cancel).await {
                if matches!(e, Error::Cancelled) {
                    return Err(e);
                }
                report.problems.push(e.to_string());
            }
            continue;
        }
        match read_object(
            store,
            &key,
            node.clone(),
            object.clone(),
            Selection::default(),
            None,
            keys.cloned(),
            None,
            Vec::new(),
            {
                let (progress, step) = (progress.clone(), format!("verify/node-{}", node.index));
                move |done| progress.event(crate::progress::Event::Bytes { step: &step, done })
            },
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
    if mode != VerifyMode::Metadata
        && let Some(object) = m.object(manifest::MANAGER_OBJECT)
    {
        report.objects_read += 1;
        let checked = if sealed {
            object_intact(store, &manifest::key(name, &object.key), object, cancel).await
        } else {
            verify_manager(store, name, object, keys, cancel).await
        };
        match checked {
            Ok(()) => {}
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            Err(e) => report
                .problems
                .push(format!("{}: {e}", manifest::MANAGER_OBJECT)),
        }
    }
    // Artifacts (the schema) are read back whole with every data check: they are
    // small, and a restore loads them before any data.
    if mode != VerifyMode::Metadata {
        for a in &m.artifacts {
            let Some(object) = m.object(&a.object) else {
                report.problems.push(format!(
                    "artifact {}: object {} not listed",
                    a.name, a.object
                ));
                continue;
            };
            report.objects_read += 1;
            match object_intact(store, &manifest::key(name, &object.key), object, cancel).await {
                Ok(()) => {}
                Err(Error::Cancelled) => return Err(Error::Cancelled),
                Err(e) => report.problems.push(format!("artifact {}: {e}", a.name)),
            }
        }
    }
    let record = VerifyRecord {
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        mode: report.mode.clone(),
        sample_percent: match mode {
            VerifyMode::Sample(p) => Some(p),
            _ => None,
        },
        ok: report.problems.is_empty(),
        problems: report.problems.len(),
    };
    match serde_json::to_vec_pretty(&record) {
        Ok(b) => {
            if let Err(e) = store.put(&verify_key(name), b.into()).await {
                tracing::warn!("could not record the verification: {e}");
            }
        }
        Err(e) => tracing::warn!("could not record the verification: {e}"),
    }
    Ok(report)
}

/// A random `percent` of the nodes (at least one), in index order.
fn sample(nodes: &[manifest::NodeInfo], percent: f64) -> Vec<&manifest::NodeInfo> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let want = ((nodes.len() as f64 * percent / 100.0).ceil() as usize).clamp(1, nodes.len());
    // xorshift seeded from the clock: a different sample on every run.
    let mut x = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64 | 1;
    let mut idx: Vec<usize> = (0..nodes.len()).collect();
    for i in (1..idx.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        idx.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut chosen: Vec<usize> = idx.into_iter().take(want).collect();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| &nodes[i]).collect()
}

/// The object's stored bytes are those the manifest records: its SHA-256, read
/// with the same reader a resume uses (the size was checked by its listing).
async fn object_intact(
    store: &dyn Store,
    key: &str,
    object: &manifest::ObjectInfo,
    cancel: &CancellationToken,
) -> Result<()> {
    let sha = crate::node::hash_object(store, key, cancel).await?;
    if sha != object.sha256 {
        return Err(Error::archive(
            key,
            format!(
                "object has SHA-256 {sha}, the manifest says {}",
                object.sha256
            ),
        ));
    }
    Ok(())
}

/// Download `manager.zip` to a temporary file and check every entry.
async fn verify_manager(
    store: &dyn Store,
    name: &str,
    object: &manifest::ObjectInfo,
    keys: Option<&crate::crypt::Keys>,
    cancel: &CancellationToken,
) -> Result<()> {
    let tmp = tempfile::NamedTempFile::new()
        .map_err(|e| Error::io("create a temporary file in", std::env::temp_dir(), e))?;
    crate::manager::catalog::download_into(
        store,
        &manifest::key(name, &object.key),
        Some(object.size),
        Some(&object.sha256),
        tmp.path(),
        keys,
        cancel,
    )
    .await?;
    tokio::task::spawn_blocking(move || crate::manager::zipfile::read(tmp.path(), None).map(|_| ()))
        .await
        .map_err(|e| Error::State(format!("verify worker failed: {e}")))?
}

/// Delete a snapshot: the manifest first, so it is marked incomplete at once and
/// never restored half-deleted; then every other object.
pub async fn delete(store: &dyn Store, name: &str) -> Result<usize> {
    crate::spec::check_snapshot_name(name).map_err(Error::Usage)?;
    let objects = store.list(&format!("{name}/")).await?;
    if objects.is_empty() {
        return Err(Error::NotFound(format!(
            "snapshot {name:?} in {}",
            store.describe()
        )));
    }
    let manifest_key = manifest::key(name, MANIFEST);
    store.delete(&manifest_key).await?;
    if let Err(e) = store.delete(&verify_key(name)).await {
        tracing::warn!("could not remove the verification record: {e}");
    }
    let mut n = 1;
    for o in objects.iter().filter(|o| o.key != manifest_key) {
        store.delete(&o.key).await?;
        n += 1;
    }
    Ok(n)
}
