//! Manager snapshots in a store.
//!
//! A snapshot made on its own (`cairn manager-snapshot create`, `upload`) lives at
//! `.cairn-manager/<id>/manager.zip` with `.cairn-manager/<id>/status.json` beside it
//! (creating → created | failed; uploaded). A backup plan's `<snapshot>/manager.zip`
//! is listed too, under the snapshot's name, once its manifest says it is complete.

use super::format::Metadata;
use super::restore::{self, Report};
use super::zipfile::{self, Header};
use super::{Kind, Manager};
use crate::archive::io::TapReader;
use crate::checks::Disk;
use crate::manifest::{self, MANIFEST, ManagerInfo};
use crate::progress::{Event, Progress};
use crate::store::{Store, get_bytes, upload_stream};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use crate::repo::MANAGER_SNAPSHOTS as PREFIX;
pub const OBJECT: &str = crate::repo::MANAGER_OBJECT;
const MAX_STATUS_BYTES: u64 = 1 << 20;

pub fn object_key(id: &str) -> String {
    crate::repo::manager_object_key(id)
}
fn status_key(id: &str) -> String {
    crate::repo::manager_status_key(id)
}

/// `creating`, `created`, `failed` or `uploaded`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub id: String,
    pub status: String,
    pub created_at: Option<String>,
    pub manager_version: Option<String>,
    pub credentials: Option<bool>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub format: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
    /// Set when the manager snapshot is part of a (node) snapshot of that name.
    #[serde(default)]
    pub snapshot: Option<String>,
}

impl Status {
    fn new(id: &str, status: &str) -> Status {
        Status {
            id: id.to_string(),
            status: status.to_string(),
            created_at: None,
            manager_version: None,
            credentials: None,
            size: None,
            sha256: None,
            format: None,
            error: None,
            snapshot: None,
        }
    }

    fn with_meta(mut self, meta: &Metadata, size: u64, sha256: String) -> Status {
        self.created_at = Some(meta.created_at.clone());
        self.manager_version = Some(meta.manager_version.clone());
        self.credentials = Some(meta.credentials_included);
        self.format = Some(meta.format_version);
        self.size = Some(size);
        self.sha256 = Some(sha256);
        self
    }

    /// Whether it can be restored.
    pub fn usable(&self) -> bool {
        matches!(self.status.as_str(), "created" | "uploaded")
    }
}

/// A default id: `manager-<UTC time>`.
pub fn default_id() -> String {
    format!("manager-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"))
}

pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{id:?} is not a snapshot id (letters, digits, '.', '_', '-'; at most 128)"
        )))
    }
}

async fn put_status(store: &dyn Store, s: &Status) -> Result<()> {
    let data = serde_json::to_vec_pretty(s).map_err(|e| Error::State(e.to_string()))?;
    store.put(&status_key(&s.id), data.into()).await
}

/// What a manager snapshot is written as, and how its progress is reported.
pub struct Target<'a> {
    pub key: &'a str,
    pub id: &'a str,
    pub include_credentials: bool,
    pub progress: Arc<dyn Progress>,
    /// The progress step's name.
    pub step: &'a str,
    /// Encrypt the zip (age) to these recipients or this passphrase.
    pub encrypt: Option<crate::crypt::EncryptTo>,
}

/// Stream a snapshot of `m` to `t.key` (blocking work on worker threads); returns
/// the metadata written, the object's size and SHA-256. `on_started` gets the
/// multipart upload id before any part is sent.
pub async fn write_object(
    store: &dyn Store,
    m: &Manager,
    t: Target<'_>,
    cancel: &CancellationToken,
    on_started: impl FnOnce(&str),
) -> Result<(Metadata, u64, String)> {
    let m2 = m.clone();
    let include_credentials = t.include_credentials;
    let prepared = tokio::task::spawn_blocking(move || zipfile::prepare(&m2, include_credentials))
        .await
        .map_err(|e| Error::State(format!("snapshot worker failed: {e}")))??;
    let expected: u64 = prepared.sources.iter().map(|s| s.size).sum();
    t.progress.event(Event::StepStarted {
        step: t.step,
        total: Some(expected),
    });
    let header = Header {
        id: t.id.to_string(),
        manager_version: m.version.clone(),
        include_credentials,
    };
    let (progress, step) = (t.progress, t.step.to_string());
    let (encrypt, key) = (t.encrypt, t.key.to_string());
    upload_stream(store, t.key, expected, cancel, on_started, move |sink| {
        let progress = |done| progress.event(Event::Bytes { step: &step, done });
        match &encrypt {
            None => Ok(zipfile::write(&prepared, &header, sink, progress)?.0),
            Some(to) => {
                let (meta, w) = zipfile::write(&prepared, &header, to.wrap(sink)?, progress)?;
                w.finish().map_err(|e| Error::io("encrypt", &key, e))?;
                Ok(meta)
            }
        }
    })
    .await
}

