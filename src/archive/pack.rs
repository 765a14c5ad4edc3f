//! Write a node's keyspaces as tar inside gzip, streaming: no copy is staged and
//! memory stays bounded whatever the data size. Output is deterministic for the same
//! files (sorted walk, gzip header without a timestamp), so a re-run step after a
//! crash produces the same object, and serial and parallel runs the same bytes.

use super::io::HashingReader;
use crate::cluster::Excludes;
use crate::manifest::{FileInfo, Span, TreeEntry};
use crate::{Error, Result};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One entry found by [`scan`].
#[derive(Debug, Clone)]
pub struct ScanEntry {
    pub abs: PathBuf,
    /// `/`-separated path inside the data dir, starting with the keyspace.
    pub rel: String,
    pub kind: Kind,
    pub mode: u32,
    pub mtime: i64,
    /// Modification time in nanoseconds, and inode: what a differential backup
    /// tells a change by.
    pub mtime_ns: i64,
    pub ino: u64,
    pub uid: u64,
    pub gid: u64,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir,
    File { size: u64 },
    Symlink { target: PathBuf },
}

/// What will be archived for one node.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub entries: Vec<ScanEntry>,
    pub total_bytes: u64,
    pub file_count: u64,
    /// Entries left out (sockets, FIFOs, devices), with a reason.
    pub skipped: Vec<String>,
    /// Entries a backup must refuse rather than archive wrongly: a keyspace or table
    /// that is a symlink (its data would be dropped), a link a restore would refuse
    /// (absolute, or out of the node).
    pub refused: Vec<String>,
    /// Entries left out by the exclusion patterns (a directory counts once).
    pub excluded: u64,
    /// User and group names of the owners found, looked up once each.
    pub names: Names,
}

/// uid/gid → name on this host (through the system's user database).
#[derive(Debug, Clone, Default)]
pub struct Names {
    users: std::collections::HashMap<u32, Option<String>>,
    groups: std::collections::HashMap<u32, Option<String>>,
}

impl Names {
    fn learn(&mut self, uid: u32, gid: u32) {
        self.users.entry(uid).or_insert_with(|| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name)
        });
        self.groups.entry(gid).or_insert_with(|| {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                .ok()
                .flatten()
                .map(|g| g.name)
        });
    }

    pub fn user(&self, uid: u32) -> Option<&str> {
        self.users.get(&uid).and_then(|n| n.as_deref())
    }

    pub fn group(&self, gid: u32) -> Option<&str> {
        self.groups.get(&gid).and_then(|n| n.as_deref())
    }
}

/// Walk `keyspaces` of `data_dir` in sorted order, leaving out what `excludes`
/// matches.
pub fn scan(data_dir: &Path, keyspaces: &[String], excludes: &Excludes) -> Result<Scan> {
    let mut out = Scan::default();
    for ks in keyspaces {
        if excludes.excludes(ks) {
            out.excluded += 1;
            continue;
        }
        walk(&data_dir.join(ks), ks, excludes, &mut out)?;
    }
    // A link that resolves through another link is refused by a restore (that is
    // how a chain escapes a check on its text): refuse it here, not later.
    let links: std::collections::HashSet<String> = out
        .entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::Symlink { .. }))
        .map(|e| e.rel.clone())
        .collect();
    for e in &out.entries {
        if let Kind::Symlink { target } = &e.kind
            && let Some(through) = crate::archive::unpack::link_through_link(&e.rel, target, &links)
        {
            out.refused.push(format!(
                "{} is a symbolic link to {} that resolves through the link {through}: a restore refuses links through links; point it at the file itself",
                e.rel,
                target.display()
            ));
        }
    }
    Ok(out)
}

