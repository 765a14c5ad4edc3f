//! Node executors: the work that touches a node's disk runs through [`NodeExec`].
//!
//! [`Local`] does it in this process (the data dir is on this machine); [`Remote`]
//! runs `cairn agent` on the node's own host through an argv prefix from the cluster
//! description (`ssh … host --`, `kubectl exec -i … --`, `env X=1`) and speaks the
//! protocol of [`proto`] over its stdin and stdout. Both run the same functions of
//! this module, so a node reached over SSH does exactly what a local one does, and a
//! node's data goes between its disk and the store, never through the coordinator.

pub mod agent;
pub mod capture;
pub mod command;
pub mod proto;
pub mod remote;
pub mod restore;
pub mod staged;

use crate::archive::pack;
use crate::checks::Disk;
use crate::cluster::{Capture, Node, RESERVED_PREFIX, Selection, data_dir_top, hooks};
use crate::manifest::{NodeInfo, ObjectInfo};
use crate::store::Store;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use remote::Remote;
use restore::{CheckStagedJob, FsOp, StageJob, StageOutput};

/// How a node reaches the run's store: the store's URL and options (credentials
/// included — sent to an agent only over its stdin, never stored or printed).
#[derive(Clone, Serialize, Deserialize)]
pub struct StoreTarget {
    pub url: String,
    pub options: BTreeMap<String, String>,
    /// Bytes per second, for this node's transfers.
    pub bandwidth: Option<u64>,
}

impl std::fmt::Debug for StoreTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTarget")
            .field("url", &self.url)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .field("bandwidth", &self.bandwidth)
            .finish()
    }
}

impl StoreTarget {
    pub async fn open(&self) -> Result<Arc<dyn Store>> {
        let mut store = crate::store::open(&self.url, &self.options).await?;
        if let Some(rate) = self.bandwidth {
            store = Arc::new(crate::store::throttle::Throttled::new(store, rate));
        }
        Ok(store)
    }
}

/// What a backup's pre-flight learns about one node, on the node.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct BackupFacts {
    /// Keyspace directories in the data dir (all of them, selected or not).
    pub keyspaces: Vec<String>,
    /// What refuses the backup on this node, one line each, naming the node.
    pub problems: Vec<String>,
    /// Top-level entries that are no keyspace and are left out.
    pub loose: Vec<String>,
    /// The cairn version that looked.
    pub version: String,
    /// Point-in-time snapshots (`.cairn-snap-*`) of any run in the data dir.
    #[serde(default)]
    pub snaps: Vec<String>,
}

/// One node's backup: what to archive and where to put it.
#[derive(Clone, Serialize, Deserialize)]
pub struct BackupJob {
    pub snapshot: String,
    pub selection: Selection,
    pub node: Node,
    pub phase: String,
    /// The environment of the node's hooks (secrets only those the cluster lists).
    pub hook_params: Vec<(String, String)>,
    /// A multipart upload a killed attempt of this step left open: aborted first.
    pub leftover_upload: Option<String>,
    /// Encrypt the archive (age) to these recipients or this passphrase.
    #[serde(default)]
    pub encrypt: Option<crate::crypt::EncryptTo>,
    /// How the node is captured (snapshot mode, what is left out).
    #[serde(default)]
    pub capture: crate::cluster::Capture,
    /// The run's snapshot dir in the data dir (`.cairn-snap-<token>`).
    #[serde(default)]
    pub snap_name: String,
    /// How the archive is compressed (`COMPRESSION`).
    #[serde(default)]
    pub compression: crate::archive::Codec,
    /// A differential backup's parent: files unchanged since it are referenced
    /// where it holds them, not archived again.
    #[serde(default)]
    pub base: Option<BackupBase>,
}

/// What a differential backup of one node compares with.
#[derive(Clone, Serialize, Deserialize)]
pub struct BackupBase {
    /// The parent snapshot.
    pub parent: String,
    /// The parent's files of this node, each with the object holding it (from the
    /// store's root) and its place there.
    pub files: Vec<crate::manifest::FileInfo>,
    /// Tell a change by SHA-256 (each file of the same size read again), not by
    /// size, time, inode, mode and owner.
    pub rehash: bool,
}

impl BackupJob {
    fn take(&self) -> capture::TakeSnapshot {
        capture::TakeSnapshot {
            node: self.node.index,
            data_dir: self.node.data_dir.clone(),
            name: self.snap_name.clone(),
            selection: self.selection.clone(),
            capture: self.capture.clone(),
            snapshot: self.snapshot.clone(),
            env: self.hook_params.clone(),
        }
    }

    fn drop_job(&self) -> capture::DropSnapshot {
        capture::DropSnapshot {
            node: self.node.index,
            data_dir: self.node.data_dir.clone(),
            name: self.snap_name.clone(),
            capture: self.capture.clone(),
            snapshot: self.snapshot.clone(),
            env: self.hook_params.clone(),
        }
    }
}

