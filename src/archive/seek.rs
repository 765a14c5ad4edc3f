//! Read some files of a node archive without reading the rest.
//!
//! A format-2 manifest says where each compressed block of a node object starts
//! ([`BlockIndex`]) and where each file's tar entry lies in the uncompressed stream
//! ([`Span`]). [`plan`] turns the wanted files into as few compressed byte ranges as
//! possible (neighbouring blocks share one); [`Assembled`] inflates those ranges and
//! cuts the wanted entries out of them, putting the directories and symbolic links
//! the manifest describes (no read needed) in their archive order, and ends the
//! result as a tar stream. That stream goes through the same checks as a whole
//! archive ([`super::unpack`]): paths, links, sizes and every file's SHA-256.

use super::Codec;
use crate::manifest::{BlockIndex, FileInfo, NodeInfo, Span, TreeEntry};
use crate::{Error, Result};
use flate2::read::DeflateDecoder;
use std::collections::VecDeque;
use std::io::{self, Read};

/// The compressed ranges to read and how to cut the wanted entries out of them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Compressed byte ranges of the object, in order.
    pub ranges: Vec<(u64, u64)>,
    /// The uncompressed offset at which each range starts.
    starts: Vec<u64>,
    /// Everything to emit, in archive order.
    pieces: Vec<Piece>,
    codec: Codec,
}

impl Plan {
    /// Compressed bytes the plan reads.
    pub fn read_bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

#[derive(Debug, Clone)]
enum Piece {
    /// A directory or link, its tar header made from the manifest.
    Tree(TreeEntry),
    /// A file's entry, cut out of range `range`.
    File { range: usize, span: Span },
}

impl Piece {
    fn offset(&self) -> u64 {
        match self {
            Piece::Tree(t) => t.offset,
            Piece::File { span, .. } => span.offset,
        }
    }
}

/// Whether `node` can be read in pieces: every file knows its entry.
pub fn seekable(node: &NodeInfo) -> bool {
    node.files.iter().all(|f| f.entry.is_some())
}

/// Plan reading the files `wanted` keeps (with the node's whole tree) from an
/// object indexed by `index`. The spans come from the manifest, which a hostile
/// store may have written: each must lie inside the stream and none may overlap
/// another.
pub fn plan(
    object: &str,
    node: &NodeInfo,
    index: &BlockIndex,
    renames: &[(String, String)],
    wanted: impl Fn(&FileInfo) -> bool,
) -> Result<Plan> {
    let bad = |m: String| Error::archive(object, m);
    let codec = Codec::of_object(&node.object)
        .ok_or_else(|| bad(format!("{:?} is not a node archive", node.object)))?;
    // Every directory above a file is in the tree (the archive holds them all): a
    // tree without them was not written by a backup.
    // (`node`'s files are named as restored, its tree as in the archive.)
    let dirs: std::collections::HashSet<String> = node
        .tree
        .iter()
        .filter(|t| t.link.is_none())
        .map(|t| crate::node::restore::renamed(&t.path, renames))
        .collect();
    let mut spans: Vec<Span> = Vec::new();
    for f in node.files.iter().filter(|f| wanted(f)) {
        if let Some(missing) = f
            .path
            .match_indices('/')
            .map(|(i, _)| &f.path[..i])
            .find(|d| !dirs.contains(*d))
        {
            return Err(bad(format!(
                "the manifest's tree lacks the directory {missing:?} above {:?}",
                f.path
            )));
        }
        let span = f
            .entry
            .ok_or_else(|| bad(format!("file {:?} has no place in the archive", f.path)))?;
        let end = span.end().filter(|&e| e <= index.total);
        if end.is_none() || span.length < 512 || span.length - 512 < f.size {
            return Err(bad(format!(
                "file {:?} has an impossible place in the archive",
                f.path
            )));
        }
        spans.push(span);
    }
    spans.sort_by_key(|s| s.offset);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut starts: Vec<u64> = Vec::new();
    let mut pieces: Vec<Piece> = node.tree.iter().cloned().map(Piece::Tree).collect();
    let mut last_end = 0u64;
    for span in spans {
        let end = span.end().unwrap_or(u64::MAX);
        if span.offset < last_end {
            return Err(bad("two files overlap in the archive".into()));
        }
        last_end = end;
        let (from, to, ustart) = index
            .range_of(span.offset, end)
            .ok_or_else(|| bad("a file lies outside the block index".into()))?;
        match ranges.last_mut() {
            // The next block starts where the last range ends, or inside it: one
            // range reads both.
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => {
                ranges.push((from, to));
                starts.push(ustart);
            }
        }
        pieces.push(Piece::File {
            range: ranges.len() - 1,
            span,
        });
    }
    pieces.sort_by_key(Piece::offset);
    Ok(Plan {
        ranges,
        starts,
        pieces,
        codec,
    })
}

/// The tar stream of a [`Plan`]: the wanted entries, inflated from the ranges read
/// through `input` (one segment per range), and the end-of-archive marker.
pub struct Assembled<R: SegmentedRead> {
    pieces: VecDeque<Piece>,
    starts: Vec<u64>,
    codec: Codec,
    /// The decompressor of the current range, the range, and the uncompressed
    /// offset it is at.
    decoder: Option<(Decoder<R>, usize, u64)>,
    /// The reader before the first range is opened.
    idle: Option<R>,
    /// An in-memory piece being emitted (a tree entry's headers, the end marker).
    buffered: io::Cursor<Vec<u8>>,
    /// Bytes left of the file entry being emitted.
    left: u64,
    ended: bool,
}

/// A reader of consecutive segments (one per range).
pub trait SegmentedRead: Read {
    fn next_segment(&mut self) -> io::Result<()>;
}

impl SegmentedRead for super::io::SegmentReader {
    fn next_segment(&mut self) -> io::Result<()> {
        super::io::SegmentReader::next_segment(self)
    }
}

impl<R: SegmentedRead> Assembled<R> {
    pub fn new(plan: &Plan, input: R) -> Assembled<R> {
        Assembled {
            pieces: plan.pieces.iter().cloned().collect(),
            starts: plan.starts.clone(),
            codec: plan.codec,
            decoder: None,
            idle: Some(input),
            buffered: io::Cursor::new(Vec::new()),
            left: 0,
            ended: false,
        }
    }

