//! Read a node archive safely.
//!
//! Every entry is checked before anything is written: the path must be relative,
//! without `..`, inside a keyspace the manifest declares for this node, and seen only
//! once; regular files must be declared by the manifest with exactly the size the
//! header gives; symlinks must point inside the node and are never written through;
//! hard links, devices, FIFOs and other types are refused. setuid/setgid/sticky bits
//! are dropped. Every file's SHA-256 is checked, and so are the object's size and
//! SHA-256, and at the end every declared file must have been seen.
//!
//! In [`Mode::Extract`] files go into a fresh directory the caller owns (a staging
//! dir); on error the caller removes it, so nothing outside is ever written.

use crate::cluster::Selection;
use crate::manifest::{FileInfo, NodeInfo};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

pub enum Mode<'a> {
    /// Write into this (fresh, empty) directory.
    Extract(&'a Path),
    /// Read and check everything, write nothing.
    Verify,
}

/// What was read.
#[derive(Debug, Clone, Default)]
pub struct Unpacked {
    /// Bytes read from the store.
    pub read: u64,
    /// The first [`HEAD`] bytes of each block of [`super::pargz::BLOCK`] bytes of the
    /// uncompressed stream (a whole read only): what `snapshots verify` compares
    /// with what the block index says starts there.
    pub heads: Vec<Vec<u8>>,
    /// Bytes of the uncompressed stream (a whole read only).
    pub stream_bytes: u64,
    pub object_size: u64,
    pub object_sha256: String,
    pub files: u64,
    pub bytes: u64,
}

/// What the manifest says about the object being read.
pub struct Expected<'a> {
    /// The object's name, for messages.
    pub object: &'a str,
    pub node: &'a NodeInfo,
    pub object_size: u64,
    pub object_sha256: &'a str,
    /// The object is an age file: what opens it.
    pub keys: Option<&'a crate::crypt::Keys>,
    /// Who owns what is extracted (`None`: whoever extracts).
    pub owners: Option<&'a Owners>,
    /// Table dirs extracted under another name (`TABLE_MAPPING=by-name`); the
    /// manifest entry `node` already names them so.
    pub renames: &'a [(String, String)],
    /// The reader gives a plain tar of the selected entries cut out of the object
    /// ([`super::seek`]), not the object: the object's size and checksum are not
    /// checked (each file's still is) and only selected files must be present.
    pub partial: bool,
    /// Leave the directories' modes and times alone (created writable): a later
    /// read into the same tree sets them (a node read from several objects).
    pub dirs_open: bool,
}

/// Who owns restored entries: a fixed `user:group` from the target's cluster
/// description, else the snapshot's owner by name where this host knows the name,
/// else by number. Only root may give files away; anyone else keeps them (warned
/// once).
#[derive(Debug)]
pub struct Owners {
    fixed: (Option<u32>, Option<u32>),
    cache: std::sync::Mutex<OwnerCache>,
    root: bool,
}

#[derive(Debug, Default)]
struct OwnerCache {
    users: HashMap<String, Option<u32>>,
    groups: HashMap<String, Option<u32>>,
    warned: bool,
}

impl Clone for Owners {
    /// The same owners, with a cache of its own.
    fn clone(&self) -> Owners {
        Owners {
            fixed: self.fixed,
            cache: std::sync::Mutex::new(OwnerCache::default()),
            root: self.root,
        }
    }
}

