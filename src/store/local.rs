//! A directory store (`file:///path`): the embedded default that needs no cloud.
//!
//! Objects become visible only when complete: data goes to a temp file under
//! `<root>/.cairn-tmp/`, is fsynced, then renamed into place and the directory
//! fsynced. Multipart parts are written at their offsets, so several may be in
//! flight at once. A temp file left by a killed process is never listed.

use super::{ByteStream, Limits, MultipartUpload, ObjectMeta, PartInfo, Store, check_key};
use crate::{Error, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const TMP_DIR: &str = crate::repo::TMP;

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn blocking_err(key: &str, e: tokio::task::JoinError) -> Error {
    Error::store("run", key, format!("worker thread failed: {e}"))
}

impl LocalStore {
    pub fn new(root: impl AsRef<Path>) -> Result<LocalStore> {
        let root = std::path::absolute(root.as_ref())
            .map_err(|e| Error::io("resolve store dir", root.as_ref(), e))?;
        // One spelling per directory (`a/./b/` is `a/b`): a resume compares it.
        let root = root.components().collect();
        Ok(LocalStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        if key.split('/').next() == Some(TMP_DIR) {
            return Err(Error::store("use key", key, "reserved key"));
        }
        no_links_below(&self.root, key)?;
        Ok(self.root.join(key))
    }

    fn temp_file(&self) -> Result<(tempfile::NamedTempFile, PathBuf)> {
        let dir = self.root.join(TMP_DIR);
        no_links_below(&self.root, TMP_DIR)?;
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create store dir", &dir, e))?;
        sweep_dead_uploads(&dir);
        let tmp = tempfile::Builder::new()
            .prefix(&upload_prefix(std::process::id()))
            .tempfile_in(&dir)
            .map_err(|e| Error::io("create temp file in", &dir, e))?;
        Ok((tmp, dir))
    }
}

/// Temp files are named after the host and process writing them, so the next
/// writer can remove those whose process is gone (killed mid-upload).
fn upload_prefix(pid: u32) -> String {
    format!("{}{pid}-", host_prefix())
}

fn host_prefix() -> String {
    let host: String = crate::lock::hostname()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("upload-{host}-")
}

/// Remove temp files of this host's processes that no longer exist.
fn sweep_dead_uploads(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let host_prefix = host_prefix();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(host_prefix.as_str()))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i64>().ok()) else {
            continue;
        };
        if !crate::engine::process_alive(pid) {
            tracing::info!(file = %e.path().display(), "removing an upload a dead process left");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Refuse a key whose path below the store root passes through a symlink: a link
/// planted in the store (`<snapshot> -> elsewhere`) must not redirect writes or
/// deletes out of it. The root itself may be a link (the operator's choice).
fn no_links_below(root: &Path, key: &str) -> Result<()> {
    let mut p = root.to_path_buf();
    for c in key.split('/') {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::store(
                    "use key",
                    key,
                    format!(
                        "{} is a symbolic link inside the store; refused (a store never follows links)",
                        p.display()
                    ),
                ));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// fsync a file's data, rename it to `dest` (creating parents), fsync the directory.
fn publish(tmp: tempfile::NamedTempFile, dest: &Path) -> Result<()> {
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io("fsync", tmp.path(), e))?;
    let parent = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(|e| Error::io("create dir", parent, e))?;
    tmp.persist(dest)
        .map_err(|e| Error::io("rename into place", dest, e.error))?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync dir", parent, e))?;
    Ok(())
}

struct LocalUpload {
    key: String,
    dest: PathBuf,
    tmp: Option<tempfile::NamedTempFile>,
    file: Arc<std::fs::File>,
}

#[async_trait]
impl MultipartUpload for LocalUpload {
    async fn put_part(&self, part: PartInfo, data: Bytes) -> Result<()> {
        let file = self.file.clone();
        let key = self.key.clone();
        let dest = self.dest.clone();
        tokio::task::spawn_blocking(move || {
            file.write_all_at(&data, part.offset)
                .map_err(|e| Error::io("write part of", dest, e))
        })
        .await
        .map_err(|e| blocking_err(&key, e))?
    }

    async fn complete(mut self: Box<Self>, _parts: usize, size: u64) -> Result<()> {
        let Some(tmp) = self.tmp.take() else {
            return Err(Error::store(
                "complete",
                &self.key,
                "upload already finished",
            ));
        };
        let dest = self.dest.clone();
        let key = self.key.clone();
        tokio::task::spawn_blocking(move || {
            let len = tmp
                .as_file()
                .metadata()
                .map_err(|e| Error::io("stat", tmp.path(), e))?
                .len();
            if len != size {
                return Err(Error::store(
                    "complete",
                    dest.display().to_string(),
                    format!("wrote {len} bytes, expected {size}"),
                ));
            }
            publish(tmp, &dest)
        })
        .await
        .map_err(|e| blocking_err(&key, e))?
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        // Dropping the NamedTempFile removes it.
        drop(self.tmp.take());
        Ok(())
    }
}

#[async_trait]
impl Store for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn exists(&self) -> Result<bool> {
        Ok(self.root.is_dir())
    }

    fn limits(&self) -> Limits {
        Limits {
            min_part_size: 8 << 20,
            max_parts: usize::MAX,
            concurrency: 2,
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let dest = self.path(key)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let (mut tmp, _) = this.temp_file()?;
            std::io::Write::write_all(&mut tmp, &data)
                .map_err(|e| Error::io("write", tmp.path(), e))?;
            publish(tmp, &dest)
        })
        .await
        .map_err(|e| blocking_err(key, e))?
    }

    async fn start_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>> {
        let dest = self.path(key)?;
        let this = self.clone();
        let (tmp, file) = tokio::task::spawn_blocking(move || {
            let (tmp, _) = this.temp_file()?;
            let file = tmp
                .as_file()
                .try_clone()
                .map_err(|e| Error::io("open", tmp.path(), e))?;
            Ok::<_, Error>((tmp, file))
        })
        .await
        .map_err(|e| blocking_err(key, e))??;
        Ok(Box::new(LocalUpload {
            key: key.to_string(),
            dest,
            tmp: Some(tmp),
            file: Arc::new(file),
        }))
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let path = self.path(key)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("{}/{key}", self.describe())));
            }
            Err(e) => return Err(Error::io("open", path, e)),
        };
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
            .map(move |r| r.map_err(|e| Error::io("read", path.clone(), e)));
        Ok(Box::pin(stream))
    }

    async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<ByteStream> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path(key)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("{}/{key}", self.describe())));
            }
            Err(e) => return Err(Error::io("open", path, e)),
        };
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| Error::io("seek in", &path, e))?;
        let part = file.take(end.saturating_sub(start));
        let stream = tokio_util::io::ReaderStream::with_capacity(part, 256 << 10)
            .map(move |r| r.map_err(|e| Error::io("read", path.clone(), e)));
        Ok(Box::pin(stream))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                modified: unix_secs(&m),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", path, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, &root, &prefix, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| blocking_err("list", e))?
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::io("delete", &path, e)),
            }
            // Remove parent dirs left empty, up to the root.
            let mut dir = path.parent();
            while let Some(d) = dir {
                if d == root || std::fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        })
        .await
        .map_err(|e| blocking_err(key, e))?
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let path = entry.path();
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let Some(key) = rel.to_str().map(str::to_string) else {
            continue;
        };
        if key == TMP_DIR {
            continue;
        }
        let ft = entry.file_type().map_err(|e| Error::io("stat", &path, e))?;
        if ft.is_dir() {
            // Descend only where the prefix can still match.
            let as_dir = format!("{key}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                walk(root, &path, prefix, out)?;
            }
        } else if ft.is_file() && key.starts_with(prefix) {
            let meta = entry.metadata().map_err(|e| Error::io("stat", &path, e))?;
            out.push(ObjectMeta {
                key,
                size: meta.len(),
                modified: unix_secs(&meta),
            });
        }
    }
    Ok(())
}

fn unix_secs(m: &std::fs::Metadata) -> Option<i64> {
    let t = m.modified().ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_secs()).ok()
}
