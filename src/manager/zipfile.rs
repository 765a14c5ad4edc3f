//! Writing `manager.zip` as a stream, and reading one back without trusting it.
//!
//! The writer needs no `Seek` (data descriptors), so the zip goes straight into the
//! store's part uploader; entries of 4 GiB and more are written as ZIP64, and so is
//! an archive whose directory lies beyond 4 GiB. `metadata.json` is the last entry:
//! its checksums are computed while the files stream past.
//!
//! The reader refuses, before writing anything of the entry in question: duplicate
//! names, names not declared by the metadata (so no absolute path, `..` or other
//! escape can reach the file system: declared paths are validated plain relative
//! paths), directories and links, an entry whose header size differs from the
//! declared one; while reading, it stops at the declared size (a deflate bomb is
//! cut off at one byte more) and at the declared total, and checks every SHA-256.

use super::format::{self, Metadata};
use super::{CLUSTER_ENTRY, Kind, Manager, STATE_DB};
use crate::archive::io::HashingReader;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use zip::write::SimpleFileOptions;

/// Entries at least this large are written with ZIP64 sizes.
const LARGE_ENTRY: u64 = 0xFFFF_0000;

/// One file to put in a snapshot.
#[derive(Debug, Clone)]
pub struct Source {
    /// Path relative to the state dir.
    pub path: String,
    pub file: PathBuf,
    pub size: u64,
    pub mode: u32,
    /// For a credential: its path relative to the credentials dir.
    pub credentials: Option<String>,
}

/// The files of a snapshot, and the temporary copies some of them are read from.
pub struct Prepared {
    pub sources: Vec<Source>,
    _tmp: Option<tempfile::TempDir>,
}

/// Choose the files of a snapshot of `m` (blocking).
pub fn prepare(m: &Manager, include_credentials: bool) -> Result<Prepared> {
    match m.kind {
        Kind::Declared => {
            let files = match super::walk(&m.state_dir) {
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::Checks(vec![format!(
                        "the manager state dir {} does not exist: nothing to snapshot",
                        m.state_dir.display()
                    )]));
                }
                r => r?,
            };
            let cred_prefix = format!("{}/", m.credentials);
            let mut sources = Vec::new();
            for f in files {
                if Some(&f.path) == m.version_entry.as_ref() {
                    continue;
                }
                let credentials = f.path.strip_prefix(&cred_prefix).map(str::to_string);
                if credentials.is_some() && !include_credentials {
                    continue;
                }
                sources.push(Source {
                    file: m.state_dir.join(&f.path),
                    path: f.path,
                    size: f.size,
                    mode: f.mode,
                    credentials,
                });
            }
            Ok(Prepared {
                sources,
                _tmp: None,
            })
        }
        Kind::Own => {
            let tmp = tempfile::Builder::new()
                .prefix("cairn-manager-")
                .tempdir()
                .map_err(|e| Error::io("create a temporary dir", std::env::temp_dir(), e))?;
            let mut sources = Vec::new();
            let db = m.state_dir.join(STATE_DB);
            if db.exists() {
                // A consistent copy, also while a run writes to the live database.
                let copy = tmp.path().join(STATE_DB);
                let conn = rusqlite::Connection::open_with_flags(
                    &db,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .map_err(|e| Error::State(format!("open {}: {e}", db.display())))?;
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .map_err(|e| Error::State(e.to_string()))?;
                let target = copy.to_str().ok_or_else(|| {
                    Error::Usage(format!("{}: path is not UTF-8", copy.display()))
                })?;
                conn.execute("VACUUM INTO ?1", [target])
                    .map_err(|e| Error::State(format!("copy {}: {e}", db.display())))?;
                sources.push(source_of(STATE_DB, copy)?);
            }
            if let Some(c) = &m.cluster_file {
                sources.push(source_of(CLUSTER_ENTRY, c.clone())?);
            }
            Ok(Prepared {
                sources,
                _tmp: Some(tmp),
            })
        }
    }
}

fn source_of(path: &str, file: PathBuf) -> Result<Source> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&file).map_err(|e| Error::io("stat", &file, e))?;
    Ok(Source {
        path: path.to_string(),
        size: meta.len(),
        mode: meta.permissions().mode() & 0o777,
        file,
        credentials: None,
    })
}

