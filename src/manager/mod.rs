//! Manager snapshots: the control plane's state as one `manager.zip`.
//!
//! * [`Manager`] says where the state lives and which version runs: the cluster
//!   description's `[manager]`, or, without one, cairn's own state (the run-state
//!   store and the cluster description), so every installation has one to protect.
//! * [`zipfile`] writes a snapshot as a stream and reads one back: every entry
//!   checked against the metadata before anything is moved into place.
//! * [`format`] is the metadata and the migrations from older formats.
//! * [`restore`] stages, verifies and swaps the state dir; [`catalog`] keeps
//!   snapshots in a store.

pub mod catalog;
pub mod format;
pub mod restore;
pub mod zipfile;

use crate::cluster::{Cluster, ManagerVersion};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Whose state a manager snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `[manager]` of the cluster description.
    Declared,
    /// cairn's own run-state store (and the cluster description).
    Own,
}

/// The name of cairn's run-state database inside its home.
pub const STATE_DB: &str = "state.db";
/// Where an own-manager snapshot keeps the cluster description.
pub const CLUSTER_ENTRY: &str = "cluster.toml";

#[derive(Debug, Clone, serde::Serialize)]
pub struct Manager {
    pub kind: Kind,
    pub state_dir: PathBuf,
    /// The version the manager runs now.
    pub version: String,
    /// Sub-path of the state dir holding credentials.
    pub credentials: String,
    /// The version file, when it lies inside the state dir: never part of a
    /// snapshot (restoring an old snapshot must not overwrite the new version).
    #[serde(skip)]
    version_entry: Option<String>,
    /// Own manager: the cluster description to include.
    #[serde(skip)]
    cluster_file: Option<PathBuf>,
}

impl Manager {
    /// The manager of `cluster` (loaded from `cluster_file`), or cairn's own state in
    /// `home` when there is no cluster or it has no `[manager]`.
    pub fn resolve(
        cluster: Option<&Cluster>,
        cluster_file: Option<&Path>,
        home: &Path,
    ) -> Result<Manager> {
        match cluster.and_then(|c| c.manager.as_ref()) {
            Some(m) => {
                let version = match &m.version {
                    ManagerVersion::Fixed(v) => v.trim().to_string(),
                    ManagerVersion::File(f) => crate::fsx::read_small_text(f, 64 << 10)
                        .map_err(|e| Error::io("read the manager version file", f, e))?
                        .trim()
                        .to_string(),
                };
                parse_version(&version).map_err(|e| Error::Cluster {
                    file: cluster_file.map_or("cluster".into(), |f| f.display().to_string()),
                    message: format!("[manager] version {version:?}: {e}"),
                })?;
                let version_entry = match &m.version {
                    ManagerVersion::File(f) => f
                        .strip_prefix(&m.state_dir)
                        .ok()
                        .and_then(|r| r.to_str())
                        .map(|r| r.replace(std::path::MAIN_SEPARATOR, "/")),
                    ManagerVersion::Fixed(_) => None,
                };
                Ok(Manager {
                    kind: Kind::Declared,
                    state_dir: m.state_dir.clone(),
                    version,
                    credentials: m.credentials.clone(),
                    version_entry,
                    cluster_file: None,
                })
            }
            None => Ok(Manager {
                kind: Kind::Own,
                state_dir: std::path::absolute(home).map_err(|e| Error::io("resolve", home, e))?,
                version: crate::VERSION.to_string(),
                credentials: "credentials".into(),
                version_entry: None,
                cluster_file: cluster_file.map(Path::to_path_buf),
            }),
        }
    }

    /// Why the manager is not clean; empty when it is.
    ///
    /// A **declared** manager is clean when its state dir does not exist or holds
    /// nothing but directories (and its own version file): no state file, no
    /// credential, no link. **cairn's own** state is clean when no run is recorded
    /// and its home holds no other file.
    pub fn not_clean(&self) -> Result<Vec<String>> {
        let mut reasons = Vec::new();
        let files = match walk(&self.state_dir) {
            Ok(f) => f,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(reasons);
            }
            Err(e) => return Err(e),
        };
        for f in files {
            let ignored = match self.kind {
                Kind::Declared => Some(&f.path) == self.version_entry.as_ref(),
                Kind::Own => {
                    f.path == STATE_DB
                        || f.path == format!("{STATE_DB}-wal")
                        || f.path == format!("{STATE_DB}-shm")
                }
            };
            if !ignored {
                reasons.push(format!("{} holds {}", self.state_dir.display(), f.path));
            }
        }
        if self.kind == Kind::Own {
            let db = self.state_dir.join(STATE_DB);
            if db.exists() {
                let runs = count_runs(&db)?;
                if runs > 0 {
                    reasons.push(format!("{} records {runs} run(s)", db.display()));
                }
            }
        }
        reasons.truncate(20);
        Ok(reasons)
    }
}

fn count_runs(db: &Path) -> Result<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| Error::State(format!("open {}: {e}", db.display())))?;
    conn.query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
        .or_else(|e| match e {
            // A database without the table has recorded nothing.
            rusqlite::Error::SqliteFailure(_, Some(m)) if m.contains("no such table") => Ok(0),
            e => Err(Error::State(format!("read {}: {e}", db.display()))),
        })
}

/// A version such as `2.3.0` (a missing minor or patch counts as 0).
pub fn parse_version(text: &str) -> std::result::Result<semver::Version, String> {
    let t = text.trim().trim_start_matches('v');
    let core_end = t.find(['-', '+']).unwrap_or(t.len());
    let dots = t[..core_end].matches('.').count();
    let padded = match dots {
        0 => format!("{}.0.0{}", &t[..core_end], &t[core_end..]),
        1 => format!("{}.0{}", &t[..core_end], &t[core_end..]),
        _ => t.to_string(),
    };
    semver::Version::parse(&padded).map_err(|e| format!("{text:?} is not a version: {e}"))
}

/// A regular file found under a directory.
#[derive(Debug, Clone)]
pub struct Found {
    /// Relative, `/`-separated.
    pub path: String,
    pub size: u64,
    pub mode: u32,
}

/// Every regular file under `root`, sorted; a link, device or non-UTF-8 name is an
/// error (a snapshot holds regular files only).
pub fn walk(root: &Path) -> Result<Vec<Found>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(Error::Usage(format!(
                    "{}: a file name is not UTF-8",
                    entry.path().display()
                )));
            };
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(entry.path())
                .map_err(|e| Error::io("stat", entry.path(), e))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push((entry.path(), path));
            } else if ft.is_file() {
                out.push(Found {
                    path,
                    size: meta.len(),
                    mode: meta.permissions().mode() & 0o777,
                });
            } else {
                return Err(Error::Usage(format!(
                    "{}: not a regular file or directory (links and devices are not kept in a manager snapshot)",
                    entry.path().display()
                )));
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let v = |s| parse_version(s).expect(s);
        assert!(v("2.10") > v("2.9.9"));
        assert!(v("v3") > v("2.99.0"));
        assert!(v("2.3.0-rc1") < v("2.3.0"));
        assert!(parse_version("latest").is_err());
    }
}
