//! Restoring a manager snapshot: refuse before touching anything, extract and verify
//! into a staging dir beside the state dir, then swap it in.
//!
//! The swap is one `renameat2(RENAME_EXCHANGE)` where the file system supports it
//! (atomic: the state dir is at every instant either the old or the new state), else
//! two renames with a move back on failure. The state it replaced is kept beside it
//! as `.<name>.pre-restore-<time>`; [`rollback`] swaps the newest one back.

use super::zipfile;
use super::{Kind, Manager, STATE_DB};
use crate::checks::{Disk, human, with_margin};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub id: String,
    pub manager_version: String,
    pub written_format: u32,
    pub files: usize,
    pub bytes: u64,
    pub credentials: bool,
    pub state_dir: PathBuf,
    /// Where the replaced state was kept.
    pub pre_restore: Option<PathBuf>,
}

/// Refuse a manager that is not clean (unless forced).
pub fn check_clean(m: &Manager, force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    let reasons = m.not_clean()?;
    if reasons.is_empty() {
        return Ok(());
    }
    let mut problems = vec![format!(
        "the manager at {} is not clean; restoring over it needs --force (the current state is kept as a pre-restore copy)",
        m.state_dir.display()
    )];
    problems.extend(reasons);
    Err(Error::Checks(problems))
}

/// Refuse a snapshot taken on a newer manager than the target runs.
pub fn check_version(m: &Manager, snapshot_version: &str) -> Result<()> {
    let theirs =
        super::parse_version(snapshot_version).map_err(|e| Error::archive("manager.zip", e))?;
    let ours = super::parse_version(&m.version).map_err(Error::Usage)?;
    if theirs > ours {
        return Err(Error::Checks(vec![format!(
            "the snapshot comes from manager version {snapshot_version}, newer than this manager's {}; upgrade the manager first",
            m.version
        )]));
    }
    Ok(())
}

/// cairn's own home only ever receives cairn's own state: a declared manager's
/// snapshot restored there (a forgotten `--cluster`) would replace the run history
/// with somebody else's files.
fn check_kind(m: &Manager, meta: &super::format::Metadata) -> Result<()> {
    if m.kind != Kind::Own {
        return Ok(());
    }
    let foreign: Vec<&str> = meta
        .entries
        .iter()
        .filter(|e| {
            e.kind != super::format::EntryKind::State
                || (e.path != STATE_DB && e.path != super::CLUSTER_ENTRY)
        })
        .map(|e| e.path.as_str())
        .take(5)
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    Err(Error::Checks(vec![format!(
        "this snapshot holds a declared manager's state ({}…), not cairn's own; name that manager's cluster description with --cluster",
        foreign.join(", ")
    )]))
}

/// `(parent, name)` of the state dir.
fn split(state_dir: &Path) -> Result<(PathBuf, String)> {
    let parent = state_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = state_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::Usage(format!(
                "{}: the state dir needs a UTF-8 name",
                state_dir.display()
            ))
        })?
        .to_string();
    Ok((parent, name))
}

/// A temporary file beside the state dir, for the download.
pub fn download_file(m: &Manager) -> Result<tempfile::NamedTempFile> {
    let (parent, name) = split(&m.state_dir)?;
    std::fs::create_dir_all(&parent).map_err(|e| Error::io("create", &parent, e))?;
    tempfile::Builder::new()
        .prefix(&format!(".{name}.cairn-download-"))
        .suffix(".zip")
        .tempfile_in(&parent)
        .map_err(|e| Error::io("create a download file in", &parent, e))
}

fn stamp() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

