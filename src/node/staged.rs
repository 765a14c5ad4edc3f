//! What a staging dir holds, summed up as one digest so a later check can tell
//! whether it still holds exactly what was staged.
//!
//! Every entry contributes its path, kind, mode and owner; a directory its
//! modification time; a file its size, modification time and SHA-256 (and a file
//! with other hard links is refused: it shares its bytes with a place outside); a
//! link its target. The one exception: the times of the directories above the
//! paths of a partial restore, which the commit and its rollback change by moving
//! entries in and out (their times are recorded apart when staged). A file's SHA-256 comes either from the snapshot's manifest (right after
//! staging, when unpacking has just verified every file against it: no second
//! read) or from reading the file again (on resume, when anything may have
//! happened to it since).

use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Where file hashes come from.
pub enum Content<'a> {
    /// The manifest's hash of each file, by its path in the node.
    Recorded(&'a HashMap<&'a str, &'a str>),
    /// Hash every file again.
    Read,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Tree {
    pub entries: u64,
    pub bytes: u64,
    pub digest: String,
    /// Every file's inode change time and inode (the files a commit moves
    /// themselves left out: a rename changes their ctime). A write that puts the
    /// size and mtime back still changes the ctime: this is what tells, without
    /// reading the bytes again, that a file changed since it was staged.
    pub changes: String,
}

/// Sum up the tree below `dir`, leaving out `skip` at its top (the record), and
/// the times of the directories in `moving_parents`.
pub fn tree(
    dir: &Path,
    skip: &str,
    content: &Content<'_>,
    moving_parents: &HashSet<String>,
    moved: &HashSet<String>,
) -> io::Result<Tree> {
    let mut t = Walk {
        hasher: Sha256::new(),
        changes: Sha256::new(),
        entries: 0,
        bytes: 0,
        content,
        moving_parents,
        moved,
    };
    t.dir(dir, "", Some(skip))?;
    Ok(Tree {
        entries: t.entries,
        bytes: t.bytes,
        digest: crate::archive::hex_digest(t.hasher),
        changes: crate::archive::hex_digest(t.changes),
    })
}

struct Walk<'a> {
    hasher: Sha256,
    changes: Sha256,
    moved: &'a HashSet<String>,
    entries: u64,
    bytes: u64,
    content: &'a Content<'a>,
    moving_parents: &'a HashSet<String>,
}

impl Walk<'_> {
    fn dir(&mut self, abs: &Path, rel: &str, skip: Option<&str>) -> io::Result<()> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(abs)? {
            let name = e?.file_name();
            let name = name.to_str().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: a file name that is not UTF-8", abs.display()),
                )
            })?;
            if Some(name) != skip {
                names.push(name.to_string());
            }
        }
        names.sort();
        for name in names {
            let rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            self.entry(&abs.join(&name), &rel)?;
        }
        Ok(())
    }

    fn entry(&mut self, abs: &Path, rel: &str) -> io::Result<()> {
        let m = abs.symlink_metadata()?;
        let mode = m.mode() & 0o7777;
        let ft = m.file_type();
        self.entries += 1;
        let owner = format!("{}:{}", m.uid(), m.gid());
        let line = if ft.is_dir() {
            if self.moving_parents.contains(rel) {
                format!("d {mode:o} {owner}")
            } else {
                format!("d {mode:o} {owner} {}", m.mtime())
            }
        } else if ft.is_file() {
            if m.nlink() > 1 {
                return Err(invalid(format!(
                    "{rel} has {} hard links: it shares its bytes with a file elsewhere",
                    m.nlink()
                )));
            }
            self.bytes = self.bytes.saturating_add(m.len());
            let sha = match self.content {
                Content::Recorded(files) => files
                    .get(rel)
                    .map(|s| s.to_string())
                    .ok_or_else(|| invalid(format!("{rel} is not a file of the snapshot")))?,
                Content::Read => hash_file(abs)?,
            };
            if !self.moved.contains(rel) {
                self.changes.update(
                    format!("{rel}\0{} {} {}\n", m.ino(), m.ctime(), m.ctime_nsec()).as_bytes(),
                );
            }
            format!("f {mode:o} {owner} {} {} {sha}", m.len(), m.mtime())
        } else if ft.is_symlink() {
            let target = std::fs::read_link(abs)?;
            let target = target
                .to_str()
                .ok_or_else(|| invalid(format!("{rel}: a link target that is not UTF-8")))?;
            format!("l {owner} {target}")
        } else {
            return Err(invalid(format!("{rel} is not a file, directory or link")));
        };
        self.hasher.update(rel.as_bytes());
        self.hasher.update([0]);
        self.hasher.update(line.as_bytes());
        self.hasher.update([b'\n']);
        if ft.is_dir() {
            self.dir(abs, rel, None)?;
        }
        Ok(())
    }
}