/// What a node's backup wrote: its manifest entry and its object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backed {
    pub node: NodeInfo,
    pub object: ObjectInfo,
}

/// Progress of a node's work, as it happens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeEvent {
    /// The transfer started; `total` bytes are expected.
    Started { total: u64 },
    /// Bytes done so far.
    Bytes { done: u64 },
    /// A multipart upload was opened (recorded, so that it is aborted if the step
    /// dies before it completes).
    UploadId { id: String },
}

/// Where a node's events go (the run's progress and state).
pub trait Events: Send + Sync {
    fn event(&self, e: NodeEvent);
}

/// Everything that touches a node's disk.
#[async_trait::async_trait]
pub trait NodeExec: Send + Sync {
    /// Backup pre-flight on the node: data dir, keyspaces, what the archive would
    /// refuse, and whether the node reaches the store.
    async fn inspect_backup(
        &self,
        node: &Node,
        selection: &Selection,
        capture: &Capture,
    ) -> Result<BackupFacts>;

    /// Run the node's hooks and stream its archive into the store.
    async fn backup(
        &self,
        job: &BackupJob,
        events: Arc<dyn Events>,
        cancel: &CancellationToken,
    ) -> Result<Backed>;

    /// A filesystem operation of a restore on the node (see [`FsOp`]); a commit
    /// stops between moves when `cancel` fires (and moves back what it moved).
    async fn fs_until(&self, op: FsOp, cancel: &CancellationToken) -> Result<serde_json::Value>;

    /// [`NodeExec::fs_until`], never cancelled (checks, rollbacks, clean-up).
    async fn fs(&self, op: FsOp) -> Result<serde_json::Value> {
        self.fs_until(op, &CancellationToken::new()).await
    }

    /// Download and unpack the node's archive into its staging dir.
    async fn stage(
        &self,
        job: &StageJob,
        events: Arc<dyn Events>,
        cancel: &CancellationToken,
    ) -> Result<StageOutput>;

    /// Whether a staging dir holds what was staged: `Some(why)` when not.
    async fn check_staged(&self, job: &CheckStagedJob) -> Result<Option<String>>;

    /// SHA-256 of an object of the store, read where the node reads it.
    async fn hash_object(&self, key: &str, cancel: &CancellationToken) -> Result<String>;
}

/// A node that could not be asked in a pre-flight, as lines of its report: its
/// own problems, or the one error naming it.
pub fn problems_of(node: u32, e: Error) -> Vec<String> {
    match e {
        Error::Checks(p) => p,
        e @ Error::Remote { .. } => vec![e.to_string()],
        e => vec![format!("node {node}: {e}")],
    }
}

/// A typed [`NodeExec::fs`].
pub async fn fs<T: serde::de::DeserializeOwned>(
    exec: &dyn NodeExec,
    node: u32,
    op: FsOp,
) -> Result<T> {
    fs_until(exec, node, op, &CancellationToken::new()).await
}

/// A typed [`NodeExec::fs_until`].
pub async fn fs_until<T: serde::de::DeserializeOwned>(
    exec: &dyn NodeExec,
    node: u32,
    op: FsOp,
    cancel: &CancellationToken,
) -> Result<T> {
    let v = exec.fs_until(op, cancel).await?;
    serde_json::from_value(v).map_err(|e| Error::Remote {
        node,
        message: format!("the node's answer cannot be read: {e}"),
        exit_code: crate::error::exit::FAILED,
        transient: false,
    })
}

/// SHA-256 of an object, read from the store here.
pub async fn hash_object(
    store: &dyn Store,
    key: &str,
    cancel: &CancellationToken,
) -> Result<String> {
    crate::store::read_stream(store, key, cancel, |mut r| {
        let mut h = crate::archive::io::HashingReader::new(&mut r);
        std::io::copy(&mut h, &mut std::io::sink())
            .map_err(|e| Error::io("read", std::path::Path::new("object"), e))?;
        Ok(h.finish().1)
    })
    .await
}

/// The node's data dir is on this machine.
pub struct Local {
    pub store: Arc<dyn Store>,
    /// Free space and file systems (a test may stand in for the real disk).
    pub disk: Arc<dyn Disk>,
}

#[async_trait::async_trait]
impl NodeExec for Local {
    async fn inspect_backup(
        &self,
        node: &Node,
        selection: &Selection,
        capture: &Capture,
    ) -> Result<BackupFacts> {
        let (node, selection, capture) = (node.clone(), selection.clone(), capture.clone());
        tokio::task::spawn_blocking(move || inspect_backup(&node, &selection, &capture))
            .await
            .map_err(|e| Error::State(format!("scan worker failed: {e}")))
    }