/// Restore the snapshot in the local file `zip` into `m` (blocking). Every check and
/// every checksum passes before the state dir is touched.
pub fn restore_file(m: &Manager, zip: &Path, force: bool, disk: &dyn Disk) -> Result<Report> {
    // Again, now the download is done: the manager may have changed meanwhile.
    check_clean(m, force)?;
    let opened = zipfile::open_snapshot(zip)?;
    let head = &opened.checked;
    check_version(m, &head.metadata.manager_version)?;
    check_kind(m, &head.metadata)?;
    let (parent, name) = split(&m.state_dir)?;
    std::fs::create_dir_all(&parent).map_err(|e| Error::io("create", &parent, e))?;
    let need = with_margin(head.metadata.total_bytes);
    let free = disk
        .available(&parent)
        .map_err(|e| Error::io("check free space of", &parent, e))?;
    if free < need {
        return Err(Error::Checks(vec![format!(
            "{}: {} free, the manager state needs {} (with margin)",
            parent.display(),
            human(free),
            human(need)
        )]));
    }
    let staging = parent.join(format!(".{name}.cairn-staging-{}", std::process::id()));
    remove_dir(&staging)?;
    std::fs::create_dir(&staging).map_err(|e| Error::io("create", &staging, e))?;
    let staged = stage(m, opened, &staging);
    let checked = match staged {
        Ok(c) => c,
        Err(e) => {
            let _ = remove_dir(&staging);
            return Err(e);
        }
    };
    let pre_restore = swap_in(&staging, &m.state_dir, &parent, &name).inspect_err(|_| {
        let _ = remove_dir(&staging);
    })?;
    let meta = checked.metadata;
    Ok(Report {
        id: meta.snapshot_id.clone(),
        manager_version: meta.manager_version.clone(),
        written_format: checked.written_format,
        files: meta.entries.len(),
        bytes: meta.total_bytes,
        credentials: meta.credentials_included,
        state_dir: m.state_dir.clone(),
        pre_restore,
    })
}

fn stage(m: &Manager, zip: zipfile::Opened, staging: &Path) -> Result<zipfile::Checked> {
    let checked = zip.read_entries(Some((staging, &m.credentials)))?;
    // A snapshot without credentials keeps the target's own.
    if m.kind == Kind::Declared && !checked.metadata.credentials_included {
        let current = m.state_dir.join(&m.credentials);
        if current.is_dir() {
            for f in super::walk(&current)? {
                let to = staging.join(&m.credentials).join(&f.path);
                if to.exists() {
                    continue;
                }
                if let Some(p) = to.parent() {
                    std::fs::create_dir_all(p).map_err(|e| Error::io("create", p, e))?;
                }
                std::fs::copy(current.join(&f.path), &to)
                    .map_err(|e| Error::io("keep credential", &to, e))?;
            }
        }
    }
    if m.kind == Kind::Own {
        let db = staging.join(STATE_DB);
        if db.exists() {
            mark_interrupted(&db)?;
        }
    }
    if let Ok(d) = std::fs::File::open(staging) {
        let _ = d.sync_all();
    }
    Ok(checked)
}

/// Runs that were running when cairn's own state was snapshotted did not finish in
/// the restored world: mark them failed so nobody resumes them by mistake.
fn mark_interrupted(db: &Path) -> Result<()> {
    let conn = rusqlite::Connection::open(db)
        .map_err(|e| Error::State(format!("open {}: {e}", db.display())))?;
    let note = "interrupted: the manager state was snapshotted while this run was running";
    conn.execute(
        "UPDATE runs SET status = 'FAILED', error = ?1 WHERE status IN ('RUNNING', 'PENDING')",
        [note],
    )
    .map_err(|e| Error::State(format!("update {}: {e}", db.display())))?;
    Ok(())
}

fn remove_dir(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Put `new` in place of `target`; returns where the old state went.
fn swap_in(new: &Path, target: &Path, parent: &Path, name: &str) -> Result<Option<PathBuf>> {
    let kept = parent.join(format!(".{name}.pre-restore-{}", stamp()));
    let result = if !exists(target) {
        std::fs::rename(new, target)
            .map_err(|e| Error::io("move into place", target, e))
            .map(|()| None)
    } else {
        exchange(new, target, &kept).map(Some)
    };
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    result
}

/// Swap `new` and `target`; the old content ends at `kept`.
fn exchange(new: &Path, target: &Path, kept: &Path) -> Result<PathBuf> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, new, CWD, target, RenameFlags::EXCHANGE) {
        Ok(()) => {
            // `new` now holds the old state.
            match std::fs::rename(new, kept) {
                Ok(()) => Ok(kept.to_path_buf()),
                Err(e) => {
                    tracing::warn!("could not rename {}: {e}", new.display());
                    Ok(new.to_path_buf())
                }
            }
        }
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            // No atomic exchange here: two renames, the first undone on failure.
            std::fs::rename(target, kept).map_err(|e| Error::io("move aside", target, e))?;
            if let Err(e) = std::fs::rename(new, target) {
                if let Err(back) = std::fs::rename(kept, target) {
                    tracing::error!("could not move {} back: {back}", kept.display());
                }
                return Err(Error::io("move into place", target, e));
            }
            Ok(kept.to_path_buf())
        }
        Err(e) => Err(Error::io("swap into place", target, e.into())),
    }
}