async fn exists(store: &dyn Store, id: &str) -> Result<bool> {
    Ok(
        store.head(&status_key(id)).await?.is_some()
            || store.head(&object_key(id)).await?.is_some(),
    )
}

/// `cairn manager-snapshot create`.
pub async fn create(
    store: &dyn Store,
    m: &Manager,
    id: &str,
    include_credentials: bool,
    progress: Arc<dyn Progress>,
    cancel: &CancellationToken,
) -> Result<Status> {
    check_id(id)?;
    if exists(store, id).await? {
        return Err(Error::Checks(vec![format!(
            "a manager snapshot {id:?} already exists in {}; snapshots are never overwritten",
            store.describe()
        )]));
    }
    put_status(store, &Status::new(id, "creating")).await?;
    let step = format!("manager-snapshot/{id}");
    let key = object_key(id);
    let target = Target {
        key: &key,
        id,
        include_credentials,
        progress: progress.clone(),
        step: &step,
        encrypt: None,
    };
    let written = write_object(store, m, target, cancel, |_| {}).await;
    progress.event(Event::StepFinished {
        step: &step,
        status: if written.is_ok() {
            crate::state::Status::Complete
        } else {
            crate::state::Status::Failed
        },
        error: None,
    });
    match written {
        Ok((meta, size, sha)) => {
            let s = Status::new(id, "created").with_meta(&meta, size, sha);
            put_status(store, &s).await?;
            Ok(s)
        }
        Err(e) => {
            let mut s = Status::new(id, "failed");
            s.error = Some(crate::redact::redact(&e.to_string()));
            if let Err(e2) = put_status(store, &s).await {
                tracing::warn!("could not record the failure: {e2}");
            }
            Err(e)
        }
    }
}

