//! `metadata.json` of a manager snapshot, and the chain of migrations that brings
//! every older snapshot format to the current one.
//!
//! Format history (each kept as a fixture in `testdata/manager-snapshots/`):
//!
//! * **v1** — entries stored as `files/<path relative to the state dir>`,
//!   credentials among them under the fixed sub-path `credentials/`.
//!
//! A snapshot is read by parsing its metadata with the reader of its own format
//! version and applying the migrations after it in order; restore only ever sees
//! the current [`Metadata`].

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The format this cairn writes.
pub const CURRENT: u32 = 1;
/// The name of the metadata entry inside `manager.zip`.
pub const METADATA: &str = "metadata.json";
/// A metadata entry larger than this is refused before it is parsed.
pub const MAX_METADATA_BYTES: u64 = 64 << 20;

/// The current metadata (format v1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub format: u32,
    pub id: String,
    pub manager_version: String,
    pub cairn_version: String,
    pub created_at: String,
    pub include_credentials: bool,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Relative to the state dir, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Permission bits (`0o600`…).
    pub mode: u32,
}

impl Entry {
    /// Name of the entry inside the zip.
    pub fn zip_name(&self) -> String {
        format!("files/{}", self.path)
    }
}

impl Metadata {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::State(format!("serialize metadata: {e}")))?;
        v.push(b'\n');
        Ok(v)
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Parse current-format metadata (untrusted input) and validate it.
    pub fn parse(data: &[u8]) -> Result<Metadata> {
        let bad = |m: String| Error::archive(METADATA, m);
        let m: Metadata =
            serde_json::from_slice(data).map_err(|e| bad(format!("not valid metadata: {e}")))?;
        if m.format != CURRENT {
            return Err(bad(format!(
                "snapshot format {} is not supported by cairn {} (supports {CURRENT})",
                m.format,
                crate::VERSION
            )));
        }
        m.validate()?;
        Ok(m)
    }

    /// Paths are plain relative paths, unique, checksums well-formed.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Error::archive(METADATA, m);
        crate::store::check_key(&self.id)
            .map_err(|_| bad(format!("snapshot id {:?} is not a plain name", self.id)))?;
        super::parse_version(&self.manager_version)
            .map_err(|e| bad(format!("manager version: {e}")))?;
        let mut seen = std::collections::BTreeSet::new();
        for e in &self.entries {
            crate::store::check_key(&e.path)
                .map_err(|_| bad(format!("entry path {:?} escapes the state dir", e.path)))?;
            if !seen.insert(e.path.as_str()) {
                return Err(bad(format!("entry {:?} appears twice", e.path)));
            }
            if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("entry {:?} has a malformed checksum", e.path)));
            }
        }
        Ok(())
    }
}

/// Parse metadata of any known format and migrate it to the current one; returns
/// it with the format it was written in.
pub fn read_any(data: &[u8]) -> Result<(Metadata, u32)> {
    Ok((Metadata::parse(data)?, CURRENT))
}
