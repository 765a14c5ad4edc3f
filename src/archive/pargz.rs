//! Parallel gzip: one valid gzip member whose deflate stream is made of independently
//! compressed blocks (as pigz does), compressed on a small pool of threads. With
//! [`Codec::Zstd`] the same blocks become one zstd frame each (with its checksum),
//! which concatenate into a valid zstd stream (`zstd -d` reads it) and can each be
//! decompressed alone: the seekable layout.
//!
//! * The input is cut into fixed 1 MiB blocks; each is deflated on its own and ended
//!   with a sync flush (byte-aligned, not final), so the blocks concatenate into one
//!   deflate stream; an empty final block closes it. The CRC-32 of the whole input is
//!   combined from the blocks' CRCs.
//! * Each 64 KiB of a block is judged on its own: what does not compress
//!   (already-compressed SSTables, random data) is written as stored blocks instead of
//!   being deflated for nothing; the rest is deflated. A block that holds the end of
//!   an SSTable and the start of a text file is split at that grain, so neither part
//!   decides for the other.
//! * Every block starts at a byte offset of the output that a raw inflater can start
//!   from (no dictionary reaches back into the block before): [`ParGzEncoder::finish_indexed`]
//!   returns those offsets, the index a reader uses to read one file of a large
//!   archive without reading the rest.
//! * Output depends only on the input (fixed block size, no timestamp), never on the
//!   number of threads, so re-running a node after a crash gives the same bytes.
//! * Memory is bounded: at most `2 × threads` blocks in flight.

use super::Codec;
use flate2::{Compress, Compression, FlushCompress};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Uncompressed bytes per independently compressed block.
pub const BLOCK: usize = 1 << 20;
/// A piece whose level-1 deflate shrinks less than this (in %) is stored.
const STORE_ABOVE_PERCENT: usize = 97;
/// The grain of the store-or-deflate decision.
const PIECE: usize = 64 << 10;
/// Below this order-0 entropy (bits per byte, × 100) a piece surely compresses and
/// is not probed.
const PROBE_ABOVE_CENTIBITS: u64 = 750;

struct Job {
    seq: u64,
    data: Vec<u8>,
}

struct Done {
    seq: u64,
    deflated: io::Result<Vec<u8>>,
    crc: u32,
    len: u64,
}

pub struct ParGzEncoder<W: Write> {
    inner: Option<W>,
    level: u32,
    codec: Codec,
    block: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    results: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    ready: BTreeMap<u64, Done>,
    next_seq: u64,
    next_write: u64,
    in_flight: usize,
    max_in_flight: usize,
    crc: crc32fast::Hasher,
    total: u64,
    header_written: bool,
    /// Compressed bytes written so far.
    written: u64,
    /// The compressed offset at which each block starts.
    offsets: Vec<u64>,
}

/// Where each block of a [`ParGzEncoder`]'s output starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    /// Uncompressed bytes per block (every block but the last is this long).
    pub block: u64,
    /// Compressed offset of each block's first byte (the first follows the gzip
    /// header).
    pub offsets: Vec<u64>,
    /// Uncompressed bytes in all.
    pub total: u64,
    /// Compressed offset where the deflate data ends (the final empty block).
    pub end: u64,
}

/// Deflate `data` as a non-final, byte-aligned run of blocks (sync flush).
fn deflate(level: Compression, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(level, false);
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 1024);
    loop {
        let consumed = c.total_in() as usize;
        c.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(64 << 10);
    }
}

/// Order-0 entropy of `data` in hundredths of a bit per byte.
fn entropy_centibits(data: &[u8]) -> u64 {
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    (bits * 100.0) as u64
}

/// Whether deflating `piece` would be wasted work: high entropy, and a fast deflate
/// barely shrinks it.
fn incompressible(piece: &[u8]) -> io::Result<bool> {
    if piece.is_empty() || entropy_centibits(piece) < PROBE_ABOVE_CENTIBITS {
        return Ok(false);
    }
    let probe = deflate(Compression::fast(), piece)?;
    Ok(probe.len() * 100 > piece.len() * STORE_ABOVE_PERCENT)
}