    /// Position the inflater at `span` of range `range`.
    fn open(&mut self, range: usize, span: Span) -> io::Result<()> {
        let current = self.decoder.as_ref().map(|(_, r, _)| *r);
        if current != Some(range) {
            let mut input = match self.decoder.take() {
                Some((d, _, _)) => d.into_inner(),
                None => self
                    .idle
                    .take()
                    .ok_or_else(|| io::Error::other("no input"))?,
            };
            // Ranges are read in order, one segment each: skip to this one.
            for _ in current.unwrap_or(0)..range {
                input.next_segment()?;
            }
            let start = *self
                .starts
                .get(range)
                .ok_or_else(|| io::Error::other("range out of plan"))?;
            let decoder = match self.codec {
                Codec::Gzip => Decoder::Deflate(DeflateDecoder::new(input)),
                Codec::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::new(input)?),
            };
            self.decoder = Some((decoder, range, start));
        }
        let (decoder, _, at) = self
            .decoder
            .as_mut()
            .ok_or_else(|| io::Error::other("no range open"))?;
        let skip = span
            .offset
            .checked_sub(*at)
            .ok_or_else(|| io::Error::other("entries out of order"))?;
        let skipped = io::copy(&mut decoder.by_ref().take(skip), &mut io::sink())?;
        if skipped != skip {
            return Err(truncated());
        }
        *at = span.offset;
        self.left = span.length;
        Ok(())
    }
}

/// A range's decompressor: raw deflate from a block's start, or zstd frames.
enum Decoder<R: Read> {
    Deflate(DeflateDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    fn into_inner(self) -> R {
        match self {
            Decoder::Deflate(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish().into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Deflate(d) => d.read(out),
            Decoder::Zstd(d) => d.read(out),
        }
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "a range of the archive ended before the entry it should hold",
    )
}

/// The tar headers of a directory or link, as the archive holds them.
fn tree_headers(t: &TreeEntry) -> io::Result<Vec<u8>> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(t.mode);
    h.set_mtime(u64::try_from(t.mtime).unwrap_or(0));
    h.set_uid(u64::from(t.uid.unwrap_or(0)));
    h.set_gid(u64::from(t.gid.unwrap_or(0)));
    h.set_size(0);
    if let Some(u) = &t.user {
        let _ = h.set_username(u);
    }
    if let Some(g) = &t.group {
        let _ = h.set_groupname(g);
    }
    let mut b = tar::Builder::new(Vec::new());
    match &t.link {
        None => {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, format!("{}/", t.path), io::empty())?;
        }
        Some(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, &t.path, target)?;
        }
    }
    let mut v = b.into_inner()?;
    // `into_inner` ends the archive: keep the entry only.
    v.truncate(v.len().saturating_sub(1024));
    Ok(v)
}