impl Owners {
    /// `owner`: `user:group` of the target's description (names or numbers, looked
    /// up on this host).
    pub fn new(owner: Option<&str>) -> Result<Owners> {
        let mut fixed = (None, None);
        if let Some(text) = owner {
            let (u, g) = crate::cluster::parse_owner(text).map_err(Error::Usage)?;
            let uid = match u.parse::<u32>() {
                Ok(n) => n,
                Err(_) => nix::unistd::User::from_name(&u)
                    .ok()
                    .flatten()
                    .map(|x| x.uid.as_raw())
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "owner {text:?}: there is no user {u:?} on this host"
                        ))
                    })?,
            };
            let gid = match &g {
                // `user` alone: the user's own group, as chown(1) does for `user:`.
                None => Some(
                    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                        .ok()
                        .flatten()
                        .map(|x| x.gid.as_raw())
                        .ok_or_else(|| {
                            Error::Usage(format!(
                                "owner {text:?}: user {u:?} has no entry on this host to take a group from; give user:group"
                            ))
                        })?,
                ),
                Some(g) => Some(match g.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => nix::unistd::Group::from_name(g)
                        .ok()
                        .flatten()
                        .map(|x| x.gid.as_raw())
                        .ok_or_else(|| {
                            Error::Usage(format!(
                                "owner {text:?}: there is no group {g:?} on this host"
                            ))
                        })?,
                }),
            };
            fixed = (Some(uid), gid);
        }
        let root = nix::unistd::geteuid().is_root();
        if !root
            && let (Some(uid), _) = fixed
            && uid != nix::unistd::geteuid().as_raw()
        {
            return Err(Error::Usage(format!(
                "owner {:?}: only root can give restored files to another user; restore as root, or drop `owner`",
                owner.unwrap_or_default()
            )));
        }
        Ok(Owners {
            fixed,
            cache: Default::default(),
            root,
        })
    }

    /// The owner an entry with this header gets.
    fn of(&self, h: &tar::Header) -> (Option<u32>, Option<u32>) {
        let mut c = match self.cache.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        // By name where this host knows it (looked up once), else the number.
        fn resolve(
            cache: &mut HashMap<String, Option<u32>>,
            name: Option<&str>,
            number: io::Result<u64>,
            find: fn(&str) -> Option<u32>,
        ) -> Option<u32> {
            name.filter(|n| !n.is_empty())
                .and_then(|n| *cache.entry(n.to_string()).or_insert_with(|| find(n)))
                .or_else(|| number.ok().and_then(|u| u32::try_from(u).ok()))
        }
        let c = &mut *c;
        let uid = self.fixed.0.or_else(|| {
            resolve(&mut c.users, h.username().ok().flatten(), h.uid(), |n| {
                nix::unistd::User::from_name(n)
                    .ok()
                    .flatten()
                    .map(|u| u.uid.as_raw())
            })
        });
        let gid = match self.fixed {
            (Some(_), g) => g,
            _ => resolve(&mut c.groups, h.groupname().ok().flatten(), h.gid(), |n| {
                nix::unistd::Group::from_name(n)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
            }),
        };
        (uid, gid)
    }

    /// Give `path` (never followed: a link itself) the owner its header asks.
    fn apply(&self, path: &Path, h: &tar::Header) -> Result<()> {
        let (uid, gid) = self.of(h);
        let r = std::os::unix::fs::lchown(path, uid, gid);
        match r {
            Ok(()) => Ok(()),
            Err(e) if !self.root && e.kind() == io::ErrorKind::PermissionDenied => {
                let mut c = match self.cache.lock() {
                    Ok(c) => c,
                    Err(p) => p.into_inner(),
                };
                if !c.warned {
                    c.warned = true;
                    tracing::warn!(
                        "restoring as a user other than root: files keep this user as their owner, not the snapshot's ({})",
                        path.display()
                    );
                }
                Ok(())
            }
            Err(e) => Err(Error::io("set the owner of", path, e)),
        }
    }
}

/// Unpack (or verify) a node archive read from `reader`. `select` limits which
/// keyspaces are extracted; the others are still read so the object checksum covers
/// the whole object.
pub fn unpack<R: Read + Send>(
    reader: R,
    expected: &Expected<'_>,
    select: &Selection,
    mode: Mode<'_>,
    progress: impl FnMut(u64),
) -> Result<Unpacked> {
    if expected.partial && expected.keys.is_some() {
        return Err(Error::archive(
            expected.object,
            "an encrypted object is read whole",
        ));
    }
    // The checksum is of the stored bytes: of the ciphertext when encrypted.
    let (tapped, tap) = super::io::TapReader::new(reader);
    match expected.keys {
        None => unpack_plain(tapped, &tap, expected, select, mode, progress),
        Some(keys) => {
            // The header is read (and a key that does not fit refused) here; the
            // chunks are decrypted on a thread of their own, beside gunzip and tar.
            // The keys opened the manifest: an object they do not open is damaged
            // or was replaced, not a question of keys (exit 1, not 3).
            let decrypting = keys
                .reader(tapped, expected.object)
                .map_err(|e| match e {
                    Error::Refused(_) => Error::archive(
                        expected.object,
                        "its age header does not open with the key that opened the manifest (damaged or replaced)",
                    ),
                    e => e,
                })?;
            std::thread::scope(|s| {
                let plain = super::io::read_ahead(s, decrypting);
                unpack_plain(plain, &tap, expected, select, mode, progress)
            })
        }
    }
}

