//! The snapshot manifest, `<snapshot>/manifest.json`, written last: its presence
//! means the snapshot is complete.
//!
//! Format 2 adds where things are inside each node object, so one file can be read
//! without the rest: the object's block index (where each independently compressed
//! block starts), each file's tar entry (offset and length in the uncompressed
//! stream) and the node's directories and symbolic links with their metadata.
//! Format 1 manifests (none of that) are still read: [`Manifest::from_bytes`] takes
//! them as format 2 with no index, and readers then read whole objects, as format 1
//! did.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 3;
/// The first format with differential snapshots (a parent, references to its
/// objects, and what a file's change is told by).
pub const DIFFERENTIAL_FORMAT: u32 = 3;
/// The oldest format still read.
pub const OLDEST_FORMAT: u32 = 1;
pub use crate::repo::{MANAGER_OBJECT, MANIFEST};
/// A manifest larger than this is refused (a hostile store cannot exhaust memory).
pub const MAX_MANIFEST_BYTES: u64 = 512 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub cairn_version: String,
    pub snapshot: String,
    pub plan: String,
    pub started_at: String,
    pub finished_at: String,
    pub cluster: ClusterInfo,
    /// Every object of the snapshot except the manifest itself.
    pub objects: Vec<ObjectInfo>,
    /// The manager snapshot (`manager.zip`) of this snapshot, if it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<ManagerInfo>,
    /// Tags given at backup time (`-p TAGS=pre-upgrade`): `snapshots prune` leaves
    /// a tagged snapshot alone unless `--tag` selects it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Client-side encryption: how, and the private part — keyspaces, file names
    /// and hashes — sealed for the same recipients. Those fields are empty in the
    /// clear part; [`Manifest::open`] gives them back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Service artifacts (the schema): each is an object of `objects` too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactInfo>,
    /// The snapshot this one is a differential of (format 3): only files new or
    /// changed since it are in this snapshot's node objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Differential backups since the last full one (0 for a full backup).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub differentials: u32,
    /// Objects of other snapshots that hold unchanged files of this one (format
    /// 3), keyed from the store's root (`nightly-1/node-0.tar.gz`), each with its
    /// block index: a restore reads only the files it needs from them. They are
    /// kept as long as a snapshot references them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<ObjectInfo>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ArtifactInfo {
    /// Its name in the cluster description (`schema`).
    pub name: String,
    /// Its object, relative to the snapshot folder (`schema.cql`).
    pub object: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub scheme: crate::crypt::Scheme,
    /// The whole manifest (this field with an empty `private`), an armored age
    /// file.
    pub private: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManagerInfo {
    /// Its snapshot format (see `manager::format`).
    pub format: u32,
    pub manager_version: String,
    pub include_credentials: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterInfo {
    pub name: String,
    pub nodes: Vec<NodeInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub index: u32,
    /// Object key relative to the snapshot folder, e.g. `node-0.tar.gz`.
    pub object: String,
    pub keyspaces: Vec<String>,
    pub file_count: u64,
    /// Bytes of file data before compression.
    pub bytes: u64,
    /// Bytes of the compressed object.
    pub compressed_bytes: u64,
    /// Every regular file, sorted by path.
    pub files: Vec<FileInfo>,
    /// Directories and symbolic links, in archive order (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tree: Vec<TreeEntry>,
}

/// Where an entry's headers and data lie in a node's uncompressed tar stream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Span {
    pub offset: u64,
    /// Headers, data and padding.
    pub length: u64,
}

impl Span {
    /// The first byte after the entry, or `None` when a crafted span overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

/// A directory or symbolic link of a node: what a restore that reads only some
/// files of the archive needs to recreate the ones above and beside them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TreeEntry {
    /// As in the archive, `/`-separated, without a trailing `/`.
    pub path: String,
    /// Where it is in the tar stream (its order among the files).
    pub offset: u64,
    /// A symbolic link's target; `None` for a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Permission bits.
    pub mode: u32,
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Where each independently compressed block of a node object starts (format 2):
/// block `i` holds uncompressed bytes `[i × block, (i + 1) × block)` and starts at
/// compressed offset `offsets[i]`; a raw inflater can start there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockIndex {
    /// Uncompressed bytes per block.
    pub block: u64,
    pub offsets: Vec<u64>,
    /// Uncompressed bytes in all.
    pub total: u64,
    /// Compressed offset where the last block ends.
    pub end: u64,
}

