//! `metadata.json` of a manager snapshot, and the chain of migrations that brings
//! every older snapshot format to the current one.
//!
//! Format history (each kept as a fixture in `testdata/manager-snapshots/`):
//!
//! * **v1** — entries stored as `files/<path relative to the state dir>`,
//!   credentials among them under the then fixed sub-path `credentials/`.
//! * **v2** (current) — the credentials sub-path became configurable
//!   (`[manager] credentials`), so credentials are stored apart from the state:
//!   `state/<path>` and `credentials/<path relative to the credentials dir>`, each
//!   entry with its kind, and restore puts credentials under the *target's*
//!   sub-path. The metadata also declares the total size, which restore enforces.
//!
//! A snapshot is read by parsing its metadata with the reader of its own format
//! version and applying the migrations after it in order ([`read_any`]); restore
//! only ever sees the current [`Metadata`].

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The format this cairn writes.
pub const CURRENT: u32 = 2;
/// The name of the metadata entry inside `manager.zip`.
pub const METADATA: &str = "metadata.json";
/// A metadata entry larger than this is refused before it is parsed.
pub const MAX_METADATA_BYTES: u64 = 64 << 20;

/// The current metadata (format v2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub format_version: u32,
    pub snapshot_id: String,
    pub manager_version: String,
    pub cairn_version: String,
    pub created_at: String,
    pub credentials_included: bool,
    /// Sum of the entries' sizes.
    pub total_bytes: u64,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    State,
    Credentials,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Name of the entry inside the zip.
    pub name: String,
    pub kind: EntryKind,
    /// Relative to the state dir (state) or to the credentials dir (credentials),
    /// `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Permission bits (`0o600`…).
    pub mode: u32,
}

impl Entry {
    /// Where the entry goes, relative to the state dir, for a manager whose
    /// credentials live under `credentials_dir`.
    pub fn destination(&self, credentials_dir: &str) -> String {
        match self.kind {
            EntryKind::State => self.path.clone(),
            EntryKind::Credentials => format!("{credentials_dir}/{}", self.path),
        }
    }

    /// The zip name a v2 writer gives an entry.
    pub fn name_for(kind: EntryKind, path: &str) -> String {
        match kind {
            EntryKind::State => format!("state/{path}"),
            EntryKind::Credentials => format!("credentials/{path}"),
        }
    }
}

impl Metadata {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::State(format!("serialize metadata: {e}")))?;
        v.push(b'\n');
        Ok(v)
    }

    /// Names and paths are plain relative paths, unique; checksums well-formed; the
    /// declared total is the sum of the entries.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Error::archive(METADATA, m);
        crate::store::check_key(&self.snapshot_id).map_err(|_| {
            bad(format!(
                "snapshot id {:?} is not a plain name",
                self.snapshot_id
            ))
        })?;
        super::parse_version(&self.manager_version)
            .map_err(|e| bad(format!("manager version: {e}")))?;
        let mut names = std::collections::BTreeSet::new();
        let mut paths = std::collections::BTreeSet::new();
        let mut sum = 0u64;
        for e in &self.entries {
            for p in [&e.name, &e.path] {
                crate::store::check_key(p)
                    .map_err(|_| bad(format!("entry {p:?} escapes the target")))?;
            }
            if e.name == METADATA || !names.insert(e.name.as_str()) {
                return Err(bad(format!("entry name {:?} appears twice", e.name)));
            }
            if !paths.insert((e.kind == EntryKind::Credentials, e.path.as_str())) {
                return Err(bad(format!("entry path {:?} appears twice", e.path)));
            }
            if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("entry {:?} has a malformed checksum", e.name)));
            }
            sum = sum
                .checked_add(e.size)
                .ok_or_else(|| bad("entry sizes overflow".into()))?;
        }
        if sum != self.total_bytes {
            return Err(bad(format!(
                "declares a total of {} bytes but its entries add up to {sum}",
                self.total_bytes
            )));
        }
        Ok(())
    }
}

