//! The store layout: every key cairn reads or writes in a store is made here.
//!
//! ```text
//!     <snapshot>/node-<i>.tar.gz | .tar.zst   a node's archive
//!     <snapshot>/manager.zip                  the manager's state
//!     <snapshot>/<artifact>                   a service artifact (schema.cql)
//!     <snapshot>/manifest.json                written last: the snapshot is complete
//!     .cairn-locks/<snapshot>/<token>.json    a lock held on a snapshot
//!     .cairn-verify/<snapshot>.json           its last verification
//!     .cairn-gc/<snapshot>.json               a delete in progress
//!     .cairn-manager/<id>/manager.zip         a manager snapshot made on its own
//!     .cairn-manager/<id>/status.json         its status
//!     .cairn-tmp/                             a directory store's uploads in flight
//! ```
//!
//! Top-level names starting with `.cairn` are cairn's own; snapshot names never
//! start with a dot.

use crate::archive::Codec;

/// Names starting with this are cairn's own, in a store and in a data dir.
pub const RESERVED_PREFIX: &str = ".cairn";
pub const MANIFEST: &str = "manifest.json";
pub const MANAGER_OBJECT: &str = "manager.zip";
pub const LOCKS: &str = ".cairn-locks";
pub const VERIFY: &str = ".cairn-verify";
pub const GC: &str = ".cairn-gc";
pub const MANAGER_SNAPSHOTS: &str = ".cairn-manager";
pub const MANAGER_STATUS: &str = "status.json";
/// A directory store's uploads in flight (renamed into place when complete).
pub const TMP: &str = ".cairn-tmp";

/// The key of an object of a snapshot.
pub fn key(snapshot: &str, name: &str) -> String {
    format!("{snapshot}/{name}")
}

/// A snapshot's folder, as a listing prefix (`<snapshot>/`).
pub fn folder(snapshot: &str) -> String {
    format!("{snapshot}/")
}

/// A backup's write probe: written and removed at once by its pre-flight.
pub fn probe_key(run: i64, pid: u32) -> String {
    format!("{RESERVED_PREFIX}-probe-{run}-{pid}")
}

/// The snapshot folder a key is in (its first segment).
pub fn folder_of(key: &str) -> &str {
    key.split('/').next().unwrap_or("")
}

/// A node's object: `node-<i>.tar.gz`, or `node-<i>.tar.zst` with zstd.
pub fn node_object(index: u32, codec: Codec) -> String {
    format!("node-{index}.{}", codec.extension())
}

/// Whether `name` is a name node `index`'s object may have.
pub fn is_node_object(index: u32, name: &str) -> bool {
    Codec::of_object(name).is_some_and(|c| name == node_object(index, c))
}

/// Whether a top-level folder is cairn's own (locks, records), not a snapshot.
pub fn reserved(folder: &str) -> bool {
    folder.starts_with(RESERVED_PREFIX)
}

/// Where the locks on a snapshot are (a folder, with its trailing `/`).
pub fn lock_dir(snapshot: &str) -> String {
    format!("{LOCKS}/{snapshot}/")
}

/// A snapshot's last verification.
pub fn verify_key(snapshot: &str) -> String {
    format!("{VERIFY}/{snapshot}.json")
}

/// The record of a delete in progress.
pub fn gc_key(snapshot: &str) -> String {
    format!("{GC}/{snapshot}.json")
}

/// A manager snapshot's archive.
pub fn manager_object_key(id: &str) -> String {
    format!("{MANAGER_SNAPSHOTS}/{id}/{MANAGER_OBJECT}")
}

/// A manager snapshot's status.
pub fn manager_status_key(id: &str) -> String {
    format!("{MANAGER_SNAPSHOTS}/{id}/{MANAGER_STATUS}")
}