/// What the metadata says besides the entries.
pub struct Header {
    pub id: String,
    pub manager_version: String,
    pub include_credentials: bool,
}

/// Write the snapshot as a zip stream into `w` (blocking); returns the metadata
/// written and `w`.
pub fn write<W: Write>(
    prepared: &Prepared,
    header: &Header,
    w: W,
    mut on_bytes: impl FnMut(u64),
) -> Result<(Metadata, W)> {
    let zerr = |e: zip::result::ZipError| Error::io("write manager.zip", "manager.zip", e.into());
    let mut zw = zip::ZipWriter::new_stream(w);
    let base = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default());
    let mut entries = Vec::new();
    let mut done = 0u64;
    for s in &prepared.sources {
        let (kind, path) = match &s.credentials {
            Some(rel) => (format::EntryKind::Credentials, rel.clone()),
            None => (format::EntryKind::State, s.path.clone()),
        };
        let entry = format::Entry {
            name: format::Entry::name_for(kind, &path),
            kind,
            path,
            size: 0,
            sha256: String::new(),
            mode: s.mode,
        };
        zw.start_file(
            entry.name.clone(),
            base.unix_permissions(s.mode)
                .large_file(s.size >= LARGE_ENTRY),
        )
        .map_err(zerr)?;
        let f = File::open(&s.file).map_err(|e| Error::io("read", &s.file, e))?;
        let mut r = HashingReader::new(f.take(s.size + 1));
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| Error::io("read", &s.file, e))?;
            if n == 0 {
                break;
            }
            zw.write_all(&buf[..n])
                .map_err(|e| Error::io("write manager.zip", "manager.zip", e))?;
            done += n as u64;
            on_bytes(done);
        }
        let (size, sha256, _) = r.finish();
        if size != s.size {
            return Err(Error::Usage(format!(
                "{} changed size while it was read ({} → {size} bytes); stop the manager or retry",
                s.file.display(),
                s.size
            )));
        }
        entries.push(format::Entry {
            size,
            sha256,
            ..entry
        });
    }
    let meta = Metadata {
        format_version: format::CURRENT,
        snapshot_id: header.id.clone(),
        manager_version: header.manager_version.clone(),
        cairn_version: crate::VERSION.to_string(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        credentials_included: header.include_credentials,
        total_bytes: entries.iter().map(|e| e.size).sum(),
        entries,
    };
    zw.start_file(format::METADATA, base.unix_permissions(0o600))
        .map_err(zerr)?;
    zw.write_all(&meta.to_bytes()?)
        .map_err(|e| Error::io("write manager.zip", "manager.zip", e))?;
    let inner = zw.finish().map_err(zerr)?;
    Ok((meta, inner.into_inner()))
}

/// A snapshot that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub metadata: Metadata,
    /// The format the file was written in (before migrations).
    pub written_format: u32,
}

/// A zip opened once: its metadata read (and migrated), its entries not yet.
pub struct Opened {
    archive: zip::ZipArchive<File>,
    pub checked: Checked,
}

/// Open the zip at `path` and read its metadata (migrated to the current format).
pub fn open_snapshot(path: &Path) -> Result<Opened> {
    let mut archive = open(path)?;
    let checked = metadata_of(&mut archive)?;
    Ok(Opened { archive, checked })
}

/// Check every entry of the zip at `path` against its metadata; with `dest`, write
/// the files into that (new, empty) directory, credentials under its
/// `credentials_dir`.
pub fn read(path: &Path, dest: Option<(&Path, &str)>) -> Result<Checked> {
    open_snapshot(path)?.read_entries(dest)
}

impl Opened {
    /// See [`read`].
    pub fn read_entries(self, dest: Option<(&Path, &str)>) -> Result<Checked> {
        let Opened {
            mut archive,
            checked,
        } = self;
        read_entries(&mut archive, checked, dest)
    }
}