    async fn backup(
        &self,
        job: &BackupJob,
        events: Arc<dyn Events>,
        cancel: &CancellationToken,
    ) -> Result<Backed> {
        let node = &job.node;
        hooks::run(
            hooks::Which::Pre,
            node,
            &job.phase,
            &job.snapshot,
            &job.hook_params,
            cancel,
        )
        .await?;
        let mut work = stream_node(&*self.store, job, events, cancel).await;
        // The snapshot has served: it goes now (a failed upload keeps it for the
        // step's retry; the run's failure removes it).
        if work.is_ok() && job.capture.mode != crate::cluster::SnapshotMode::None {
            let (drop, stop) = (job.drop_job(), cancel.clone());
            let dropped = tokio::task::spawn_blocking(move || capture::drop_snapshot(&drop, &stop))
                .await
                .map_err(|e| Error::State(format!("snapshot worker failed: {e}")))
                .and_then(|r| r);
            if let Err(e) = dropped {
                work = Err(e);
            }
        }
        let post = hooks::run(
            hooks::Which::Post,
            node,
            &job.phase,
            &job.snapshot,
            &job.hook_params,
            cancel,
        )
        .await;
        let out = work?;
        post?;
        Ok(out)
    }

    async fn fs_until(&self, op: FsOp, cancel: &CancellationToken) -> Result<serde_json::Value> {
        let (disk, cancel) = (self.disk.clone(), cancel.clone());
        tokio::task::spawn_blocking(move || restore::run_fs(op, &*disk, &cancel))
            .await
            .map_err(|e| Error::State(format!("file system worker failed: {e}")))?
    }

    async fn stage(
        &self,
        job: &StageJob,
        events: Arc<dyn Events>,
        cancel: &CancellationToken,
    ) -> Result<StageOutput> {
        restore::stage(&*self.store, job, events, cancel).await
    }

    async fn check_staged(&self, job: &CheckStagedJob) -> Result<Option<String>> {
        restore::check_staged(&*self.store, job).await
    }

    async fn hash_object(&self, key: &str, cancel: &CancellationToken) -> Result<String> {
        hash_object(&*self.store, key, cancel).await
    }
}

/// Backup pre-flight of one node, on its host (blocking).
pub fn inspect_backup(node: &Node, selection: &Selection, capture: &Capture) -> BackupFacts {
    let mut facts = BackupFacts {
        version: crate::VERSION.to_string(),
        ..BackupFacts::default()
    };
    let n = node.index;
    if !node.data_dir.is_dir() {
        facts.problems.push(format!(
            "node {n}: data dir {} does not exist or is not a directory",
            node.data_dir.display()
        ));
        return facts;
    }
    // One read of the top of the data dir: keyspaces, what is left out, reserved
    // names that are not cairn's.
    let top = match data_dir_top(&node.data_dir) {
        Ok(top) => top,
        Err(e) => {
            facts.problems.push(format!("node {n}: {e}"));
            return facts;
        }
    };
    facts.problems.extend(top.foreign_reserved.iter().map(|name| {
        format!(
            "node {n}: {name} uses a name reserved for cairn's own files ({RESERVED_PREFIX}*) and would be left out; rename it"
        )
    }));
    let selected: Vec<String> = top
        .keyspaces
        .iter()
        .filter(|k| selection.includes(k))
        .cloned()
        .collect();
    // What the archive would drop or a restore would refuse is refused now.
    let excludes = match capture.excludes() {
        Ok(x) => x,
        Err(e) => {
            facts.problems.push(format!("node {n}: {e}"));
            return facts;
        }
    };
    // A keyspace asked for by name, or every keyspace, left out by the patterns
    // would make a backup of nothing that says COMPLETE.
    if let Some(named) = &selection.keyspaces {
        let gone: Vec<&str> = named
            .iter()
            .filter(|k| selected.contains(k) && excludes.excludes(k))
            .map(String::as_str)
            .collect();
        if !gone.is_empty() {
            facts.problems.push(format!(
                "node {n}: keyspace(s) {} asked for but left out by the cluster's exclude patterns",
                gone.join(", ")
            ));
        }
    }
    if !selected.is_empty() && selected.iter().all(|k| excludes.excludes(k)) {
        facts.problems.push(format!(
            "node {n}: every keyspace selected ({}) is left out by the cluster's exclude patterns; the backup would hold nothing",
            selected.join(", ")
        ));
    }
    match pack::scan(&node.data_dir, &selected, &excludes) {
        Ok(scan) => facts
            .problems
            .extend(scan.refused.into_iter().map(|p| format!("node {n}: {p}"))),
        Err(e) => facts.problems.push(format!("node {n}: {e}")),
    }
    facts.keyspaces = top.keyspaces;
    facts.loose = top.loose;
    facts.snaps = capture::list(&node.data_dir);
    facts
}

