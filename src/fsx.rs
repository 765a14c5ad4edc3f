//! File-system operations that resolve paths instead of trusting their text.
//!
//! A path inside a target (a data dir) is walked one component at a time with
//! `openat(O_NOFOLLOW | O_DIRECTORY)`: a symlink anywhere below the root — planted by
//! an earlier restore, or by someone racing us — stops the walk instead of being
//! followed out of the root. Renames use `renameat2(RENAME_NOREPLACE)` between the
//! directory handles so nothing in the target is ever overwritten.

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

fn to_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn open_root(root: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(to_io)
}

/// The plain components of a relative path; anything else is refused.
fn parts(rel: &Path) -> io::Result<Vec<&std::ffi::OsStr>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a plain relative path", rel.display()),
                ));
            }
        }
    }
    Ok(out)
}

/// Open the directory `rel` beneath `root`, never following a symlink below
/// `root`; with `create`, missing directories are made (mode 0755 before umask).
pub fn open_dir_beneath(root: &Path, rel: &Path, create: bool) -> io::Result<OwnedFd> {
    let mut fd = open_root(root)?;
    for name in parts(rel)? {
        let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
        fd = match rustix::fs::openat(&fd, name, flags, Mode::empty()) {
            Ok(next) => next,
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(to_io(e)),
                }
                rustix::fs::openat(&fd, name, flags, Mode::empty()).map_err(to_io)?
            }
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                return Err(io::Error::other(format!(
                    "{} is a symbolic link or not a directory: refused, a restore never writes through a link",
                    root.join(rel).display()
                )));
            }
            Err(e) => return Err(to_io(e)),
        };
    }
    Ok(fd)
}

fn split(rel: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    let name = rel.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", rel.display()),
        )
    })?;
    Ok((rel.parent().unwrap_or(Path::new("")), name))
}

/// Move `from_root/from_rel` to `to_root/to_rel` without following symlinks below
/// either root and without replacing anything (`EEXIST` if the target exists).
/// Missing parents of the target are created.
pub fn rename_beneath(
    from_root: &Path,
    from_rel: &Path,
    to_root: &Path,
    to_rel: &Path,
) -> io::Result<()> {
    let (from_dir, from_name) = split(from_rel)?;
    let (to_dir, to_name) = split(to_rel)?;
    let from_fd = open_dir_beneath(from_root, from_dir, true)?;
    let to_fd = open_dir_beneath(to_root, to_dir, true)?;
    rustix::fs::renameat_with(&from_fd, from_name, &to_fd, to_name, RenameFlags::NOREPLACE)
        .map_err(to_io)
}

/// Whether `root/rel` exists, without following a symlink at its end or below
/// `root` (a dangling link exists).
pub fn exists_beneath(root: &Path, rel: &Path) -> io::Result<bool> {
    let (dir, name) = split(rel)?;
    let fd = match open_dir_beneath(root, dir, false) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(to_io(e)),
    }
}

/// What tells an entry at `root/rel` from another put in its place: its identity
/// (device, inode) and, for a regular file, its modification time (ns) and size
/// (an inode number may be given again; time and size with it hardly). Read
/// without following a symlink at its end or below `root`; `None` if absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub ident: (u64, u64),
    pub stamp: Option<(i64, u64)>,
}

pub fn entry_beneath(root: &Path, rel: &Path) -> io::Result<Option<Entry>> {
    let (dir, name) = split(rel)?;
    let fd = match open_dir_beneath(root, dir, false) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => {
            let file = rustix::fs::FileType::from_raw_mode(st.st_mode)
                == rustix::fs::FileType::RegularFile;
            Ok(Some(Entry {
                ident: (st.st_dev, st.st_ino),
                stamp: file.then(|| {
                    (
                        st.st_mtime
                            .saturating_mul(1_000_000_000)
                            .saturating_add(i64::try_from(st.st_mtime_nsec).unwrap_or(0)),
                        u64::try_from(st.st_size).unwrap_or(0),
                    )
                }),
            }))
        }
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// The identity (device, inode) of `root/rel` (see [`entry_beneath`]).
pub fn ident_beneath(root: &Path, rel: &Path) -> io::Result<Option<(u64, u64)>> {
    Ok(entry_beneath(root, rel)?.map(|e| e.ident))
}

/// Give the directory `root/rel` a mode and modification time, through a handle
/// opened without following a symlink below `root`.
pub fn set_dir_meta_beneath(root: &Path, rel: &Path, mode: u32, mtime: i64) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::fs::File::from(open_dir_beneath(root, rel, false)?);
    dir.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    let t = filetime::FileTime::from_unix_time(mtime, 0);
    filetime::set_file_handle_times(&dir, Some(t), Some(t))
}

/// Remove the directory `root/rel` if it is empty, without following a symlink
/// below `root` (a link in its place is left alone).
pub fn remove_empty_dir_beneath(root: &Path, rel: &Path) -> io::Result<()> {
    let (dir, name) = split(rel)?;
    let fd = open_dir_beneath(root, dir, false)?;
    rustix::fs::unlinkat(&fd, name, AtFlags::REMOVEDIR).map_err(to_io)
}

/// Read a small text file (a cluster description, a plan): only a regular file
/// (a FIFO would block, a device never end), at most `max` bytes, UTF-8.
pub fn read_small_text(path: &Path, max: u64) -> io::Result<String> {
    use std::io::Read;
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes, the most accepted"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// The most a cluster description or a plan file may hold.
pub const MAX_DESCRIPTION: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_below_the_root_is_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("ks")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("ks/t")).expect("symlink");
        let staged = dir.path().join("staged");
        std::fs::create_dir_all(&staged).expect("mkdir");
        std::fs::write(staged.join("f"), b"x").expect("write");
        let err = rename_beneath(&staged, Path::new("f"), &root, Path::new("ks/t/f"))
            .expect_err("must refuse");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!outside.join("f").exists());
        // No replacing either.
        std::fs::write(root.join("ks/g"), b"old").expect("write");
        assert!(rename_beneath(&staged, Path::new("f"), &root, Path::new("ks/g")).is_err());
        assert_eq!(std::fs::read(root.join("ks/g")).expect("read"), b"old");
        // A plain move works and creates parents.
        rename_beneath(&staged, Path::new("f"), &root, Path::new("ks/new/f")).expect("move");
        assert_eq!(std::fs::read(root.join("ks/new/f")).expect("read"), b"x");
        assert!(exists_beneath(&root, Path::new("ks/t")).expect("stat"));
    }
}