/// Every manager snapshot of a store: standalone ones, then those inside complete
/// snapshots; sorted by creation time.
pub async fn list(store: &dyn Store) -> Result<Vec<Status>> {
    let objects = store.list("").await?;
    let size_of = |key: &str| objects.iter().find(|o| o.key == key).map(|o| o.size);
    let mut out = Vec::new();
    for o in &objects {
        if let Some(rest) = o.key.strip_prefix(&format!("{PREFIX}/"))
            && let Some(id) = rest.strip_suffix(&format!("/{}", crate::repo::MANAGER_STATUS))
        {
            let mut s = match get_bytes(store, &o.key, MAX_STATUS_BYTES)
                .await
                .and_then(|b| {
                    serde_json::from_slice::<Status>(&b)
                        .map_err(|e| Error::archive(&o.key, e.to_string()))
                }) {
                Ok(s) if s.id == id => s,
                Ok(_) | Err(_) => {
                    let mut s = Status::new(id, "failed");
                    s.error = Some("status.json is unreadable".into());
                    s
                }
            };
            if s.usable() && size_of(&object_key(id)) != s.size {
                s.status = "failed".into();
                s.error = Some("manager.zip is missing or has the wrong size".into());
            }
            out.push(s);
        } else if let Some(name) = o.key.strip_suffix(&format!("/{MANIFEST}"))
            && !name.contains('/')
            && size_of(&crate::repo::key(name, OBJECT)).is_some()
        {
            let Ok(m) = crate::checks::read_manifest(store, name).await else {
                continue;
            };
            if let (Some(info), Some(obj)) = (&m.manager, m.object(OBJECT)) {
                out.push(from_manifest(name, info, obj));
            }
        }
    }
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// The status of the manager snapshot inside complete snapshot `name`.
pub fn from_manifest(name: &str, info: &ManagerInfo, obj: &manifest::ObjectInfo) -> Status {
    Status {
        id: name.to_string(),
        status: "created".into(),
        created_at: Some(info.created_at.clone()),
        manager_version: Some(info.manager_version.clone()),
        credentials: Some(info.include_credentials),
        size: Some(obj.size),
        sha256: Some(obj.sha256.clone()),
        format: Some(info.format),
        error: None,
        snapshot: Some(name.to_string()),
    }
}

/// Where a snapshot id's zip is, with its expected size and checksum.
pub struct Located {
    pub key: String,
    pub status: Status,
}

/// Find `id`: a standalone snapshot, else the manager of a complete snapshot.
pub async fn locate(store: &dyn Store, id: &str) -> Result<Located> {
    check_id(id)?;
    if store.head(&status_key(id)).await?.is_some() {
        let b = get_bytes(store, &status_key(id), MAX_STATUS_BYTES).await?;
        let s: Status = serde_json::from_slice(&b)
            .map_err(|e| Error::archive(status_key(id), e.to_string()))?;
        if !s.usable() {
            return Err(Error::Checks(vec![format!(
                "manager snapshot {id:?} is {}{}; it cannot be used",
                s.status,
                s.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )]));
        }
        return Ok(Located {
            key: object_key(id),
            status: s,
        });
    }
    if store.head(&crate::repo::key(id, MANIFEST)).await?.is_some() {
        let m = crate::checks::read_manifest(store, id).await?;
        if let (Some(info), Some(obj)) = (&m.manager, m.object(OBJECT)) {
            return Ok(Located {
                key: crate::repo::key(id, OBJECT),
                status: from_manifest(id, info, obj),
            });
        }
        return Err(Error::NotFound(format!(
            "snapshot {id:?} in {} holds no manager snapshot",
            store.describe()
        )));
    }
    Err(Error::NotFound(format!(
        "manager snapshot {id:?} in {}",
        store.describe()
    )))
}

/// Download `key` into `out` (on a blocking thread), checking size and SHA-256
/// when known.
pub async fn download_into(
    store: &dyn Store,
    key: &str,
    size: Option<u64>,
    sha256: Option<&str>,
    out: &Path,
    keys: Option<&crate::crypt::Keys>,
    cancel: &CancellationToken,
) -> Result<()> {
    let (name, sha256, out, keys) = (
        key.to_string(),
        sha256.map(str::to_string),
        out.to_path_buf(),
        keys.cloned(),
    );
    crate::store::read_stream(store, key, cancel, move |reader| {
        let mut f = std::fs::File::create(&out).map_err(|e| Error::io("create", &out, e))?;
        // One byte past the recorded size is enough to know it is too large.
        let limit = size.map_or(u64::MAX, |s| s.saturating_add(1));
        // Checked as stored (the ciphertext of an encrypted one), written as read.
        let (tapped, tap) = TapReader::new(std::io::Read::take(reader, limit));
        // Keys open an age file; an object that is none is read as is (a clear
        // snapshot restored by a command that was given keys anyway).
        let mut tapped = std::io::BufReader::new(tapped);
        let age = std::io::BufRead::fill_buf(&mut tapped)
            .map(|b| b.starts_with(crate::crypt::AGE_MAGIC))
            .map_err(|e| Error::archive(&name, format!("cannot be read: {e}")))?;
        let mut r: Box<dyn std::io::Read> = match &keys {
            Some(k) if age => Box::new(k.reader(tapped, &name)?),
            _ => Box::new(tapped),
        };
        std::io::copy(&mut r, &mut f).map_err(|e| match &keys {
            Some(_) if e.kind() != std::io::ErrorKind::StorageFull => {
                Error::archive(&name, format!("cannot be decrypted: {e}"))
            }
            _ => Error::io("write", &out, e),
        })?;
        f.sync_all().map_err(|e| Error::io("sync", &out, e))?;
        drop(r);
        let (n, got) = tap.finish();
        if size.is_some_and(|s| s != n) {
            return Err(Error::archive(
                &name,
                format!("{n} bytes or more, {size:?} recorded"),
            ));
        }
        if sha256.is_some_and(|s| s != got) {
            return Err(Error::archive(
                &name,
                "does not match its recorded checksum (corrupt)",
            ));
        }
        Ok(())
    })
    .await
}

/// `cairn manager-snapshot download ID -o FILE`: never overwrites `out`.
/// An encrypted one is decrypted with `keys`, else written as stored (an age file
/// the `age` tool opens).
pub async fn download(
    store: &dyn Store,
    id: &str,
    out: &Path,
    keys: Option<&crate::crypt::Keys>,
    cancel: &CancellationToken,
) -> Result<Status> {
    let loc = locate(store, id).await?;
    if out.exists() {
        return Err(Error::Usage(format!(
            "{} exists; choose another file",
            out.display()
        )));
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".cairn-download-")
        .tempfile_in(dir)
        .map_err(|e| Error::io("create a file in", dir, e))?;
    download_into(
        store,
        &loc.key,
        loc.status.size,
        loc.status.sha256.as_deref(),
        tmp.path(),
        keys,
        cancel,
    )
    .await?;
    tmp.persist_noclobber(out)
        .map_err(|e| Error::io("save", out, e.error))?;
    Ok(loc.status)
}

/// `cairn manager-snapshot upload FILE [--id ID]`: the file is checked entry by
/// entry first; a file that fails is never uploaded.
pub async fn upload(
    store: &dyn Store,
    file: &Path,
    id: Option<&str>,
    cancel: &CancellationToken,
) -> Result<Status> {
    let f = file.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || zipfile::read(&f, None))
        .await
        .map_err(|e| Error::State(format!("check worker failed: {e}")))??;
    let id = id.map_or_else(|| checked.metadata.snapshot_id.clone(), str::to_string);
    check_id(&id)?;
    if exists(store, &id).await? {
        return Err(Error::Checks(vec![format!(
            "a manager snapshot {id:?} already exists in {}",
            store.describe()
        )]));
    }
    let len = std::fs::metadata(file)
        .map_err(|e| Error::io("stat", file, e))?
        .len();
    let f = file.to_path_buf();
    let ((), size, sha) = upload_stream(
        store,
        &object_key(&id),
        len,
        cancel,
        |_| {},
        move |sink| {
            let mut src = std::fs::File::open(&f).map_err(|e| Error::io("open", &f, e))?;
            std::io::copy(&mut src, sink).map_err(|e| Error::io("read", &f, e))?;
            Ok(())
        },
    )
    .await?;
    let mut s = Status::new(&id, "uploaded").with_meta(&checked.metadata, size, sha);
    s.format = Some(checked.written_format);
    put_status(store, &s).await?;
    Ok(s)
}