fn unpack_plain<P: Read>(
    plain: P,
    tap: &super::io::Tap,
    expected: &Expected<'_>,
    select: &Selection,
    mode: Mode<'_>,
    mut progress: impl FnMut(u64),
) -> Result<Unpacked> {
    let object = expected.object;
    let bad = |m: String| Error::archive(object, m);
    let corrupt =
        |e: io::Error| Error::archive(object, format!("corrupt or truncated: {}", tar_message(&e)));
    let declared: HashMap<&str, &FileInfo> = expected
        .node
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let keyspaces: HashSet<&str> = expected.node.keyspaces.iter().map(String::as_str).collect();
    let root = match mode {
        Mode::Extract(root) => Some(root),
        Mode::Verify => None,
    };

    let heads = std::sync::Arc::new(std::sync::Mutex::new((Vec::new(), 0u64)));
    let tarred: Box<dyn Read + '_> = if expected.partial {
        Box::new(plain)
    } else {
        match super::Codec::of_object(&expected.node.object).unwrap_or_default() {
            super::Codec::Gzip => Box::new(Heads::new(
                flate2::read::MultiGzDecoder::new(plain),
                heads.clone(),
            )),
            super::Codec::Zstd => Box::new(Heads::new(
                zstd::stream::read::Decoder::new(plain).map_err(corrupt)?,
                heads.clone(),
            )),
        }
    };
    let mut archive = tar::Archive::new(tarred);
    let mut seen: HashSet<String> = HashSet::new();
    let mut files_seen: HashSet<String> = HashSet::new();
    let mut links: HashSet<String> = HashSet::new();
    let mut link_targets: Vec<(String, PathBuf)> = Vec::new();
    let mut dirs: Vec<(PathBuf, u32, i64, tar::Header)> = Vec::new();
    let mut out = Unpacked::default();
    let mut buf = vec![0u8; 256 << 10];
    // A whole archive read against a format-2 manifest also checks what the
    // manifest says about it (where each entry is, the tree), which partial
    // restores trust: the two kinds of restore never see different snapshots.
    let tree: HashMap<&str, &crate::manifest::TreeEntry> = expected
        .node
        .tree
        .iter()
        .map(|t| (t.path.as_str(), t))
        .collect();
    let indexed = !expected.partial
        && (!tree.is_empty() || expected.node.files.iter().any(|f| f.entry.is_some()));
    let mut tree_seen = 0usize;
    let disagree = |what: String| {
        Error::archive(
            object,
            format!("the manifest does not describe the archive: {what}"),
        )
    };

    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw_path = entry.path().map_err(corrupt)?.into_owned();
        let original = clean_path(&raw_path).ok_or_else(|| {
            bad(format!(
                "unsafe entry path {raw_path:?} (absolute, `..`, empty or not UTF-8)"
            ))
        })?;
        let rel = crate::node::restore::renamed(&original, expected.renames);
        if indexed {
            let h = entry.header();
            let at = entry.raw_header_position();
            let kind = h.entry_type();
            if kind.is_dir() || kind.is_symlink() {
                let t = tree
                    .get(original.as_str())
                    .ok_or_else(|| disagree(format!("{original:?} is not in its tree")))?;
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .map(|l| l.to_string_lossy().into_owned());
                if t.link != target
                    || t.offset > at
                    || u64::from(t.mode & 0o7777) != u64::from(h.mode().map_err(corrupt)? & 0o7777)
                    || u64::try_from(t.mtime).unwrap_or(0) != h.mtime().map_err(corrupt)?
                {
                    return Err(disagree(format!(
                        "its tree entry for {original:?} differs from the archive's"
                    )));
                }
                tree_seen += 1;
            } else if let Some(span) = declared.get(rel.as_str()).and_then(|f| f.entry) {
                let size = h.size().map_err(corrupt)?;
                let end = at
                    .checked_add(512)
                    .and_then(|e| e.checked_add(size.div_ceil(512) * 512));
                if span.offset > at || end != span.end() {
                    return Err(disagree(format!(
                        "{original:?} is not where the manifest places it"
                    )));
                }
            }
        }
        if !seen.insert(rel.clone()) {
            return Err(bad(format!("duplicate entry {rel:?}")));
        }
        if rel
            .split('/')
            .any(|c| c.starts_with(crate::cluster::RESERVED_PREFIX))
        {
            return Err(bad(format!(
                "entry {rel:?} uses a name reserved for cairn's own files"
            )));
        }
        let keyspace = rel.split('/').next().unwrap_or("");
        if !keyspaces.contains(keyspace) {
            return Err(bad(format!(
                "entry {rel:?} is outside the keyspaces the manifest declares"
            )));
        }
        if let Some(link) = rel
            .match_indices('/')
            .map(|(i, _)| &rel[..i])
            .find(|p| links.contains(*p))
        {
            return Err(bad(format!(
                "entry {rel:?} would be written through the symlink {link:?}"
            )));
        }
        let header = entry.header();
        let owner_header = header.clone();
        let kind = header.entry_type();
        // Only permission bits: setuid, setgid and sticky are dropped.
        let perm = header.mode().map_err(corrupt)? & 0o777;
        let mtime = i64::try_from(header.mtime().map_err(corrupt)?).unwrap_or(0);
        let size = header.size().map_err(corrupt)?;
        let regular = matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous);
        if !regular && declared.contains_key(rel.as_str()) {
            return Err(bad(format!(
                "{rel:?} is declared as a file by the manifest but is a {kind:?} entry in the archive"
            )));
        }
        let wanted = if kind == tar::EntryType::Directory {
            select.restores_dir(&rel)
        } else {
            select.restores_file(&rel)
        };
        let dest = match root {
            Some(r) if wanted => Some(r.join(&rel)),
            _ => None,
        };
        match kind {
            tar::EntryType::Directory => {
                if let Some(dest) = dest {
                    create_dir(&dest)?;
                    dirs.push((dest, perm, mtime, owner_header.clone()));
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let Some(info) = declared.get(rel.as_str()) else {
                    return Err(bad(format!("file {rel:?} is not declared by the manifest")));
                };
                if size != info.size {
                    return Err(bad(format!(
                        "file {rel:?} is {size} bytes in the archive but {} in the manifest",
                        info.size
                    )));
                }
                let mut file = match &dest {
                    Some(dest) => {
                        if let Some(parent) = dest.parent() {
                            create_dir(parent)?;
                        }
                        Some(
                            std::fs::OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .mode(0o600)
                                .open(dest)
                                .map_err(|e| Error::io("create", dest, e))?,
                        )
                    }
                    None => None,
                };
                let mut hasher = Sha256::new();
                let mut left = size;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = entry.read(&mut buf[..want]).map_err(corrupt)?;
                    if n == 0 {
                        return Err(bad(format!("file {rel:?} is truncated")));
                    }
                    hasher.update(&buf[..n]);
                    if let (Some(f), Some(d)) = (file.as_mut(), dest.as_ref()) {
                        f.write_all(&buf[..n])
                            .map_err(|e| Error::io("write", d, e))?;
                    }
                    left -= n as u64;
                    out.bytes += n as u64;
                    progress(out.bytes);
                }
                let sha = super::hex_digest(hasher);
                if sha != info.sha256 {
                    return Err(bad(format!(
                        "file {rel:?} does not match its checksum (manifest {}, archive {sha})",
                        info.sha256
                    )));
                }
                if let (Some(f), Some(d)) = (file, dest.as_ref()) {
                    if let Some(o) = expected.owners {
                        o.apply(d, &owner_header)?;
                    }
                    f.set_permissions(std::fs::Permissions::from_mode(perm))
                        .map_err(|e| Error::io("chmod", d, e))?;
                    let t = filetime::FileTime::from_unix_time(mtime, 0);
                    filetime::set_file_handle_times(&f, Some(t), Some(t))
                        .map_err(|e| Error::io("set times of", d, e))?;
                }
                files_seen.insert(rel.clone());
                out.files += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| bad(format!("symlink {rel:?} has no target")))?
                    .into_owned();
                if !link_stays_inside(&rel, &target) {
                    return Err(bad(format!(
                        "symlink {rel:?} points outside the node ({target:?})"
                    )));
                }
                if let Some(through) = link_through_link(&rel, &target, &links) {
                    return Err(bad(format!(
                        "symlink {rel:?} ({target:?}) resolves through the symlink {through:?}; links through links are refused"
                    )));
                }
                links.insert(rel.clone());
                link_targets.push((rel.clone(), target.clone()));
                if let Some(dest) = dest {
                    if let Some(parent) = dest.parent() {
                        create_dir(parent)?;
                    }
                    std::os::unix::fs::symlink(&target, &dest)
                        .map_err(|e| Error::io("create symlink", &dest, e))?;
                    if let Some(o) = expected.owners {
                        o.apply(&dest, &owner_header)?;
                    }
                    // The link's own time, as archived (not its target's).
                    let t = filetime::FileTime::from_unix_time(mtime, 0);
                    filetime::set_symlink_file_times(&dest, t, t)
                        .map_err(|e| Error::io("set times of", &dest, e))?;
                }
            }
            tar::EntryType::Link => {
                return Err(bad(format!("hard link {rel:?} refused")));
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(bad(format!("device or FIFO {rel:?} refused")));
            }
            other => {
                return Err(bad(format!("entry {rel:?} of type {other:?} refused")));
            }
        }
    }

    // Read the rest (tar padding, gzip trailer with its CRC, anything after it) so
    // the object checksum covers every byte.
    let mut gz = archive.into_inner();
    io::copy(&mut gz, &mut io::sink()).map_err(corrupt)?;
    drop(gz);
    let (size, sha) = tap.finish();
    {
        let mut h = heads.lock().unwrap_or_else(|p| p.into_inner());
        out.heads = std::mem::take(&mut h.0);
        out.stream_bytes = h.1;
    }
    out.object_size = size;
    out.object_sha256 = sha;
    if !expected.partial
        && (size != expected.object_size || out.object_sha256 != expected.object_sha256)
    {
        return Err(bad(format!(
            "object is {size} bytes with SHA-256 {}, the manifest says {} bytes with {}",
            out.object_sha256, expected.object_size, expected.object_sha256
        )));
    }
    if indexed && tree_seen != tree.len() {
        return Err(disagree(format!(
            "its tree lists {} directories and links, the archive holds {tree_seen}",
            tree.len()
        )));
    }
    // A link may resolve through a link that came after it in the archive.
    for (rel, target) in &link_targets {
        if let Some(through) = link_through_link(rel, target, &links) {
            return Err(bad(format!(
                "symlink {rel:?} ({target:?}) resolves through the symlink {through:?}; links through links are refused"
            )));
        }
    }
    let missing: Vec<&str> = expected
        .node
        .files
        .iter()
        .filter(|f| !files_seen.contains(&f.path))
        .filter(|f| !expected.partial || select.restores_file(&f.path))
        .map(|f| f.path.as_str())
        .take(5)
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "files declared by the manifest are missing from the archive: {}",
            missing.join(", ")
        )));
    }
    // Directory modes and times last (deepest first), once their contents exist.
    if expected.dirs_open {
        dirs.clear();
    }
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (dir, perm, mtime, h) in dirs {
        if let Some(o) = expected.owners {
            o.apply(&dir, &h)?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(perm | 0o700))
            .map_err(|e| Error::io("chmod", &dir, e))?;
        let t = filetime::FileTime::from_unix_time(mtime, 0);
        filetime::set_file_times(&dir, t, t).map_err(|e| Error::io("set times of", &dir, e))?;
        if perm & 0o700 != 0o700 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(perm))
                .map_err(|e| Error::io("chmod", &dir, e))?;
        }
    }
    Ok(out)
}