impl BlockIndex {
    /// Whether the index is consistent with itself and an object of `size` bytes.
    pub fn is_sound(&self, size: u64) -> bool {
        let blocks = if self.block == 0 {
            return false;
        } else {
            self.total.div_ceil(self.block)
        };
        blocks == self.offsets.len() as u64
            && self.offsets.windows(2).all(|w| w[0] < w[1])
            && self.offsets.last().is_none_or(|&l| l < self.end)
            && self.end <= size
    }

    /// The compressed range holding uncompressed bytes `[start, end)`, and the
    /// uncompressed offset at which that range starts.
    pub fn range_of(&self, start: u64, end: u64) -> Option<(u64, u64, u64)> {
        if start >= end || end > self.total || self.block == 0 {
            return None;
        }
        let first = usize::try_from(start / self.block).ok()?;
        let last = usize::try_from((end - 1) / self.block).ok()?;
        let from = *self.offsets.get(first)?;
        let to = match self.offsets.get(last + 1) {
            Some(&o) => o,
            None => self.end,
        };
        Some((from, to, first as u64 * self.block))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    /// Path inside the node's data dir, `/`-separated, starting with the keyspace.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Owner on the backed-up node: numbers, and names where the node knew them
    /// (a restore sets the owner by name where the target knows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Where its tar entry is in the node object (format 2), or in `object`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Span>,
    /// The object holding it when not the node's own: a key of the manifest's
    /// `references` (format 3, a differential's unchanged file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// What a differential backup tells a change by (format 3): the file's
    /// modification time in nanoseconds, inode and permission bits when it was
    /// read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ObjectInfo {
    /// Key relative to the snapshot folder.
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// A node object's block index (format 2; not kept for encrypted objects,
    /// which are read whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<BlockIndex>,
}

use crate::repo::{is_node_object, key};

impl Manifest {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::State(format!("serialize manifest: {e}")))?;
        v.push(b'\n');
        Ok(v)
    }

    /// Parse and validate a manifest read from a store (untrusted input).
    pub fn from_bytes(snapshot: &str, data: &[u8]) -> Result<Manifest> {
        let bad = |m: String| Error::archive(key(snapshot, MANIFEST), m);
        let m: Manifest =
            serde_json::from_slice(data).map_err(|e| bad(format!("not a valid manifest: {e}")))?;
        if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&m.format_version) {
            return Err(bad(format!(
                "format version {} is not supported by cairn {} (supports {OLDEST_FORMAT} to {FORMAT_VERSION})",
                m.format_version,
                crate::VERSION
            )));
        }
        if m.format_version < 2
            && (m.objects.iter().any(|o| o.index.is_some())
                || m.cluster
                    .nodes
                    .iter()
                    .any(|n| !n.tree.is_empty() || n.files.iter().any(|f| f.entry.is_some())))
        {
            return Err(bad(format!(
                "format version {} has no block index, but this one has one",
                m.format_version
            )));
        }
        if m.format_version < DIFFERENTIAL_FORMAT
            && (m.parent.is_some()
                || m.differentials != 0
                || !m.references.is_empty()
                || m.cluster.nodes.iter().any(|n| {
                    n.files.iter().any(|f| {
                        f.object.is_some()
                            || f.mtime_ns.is_some()
                            || f.inode.is_some()
                            || f.mode.is_some()
                    })
                }))
        {
            return Err(bad(format!(
                "format version {} has no differential fields, but this one has some",
                m.format_version
            )));
        }
        if m.snapshot != snapshot {
            return Err(bad(format!("names snapshot {:?}", m.snapshot)));
        }
        if let Some(p) = &m.parent
            && (crate::spec::check_snapshot_name(p).is_err() || p == snapshot)
        {
            return Err(bad(format!(
                "names an impossible parent {:?}",
                crate::plan::params::shorten(p)
            )));
        }
        let mut referenced = std::collections::HashSet::new();
        for r in &m.references {
            let holder = r.key.split_once('/').filter(|(snap, name)| {
                crate::spec::check_snapshot_name(snap).is_ok()
                    && *snap != snapshot
                    && crate::archive::Codec::of_object(name).is_some()
                    && !name.contains('/')
            });
            if holder.is_none() || !referenced.insert(r.key.as_str()) {
                return Err(bad(format!(
                    "references {:?}, which is no node object of another snapshot, or twice",
                    crate::plan::params::shorten(&r.key)
                )));
            }
            if !r.index.as_ref().is_some_and(|i| i.is_sound(r.size)) {
                return Err(bad(format!(
                    "references {:?} without a sound block index",
                    r.key
                )));
            }
        }
        for n in &m.cluster.nodes {
            if !is_node_object(n.index, &n.object) || !m.objects.iter().any(|o| o.key == n.object) {
                return Err(bad(format!(
                    "node {} has an unexpected object {:?}",
                    n.index, n.object
                )));
            }
            for ks in &n.keyspaces {
                if !valid_segment(ks) {
                    return Err(bad(format!(
                        "keyspace name {ks:?} is not a plain directory name"
                    )));
                }
            }
            let in_node = |path: &str| {
                let top = path.split('/').next().unwrap_or("");
                path.split('/').all(valid_entry_segment) && n.keyspaces.iter().any(|k| k == top)
            };
            let mut paths = std::collections::HashSet::new();
            for f in &n.files {
                if let Some(o) = &f.object {
                    // A node's unchanged file is in that node's object of an
                    // earlier snapshot, at a known place.
                    let of_node = o
                        .split_once('/')
                        .is_some_and(|(_, name)| is_node_object(n.index, name));
                    if !referenced.contains(o.as_str()) || !of_node || f.entry.is_none() {
                        return Err(bad(format!(
                            "node {}: the file {:?} is held by {:?}, which the manifest does not reference as this node's",
                            n.index,
                            crate::plan::params::shorten(&f.path),
                            crate::plan::params::shorten(o)
                        )));
                    }
                }
                if !in_node(&f.path) || !paths.insert(f.path.as_str()) {
                    return Err(bad(format!(
                        "node {}: the file {:?} is not a relative path inside the node's keyspaces, or is listed twice",
                        n.index,
                        crate::plan::params::shorten(&f.path)
                    )));
                }
            }
            // The tree is what a partial restore recreates without reading the
            // archive: refused here, before anything runs, when it could not be
            // an archive's.
            for t in &n.tree {
                if !paths.insert(t.path.as_str()) {
                    return Err(bad(format!(
                        "node {}: {:?} is in the tree twice, or is a file too",
                        n.index,
                        crate::plan::params::shorten(&t.path)
                    )));
                }
                if let Some(target) = &t.link
                    && !crate::archive::unpack::link_stays_inside(
                        &t.path,
                        std::path::Path::new(target),
                    )
                {
                    return Err(bad(format!(
                        "node {}: the link {:?} points outside the node",
                        n.index,
                        crate::plan::params::shorten(&t.path)
                    )));
                }
                let top = t.path.split('/').next().unwrap_or("");
                if !t.path.split('/').all(valid_entry_segment)
                    || !n.keyspaces.iter().any(|k| k == top)
                {
                    return Err(bad(format!(
                        "node {}: the tree entry {:?} is not a relative path inside the node's keyspaces",
                        n.index,
                        crate::plan::params::shorten(&t.path)
                    )));
                }
                if t.link
                    .as_deref()
                    .is_some_and(|l| l.is_empty() || l.contains('\0'))
                {
                    return Err(bad(format!(
                        "node {}: the link {:?} has an empty or impossible target",
                        n.index,
                        crate::plan::params::shorten(&t.path)
                    )));
                }
            }
            // Nothing lies below a link: a restore that writes a node from several
            // objects never writes through one.
            let links: std::collections::HashSet<&str> = n
                .tree
                .iter()
                .filter(|t| t.link.is_some())
                .map(|t| t.path.as_str())
                .collect();
            let below_link = |path: &str| {
                path.match_indices('/')
                    .any(|(i, _)| links.contains(&path[..i]))
            };
            if let Some(p) = n
                .files
                .iter()
                .map(|f| f.path.as_str())
                .chain(n.tree.iter().map(|t| t.path.as_str()))
                .find(|p| below_link(p))
            {
                return Err(bad(format!(
                    "node {}: {:?} lies below a symbolic link",
                    n.index,
                    crate::plan::params::shorten(p)
                )));
            }
        }
        if m.manager.is_some() && m.object(MANAGER_OBJECT).is_none() {
            return Err(bad(format!(
                "names a manager snapshot but lists no {MANAGER_OBJECT}"
            )));
        }
        let mut keys = std::collections::HashSet::new();
        for o in &m.objects {
            if !keys.insert(o.key.as_str()) {
                return Err(bad(format!("lists the object {:?} twice", o.key)));
            }
            crate::store::check_key(&o.key)
                .map_err(|_| bad(format!("bad object key {:?}", o.key)))?;
            if o.index.as_ref().is_some_and(|i| !i.is_sound(o.size)) {
                return Err(bad(format!(
                    "object {:?} has an unsound block index",
                    o.key
                )));
            }
        }
        Ok(m)
    }

    /// This manifest with its private part sealed for `to`: what an encrypted
    /// snapshot stores.
    pub fn seal(&self, to: &crate::crypt::EncryptTo) -> Result<Manifest> {
        let mut full = self.clone();
        // The sealed part names its own scheme: the clear one is checked against it.
        full.encryption = Some(Encryption {
            scheme: to.scheme(),
            private: String::new(),
        });
        let private = to.seal(&full.to_bytes()?)?;
        let mut outer = full;
        for n in &mut outer.cluster.nodes {
            n.keyspaces.clear();
            n.files.clear();
            n.tree.clear();
        }
        outer.encryption = Some(Encryption {
            scheme: to.scheme(),
            private,
        });
        Ok(outer)
    }

    /// The whole manifest: itself when not encrypted, else its private part opened
    /// with `keys` and checked against the clear part. Without keys, or with keys
    /// that do not fit, an encrypted snapshot is refused naming it.
    pub fn open(&self, keys: Option<&crate::crypt::Keys>) -> Result<Manifest> {
        let Some(enc) = &self.encryption else {
            return Ok(self.clone());
        };
        let name = key(&self.snapshot, MANIFEST);
        let Some(keys) = keys else {
            return Err(Error::Refused(vec![format!(
                "snapshot {:?} is encrypted ({}): give its identity (AGE_IDENTITY=@key.txt or AGE_PASSPHRASE=@file to a plan, --identity FILE or --passphrase-file FILE to a command)",
                self.snapshot,
                enc.scheme.describe()
            )]));
        };
        let bytes = keys.open(&enc.private, &name)?;
        let mut inner = Manifest::from_bytes(&self.snapshot, &bytes)?;
        let mut clear = inner.clone();
        for n in &mut clear.cluster.nodes {
            n.keyspaces.clear();
            n.files.clear();
            n.tree.clear();
        }
        clear.encryption = self.encryption.clone();
        let sealed_scheme = Some(Encryption {
            scheme: enc.scheme.clone(),
            private: String::new(),
        });
        if inner.encryption != sealed_scheme || &clear != self {
            return Err(Error::archive(
                name,
                "its sealed part does not match its clear part (altered)",
            ));
        }
        inner.encryption = self.encryption.clone();
        Ok(inner)
    }

    pub fn node(&self, index: u32) -> Option<&NodeInfo> {
        self.cluster.nodes.iter().find(|n| n.index == index)
    }

    pub fn object(&self, key: &str) -> Option<&ObjectInfo> {
        self.objects.iter().find(|o| o.key == key)
    }

    /// A referenced object of another snapshot (key from the store's root).
    pub fn reference(&self, key: &str) -> Option<&ObjectInfo> {
        self.references.iter().find(|o| o.key == key)
    }

    /// Every object the snapshot needs, keyed from the store's root: its own
    /// (the manifest included) and those it references.
    pub fn needs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .objects
            .iter()
            .map(|o| key(&self.snapshot, &o.key))
            .chain(std::iter::once(key(&self.snapshot, MANIFEST)))
            .chain(self.references.iter().map(|r| r.key.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Uncompressed bytes of all nodes (saturating: a crafted manifest may lie).
    pub fn total_bytes(&self) -> u64 {
        self.cluster
            .nodes
            .iter()
            .fold(0u64, |a, n| a.saturating_add(n.bytes))
    }
}

/// A segment of a path in the archive: any name a directory may hold.
fn valid_entry_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('\0')
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}