fn walk(abs: &Path, rel: &str, excludes: &Excludes, out: &mut Scan) -> Result<()> {
    let meta = std::fs::symlink_metadata(abs).map_err(|e| Error::io("stat", abs, e))?;
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        out.total_bytes += meta.len();
        out.file_count += 1;
        Kind::File { size: meta.len() }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(abs).map_err(|e| Error::io("read link", abs, e))?;
        let depth = rel.matches('/').count();
        let to_dir = std::fs::metadata(abs).is_ok_and(|m| m.is_dir());
        if depth <= 1 && to_dir {
            let what = if depth == 0 { "keyspace" } else { "table" };
            out.refused.push(format!(
                "{what} {rel} is a symbolic link to {}: cairn does not follow links at keyspace or table level, and will not silently leave the data out; back up the directory it points to as a data dir, or replace the link by a bind mount",
                target.display()
            ));
            return Ok(());
        }
        if !crate::archive::unpack::link_stays_inside(rel, &target) {
            out.refused.push(format!(
                "{rel} is a symbolic link to {} outside the node: a restore would refuse it",
                target.display()
            ));
            return Ok(());
        }
        Kind::Symlink { target }
    } else {
        tracing::warn!(path = %abs.display(), "not a file, directory or symlink: left out");
        out.skipped
            .push(format!("{rel}: not a file, directory or symlink"));
        return Ok(());
    };
    out.names.learn(meta.uid(), meta.gid());
    out.entries.push(ScanEntry {
        abs: abs.to_path_buf(),
        rel: rel.to_string(),
        kind: kind.clone(),
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        ino: meta.ino(),
        uid: meta.uid() as u64,
        gid: meta.gid() as u64,
    });
    if let Kind::Dir = kind {
        let mut children = Vec::new();
        for entry in std::fs::read_dir(abs).map_err(|e| Error::io("list", abs, e))? {
            let entry = entry.map_err(|e| Error::io("list", abs, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(Error::Usage(format!(
                    "{}: file name is not UTF-8; cairn refuses rather than lose it",
                    entry.path().display()
                )));
            };
            if name.starts_with(crate::cluster::RESERVED_PREFIX) {
                out.refused.push(format!(
                    "{rel}/{name}: names starting with {} are reserved for cairn's own files and a restore refuses them; rename it",
                    crate::cluster::RESERVED_PREFIX
                ));
                continue;
            }
            children.push(name.to_string());
        }
        children.sort();
        for name in children {
            let child = format!("{rel}/{name}");
            if excludes.excludes(&child) {
                out.excluded += 1;
                continue;
            }
            walk(&abs.join(&name), &child, excludes, out)?;
        }
    }
    Ok(())
}

/// A reader that must yield exactly `size` bytes: a file that shrinks or grows while
/// it is archived fails the step instead of producing a corrupt archive.
struct Exact<R> {
    inner: R,
    left: u64,
    path: PathBuf,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // The scanned size is read: anything more means the file grew.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? != 0 {
                return Err(io::Error::other(format!(
                    "{} grew while it was archived; a live file needs a point-in-time snapshot (stop writes, or use a hard-link snapshot) before a backup",
                    self.path.display()
                )));
            }
            return Ok(0);
        }
        let want = out
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was archived", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn header(e: &ScanEntry, kind: tar::EntryType, size: u64, names: &Names) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(e.mode);
    h.set_mtime(u64::try_from(e.mtime).unwrap_or(0));
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    // Names too (as tar does), so a restore can map them on another host; a name
    // too long for the header is left out (the number stays).
    if let Some(u) = u32::try_from(e.uid).ok().and_then(|u| names.user(u)) {
        let _ = h.set_username(u);
    }
    if let Some(g) = u32::try_from(e.gid).ok().and_then(|g| names.group(g)) {
        let _ = h.set_groupname(g);
    }
    h
}

/// The compressor every node archive goes through: parallel gzip at level
/// [`super::GZIP_LEVEL`] (or zstd) on as many threads as the machine has cores.
pub fn compressor<W: Write>(out: W, codec: super::Codec) -> super::pargz::ParGzEncoder<W> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    super::pargz::ParGzEncoder::with_codec(out, codec, super::GZIP_LEVEL, threads)
}

/// Reports progress every few MiB while a (possibly huge) file is read.
struct Progressing<'a, R> {
    inner: R,
    base: u64,
    read: u64,
    last: u64,
    report: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Progressing<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.read += n as u64;
        if self.read - self.last >= 4 << 20 {
            self.last = self.read;
            (self.report)(self.base + self.read);
        }
        Ok(n)
    }
}

/// What [`pack`] wrote, as the manifest records it.
#[derive(Debug, Clone, Default)]
pub struct Packed {
    /// Every regular file, sorted by path, with its place in the tar stream.
    pub files: Vec<FileInfo>,
    /// Directories and symbolic links, in archive order.
    pub tree: Vec<TreeEntry>,
    /// Where each compressed block starts.
    pub index: super::pargz::Index,
}