/// An error of the tar reader without what it quotes of the archive: its header
/// errors end with the entry's path or a field's bytes, which may be a file's data
/// when a damaged archive (or a wrong place in it) is read as a header.
fn tar_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" when getting ") {
        Some(at) => {
            let what = text[at + " when getting ".len()..]
                .split(" for ")
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == ' ')
                .take(40)
                .collect::<String>();
            format!("an entry header is not valid (its {what})")
        }
        None => text,
    }
}

/// Bytes of each block's start that [`Unpacked::heads`] keeps.
pub const HEAD: usize = 64;

/// Records the first [`HEAD`] bytes of each block of the stream read through it.
type SharedHeads = std::sync::Arc<std::sync::Mutex<(Vec<Vec<u8>>, u64)>>;

struct Heads<R> {
    inner: R,
    at: u64,
    /// The heads, and the bytes read so far.
    heads: SharedHeads,
}

impl<R> Heads<R> {
    fn new(inner: R, heads: SharedHeads) -> Heads<R> {
        Heads {
            inner,
            at: 0,
            heads,
        }
    }
}

impl<R: Read> Read for Heads<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        let block = super::pargz::BLOCK as u64;
        let mut shared = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        shared.1 += n as u64;
        let heads = &mut shared.0;
        let mut i = 0;
        while i < n {
            let pos = self.at + i as u64;
            let within = pos % block;
            if within < HEAD as u64 {
                let b = usize::try_from(pos / block).unwrap_or(usize::MAX);
                if heads.len() <= b {
                    heads.resize(b + 1, Vec::new());
                }
                let take = (HEAD - within as usize).min(n - i);
                heads[b].extend_from_slice(&out[i..i + take]);
                i += take;
            } else {
                // Jump to the next block's start.
                let skip = usize::try_from(block - within).unwrap_or(usize::MAX);
                i = i.saturating_add(skip);
            }
        }
        self.at += n as u64;
        Ok(n)
    }
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io("create dir", path, e))
}