/// The pre-restore copies of `m`'s state dir, oldest first.
pub fn pre_restore_copies(m: &Manager) -> Result<Vec<PathBuf>> {
    let (parent, name) = split(&m.state_dir)?;
    let prefix = format!(".{name}.pre-restore-");
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(&parent) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("list", &parent, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", &parent, e))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Swap the newest pre-restore copy back in; the state it replaces is kept as
/// `.<name>.rolled-back-<time>`. Returns (copy restored, where the replaced went).
pub fn rollback(m: &Manager) -> Result<(PathBuf, Option<PathBuf>)> {
    let Some(copy) = pre_restore_copies(m)?.pop() else {
        return Err(Error::NotFound(format!(
            "a pre-restore copy of {}",
            m.state_dir.display()
        )));
    };
    let replaced = undo(m, Some(&copy))?;
    Ok((copy, replaced))
}

/// Undo a restore that just happened (a later step of the same run failed): put
/// `pre_restore` back in place, or, when there was no state before, move the
/// restored state aside. The restored state is kept as `.<name>.rolled-back-<time>`.
pub fn undo(m: &Manager, pre_restore: Option<&Path>) -> Result<Option<PathBuf>> {
    let (parent, name) = split(&m.state_dir)?;
    let displaced = parent.join(format!(".{name}.rolled-back-{}", stamp()));
    let kept = match pre_restore {
        Some(copy) if exists(&m.state_dir) => Some(exchange(copy, &m.state_dir, &displaced)?),
        Some(copy) => {
            std::fs::rename(copy, &m.state_dir)
                .map_err(|e| Error::io("move into place", &m.state_dir, e))?;
            None
        }
        None if exists(&m.state_dir) => {
            std::fs::rename(&m.state_dir, &displaced)
                .map_err(|e| Error::io("move aside", &m.state_dir, e))?;
            Some(displaced)
        }
        None => None,
    };
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::RealDisk;
    use crate::cluster::{ManagerConfig, ManagerVersion};

    fn manager(dir: &Path) -> Manager {
        let cluster = crate::cluster::Cluster {
            name: "t".into(),
            nodes: Vec::new(),
            manager: Some(ManagerConfig {
                state_dir: dir.to_path_buf(),
                version: ManagerVersion::Fixed("1.0.0".into()),
                credentials: "credentials".into(),
            }),
            source: None,
            partial: false,
            hook_secrets: Vec::new(),
            capture: Default::default(),
            owner: None,
            artifacts: Vec::new(),
        };
        Manager::resolve(Some(&cluster), None, dir).expect("manager")
    }

    fn snapshot_of(m: &Manager, zip: &Path) {
        let prepared = zipfile::prepare(m, true).expect("prepare");
        let header = zipfile::Header {
            id: "t".into(),
            manager_version: "1.0.0".into(),
            include_credentials: true,
        };
        let f = std::fs::File::create(zip).expect("create");
        zipfile::write(&prepared, &header, f, |_| {}).expect("write");
    }

    #[test]
    fn a_restore_is_undone_to_the_state_it_replaced_or_to_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let state = tmp.path().join("mgr/state");
        std::fs::create_dir_all(state.join("db")).expect("mkdir");
        std::fs::write(state.join("db/a.json"), b"snapshotted").expect("write");
        let m = manager(&state);
        let zip = tmp.path().join("s.zip");
        snapshot_of(&m, &zip);
        // The manager moves on, then the snapshot is restored over it and undone.
        std::fs::write(state.join("db/a.json"), b"current").expect("write");
        let r = restore_file(&m, &zip, true, &RealDisk).expect("restore");
        assert_eq!(
            std::fs::read(state.join("db/a.json")).expect("read"),
            b"snapshotted"
        );
        undo(&m, r.pre_restore.as_deref()).expect("undo");
        assert_eq!(
            std::fs::read(state.join("db/a.json")).expect("read"),
            b"current"
        );
        // Onto a place with no state: undone means no state again.
        let fresh = tmp.path().join("new/state");
        let m2 = manager(&fresh);
        let r = restore_file(&m2, &zip, false, &RealDisk).expect("restore");
        assert!(r.pre_restore.is_none() && fresh.join("db/a.json").exists());
        undo(&m2, None).expect("undo");
        assert!(!fresh.exists());
    }
}