fn tree_entry(e: &ScanEntry, offset: u64, link: Option<String>, names: &Names) -> TreeEntry {
    let (uid, gid) = (u32::try_from(e.uid).ok(), u32::try_from(e.gid).ok());
    TreeEntry {
        path: e.rel.clone(),
        offset,
        link,
        mode: e.mode & 0o7777,
        mtime: e.mtime,
        uid,
        gid,
        user: uid.and_then(|u| names.user(u)).map(str::to_string),
        group: gid.and_then(|g| names.group(g)).map(str::to_string),
    }
}

/// Archive the scanned entries into `out` (tar inside gzip or zstd). `progress` is
/// called with the number of file bytes read so far. Returns the listing (files,
/// tree and block index) and `out`, flushed and finished.
pub fn pack<W: Write>(
    scan: &Scan,
    out: W,
    codec: super::Codec,
    progress: impl FnMut(u64),
) -> Result<(Packed, W)> {
    pack_changed(scan, out, codec, progress, &HashMap::new())
}

/// Files of a differential backup's parent, by path: where each is held (`object`,
/// from the store's root, and `entry`) and what it was.
pub type Base = HashMap<String, FileInfo>;

/// Which scanned files are unchanged since `base` (same size, modification time,
/// inode, permission bits and owner; with `rehash`, same size and SHA-256, read
/// again), with the parent's record of each: a differential backup references
/// them instead of archiving them.
pub fn unchanged(scan: &Scan, base: &Base, rehash: bool) -> Result<Base> {
    let mut out = HashMap::new();
    for e in &scan.entries {
        let Kind::File { size } = e.kind else {
            continue;
        };
        let Some(b) = base.get(&e.rel) else {
            continue;
        };
        if b.size != size || b.object.is_none() || b.entry.is_none() {
            continue;
        }
        let same = if rehash {
            let file = std::fs::File::open(&e.abs).map_err(|err| Error::io("open", &e.abs, err))?;
            let mut r = HashingReader::new(Exact {
                inner: io::BufReader::with_capacity(256 << 10, file),
                left: size,
                path: e.abs.clone(),
            });
            io::copy(&mut r, &mut io::sink()).map_err(|err| Error::io("read", &e.abs, err))?;
            let (_, sha, _) = r.finish();
            sha == b.sha256
        } else {
            b.mtime_ns == Some(e.mtime_ns)
                && b.inode == Some(e.ino)
                && b.mode == Some(e.mode & 0o7777)
                && b.uid.map(u64::from) == Some(e.uid)
                && b.gid.map(u64::from) == Some(e.gid)
        };
        if same {
            out.insert(e.rel.clone(), b.clone());
        }
    }
    Ok(out)
}