/// `cairn manager-snapshot delete ID`: the zip, then its status.
pub async fn delete(store: &dyn Store, id: &str) -> Result<()> {
    check_id(id)?;
    if store.head(&status_key(id)).await?.is_none() && store.head(&object_key(id)).await?.is_none()
    {
        if store.head(&crate::repo::key(id, OBJECT)).await?.is_some() {
            return Err(Error::Usage(format!(
                "{id:?} is the manager snapshot of snapshot {id:?}; delete the whole snapshot with `cairn snapshots delete {id}`"
            )));
        }
        return Err(Error::NotFound(format!(
            "manager snapshot {id:?} in {}",
            store.describe()
        )));
    }
    store.delete(&object_key(id)).await?;
    store.delete(&status_key(id)).await
}

/// Download the snapshot `id` beside the state dir and restore it into `m`.
pub async fn restore(
    store: &dyn Store,
    id: &str,
    m: &Manager,
    force: bool,
    disk: Arc<dyn Disk>,
    keys: Option<&crate::crypt::Keys>,
    cancel: &CancellationToken,
) -> Result<Report> {
    // Refuse a dirty manager before downloading anything.
    restore::check_clean(m, force)?;
    let loc = locate(store, id).await?;
    if let Some(v) = &loc.status.manager_version {
        restore::check_version(m, v)?;
    }
    restore_key(store, &loc.key, &loc.status, m, force, disk, keys, cancel).await
}

/// Restore the zip at `key` (expected size and checksum from `status`).
#[allow(clippy::too_many_arguments)]
pub async fn restore_key(
    store: &dyn Store,
    key: &str,
    status: &Status,
    m: &Manager,
    force: bool,
    disk: Arc<dyn Disk>,
    keys: Option<&crate::crypt::Keys>,
    cancel: &CancellationToken,
) -> Result<Report> {
    let tmp = restore::download_file(m)?;
    download_into(
        store,
        key,
        status.size,
        status.sha256.as_deref(),
        tmp.path(),
        keys,
        cancel,
    )
    .await?;
    if keys.is_none() && crate::crypt::is_age_file(tmp.path()) {
        return Err(Error::Refused(vec![format!(
            "{key} is encrypted: give its identity (AGE_IDENTITY=@key.txt to a plan, --identity FILE to a command)"
        )]));
    }
    let m = m.clone();
    tokio::task::spawn_blocking(move || {
        let r = restore::restore_file(&m, tmp.path(), force, &*disk);
        drop(tmp);
        r
    })
    .await
    .map_err(|e| Error::State(format!("restore worker failed: {e}")))?
}

/// What `status` shows about a manager.
#[derive(Debug, Serialize)]
pub struct ManagerStatus {
    pub kind: Kind,
    pub state_dir: PathBuf,
    pub version: String,
    pub credentials: String,
    pub clean: bool,
    pub not_clean: Vec<String>,
    pub pre_restore_copies: Vec<PathBuf>,
}

pub fn status(m: &Manager) -> Result<ManagerStatus> {
    let not_clean = m.not_clean()?;
    Ok(ManagerStatus {
        kind: m.kind,
        state_dir: m.state_dir.clone(),
        version: m.version.clone(),
        credentials: m.credentials.clone(),
        clean: not_clean.is_empty(),
        not_clean,
        pre_restore_copies: restore::pre_restore_copies(m)?,
    })
}