/// One block: runs of pieces judged alike, each deflated (or stored) on its own and
/// sync-flushed, so the block stays independent of what came before it.
fn compress_block(level: u32, data: &[u8]) -> io::Result<Vec<u8>> {
    let judged = data
        .chunks(PIECE)
        .map(incompressible)
        .collect::<io::Result<Vec<bool>>>()?;
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let mut start = 0;
    while start < judged.len() {
        let store = judged[start];
        let end = (start..judged.len())
            .find(|&i| judged[i] != store)
            .unwrap_or(judged.len());
        let run = &data[start * PIECE..(end * PIECE).min(data.len())];
        let level = if store {
            Compression::none()
        } else {
            Compression::new(level)
        };
        out.extend_from_slice(&deflate(level, run)?);
        start = end;
    }
    Ok(out)
}

/// One zstd frame of `data`, with its content size and checksum.
fn zstd_frame(z: &mut Option<zstd::bulk::Compressor<'static>>, data: &[u8]) -> io::Result<Vec<u8>> {
    if z.is_none() {
        let mut c = zstd::bulk::Compressor::new(super::ZSTD_LEVEL)?;
        c.include_checksum(true)?;
        c.include_contentsize(true)?;
        *z = Some(c);
    }
    match z {
        Some(c) => c.compress(data),
        None => Err(io::Error::other("no zstd compressor")),
    }
}

fn worker(level: u32, codec: Codec, jobs: Arc<Mutex<Receiver<Job>>>, results: SyncSender<Done>) {
    // Each thread keeps its zstd context: made once, reused for every block.
    let mut zstd = None;
    loop {
        let job = {
            let rx = match jobs.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            rx.recv()
        };
        let Ok(job) = job else { return };
        let (deflated, crc) = match codec {
            Codec::Gzip => {
                let mut crc = crc32fast::Hasher::new();
                crc.update(&job.data);
                (compress_block(level, &job.data), crc.finalize())
            }
            Codec::Zstd => (zstd_frame(&mut zstd, &job.data), 0),
        };
        let done = Done {
            seq: job.seq,
            deflated,
            crc,
            len: job.data.len() as u64,
        };
        if results.send(done).is_err() {
            return;
        }
    }
}

impl<W: Write> ParGzEncoder<W> {
    /// `threads` compressing threads (at least 1) at gzip `level`.
    pub fn new(inner: W, level: u32, threads: usize) -> Self {
        Self::with_codec(inner, Codec::Gzip, level, threads)
    }

