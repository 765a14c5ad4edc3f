//! Snapshots in a store: list (complete or not), verify (read everything back and
//! check every checksum), delete.

use crate::cluster::Selection;
use crate::manifest::{self, MANIFEST, Manifest};
use crate::node::restore::read_node;
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
    /// A folder without a manifest that keeps objects other snapshots reference
    /// (a deleted snapshot's unchanged files): those snapshots. Never restored,
    /// pruned or reused; swept when the last of them goes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_for: Vec<String>,
    /// A differential's parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// Where the last verification of each snapshot is recorded.
pub use crate::repo::VERIFY as VERIFY_PREFIX;

use crate::repo::verify_key;

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

/// All snapshots (top-level folders) of a store, sorted by name: complete, held
/// (a deleted snapshot's objects others need) or incomplete.
pub async fn list(store: &dyn Store) -> Result<Vec<SnapshotSummary>> {
    let catalog = crate::repo::Catalog::load(store).await?;
    let needed = catalog.needed();
    let mut folders: BTreeMap<&str, (u64, usize, Option<i64>)> = BTreeMap::new();
    let mut records = std::collections::BTreeSet::new();
    let mut locked = std::collections::BTreeSet::new();
    for o in &catalog.listing {
        let Some((name, rest)) = o.key.split_once('/') else {
            continue;
        };
        if name == VERIFY_PREFIX {
            records.insert(o.key.as_str());
        } else if name == crate::lock::PREFIX {
            if let Some((snap, _)) = rest.split_once('/') {
                locked.insert(snap);
            }
        } else if !crate::repo::reserved(name) {
            let e = folders.entry(name).or_default();
            e.0 = e.0.saturating_add(o.size);
            e.1 += 1;
            e.2 = e.2.max(o.modified);
        }
    }
    let mut out = Vec::new();
    for (name, (stored_bytes, objects, modified)) in folders {
        let verified = if records.contains(verify_key(name).as_str()) {
            crate::store::get_bytes(store, &verify_key(name), 1 << 20)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        } else {
            None
        };
        let lock = if locked.contains(name) {
            crate::lock::is_locked(store, name).await?
        } else {
            None
        };
        let mut s = SnapshotSummary {
            name: name.to_string(),
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
            problem: catalog.unreadable.get(name).cloned(),
            modified,
            verified,
            lock,
            held_for: Vec::new(),
            parent: None,
        };
        match catalog.manifests.get(name) {
            Some(m) => {
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
                s.parent = m.parent.clone();
            }
            None => {
                let mut by: Vec<String> = catalog
                    .held_with(&needed, name)
                    .into_iter()
                    .flat_map(|(_, b)| b)
                    .collect();
                by.sort();
                by.dedup();
                s.held_for = by;
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
        objects: m.objects.len() + m.references.len(),
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
    let chosen_nodes: Vec<u32> = chosen.iter().map(|n| n.index).collect();
    for node in chosen {
        let Some(object) = m.object(&node.object) else {
            report
                .problems
                .push(format!("node {}: object not listed", node.index));
            continue;
        };
        let key = crate::repo::key(name, &object.key);
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
        match read_node(
            store,
            name,
            node.clone(),
            object.clone(),
            &m.references,
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
                // The block index is what partial restores read by: each block must
                // start where it says, with the bytes the whole read found there.
                if let Some(index) = &object.index {
                    let whole = (object.size, u.stream_bytes);
                    match check_index(store, &key, &node.object, index, &u.heads, whole, cancel)
                        .await
                    {
                        Ok(()) => {}
                        Err(Error::Cancelled) => return Err(Error::Cancelled),
                        Err(e) => report.problems.push(e.to_string()),
                    }
                }
            }
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    // The earlier snapshots' objects this one reads its unchanged files from:
    // each whole, against the checksum this manifest records for it (the files
    // were checked one by one above, the manifest's claim about the objects is
    // checked here).
    if mode != VerifyMode::Metadata {
        let read: std::collections::BTreeSet<&str> = m
            .cluster
            .nodes
            .iter()
            .filter(|n| mode == VerifyMode::ReadData || chosen_nodes.contains(&n.index))
            .flat_map(|n| n.files.iter().filter_map(|f| f.object.as_deref()))
            .collect();
        for r in m
            .references
            .iter()
            .filter(|r| read.contains(r.key.as_str()))
        {
            report.objects_read += 1;
            match object_intact(store, &r.key, r, cancel).await {
                Ok(()) => {}
                Err(Error::Cancelled) => return Err(Error::Cancelled),
                Err(e) => report.problems.push(format!("referenced {e}")),
            }
        }
    }
    if mode != VerifyMode::Metadata
        && let Some(object) = m.object(manifest::MANAGER_OBJECT)
    {
        report.objects_read += 1;
        let checked = if sealed {
            object_intact(store, &crate::repo::key(name, &object.key), object, cancel).await
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
            match object_intact(store, &crate::repo::key(name, &object.key), object, cancel).await {
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
        &crate::repo::key(name, &object.key),
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

/// Every block of an indexed object decodes, alone, from the offset its index
/// gives, to the bytes a whole read found at its start (`heads`).
async fn check_index(
    store: &dyn Store,
    key: &str,
    object: &str,
    index: &manifest::BlockIndex,
    heads: &[Vec<u8>],
    (object_size, stream_bytes): (u64, u64),
    cancel: &CancellationToken,
) -> Result<()> {
    use std::io::Read;
    let bad = |m: String| Error::archive(key, format!("its block index is wrong: {m}"));
    let codec = crate::archive::Codec::of_object(object).unwrap_or_default();
    // The compressed data ends where the index says: before gzip's final empty
    // block and trailer, at the end of the last zstd frame.
    let trailer = match codec {
        crate::archive::Codec::Gzip => 13,
        crate::archive::Codec::Zstd => 0,
    };
    if index.total != stream_bytes || index.end.checked_add(trailer) != Some(object_size) {
        return Err(bad(format!(
            "it says {} bytes ending at {}, the object holds {stream_bytes} ending at {}",
            index.total,
            index.end,
            object_size.saturating_sub(trailer)
        )));
    }
    if index.block != crate::archive::pargz::BLOCK as u64 || heads.len() != index.offsets.len() {
        return Err(bad(format!(
            "{} blocks of {} bytes indexed, {} read",
            index.offsets.len(),
            index.block,
            heads.len()
        )));
    }
    for (i, &start) in index.offsets.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let next = index.offsets.get(i + 1).copied().unwrap_or(index.end);
        // Enough for the first bytes whatever the block holds (a zstd block is at
        // most 128 KiB).
        let end = next.min(start + (192 << 10));
        let data = {
            use futures::StreamExt;
            let mut s = store.get_range(key, start, end).await?;
            let mut v = Vec::new();
            while let Some(c) = s.next().await {
                v.extend_from_slice(&c?);
            }
            v
        };
        let want = heads[i].clone();
        // Decompression runs on a blocking thread, not the runtime's.
        let matches = tokio::task::spawn_blocking(move || {
            let mut got = vec![0u8; want.len()];
            let decoded = match codec {
                crate::archive::Codec::Gzip => {
                    flate2::read::DeflateDecoder::new(&data[..]).read_exact(&mut got)
                }
                crate::archive::Codec::Zstd => zstd::stream::read::Decoder::new(&data[..])
                    .and_then(|mut d| d.read_exact(&mut got)),
            };
            decoded.is_ok() && got == want
        })
        .await
        .map_err(|e| Error::State(format!("verify worker failed: {e}")))?;
        if !matches {
            return Err(bad(format!(
                "block {i} does not start at offset {start} of {object}"
            )));
        }
    }
    Ok(())
}

/// What [`copy`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    pub snapshot: String,
    pub from: String,
    pub to: String,
    /// Every object copied (the manifest last), with its size.
    pub objects: Vec<(String, u64)>,
    pub bytes: u64,
}

/// Copy snapshot `name` and every object its manifest names from `from` to `to`
/// (any two stores: S3, Azure, a directory). Each object is streamed, never staged:
/// its size and SHA-256 are checked against the manifest as it passes, and again by
/// reading it back from `to`. The manifest is copied last, byte for byte (an
/// encrypted snapshot stays sealed: no key is needed), so the copy is complete only
/// once everything it names is there and verified. A complete snapshot of that name
/// in `to` is never overwritten.
pub async fn copy(
    from: &Arc<dyn Store>,
    to: &Arc<dyn Store>,
    name: &str,
    progress: &dyn Fn(&str, u64),
    cancel: &CancellationToken,
) -> Result<CopyReport> {
    let key = crate::repo::key(name, MANIFEST);
    let raw = crate::store::get_bytes(&**from, &key, manifest::MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!(
                "snapshot {name:?} in {} has no manifest.json: it does not exist or is incomplete",
                from.describe()
            )),
            e => e,
        })?;
    let m = Manifest::from_bytes(name, &raw)?;
    if to.head(&key).await?.is_some() {
        return Err(Error::Refused(vec![format!(
            "{} already holds a complete snapshot {name:?}: a complete snapshot is never overwritten (delete it there first)",
            to.describe()
        )]));
    }
    let there = crate::repo::Catalog::load(&**to).await?;
    if let Some((_, by)) = there.held_for(name).first() {
        return Err(Error::Refused(vec![format!(
            "the folder {name:?} in {} holds objects that {} reference (a deleted snapshot's): copy under another store or delete those first",
            to.describe(),
            by.join(", ")
        )]));
    }
    // A differential's referenced objects: the same bytes there, or none and no
    // other snapshot of that name.
    let mut wanted_refs = Vec::new();
    for r in &m.references {
        let folder = crate::repo::folder_of(&r.key);
        match to.head(&r.key).await? {
            Some(_) => {
                let (size, sha) = digest_of(&**to, &r.key, cancel).await?;
                if size != r.size || sha != r.sha256 {
                    return Err(Error::Refused(vec![format!(
                        "{} holds another {} than the one {name:?} references: the snapshots there are others of the same names",
                        to.describe(),
                        r.key
                    )]));
                }
            }
            None if there.manifests.contains_key(folder) => {
                return Err(Error::Refused(vec![format!(
                    "{} holds another snapshot {folder:?} than the one {name:?} references",
                    to.describe()
                )]));
            }
            None => wanted_refs.push(r),
        }
    }
    // What an earlier, unfinished copy or backup left there (no manifest: an
    // incomplete snapshot) goes first, so the copy holds only what it names.
    for o in to.list(&crate::repo::folder(name)).await? {
        to.delete(&o.key).await?;
    }
    let mut report = CopyReport {
        snapshot: name.to_string(),
        from: from.describe(),
        to: to.describe(),
        objects: Vec::new(),
        bytes: 0,
    };
    let own = m
        .objects
        .iter()
        .map(|o| (crate::repo::key(name, &o.key), o));
    let referenced = wanted_refs.into_iter().map(|r| (r.key.clone(), r));
    for (object_key, o) in referenced.chain(own) {
        copy_object(from, to, &object_key, o.size, &o.sha256, cancel).await?;
        // Verified where it now lives, by reading it back.
        let (size, sha) = digest_of(&**to, &object_key, cancel).await?;
        if size != o.size || sha != o.sha256 {
            return Err(Error::archive(
                &object_key,
                format!(
                    "reads back from {} as {size} bytes with SHA-256 {sha}, not the manifest's {} bytes with {}",
                    to.describe(),
                    o.size,
                    o.sha256
                ),
            ));
        }
        let shown = object_key
            .strip_prefix(&crate::repo::folder(name))
            .unwrap_or(&object_key)
            .to_string();
        progress(&shown, o.size);
        report.objects.push((shown, o.size));
        report.bytes += o.size;
    }
    to.put(&key, raw.clone()).await?;
    report
        .objects
        .push((MANIFEST.to_string(), raw.len() as u64));
    Ok(report)
}

/// Stream one object from `from` to `to`, checking its size and SHA-256 on the
/// way: a mismatch aborts the upload, so nothing wrong becomes visible.
async fn copy_object(
    from: &Arc<dyn Store>,
    to: &Arc<dyn Store>,
    key: &str,
    size: u64,
    sha256: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    use futures::StreamExt;
    use sha2::Digest;
    let mismatch = |seen: u64, sha: &str| {
        Error::archive(
            key,
            format!(
                "is {seen} bytes with SHA-256 {sha} in the source, not the manifest's {size} bytes with {sha256}"
            ),
        )
    };
    // A small object (a schema, a manager snapshot, an empty one) is one put.
    if size <= 8 << 20 {
        let data = crate::store::get_bytes(&**from, key, size).await?;
        let sha = hex::encode(sha2::Sha256::digest(&data));
        if data.len() as u64 != size || sha != sha256 {
            return Err(mismatch(data.len() as u64, &sha));
        }
        return to.put(key, data).await;
    }
    let part_size = crate::store::part_size_for(to.limits(), size);
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let (source, name, want) = (from.clone(), key.to_string(), sha256.to_string());
    let producer = tokio::spawn(async move {
        let mut stream = source.get(&name).await?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = bytes::BytesMut::with_capacity(part_size);
        let mut seen = 0u64;
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk?;
            seen += chunk.len() as u64;
            if seen > size {
                return Err(Error::archive(&name, "is larger than its manifest says"));
            }
            hasher.update(&chunk);
            while !chunk.is_empty() {
                let take = (part_size - buf.len()).min(chunk.len());
                buf.extend_from_slice(&chunk.split_to(take));
                if buf.len() == part_size {
                    let part =
                        std::mem::replace(&mut buf, bytes::BytesMut::with_capacity(part_size));
                    tx.send(part.freeze()).await.map_err(|_| Error::Cancelled)?;
                }
            }
        }
        let sha = hex::encode(hasher.finalize());
        if seen != size || sha != want {
            return Err(Error::archive(
                &name,
                format!(
                    "is {seen} bytes with SHA-256 {sha} in the source, not the manifest's {size} bytes with {want}"
                ),
            ));
        }
        if !buf.is_empty() || seen == 0 {
            tx.send(buf.freeze()).await.map_err(|_| Error::Cancelled)?;
        }
        Ok(())
    });
    let joined = async {
        producer
            .await
            .map_err(|e| Error::State(format!("copy worker failed: {e}")))?
    };
    crate::store::upload_parts(&**to, key, rx, part_size, joined, cancel, |_| {}).await?;
    Ok(())
}

/// Size and SHA-256 of an object, read whole.
async fn digest_of(
    store: &dyn Store,
    key: &str,
    cancel: &CancellationToken,
) -> Result<(u64, String)> {
    use futures::StreamExt;
    use sha2::Digest;
    let mut stream = store.get(key).await?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    loop {
        let chunk = tokio::select! {
            c = stream.next() => c,
            _ = cancel.cancelled() => return Err(Error::Cancelled),
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk?;
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// How one node's files differ between two snapshots.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeDiff {
    pub node: u32,
    /// In the second snapshot only.
    pub added: Vec<(String, u64)>,
    /// In the first only.
    pub removed: Vec<(String, u64)>,
    /// In both, with another size or content: (path, size in the first, in the second).
    pub changed: Vec<(String, u64, u64)>,
    pub unchanged: u64,
}

/// The files of `b` against those of `a`, node by node (by index; a node in one
/// snapshot only has all its files added or removed).
pub fn diff(a: &Manifest, b: &Manifest) -> Vec<NodeDiff> {
    let mut indexes: Vec<u32> = a
        .cluster
        .nodes
        .iter()
        .chain(&b.cluster.nodes)
        .map(|n| n.index)
        .collect();
    indexes.sort_unstable();
    indexes.dedup();
    let files = |m: &Manifest, i: u32| -> BTreeMap<String, (u64, String)> {
        m.node(i)
            .map(|n| {
                n.files
                    .iter()
                    .map(|f| (f.path.clone(), (f.size, f.sha256.clone())))
                    .collect()
            })
            .unwrap_or_default()
    };
    indexes
        .into_iter()
        .map(|i| {
            let (fa, fb) = (files(a, i), files(b, i));
            let mut d = NodeDiff {
                node: i,
                ..NodeDiff::default()
            };
            for (path, (size, sha)) in &fb {
                match fa.get(path) {
                    None => d.added.push((path.clone(), *size)),
                    Some((s, h)) if s != size || h != sha => {
                        d.changed.push((path.clone(), *s, *size))
                    }
                    Some(_) => d.unchanged += 1,
                }
            }
            for (path, (size, _)) in &fa {
                if !fb.contains_key(path) {
                    d.removed.push((path.clone(), *size));
                }
            }
            d
        })
        .collect()
}