/// [`pack`], leaving out the files of `unchanged` (their records, which say
/// where they are held, go into the listing as they are).
pub fn pack_changed<W: Write>(
    scan: &Scan,
    out: W,
    codec: super::Codec,
    mut progress: impl FnMut(u64),
    unchanged: &Base,
) -> Result<(Packed, W)> {
    let mut tar = tar::Builder::new(compressor(out, codec));
    let mut files = Vec::with_capacity(scan.file_count as usize);
    let mut tree = Vec::new();
    let mut done = 0u64;
    let wrap = |path: &Path, e: io::Error| Error::io("archive", path, e);
    for e in &scan.entries {
        // The tar builder writes each entry whole (headers, data, padding) before
        // it returns: the positions around it are its span.
        let offset = tar.get_ref().position();
        match &e.kind {
            Kind::Dir => {
                let mut h = header(e, tar::EntryType::Directory, 0, &scan.names);
                tar.append_data(&mut h, format!("{}/", e.rel), io::empty())
                    .map_err(|err| wrap(&e.abs, err))?;
                tree.push(tree_entry(e, offset, None, &scan.names));
            }
            Kind::Symlink { target } => {
                let mut h = header(e, tar::EntryType::Symlink, 0, &scan.names);
                tar.append_link(&mut h, &e.rel, target)
                    .map_err(|err| wrap(&e.abs, err))?;
                let text = target.to_str().ok_or_else(|| {
                    Error::io(
                        "archive",
                        &e.abs,
                        io::Error::other("the link's target is not UTF-8"),
                    )
                })?;
                tree.push(tree_entry(e, offset, Some(text.to_string()), &scan.names));
            }
            Kind::File { .. } if unchanged.contains_key(&e.rel) => {
                if let Some(b) = unchanged.get(&e.rel) {
                    files.push(b.clone());
                }
            }
            Kind::File { size } => {
                let file =
                    std::fs::File::open(&e.abs).map_err(|err| Error::io("open", &e.abs, err))?;
                let mut reader = HashingReader::new(Progressing {
                    inner: Exact {
                        inner: io::BufReader::with_capacity(256 << 10, file),
                        left: *size,
                        path: e.abs.clone(),
                    },
                    base: done,
                    read: 0,
                    last: 0,
                    report: &mut progress,
                });
                let mut h = header(e, tar::EntryType::Regular, *size, &scan.names);
                tar.append_data(&mut h, &e.rel, &mut reader)
                    .map_err(|err| wrap(&e.abs, err))?;
                let (n, sha256, _) = reader.finish();
                done += n;
                progress(done);
                let entry = Span {
                    offset,
                    length: tar.get_ref().position() - offset,
                };
                let (uid, gid) = (u32::try_from(e.uid).ok(), u32::try_from(e.gid).ok());
                files.push(FileInfo {
                    path: e.rel.clone(),
                    size: n,
                    sha256,
                    uid,
                    gid,
                    user: uid.and_then(|u| scan.names.user(u)).map(str::to_string),
                    group: gid.and_then(|g| scan.names.group(g)).map(str::to_string),
                    entry: Some(entry),
                    object: None,
                    mtime_ns: Some(e.mtime_ns),
                    inode: Some(e.ino),
                    mode: Some(e.mode & 0o7777),
                });
            }
        }
    }
    let gz = tar
        .into_inner()
        .map_err(|e| Error::io("finish tar of", "node", e))?;
    let (out, index) = gz
        .finish_indexed()
        .map_err(|e| Error::io("finish gzip of", "node", e))?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((Packed { files, tree, index }, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_grows_while_archived_fails_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("ks/t/data.db");
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, b"0123456789").expect("write");
        let scan = scan(dir.path(), &["ks".to_string()], &Excludes::default()).expect("scan");
        std::fs::write(&f, b"0123456789 and more written by a live service").expect("grow");
        let err =
            pack(&scan, Vec::new(), crate::archive::Codec::Gzip, |_| {}).expect_err("must fail");
        assert!(err.to_string().contains("grew"), "{err}");
        assert!(err.to_string().contains("data.db"), "{err}");
    }

    #[test]
    fn symlinked_keyspaces_and_tables_and_escaping_links_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("ks/t")).expect("mkdir");
        std::fs::create_dir_all(other.path().join("t2")).expect("mkdir");
        std::os::unix::fs::symlink(other.path(), dir.path().join("ks2")).expect("link");
        std::os::unix::fs::symlink(other.path().join("t2"), dir.path().join("ks/t2"))
            .expect("link");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("ks/t/abs")).expect("link");
        std::os::unix::fs::symlink("data.db", dir.path().join("ks/t/ok")).expect("link");
        let s = scan(
            dir.path(),
            &["ks".to_string(), "ks2".to_string()],
            &Excludes::default(),
        )
        .expect("scan");
        let text = s.refused.join("\n");
        assert!(text.contains("keyspace ks2"), "{text}");
        assert!(text.contains("table ks/t2"), "{text}");
        assert!(text.contains("ks/t/abs"), "{text}");
        assert_eq!(s.refused.len(), 3, "{text}");
    }

    #[test]
    fn the_default_patterns_leave_out_logs_temporaries_and_cassandras_own_snapshots() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in [
            "ks/t-1/nb-1-big-Data.db",
            "ks/t-1/nb-2-big-Data.db-tmp-x",
            "ks/t-1/nb-3-tmp-big-Data.db",
            "ks/t-1/snapshots/s1/nb-1-big-Data.db",
            "ks/t-1/backups/nb-1-big-Data.db",
            "ks/t-1/sub/snapshots/kept.db",
            "ks/CommitLog-7-1.log",
            "commitlog/CommitLog-7-2.log",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, b"x").expect("write");
        }
        let ex = crate::cluster::Capture::default()
            .excludes()
            .expect("patterns");
        let s = scan(
            dir.path(),
            &["ks".to_string(), "commitlog".to_string()],
            &ex,
        )
        .expect("scan");
        let files: Vec<&str> = s
            .entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::File { .. }))
            .map(|e| e.rel.as_str())
            .collect();
        assert_eq!(
            files,
            ["ks/t-1/nb-1-big-Data.db", "ks/t-1/sub/snapshots/kept.db"]
        );
        assert_eq!(s.excluded, 6);
    }
}