impl<R: SegmentedRead> Read for Assembled<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.buffered.read(out)?;
            if n > 0 {
                return Ok(n);
            }
            if self.left > 0 {
                let (decoder, _, at) = self
                    .decoder
                    .as_mut()
                    .ok_or_else(|| io::Error::other("no range open"))?;
                let want = out
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                let n = decoder.read(&mut out[..want])?;
                if n == 0 {
                    return Err(truncated());
                }
                self.left -= n as u64;
                *at += n as u64;
                return Ok(n);
            }
            match self.pieces.pop_front() {
                Some(Piece::Tree(t)) => self.buffered = io::Cursor::new(tree_headers(&t)?),
                Some(Piece::File { range, span }) => self.open(range, span)?,
                None if !self.ended => {
                    self.ended = true;
                    self.buffered = io::Cursor::new(vec![0u8; 1024]);
                }
                None => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::archive::pack;
    use crate::cluster::{Excludes, Selection};
    use crate::manifest::{BlockIndex, NodeInfo, ObjectInfo};
    use crate::store::Store;
    use std::path::Path;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn write(root: &Path, rel: &str, data: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }

    /// Pack `root`'s keyspace `ks` into a memory store; the manifest's node and
    /// object entries.
    async fn packed(
        root: &Path,
    ) -> (
        std::sync::Arc<crate::store::memory::MemoryStore>,
        NodeInfo,
        ObjectInfo,
    ) {
        let scan = pack::scan(root, &["ks".to_string()], &Excludes::default()).expect("scan");
        let (p, gz) =
            pack::pack(&scan, Vec::new(), crate::archive::Codec::Gzip, |_| {}).expect("pack");
        let sha = crate::archive::hex_digest(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&gz));
        let store = crate::store::memory::MemoryStore::new();
        let size = gz.len() as u64;
        store.put("s/node-0.tar.gz", gz.into()).await.expect("put");
        let node = NodeInfo {
            index: 0,
            object: "node-0.tar.gz".into(),
            keyspaces: vec!["ks".into()],
            file_count: p.files.len() as u64,
            bytes: p.files.iter().map(|f| f.size).sum(),
            compressed_bytes: size,
            files: p.files,
            tree: p.tree,
        };
        let object = ObjectInfo {
            key: "node-0.tar.gz".into(),
            size,
            sha256: sha,
            index: Some(BlockIndex {
                block: p.index.block,
                offsets: p.index.offsets,
                total: p.index.total,
                end: p.index.end,
            }),
        };
        (store, node, object)
    }

    #[tokio::test]
    async fn one_file_is_read_from_its_blocks_alone_and_restores_exactly() {
        let src = tempfile::tempdir().expect("tempdir");
        let root = src.path();
        for i in 0..6 {
            write(
                root,
                &format!("ks/t1/nb-{i}-Data.db"),
                &noise(700_000 + i * 3, i as u64 + 7),
            );
        }
        let wanted = noise(1 << 20, 99);
        write(root, "ks/t2/nb-9-big-Data.db", &wanted);
        let long = format!("ks/t2/{}", "x".repeat(150));
        write(root, &long, b"a file whose name needs a long-name header");
        std::os::unix::fs::symlink("nb-9-big-Data.db", root.join("ks/t2/latest")).expect("link");
        for i in 0..4 {
            write(
                root,
                &format!("ks/t3/nb-{i}-Data.db"),
                &noise(900_000, i as u64 + 50),
            );
        }
        let (store, node, object) = packed(root).await;
        let out = tempfile::tempdir().expect("tempdir");
        let cancel = tokio_util::sync::CancellationToken::new();
        let selection = Selection::parse("")
            .with_paths(&format!("ks/t2/nb-9-big-Data.db,{long},ks/t2/latest"))
            .expect("paths");
        let done = crate::node::restore::read_object(
            store.as_ref(),
            "s/node-0.tar.gz",
            node.clone(),
            object.clone(),
            selection,
            Some(out.path().to_path_buf()),
            None,
            None,
            vec![],
            |_| {},
            &cancel,
            crate::node::restore::Part::Own,
        )
        .await
        .expect("ranged restore");
        assert_eq!(
            std::fs::read(out.path().join("ks/t2/nb-9-big-Data.db")).expect("restored"),
            wanted
        );
        assert_eq!(
            std::fs::read(out.path().join(&long)).expect("restored"),
            b"a file whose name needs a long-name header"
        );
        assert_eq!(
            std::fs::read_link(out.path().join("ks/t2/latest")).expect("link"),
            Path::new("nb-9-big-Data.db")
        );
        assert!(!out.path().join("ks/t1").exists(), "t1 was not selected");
        assert!(!out.path().join("ks/t3").exists(), "t3 was not selected");
        assert_eq!(done.files, 2);
        assert!(
            done.read < (5 << 20) / 2 && done.read < object.size / 3,
            "read {} of {}",
            done.read,
            object.size
        );
    }

    #[tokio::test]
    async fn a_manifest_pointing_a_file_at_another_entry_is_refused() {
        let src = tempfile::tempdir().expect("tempdir");
        for i in 0..5 {
            write(src.path(), &format!("ks/t/f{i}"), &noise(600_000, i + 1));
        }
        let (store, mut node, object) = packed(src.path()).await;
        // f4 claims f0's entry (same size): the entry's path and checksum differ.
        let f0 = node.files[0].entry;
        node.files[4].entry = f0;
        let out = tempfile::tempdir().expect("tempdir");
        let cancel = tokio_util::sync::CancellationToken::new();
        let err = crate::node::restore::read_object(
            store.as_ref(),
            "s/node-0.tar.gz",
            node,
            object,
            Selection::parse("").with_paths("ks/t/f4").expect("paths"),
            Some(out.path().to_path_buf()),
            None,
            None,
            vec![],
            |_| {},
            &cancel,
            crate::node::restore::Part::Own,
        )
        .await
        .expect_err("refused");
        assert!(
            err.to_string().contains("f0") || err.to_string().contains("f4"),
            "{err}"
        );
        assert!(!out.path().join("ks/t/f4").exists());
    }
}