    /// `threads` compressing threads compressing with `codec` (`level` is gzip's).
    pub fn with_codec(inner: W, codec: Codec, level: u32, threads: usize) -> Self {
        let threads = threads.max(1);
        let max_in_flight = threads * 2;
        let (job_tx, job_rx) = sync_channel::<Job>(max_in_flight);
        let (res_tx, res_rx) = sync_channel::<Done>(max_in_flight);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|_| {
                let jobs = job_rx.clone();
                let results = res_tx.clone();
                std::thread::spawn(move || worker(level, codec, jobs, results))
            })
            .collect();
        ParGzEncoder {
            inner: Some(inner),
            level,
            codec,
            block: Vec::with_capacity(BLOCK),
            jobs: Some(job_tx),
            results: res_rx,
            workers,
            ready: BTreeMap::new(),
            next_seq: 0,
            next_write: 0,
            in_flight: 0,
            max_in_flight,
            crc: crc32fast::Hasher::new(),
            total: 0,
            header_written: false,
            written: 0,
            offsets: Vec::new(),
        }
    }

    /// Uncompressed bytes written to this encoder so far (the offset in the
    /// uncompressed stream where the next write lands).
    pub fn position(&self) -> u64 {
        self.next_seq * BLOCK as u64 + self.block.len() as u64
    }

    fn out(&mut self) -> io::Result<&mut W> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip stream already finished"))
    }

    fn header(&mut self) -> io::Result<()> {
        if !self.header_written && self.codec == Codec::Zstd {
            // zstd frames carry their own headers.
            self.header_written = true;
        }
        if !self.header_written {
            // magic, deflate, no flags, mtime 0, extra flags 0, OS unknown
            let level = self.level;
            let xfl = if level >= 9 {
                2
            } else if level <= 1 {
                4
            } else {
                0
            };
            self.out()?
                .write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255])?;
            self.written = 10;
            self.header_written = true;
        }
        Ok(())
    }

    /// Take one finished block off the results channel and write every block that
    /// is now next in order.
    fn collect_one(&mut self) -> io::Result<()> {
        let done = self
            .results
            .recv()
            .map_err(|_| io::Error::other("a compression thread stopped"))?;
        self.in_flight -= 1;
        self.ready.insert(done.seq, done);
        while let Some(done) = self.ready.remove(&self.next_write) {
            let data = done.deflated?;
            self.header()?;
            self.offsets.push(self.written);
            self.out()?.write_all(&data)?;
            self.written += data.len() as u64;
            if self.codec == Codec::Gzip {
                self.crc
                    .combine(&crc32fast::Hasher::new_with_initial_len(done.crc, done.len));
            }
            self.total += done.len;
            self.next_write += 1;
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        while self.in_flight >= self.max_in_flight {
            self.collect_one()?;
        }
        let data = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        let job = Job {
            seq: self.next_seq,
            data,
        };
        self.jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("gzip stream already finished"))?
            .send(job)
            .map_err(|_| io::Error::other("the compression threads stopped"))?;
        self.next_seq += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// Compress what is left, write the final block and the trailer, and return the
    /// inner writer.
    pub fn finish(self) -> io::Result<W> {
        Ok(self.finish_indexed()?.0)
    }

    /// [`finish`](Self::finish), also returning where each block starts.
    pub fn finish_indexed(mut self) -> io::Result<(W, Index)> {
        self.submit()?;
        while self.in_flight > 0 {
            self.collect_one()?;
        }
        self.header()?;
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
        let total = self.total;
        let index = Index {
            block: BLOCK as u64,
            offsets: std::mem::take(&mut self.offsets),
            total,
            end: self.written,
        };
        let codec = self.codec;
        let empty = index.offsets.is_empty();
        let out = self.out()?;
        match codec {
            Codec::Gzip => {
                // An empty final stored block ends the deflate stream.
                out.write_all(&[0x01, 0x00, 0x00, 0xff, 0xff])?;
                out.write_all(&crc.to_le_bytes())?;
                out.write_all(&(total as u32).to_le_bytes())?;
            }
            // Nothing written: one empty frame keeps it a zstd file.
            Codec::Zstd if empty => out.write_all(&zstd::bulk::compress(&[], 1)?)?,
            Codec::Zstd => {}
        }
        out.flush()?;
        let out = self
            .inner
            .take()
            .ok_or_else(|| io::Error::other("gzip stream already finished"))?;
        Ok((out, index))
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let take = (BLOCK - self.block.len()).min(rest.len());
            self.block.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.block.len() == BLOCK {
                self.submit()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParGzEncoder<W> {
    fn drop(&mut self) {
        // Closing the job channel stops the workers; drain results so none blocks.
        self.jobs.take();
        while self.results.try_recv().is_ok() {}
        for w in self.workers.drain(..) {
            // A worker blocked on a full results channel is freed as results drop.
            while !w.is_finished() {
                while self.results.try_recv().is_ok() {}
                std::thread::yield_now();
            }
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(data: &[u8], threads: usize) -> Vec<u8> {
        let mut enc = ParGzEncoder::new(Vec::new(), 6, threads);
        // Uneven writes cross block boundaries.
        for chunk in data.chunks(333_333) {
            enc.write_all(chunk).expect("write");
        }
        let gz = enc.finish().expect("finish");
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .expect("valid gzip (CRC and size checked)");
        assert_eq!(out, data);
        gz
    }

    fn mixed(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x1234_5678;
        (0..len)
            .map(|i| {
                if (i / BLOCK).is_multiple_of(2) {
                    b"the quick brown fox jumps over the lazy dog "[i % 44]
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn valid_gzip_identical_for_any_thread_count() {
        let data = mixed(5 * BLOCK + 12345);
        let one = roundtrip(&data, 1);
        let three = roundtrip(&data, 3);
        assert_eq!(one, three, "output must not depend on the thread count");
        // Text compressed, random blocks stored: about half the size.
        assert!(
            one.len() < data.len() * 6 / 10,
            "{} of {}",
            one.len(),
            data.len()
        );
        assert!(one.len() > data.len() * 4 / 10);
    }

    #[test]
    fn every_block_can_be_inflated_from_its_indexed_offset() {
        let data = mixed(4 * BLOCK + 777);
        let mut enc = ParGzEncoder::new(Vec::new(), 6, 2);
        enc.write_all(&data).expect("write");
        assert_eq!(enc.position(), data.len() as u64);
        let (gz, index) = enc.finish_indexed().expect("finish");
        assert_eq!(index.offsets.len(), 5);
        assert_eq!(index.offsets[0], 10);
        assert_eq!(index.total, data.len() as u64);
        for (i, &off) in index.offsets.iter().enumerate() {
            let end = index.offsets.get(i + 1).copied().unwrap_or(index.end);
            let mut raw = flate2::read::DeflateDecoder::new(&gz[off as usize..end as usize]);
            let want = &data[i * BLOCK..((i + 1) * BLOCK).min(data.len())];
            let mut got = vec![0u8; want.len()];
            raw.read_exact(&mut got).expect("inflate one block alone");
            assert!(got == want, "block {i} differs");
        }
    }

    #[test]
    fn a_block_that_starts_incompressible_still_compresses_its_text() {
        // 64 KiB of noise, then text: judged as a whole from its start, the block
        // was stored; judged piece by piece, the text compresses.
        let mut x: u64 = 0x9e37_79b9;
        let mut data: Vec<u8> = (0..PIECE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        data.extend((0..BLOCK - PIECE).map(|i| b"name city amount 12345 ok\n"[i % 26]));
        let gz = roundtrip(&data, 2);
        assert!(
            gz.len() < PIECE + PIECE / 2,
            "{} bytes for 64 KiB of noise and 960 KiB of text",
            gz.len()
        );
    }

    #[test]
    fn zstd_blocks_are_frames_that_decode_alone_and_together() {
        let data = mixed(3 * BLOCK + 4321);
        let mut enc = ParGzEncoder::with_codec(Vec::new(), Codec::Zstd, 6, 2);
        for chunk in data.chunks(100_000) {
            enc.write_all(chunk).expect("write");
        }
        let (zst, index) = enc.finish_indexed().expect("finish");
        assert_eq!(index.offsets.len(), 4);
        assert_eq!(index.offsets[0], 0);
        assert_eq!(index.end, zst.len() as u64);
        let mut all = Vec::new();
        zstd::stream::read::Decoder::new(&zst[..])
            .expect("decoder")
            .read_to_end(&mut all)
            .expect("the frames decode as one stream");
        assert!(all == data);
        let second = &zst[index.offsets[2] as usize..index.offsets[3] as usize];
        let block = zstd::bulk::decompress(second, BLOCK).expect("one frame alone");
        assert!(block[..] == data[2 * BLOCK..3 * BLOCK]);
        // Random halves stay about their size; text shrinks.
        assert!(zst.len() < data.len() * 6 / 10, "{}", zst.len());
        let mut empty = ParGzEncoder::with_codec(Vec::new(), Codec::Zstd, 6, 1);
        empty.write_all(b"").expect("write");
        let z = empty.finish().expect("finish");
        assert!(
            zstd::stream::decode_all(&z[..])
                .expect("an empty frame")
                .is_empty()
        );
    }

    #[test]
    fn empty_and_tiny_inputs() {
        roundtrip(b"", 2);
        roundtrip(b"x", 2);
        roundtrip(&mixed(BLOCK), 2);
    }
}