/// Scan the node's selected keyspaces and stream them, as one tar.gz, into the
/// store. The upload id is reported before any part is sent.
async fn stream_node(
    store: &dyn Store,
    job: &BackupJob,
    events: Arc<dyn Events>,
    cancel: &CancellationToken,
) -> Result<Backed> {
    let node = &job.node;
    let selection = job.selection.clone();
    let (capture, take, stop) = (job.capture.clone(), job.take(), cancel.clone());
    let base = job.base.clone().filter(|_| job.encrypt.is_none());
    let scan = tokio::task::spawn_blocking(move || {
        // Read from the run's snapshot; a plan without a snapshot phase (or a
        // redone step whose snapshot went) takes it here.
        let root = match capture.mode {
            crate::cluster::SnapshotMode::None => take.data_dir.clone(),
            _ => {
                if !capture::exists(&take.data_dir, &take.name)? {
                    capture::take(&take, &stop)?;
                }
                take.data_dir.join(&take.name)
            }
        };
        let keyspaces: Vec<String> = crate::cluster::keyspaces_on_disk(&root)?
            .into_iter()
            .filter(|k| selection.includes(k))
            .collect();
        let scan = pack::scan(&root, &keyspaces, &capture.excludes()?)?;
        if !scan.refused.is_empty() {
            return Err(Error::Checks(scan.refused));
        }
        let unchanged = match &base {
            Some(b) => {
                let files: pack::Base = b
                    .files
                    .iter()
                    .map(|f| (f.path.clone(), f.clone()))
                    .collect();
                pack::unchanged(&scan, &files, b.rehash)?
            }
            None => pack::Base::new(),
        };
        Ok::<_, Error>((keyspaces, scan, unchanged))
    })
    .await
    .map_err(|e| Error::State(format!("scan worker failed: {e}")))?;
    let (keyspaces, scan, unchanged) = scan?;
    let reused: u64 = unchanged.values().map(|f| f.size).sum();
    let object = crate::repo::node_object(node.index, job.compression);
    let key = crate::repo::key(&job.snapshot, &object);
    if let Some(id) = &job.leftover_upload {
        // Best effort: the upload may have completed just before the kill.
        tracing::info!(key, "aborting the upload a killed attempt left open");
        if let Err(e) = store.abort_multipart(&key, id).await {
            tracing::warn!(
                key,
                "could not abort the upload a killed attempt left open: {e}"
            );
        }
    }
    events.event(NodeEvent::Started {
        total: scan.total_bytes.saturating_sub(reused),
    });
    tracing::info!(node = node.index, files = scan.file_count, bytes = scan.total_bytes, key = %key, "backing up node");
    if let Some(b) = &job.base {
        tracing::info!(
            node = node.index,
            parent = %b.parent,
            unchanged = unchanged.len(),
            unchanged_bytes = reused,
            "differential: files unchanged since the parent are referenced, not archived"
        );
    }
    let (file_count, total_bytes) = (scan.file_count, scan.total_bytes);
    let on_bytes = events.clone();
    let (encrypt, key_name, codec) = (job.encrypt.clone(), key.clone(), job.compression);
    let (packed, size, sha256) = crate::store::upload_stream(
        store,
        &key,
        total_bytes,
        cancel,
        |id| {
            events.event(NodeEvent::UploadId { id: id.to_string() });
        },
        move |sink| {
            let progress = |done| on_bytes.event(NodeEvent::Bytes { done });
            match &encrypt {
                None => Ok(pack::pack_changed(&scan, sink, codec, progress, &unchanged)?.0),
                Some(to) => {
                    // tar → gzip → age: the object is an age file of a .tar.gz. Its
                    // block index is of the gzip inside, of no use to a ranged read
                    // of the age file: it is not kept.
                    let (mut packed, w) = pack::pack(&scan, to.wrap(sink)?, codec, progress)?;
                    w.finish().map_err(|e| Error::io("encrypt", &key_name, e))?;
                    packed.index = Default::default();
                    Ok(packed)
                }
            }
        },
    )
    .await?;
    Ok(Backed {
        node: NodeInfo {
            index: node.index,
            object: object.clone(),
            keyspaces,
            file_count,
            bytes: total_bytes,
            compressed_bytes: size,
            files: packed.files,
            tree: packed.tree,
        },
        object: ObjectInfo {
            key: object,
            size,
            sha256,
            index: (!packed.index.offsets.is_empty()).then_some(crate::manifest::BlockIndex {
                block: packed.index.block,
                offsets: packed.index.offsets,
                total: packed.index.total,
                end: packed.index.end,
            }),
        },
    })
}