/// The directories strictly above each path of a partial restore.
pub fn parents_of(paths: &[String]) -> HashSet<String> {
    let mut out = HashSet::new();
    for p in paths {
        let parts: Vec<&str> = p.split('/').collect();
        for i in 1..parts.len() {
            out.insert(parts[..i].join("/"));
        }
    }
    out
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// SHA-256 of a file, opened without following a link in its place.
fn hash_file(path: &Path) -> io::Result<String> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::archive::hex_digest(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        crate::archive::hex_digest(Sha256::new_with_prefix(data))
    }

    #[test]
    fn the_digest_sees_every_change_a_count_would_miss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("ks/t")).expect("mkdir");
        std::fs::write(root.join("ks/t/a"), b"hello").expect("write");
        std::fs::write(root.join(".rec"), b"record").expect("write");
        std::os::unix::fs::symlink("a", root.join("ks/t/l")).expect("symlink");
        let h = sha(b"hello");
        let files: HashMap<&str, &str> = [("ks/t/a", h.as_str())].into_iter().collect();
        let none = HashSet::new();
        let recorded = tree(root, ".rec", &Content::Recorded(&files), &none, &none).expect("tree");
        assert_eq!(recorded.entries, 4);
        assert_eq!(recorded.bytes, 5);
        // Reading the files gives the same digest while they are unchanged.
        assert_eq!(
            tree(root, ".rec", &Content::Read, &none, &none).expect("tree"),
            recorded
        );

        // Same size, other bytes, time put back: the content read sees it, and
        // without a read the inode change time does.
        let mtime = std::fs::metadata(root.join("ks/t/a"))
            .expect("stat")
            .mtime();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(root.join("ks/t/a"), b"HELLO").expect("write");
        let t = filetime::FileTime::from_unix_time(mtime, 0);
        filetime::set_file_times(root.join("ks/t/a"), t, t).expect("times");
        let unread = tree(root, ".rec", &Content::Recorded(&files), &none, &none).expect("tree");
        assert_eq!(unread.digest, recorded.digest);
        assert_ne!(unread.changes, recorded.changes);
        // A file a commit moves itself is left out of the change times: a rename
        // of it (as the commit makes) changes them only where it is not left out.
        let moved: HashSet<String> = ["ks/t/a".to_string()].into_iter().collect();
        let dir_mtime = filetime::FileTime::from_last_modification_time(
            &std::fs::metadata(root.join("ks/t")).expect("stat"),
        );
        let kept = tree(root, ".rec", &Content::Read, &none, &moved).expect("tree");
        let all = tree(root, ".rec", &Content::Read, &none, &none).expect("tree");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::rename(root.join("ks/t/a"), root.join("ks/t/a.tmp")).expect("rename");
        std::fs::rename(root.join("ks/t/a.tmp"), root.join("ks/t/a")).expect("rename");
        assert_eq!(
            tree(root, ".rec", &Content::Read, &none, &moved)
                .expect("tree")
                .changes,
            kept.changes
        );
        assert_ne!(
            tree(root, ".rec", &Content::Read, &none, &none)
                .expect("tree")
                .changes,
            all.changes
        );
        // The renames changed the table dir's time (recorded in seconds; the
        // sleep makes them cross a second every time): put it
        // back, so what follows sees only what it changes itself.
        filetime::set_file_mtime(root.join("ks/t"), dir_mtime).expect("times");
        assert_ne!(
            tree(root, ".rec", &Content::Read, &none, &none).expect("tree"),
            recorded
        );
        std::fs::write(root.join("ks/t/a"), b"hello").expect("write");
        filetime::set_file_times(root.join("ks/t/a"), t, t).expect("times");
        assert_eq!(
            tree(root, ".rec", &Content::Read, &none, &none)
                .expect("tree")
                .digest,
            recorded.digest
        );

        // A mode, a time, a link target, a name: each changes the digest.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("ks/t/a"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        assert_ne!(
            tree(root, ".rec", &Content::Read, &none, &none).expect("tree"),
            recorded
        );
        std::fs::set_permissions(root.join("ks/t/a"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let t2 = filetime::FileTime::from_unix_time(mtime + 1, 0);
        filetime::set_file_times(root.join("ks/t/a"), t2, t2).expect("times");
        assert_ne!(
            tree(root, ".rec", &Content::Read, &none, &none).expect("tree"),
            recorded
        );
        filetime::set_file_times(root.join("ks/t/a"), t, t).expect("times");
        std::fs::remove_file(root.join("ks/t/l")).expect("rm");
        std::os::unix::fs::symlink("b", root.join("ks/t/l")).expect("symlink");
        assert_ne!(
            tree(root, ".rec", &Content::Read, &none, &none).expect("tree"),
            recorded
        );
        std::fs::remove_file(root.join("ks/t/l")).expect("rm");
        std::os::unix::fs::symlink("a", root.join("ks/t/m")).expect("symlink");
        assert_ne!(
            tree(root, ".rec", &Content::Read, &none, &none).expect("tree"),
            recorded
        );
        // A directory's time, a file's other hard link.
        std::fs::remove_file(root.join("ks/t/m")).expect("rm");
        std::os::unix::fs::symlink("a", root.join("ks/t/l")).expect("symlink");
        let dt = filetime::FileTime::from_last_modification_time(
            &std::fs::metadata(root.join("ks")).expect("stat"),
        );
        let before = tree(root, ".rec", &Content::Read, &none, &none).expect("tree");
        let old = filetime::FileTime::from_unix_time(1_000, 0);
        filetime::set_file_times(root.join("ks"), old, old).expect("times");
        assert_ne!(
            tree(root, ".rec", &Content::Read, &none, &none).expect("tree"),
            before
        );
        let above: HashSet<String> = parents_of(&["ks/t".to_string()]);
        let with_ks = tree(root, ".rec", &Content::Read, &above, &HashSet::new()).expect("tree");
        filetime::set_file_times(root.join("ks"), dt, dt).expect("times");
        assert_eq!(
            tree(root, ".rec", &Content::Read, &above, &HashSet::new()).expect("tree"),
            with_ks,
            "the time of a dir above a restored path is left out"
        );
        std::fs::hard_link(root.join("ks/t/a"), root.join("outside")).expect("link");
        assert!(tree(root, ".rec", &Content::Read, &none, &none).is_err());
        std::fs::remove_file(root.join("outside")).expect("rm");
        // A file the snapshot does not have is refused outright.
        std::fs::write(root.join("ks/t/extra"), b"x").expect("write");
        assert!(tree(root, ".rec", &Content::Recorded(&files), &none, &none).is_err());
    }
}