/// Format v1, as v1 wrote it. Never written any more; read and migrated.
mod v1 {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
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

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Entry {
        pub path: String,
        pub size: u64,
        pub sha256: String,
        pub mode: u32,
    }

    /// v1 kept credentials under this fixed sub-path of the state dir.
    pub const CREDENTIALS: &str = "credentials/";
}

/// v1 → v2: entries keep their zip names (`files/…`); those under the fixed
/// `credentials/` become credentials entries relative to the credentials dir, so
/// they land under the target's configured sub-path; the total is computed.
fn v1_to_v2(m: v1::Metadata) -> Result<Metadata> {
    if m.format != 1 {
        return Err(Error::archive(
            METADATA,
            format!("format {} read as v1", m.format),
        ));
    }
    let mut total = 0u64;
    let entries = m
        .entries
        .into_iter()
        .map(|e| {
            total = total.saturating_add(e.size);
            let (kind, path) = match e.path.strip_prefix(v1::CREDENTIALS) {
                Some(rest) => (EntryKind::Credentials, rest.to_string()),
                None => (EntryKind::State, e.path.clone()),
            };
            Entry {
                name: format!("files/{}", e.path),
                kind,
                path,
                size: e.size,
                sha256: e.sha256,
                mode: e.mode,
            }
        })
        .collect();
    Ok(Metadata {
        format_version: 2,
        snapshot_id: m.id,
        manager_version: m.manager_version,
        cairn_version: m.cairn_version,
        created_at: m.created_at,
        credentials_included: m.include_credentials,
        total_bytes: total,
        entries,
    })
}

/// Parse metadata of any known format (untrusted input), migrate it to the
/// current one and validate it; returns it with the format it was written in.
pub fn read_any(data: &[u8]) -> Result<(Metadata, u32)> {
    let bad = |m: String| Error::archive(METADATA, m);
    #[derive(Deserialize)]
    struct Probe {
        format_version: Option<u32>,
        format: Option<u32>,
    }
    let probe: Probe =
        serde_json::from_slice(data).map_err(|e| bad(format!("not valid metadata: {e}")))?;
    let written = match (probe.format_version, probe.format) {
        (Some(v), None) => v,
        (None, Some(1)) => 1,
        _ => return Err(bad("does not say which format it has".into())),
    };
    let parse_err =
        |e: serde_json::Error| bad(format!("not valid format v{written} metadata: {e}"));
    let current = match written {
        1 => v1_to_v2(serde_json::from_slice::<v1::Metadata>(data).map_err(parse_err)?)?,
        2 => serde_json::from_slice::<Metadata>(data).map_err(parse_err)?,
        v => {
            return Err(bad(format!(
                "snapshot format {v} is newer than cairn {} reads (up to {CURRENT}); upgrade cairn",
                crate::VERSION
            )));
        }
    };
    current.validate()?;
    Ok((current, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_migrates_credentials_apart_and_unknown_formats_are_refused() {
        let v1 = br#"{"format":1,"id":"a","manager_version":"2.3","cairn_version":"0.1.0",
            "created_at":"x","include_credentials":true,"entries":[
            {"path":"credentials/k.pem","size":3,"sha256":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","mode":384},
            {"path":"db/x","size":4,"sha256":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","mode":420}]}"#;
        let (m, written) = read_any(v1).expect("v1");
        assert_eq!((written, m.format_version, m.total_bytes), (1, 2, 7));
        assert_eq!(m.entries[0].kind, EntryKind::Credentials);
        assert_eq!(m.entries[0].name, "files/credentials/k.pem");
        assert_eq!(m.entries[0].destination("secrets"), "secrets/k.pem");
        assert_eq!(m.entries[1].destination("secrets"), "db/x");
        let v9 = br#"{"format_version":9}"#;
        assert!(read_any(v9).expect_err("v9").to_string().contains("newer"));
        let lying_total = String::from_utf8_lossy(&m.to_bytes().expect("ser"))
            .replace("\"total_bytes\": 7", "\"total_bytes\": 6");
        assert!(read_any(lying_total.as_bytes()).is_err());
    }
}
