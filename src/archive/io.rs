//! Bridges between the blocking archive code and async transfers, and the hashing
//! wrappers both directions use.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use tokio::sync::mpsc;

/// A `Write` that hashes and counts everything written and sends it on in parts of
/// `part_size` bytes over a bounded channel (backpressure: `blocking_send` waits
/// while the uploader is behind). Call [`PartSink::finish`] to send the last part.
pub struct PartSink {
    part_size: usize,
    buf: Vec<u8>,
    tx: mpsc::Sender<Bytes>,
    hasher: Sha256,
    total: u64,
}

impl PartSink {
    pub fn new(part_size: usize, tx: mpsc::Sender<Bytes>) -> PartSink {
        PartSink {
            part_size,
            buf: Vec::with_capacity(part_size),
            tx,
            hasher: Sha256::new(),
            total: 0,
        }
    }

    fn send(&mut self, data: Vec<u8>) -> io::Result<()> {
        self.tx.blocking_send(Bytes::from(data)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the upload stopped receiving data",
            )
        })
    }

    /// Send what is left; returns (size, hex SHA-256) of the whole stream.
    pub fn finish(mut self) -> io::Result<(u64, String)> {
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf);
            self.send(last)?;
        }
        Ok((self.total, super::hex_digest(self.hasher)))
    }
}

impl Write for PartSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hasher.update(data);
        self.total += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            let room = self.part_size - self.buf.len();
            let take = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.part_size {
                let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size));
                self.send(full)?;
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blocking `Read` over chunks received from an async download task.
pub struct ChannelReader {
    rx: mpsc::Receiver<crate::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<crate::Result<Bytes>>) -> ChannelReader {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(io::Error::other(e.to_string())),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// A blocking `Read` over several byte ranges received from an async download
/// task: it reads 0 at the end of each range; [`next_segment`](Self::next_segment)
/// skips what is left of the current one and moves to the next.
pub struct SegmentReader {
    rx: mpsc::Receiver<crate::Result<Option<Bytes>>>,
    current: Bytes,
    at_end: bool,
}

impl SegmentReader {
    pub fn new(rx: mpsc::Receiver<crate::Result<Option<Bytes>>>) -> SegmentReader {
        SegmentReader {
            rx,
            current: Bytes::new(),
            at_end: false,
        }
    }

    /// Drop the rest of this range and start reading the next.
    pub fn next_segment(&mut self) -> io::Result<()> {
        self.current = Bytes::new();
        while !self.at_end {
            self.pull()?;
            self.current = Bytes::new();
        }
        self.at_end = false;
        Ok(())
    }

    fn pull(&mut self) -> io::Result<()> {
        match self.rx.blocking_recv() {
            Some(Ok(Some(chunk))) => self.current = chunk,
            Some(Ok(None)) => self.at_end = true,
            Some(Err(e)) => return Err(io::Error::other(e.to_string())),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the download stopped before the end of a range",
                ));
            }
        }
        Ok(())
    }
}

impl Read for SegmentReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.at_end {
                return Ok(0);
            }
            self.pull()?;
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// A `Read` that hashes and counts what passes through.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn finish(self) -> (u64, String, R) {
        (self.count, super::hex_digest(self.hasher), self.inner)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hasher.update(&out[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// What a [`TapReader`] saw: its size and SHA-256, readable after the reader was
/// handed to a layer that does not give it back (decryption).
#[derive(Clone, Default)]
pub struct Tap(std::sync::Arc<std::sync::Mutex<(Sha256, u64)>>);

impl Tap {
    pub fn finish(&self) -> (u64, String) {
        let g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        (g.1, super::hex_digest(g.0.clone()))
    }
}

/// A `Read` that hashes and counts into a [`Tap`].
pub struct TapReader<R> {
    inner: R,
    tap: Tap,
}

impl<R: Read> TapReader<R> {
    pub fn new(inner: R) -> (Self, Tap) {
        let tap = Tap::default();
        (
            TapReader {
                inner,
                tap: tap.clone(),
            },
            tap,
        )
    }
}

impl<R: Read> Read for TapReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        let mut g = match self.tap.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.0.update(&out[..n]);
        g.1 += n as u64;
        Ok(n)
    }
}

/// Read `inner` on a thread of `scope`, 256 KiB at a time, a few reads ahead: a
/// stage of a pipeline (decryption) runs beside the one that consumes it.
pub fn read_ahead<'scope, R: Read + Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    mut inner: R,
) -> AheadReader {
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    scope.spawn(move || {
        loop {
            let mut buf = vec![0u8; 256 << 10];
            match inner.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(buf)).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    break;
                }
            }
        }
    });
    AheadReader {
        rx,
        current: Vec::new(),
        at: 0,
    }
}

/// The reading end of [`read_ahead`].
pub struct AheadReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for AheadReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.at = 0;
                }
                // The sender is gone: the end of the stream.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
