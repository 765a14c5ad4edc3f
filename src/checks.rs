//! Pre-flight checks, run before anything is written or destroyed. Each check
//! collects every problem it finds and reports them all in one
//! [`Error::Checks`], one line each.

use crate::cluster::{Cluster, Selection};
use crate::manifest::{self, MANIFEST, Manifest};
use crate::node::restore::RestoreProbe;
use crate::store::{Store, get_bytes};
use crate::{Error, Result};
use bytes::Bytes;
use std::collections::BTreeSet;
use std::path::Path;

/// Free space of the file system holding a path; a trait so tests can fake a full disk.
pub trait Disk: Send + Sync {
    fn available(&self, path: &Path) -> std::io::Result<u64>;
    /// Which file system holds a path (the device of its nearest existing
    /// ancestor), so that nodes sharing a disk are checked together.
    fn filesystem(&self, path: &Path) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut p = path;
        loop {
            match std::fs::metadata(p) {
                Ok(m) => return Ok(m.dev()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match p.parent() {
                    Some(parent) => p = parent,
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }
}

/// The real file system.
pub struct RealDisk;
impl Disk for RealDisk {
    fn available(&self, path: &Path) -> std::io::Result<u64> {
        // The data dir may not exist yet: ask its nearest existing ancestor.
        let mut p = path;
        loop {
            if p.exists() {
                return fs4::available_space(p);
            }
            match p.parent() {
                Some(parent) => p = parent,
                None => return fs4::available_space(Path::new("/")),
            }
        }
    }
}

/// Space a restore needs beyond the data: 10 % plus 16 MiB.
pub fn with_margin(bytes: u64) -> u64 {
    bytes.saturating_add(bytes / 10).saturating_add(16 << 20)
}

fn done(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Checks(problems))
    }
}

/// Backup pre-flight, after each node looked at itself (`problems`, the keyspaces
/// `found` on all nodes): named keyspaces exist, the snapshot name is free, and the
/// store is reachable and writable.
pub async fn backup(
    mut problems: Vec<String>,
    found: &BTreeSet<String>,
    selection: &Selection,
    store: &dyn Store,
    snapshot: &str,
    probe_key: Option<&str>,
) -> Result<()> {
    if let Some(named) = &selection.keyspaces {
        let absent: Vec<&str> = named
            .iter()
            .filter(|k| !found.contains(*k))
            .map(String::as_str)
            .collect();
        if !absent.is_empty() {
            problems.push(format!(
                "keyspace(s) not found on any node: {}",
                absent.join(", ")
            ));
        }
    }
    if let Err(e) = store.check().await {
        problems.push(e.to_string());
        return done(problems);
    }
    match store.head(&crate::repo::key(snapshot, MANIFEST)).await {
        Ok(Some(_)) => problems.push(format!(
            "snapshot {snapshot:?} already exists and is complete in {}; a complete snapshot is never overwritten: choose another SNAPSHOT_NAME or delete it first",
            store.describe()
        )),
        // A dry run writes nothing, not even the probe.
        Ok(None) => match probe_key {
            None => {}
            Some(probe_key) => match store
                .put(probe_key, Bytes::from_static(b"cairn write probe"))
                .await
            {
                Ok(()) => {
                    if let Err(e) = store.delete(probe_key).await {
                        problems.push(format!("store {} is not writable: {e}", store.describe()));
                    }
                }
                Err(e) => {
                    problems.push(format!("store {} is not writable: {e}", store.describe()))
                }
            },
        },
        Err(e) => problems.push(format!("store {} is not reachable: {e}", store.describe())),
    }
    done(problems)
}

/// Read and validate a snapshot's manifest.
pub async fn read_manifest(store: &dyn Store, snapshot: &str) -> Result<Manifest> {
    let key = crate::repo::key(snapshot, MANIFEST);
    let data = match get_bytes(store, &key, manifest::MAX_MANIFEST_BYTES).await {
        Ok(d) => d,
        Err(Error::NotFound(_)) => {
            return Err(Error::NotFound(format!(
                "snapshot {snapshot:?} in {} has no manifest.json: it does not exist or is incomplete",
                store.describe()
            )));
        }
        Err(e) => return Err(e),
    };
    Manifest::from_bytes(snapshot, &data)
}

/// Every object the manifest names is present with its size.
pub async fn objects_present(store: &dyn Store, snapshot: &str, m: &Manifest) -> Vec<String> {
    // Its own objects, and a differential's in earlier snapshots.
    let own = m
        .objects
        .iter()
        .map(|o| (crate::repo::key(snapshot, &o.key), o.size, "object"));
    let referenced = m
        .references
        .iter()
        .map(|r| (r.key.clone(), r.size, "referenced object"));
    let mut problems = Vec::new();
    for (key, size, what) in own.chain(referenced) {
        match store.head(&key).await {
            Ok(Some(meta)) if meta.size == size => {}
            Ok(Some(meta)) => problems.push(format!(
                "{what} {key} is {} bytes, the manifest says {size}",
                meta.size
            )),
            Ok(None) => problems.push(format!("{what} {key} is missing")),
            Err(e) => problems.push(format!("{what} {key}: {e}")),
        }
    }
    problems
}

/// The snapshot a restore reads, opened (see [`Manifest::open`]): the store
/// answers, and the snapshot is there with its manifest (a missing one is "not found", exit 5, here as in verify and
/// delete; the run is still recorded as refused by its pre-flight).
pub async fn restore_manifest(
    store: &dyn Store,
    snapshot: &str,
    keys: Option<&crate::crypt::Keys>,
) -> Result<Manifest> {
    store
        .check()
        .await
        .map_err(|e| Error::Checks(vec![e.to_string()]))?;
    // An encrypted snapshot is opened here, in the pre-flight: a missing or wrong
    // identity is refused before anything is written.
    match read_manifest(store, snapshot)
        .await
        .and_then(|m| m.open(keys))
    {
        Ok(m) => Ok(m),
        Err(e @ Error::NotFound(_)) => Err(e),
        Err(Error::Refused(p) | Error::Checks(p)) => Err(Error::Checks(p)),
        Err(e) => Err(Error::Checks(vec![e.to_string()])),
    }
}

/// Everything that refuses a restore, all reported together: objects of the
/// snapshot missing or of the wrong size, nodes and keyspaces the snapshot lacks,
/// and what each node's probe found on its host (clashes, links, free space per
/// file system — nodes that share one need its space together).
pub async fn restore(
    cluster: &Cluster,
    selection: &Selection,
    store: &dyn Store,
    snapshot: &str,
    m: &Manifest,
    probes: &std::collections::HashMap<u32, RestoreProbe>,
) -> Result<()> {
    // The objects this restore reads: a partial restore (NODES) is not stopped by
    // a damaged object of a node it leaves alone — salvaging the others is what
    // it is for. The manager snapshot is checked when the whole cluster is.
    let mut needed = m.clone();
    if cluster.partial {
        let nodes: BTreeSet<&str> = cluster
            .nodes
            .iter()
            .filter_map(|n| m.node(n.index))
            .map(|n| n.object.as_str())
            .collect();
        needed.objects.retain(|o| nodes.contains(o.key.as_str()));
        // And the earlier snapshots' objects those nodes' unchanged files are in.
        let held: BTreeSet<&str> = cluster
            .nodes
            .iter()
            .filter_map(|n| m.node(n.index))
            .flat_map(|n| n.files.iter().filter_map(|f| f.object.as_deref()))
            .collect();
        needed.references.retain(|r| held.contains(r.key.as_str()));
    }
    let mut problems = objects_present(store, snapshot, &needed).await;
    let want: BTreeSet<u32> = m.cluster.nodes.iter().map(|n| n.index).collect();
    let have: BTreeSet<u32> = cluster.nodes.iter().map(|n| n.index).collect();
    if cluster.partial {
        let absent: Vec<String> = have.difference(&want).map(u32::to_string).collect();
        if !absent.is_empty() {
            problems.push(format!(
                "node(s) {} are not in snapshot {snapshot:?}",
                absent.join(", ")
            ));
        }
    } else if want != have {
        problems.push(format!(
            "the snapshot has {} node(s) {:?} but the target cluster has {} node(s) {:?}",
            want.len(),
            want,
            have.len(),
            have
        ));
    }
    for p in &selection.paths {
        let found = m.cluster.nodes.iter().any(|n| {
            have.contains(&n.index) && n.files.iter().any(|f| crate::cluster::under(&f.path, p))
        });
        if !found {
            problems.push(format!(
                "PATHS entry {p:?} is no file of snapshot {snapshot:?} and holds none: a partial restore selects files and the directories that hold them (a link or an empty directory comes back only with its keyspace)"
            ));
        }
    }
    if let Some(named) = &selection.keyspaces {
        let in_snapshot: BTreeSet<&str> = m
            .cluster
            .nodes
            .iter()
            .flat_map(|n| n.keyspaces.iter().map(String::as_str))
            .collect();
        let absent: Vec<&str> = named
            .iter()
            .map(String::as_str)
            .filter(|k| !in_snapshot.contains(k))
            .collect();
        if !absent.is_empty() {
            problems.push(format!(
                "keyspace(s) not in snapshot {snapshot:?}: {}",
                absent.join(", ")
            ));
        }
    }
    // (host, file system) → (bytes needed, nodes, a dir on it, free bytes)
    type Fs = (String, u64);
    let mut per_fs: std::collections::BTreeMap<Fs, (u64, Vec<u32>, std::path::PathBuf, u64)> =
        Default::default();
    for node in &cluster.nodes {
        let Some(info) = m.node(node.index) else {
            continue;
        };
        let Some(probe) = probes.get(&node.index) else {
            problems.push(format!("node {}: its target was not looked at", node.index));
            continue;
        };
        problems.extend(probe.problems.iter().cloned());
        let bytes = info
            .files
            .iter()
            .filter(|f| selection.restores_file(&f.path))
            .try_fold(0u64, |a, f| a.checked_add(f.size));
        let Some(bytes) = bytes else {
            problems.push(format!(
                "node {}: the file sizes in the manifest overflow; the manifest is corrupt or hostile",
                node.index
            ));
            continue;
        };
        match (probe.filesystem, probe.free, &probe.disk_error) {
            (Some(fs), Some(free), None) => {
                // Device numbers are per host: nodes reached the same way share a
                // host, other nodes never share its file systems.
                let host = node.exec.join("\u{0}");
                let e = per_fs.entry((host, fs)).or_insert((
                    0u64,
                    Vec::new(),
                    node.data_dir.clone(),
                    free,
                ));
                match e.0.checked_add(with_margin(bytes)) {
                    Some(sum) => e.0 = sum,
                    None => {
                        problems.push(format!("node {}: the restore's size overflows", node.index))
                    }
                }
                e.1.push(node.index);
            }
            (_, _, Some(e)) => problems.push(e.clone()),
            _ => problems.push(format!(
                "node {}: the free space of {} is unknown",
                node.index,
                node.data_dir.display()
            )),
        }
    }
    for (need, nodes, dir, free) in per_fs.into_values() {
        let who = if nodes.len() == 1 {
            format!("node {}", nodes[0])
        } else {
            format!(
                "nodes {} (one file system)",
                nodes
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        if free < need {
            problems.push(format!(
                "{who}: {} has {} free, the restore needs {} (data plus margin)",
                dir.display(),
                human(free),
                human(need),
            ));
        }
    }
    done(problems)
}

/// Bytes in binary units, for messages.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn nodes_sharing_a_file_system_need_its_space_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::memory::MemoryStore::named("checks-per-fs");
        let file = |p: &str| serde_json::json!({"path": p, "size": 60u64 << 20, "sha256": "00"});
        let node = |i: u32| {
            serde_json::json!({"index": i, "object": format!("node-{i}.tar.gz"),
            "keyspaces": ["ks"], "file_count": 1, "bytes": 60u64 << 20, "compressed_bytes": 1,
            "files": [file("ks/t/data.db")]})
        };
        let m = serde_json::json!({"format_version": 1, "cairn_version": "0", "snapshot": "s",
            "plan": "p", "started_at": "", "finished_at": "",
            "cluster": {"name": "c", "nodes": [node(0), node(1)]},
            "objects": [{"key": "node-0.tar.gz", "size": 1, "sha256": "00"},
                        {"key": "node-1.tar.gz", "size": 1, "sha256": "00"}]});
        store
            .put("s/manifest.json", m.to_string().into_bytes().into())
            .await
            .expect("put");
        for i in 0..2 {
            store
                .put(
                    &format!("s/node-{i}.tar.gz"),
                    bytes::Bytes::from_static(b"x"),
                )
                .await
                .expect("put");
        }
        let cluster = Cluster::parse(
            "c.toml",
            "name = \"c\"\n[[nodes]]\nindex = 0\ndata_dir = \"n0\"\n[[nodes]]\nindex = 1\ndata_dir = \"n1\"\n",
            dir.path(),
        )
        .expect("cluster");
        // Each node alone needs 82 MiB (60 + 10 % + 16): 150 MiB free fits one,
        // not both, when the two share a file system.
        let m = read_manifest(&*store, "s").await.expect("manifest");
        let probes = |free: u64, fs: [u64; 2]| {
            (0..2u32)
                .map(|i| {
                    (
                        i,
                        RestoreProbe {
                            filesystem: Some(fs[i as usize]),
                            free: Some(free),
                            ..RestoreProbe::default()
                        },
                    )
                })
                .collect::<std::collections::HashMap<_, _>>()
        };
        let sel = Selection::default();
        let err = restore(&cluster, &sel, &*store, "s", &m, &probes(150 << 20, [7, 7]))
            .await
            .expect_err("refused");
        assert!(
            err.to_string().contains("nodes 0, 1 (one file system)"),
            "{err}"
        );
        restore(&cluster, &sel, &*store, "s", &m, &probes(200 << 20, [7, 7]))
            .await
            .expect("both fit");
        restore(&cluster, &sel, &*store, "s", &m, &probes(150 << 20, [7, 8]))
            .await
            .expect("each fits its own file system");
    }
}
