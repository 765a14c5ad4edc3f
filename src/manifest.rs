//! The snapshot manifest, `<snapshot>/manifest.json`, written last: its presence
//! means the snapshot is complete. Format version 1.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const MANAGER_OBJECT: &str = "manager.zip";
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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ObjectInfo {
    /// Key relative to the snapshot folder.
    pub key: String,
    pub size: u64,
    pub sha256: String,
}

/// The key of an object of a snapshot.
pub fn key(snapshot: &str, name: &str) -> String {
    format!("{snapshot}/{name}")
}

pub fn node_object(index: u32) -> String {
    format!("node-{index}.tar.gz")
}

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
        if m.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported by cairn {} (supports {FORMAT_VERSION})",
                m.format_version,
                crate::VERSION
            )));
        }
        if m.snapshot != snapshot {
            return Err(bad(format!("names snapshot {:?}", m.snapshot)));
        }
        for n in &m.cluster.nodes {
            if n.object != node_object(n.index) || !m.objects.iter().any(|o| o.key == n.object) {
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
        }
        if m.manager.is_some() && m.object(MANAGER_OBJECT).is_none() {
            return Err(bad(format!(
                "names a manager snapshot but lists no {MANAGER_OBJECT}"
            )));
        }
        for o in &m.objects {
            crate::store::check_key(&o.key)
                .map_err(|_| bad(format!("bad object key {:?}", o.key)))?;
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

    /// Uncompressed bytes of all nodes (saturating: a crafted manifest may lie).
    pub fn total_bytes(&self) -> u64 {
        self.cluster
            .nodes
            .iter()
            .fold(0u64, |a, n| a.saturating_add(n.bytes))
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}