fn read_entries(
    archive: &mut zip::ZipArchive<File>,
    checked: Checked,
    dest: Option<(&Path, &str)>,
) -> Result<Checked> {
    let meta = &checked.metadata;
    let bad = |m: String| Error::archive("manager.zip", m);
    let declared: BTreeMap<String, &format::Entry> =
        meta.entries.iter().map(|e| (e.name.clone(), e)).collect();
    let total = meta.total_bytes;
    let mut seen = std::collections::BTreeSet::new();
    let mut read_total = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    for i in 0..archive.len() {
        let file = archive
            .by_index(i)
            .map_err(|e| bad(format!("entry {i}: {e}")))?;
        let name = file
            .name()
            .map_err(|e| bad(format!("entry {i}: {e}")))?
            .to_string();
        if name == format::METADATA {
            continue;
        }
        if file.is_symlink() {
            return Err(bad(format!("entry {name:?} is a link")));
        }
        if file.is_dir() {
            return Err(bad(format!("entry {name:?} is a directory entry")));
        }
        let Some(entry) = declared.get(&name) else {
            return Err(bad(format!(
                "entry {name:?} is not declared by the metadata"
            )));
        };
        if file.enclosed_name().is_none() {
            return Err(bad(format!("entry {name:?} escapes the target")));
        }
        if !seen.insert(name.clone()) {
            return Err(bad(format!("entry {name:?} appears twice")));
        }
        if file.size() != entry.size {
            return Err(bad(format!(
                "entry {name:?} declares {} bytes in the zip but {} in the metadata",
                file.size(),
                entry.size
            )));
        }
        let mut out = match dest {
            Some((d, credentials_dir)) => {
                let target = d.join(entry.destination(credentials_dir));
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::io("create dir", parent, e))?;
                }
                Some((
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&target)
                        .map_err(|e| Error::io("create", &target, e))?,
                    target,
                ))
            }
            None => None,
        };
        let mut r = HashingReader::new(file.take(entry.size + 1));
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| bad(format!("entry {name:?}: {e}")))?;
            if n == 0 {
                break;
            }
            read_total += n as u64;
            if r.count() > entry.size {
                return Err(bad(format!(
                    "entry {name:?} is larger than its declared {} bytes",
                    entry.size
                )));
            }
            if read_total > total {
                return Err(bad(format!(
                    "entries are larger than the declared total of {total} bytes"
                )));
            }
            if let Some((f, target)) = &mut out {
                f.write_all(&buf[..n])
                    .map_err(|e| Error::io("write", &*target, e))?;
            }
        }
        let (size, sha256, _) = r.finish();
        if size != entry.size {
            return Err(bad(format!(
                "entry {name:?} has {size} bytes, {} declared",
                entry.size
            )));
        }
        if sha256 != entry.sha256 {
            return Err(bad(format!(
                "entry {name:?} does not match its checksum (corrupt)"
            )));
        }
        if let Some((f, target)) = out {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(entry.mode & 0o777))
                .map_err(|e| Error::io("set permissions of", &target, e))?;
            f.sync_all().map_err(|e| Error::io("sync", &target, e))?;
        }
    }
    if let Some(missing) = declared.keys().find(|k| !seen.contains(*k)) {
        return Err(bad(format!("entry {missing:?} is declared but missing")));
    }
    Ok(checked)
}

fn open(path: &Path) -> Result<zip::ZipArchive<File>> {
    let f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let archive = zip::ZipArchive::new(f)
        .map_err(|e| Error::archive("manager.zip", format!("not a readable zip: {e}")))?;
    if archive.has_duplicate_names() {
        return Err(Error::archive(
            "manager.zip",
            "two entries have the same name",
        ));
    }
    Ok(archive)
}

fn metadata_of(archive: &mut zip::ZipArchive<File>) -> Result<Checked> {
    let bad = |m: String| Error::archive("manager.zip", m);
    let i = archive
        .index_for_name(format::METADATA)
        .ok_or_else(|| bad(format!("no {} entry", format::METADATA)))?;
    let file = archive
        .by_index(i)
        .map_err(|e| bad(format!("{}: {e}", format::METADATA)))?;
    if file.size() > format::MAX_METADATA_BYTES {
        return Err(bad(format!("{} is too large", format::METADATA)));
    }
    let mut data = Vec::new();
    file.take(format::MAX_METADATA_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| bad(format!("{}: {e}", format::METADATA)))?;
    if data.len() as u64 > format::MAX_METADATA_BYTES {
        return Err(bad(format!("{} is too large", format::METADATA)));
    }
    let (metadata, written_format) = format::read_any(&data)?;
    Ok(Checked {
        metadata,
        written_format,
    })
}
