//! Parallel gzip: one valid gzip member whose deflate stream is made of independently
//! compressed blocks (as pigz does), compressed on a small pool of threads.
//!
//! * The input is cut into fixed 1 MiB blocks; each is deflated on its own and ended
//!   with a sync flush (byte-aligned, not final), so the blocks concatenate into one
//!   deflate stream; an empty final block closes it. The CRC-32 of the whole input is
//!   combined from the blocks' CRCs.
//! * A block that does not compress (already-compressed SSTables, random data) is
//!   written as stored blocks instead of being deflated for nothing.
//! * Output depends only on the input (fixed block size, no timestamp), never on the
//!   number of threads, so re-running a node after a crash gives the same bytes.
//! * Memory is bounded: at most `2 × threads` blocks in flight.

use flate2::{Compress, Compression, FlushCompress};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Uncompressed bytes per independently compressed block.
pub const BLOCK: usize = 1 << 20;
/// A block whose level-1 sample shrinks less than this (in %) is stored.
const STORE_ABOVE_PERCENT: usize = 97;
const SAMPLE: usize = 64 << 10;

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

fn compress_block(level: u32, data: &[u8]) -> io::Result<Vec<u8>> {
    let sample = &data[..data.len().min(SAMPLE)];
    let probe = deflate(Compression::fast(), sample)?;
    if probe.len() * 100 > sample.len() * STORE_ABOVE_PERCENT {
        deflate(Compression::none(), data)
    } else {
        deflate(Compression::new(level), data)
    }
}

fn worker(level: u32, jobs: Arc<Mutex<Receiver<Job>>>, results: SyncSender<Done>) {
    loop {
        let job = {
            let rx = match jobs.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            rx.recv()
        };
        let Ok(job) = job else { return };
        let mut crc = crc32fast::Hasher::new();
        crc.update(&job.data);
        let done = Done {
            seq: job.seq,
            deflated: compress_block(level, &job.data),
            crc: crc.finalize(),
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
        let threads = threads.max(1);
        let max_in_flight = threads * 2;
        let (job_tx, job_rx) = sync_channel::<Job>(max_in_flight);
        let (res_tx, res_rx) = sync_channel::<Done>(max_in_flight);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|_| {
                let jobs = job_rx.clone();
                let results = res_tx.clone();
                std::thread::spawn(move || worker(level, jobs, results))
            })
            .collect();
        ParGzEncoder {
            inner: Some(inner),
            level,
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
        }
    }

    fn out(&mut self) -> io::Result<&mut W> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip stream already finished"))
    }

    fn header(&mut self) -> io::Result<()> {
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
            self.out()?.write_all(&data)?;
            self.crc
                .combine(&crc32fast::Hasher::new_with_initial_len(done.crc, done.len));
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
    pub fn finish(mut self) -> io::Result<W> {
        self.submit()?;
        while self.in_flight > 0 {
            self.collect_one()?;
        }
        self.header()?;
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
        let total = self.total;
        let out = self.out()?;
        // An empty final stored block ends the deflate stream.
        out.write_all(&[0x01, 0x00, 0x00, 0xff, 0xff])?;
        out.write_all(&crc.to_le_bytes())?;
        out.write_all(&(total as u32).to_le_bytes())?;
        out.flush()?;
        self.inner
            .take()
            .ok_or_else(|| io::Error::other("gzip stream already finished"))
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
    fn empty_and_tiny_inputs() {
        roundtrip(b"", 2);
        roundtrip(b"x", 2);
        roundtrip(&mixed(BLOCK), 2);
    }
}