/// A relative, `/`-joined, UTF-8 path with only normal components, or `None`.
fn clean_path(p: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

/// The first symlink (of `links`) that resolving `target` from the directory of
/// `rel` passes through, if any. Resolution is lexical, so it is only sound when no
/// component on the way is itself a link: such chains (`a -> .`, `b -> a/a/../..`)
/// are how a link escapes a check done on its text.
pub(crate) fn link_through_link(
    rel: &str,
    target: &Path,
    links: &HashSet<String>,
) -> Option<String> {
    let mut at: Vec<&str> = rel.split('/').collect();
    at.pop();
    for c in target.components() {
        match c {
            Component::Normal(s) => {
                at.push(s.to_str()?);
                let joined = at.join("/");
                if links.contains(&joined) {
                    return Some(joined);
                }
            }
            Component::CurDir => {}
            Component::ParentDir => {
                at.pop();
            }
            _ => return Some("/".into()),
        }
    }
    None
}

/// Whether a symlink at `rel` with `target` resolves (lexically) inside the node.
pub(crate) fn link_stays_inside(rel: &str, target: &Path) -> bool {
    let mut depth: i64 = rel.matches('/').count() as i64;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_links() {
        assert_eq!(clean_path(Path::new("./a/b")), Some("a/b".into()));
        assert_eq!(clean_path(Path::new("a/../b")), None);
        assert_eq!(clean_path(Path::new("/etc/passwd")), None);
        assert!(link_stays_inside("ks/t/l", Path::new("../other")));
        assert!(link_stays_inside("ks/l", Path::new("..")));
        assert!(!link_stays_inside("ks/l", Path::new("../..")));
        assert!(!link_stays_inside("ks/l", Path::new("/etc")));
    }

    #[test]
    fn links_through_links_are_found() {
        let mut links = HashSet::new();
        links.insert("ks/a".to_string());
        assert_eq!(
            link_through_link("ks/b", Path::new("a/a/../../outside"), &links),
            Some("ks/a".into())
        );
        assert_eq!(link_through_link("ks/c", Path::new("file"), &links), None);
        assert_eq!(link_through_link("ks/t/l", Path::new("../x"), &links), None);
    }
}
