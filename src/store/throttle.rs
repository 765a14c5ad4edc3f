//! A bandwidth cap for a whole run: a store decorator sharing one rate limiter
//! (governor's GCRA) across every upload part and download chunk of all nodes.

use super::{ByteStream, Limits, MultipartUpload, ObjectMeta, PartInfo, Store};
use crate::{Error, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;

/// The limiter counts KiB, so rates up to terabytes per second fit in its u32 cells.
const CELL: u64 = 1024;

#[derive(Debug)]
pub struct Throttled {
    inner: Arc<dyn Store>,
    limiter: Arc<DefaultDirectRateLimiter>,
    burst: u32,
    rate: u64,
}

/// Parse `100MiB/s`, `12.5MB/s`, `500KiB/s`, `1GiB/s` or a plain number of bytes per
/// second. Decimal units are powers of 1000, binary ones of 1024.
pub fn parse_rate(text: &str) -> Result<u64> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| {
        Error::Params(vec![format!(
            "MAX_BANDWIDTH {text:?}: expected e.g. 100MiB/s"
        )])
    })?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" | "kB" => 1e3,
        "Ki" | "KiB" => 1024.0,
        "M" | "MB" => 1e6,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(Error::Params(vec![format!(
                "MAX_BANDWIDTH {text:?}: unknown unit {other:?} (B, KB, KiB, MB, MiB, GB, GiB)"
            )]));
        }
    };
    let rate = (num * mult) as u64;
    if rate < CELL {
        return Err(Error::Params(vec![format!(
            "MAX_BANDWIDTH {text:?}: at least 1KiB/s"
        )]));
    }
    Ok(rate)
}

impl Throttled {
    pub fn new(inner: Arc<dyn Store>, bytes_per_sec: u64) -> Throttled {
        let cells = u32::try_from(bytes_per_sec / CELL)
            .unwrap_or(u32::MAX)
            .max(1);
        let per_sec = NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN);
        // One second's worth may go at once; bigger requests wait in slices.
        let limiter = RateLimiter::direct(Quota::per_second(per_sec).allow_burst(per_sec));
        Throttled {
            inner,
            limiter: Arc::new(limiter),
            burst: cells,
            rate: bytes_per_sec,
        }
    }

    async fn take(limiter: &DefaultDirectRateLimiter, burst: u32, bytes: usize) {
        let mut cells = (bytes as u64).div_ceil(CELL);
        while cells > 0 {
            let n = cells.min(burst as u64) as u32;
            if let Some(n) = NonZeroU32::new(n) {
                // n <= burst, so capacity is always sufficient.
                let _ = limiter.until_n_ready(n).await;
            }
            cells -= n as u64;
        }
    }
}

struct ThrottledUpload {
    inner: Box<dyn MultipartUpload>,
    limiter: Arc<DefaultDirectRateLimiter>,
    burst: u32,
}

#[async_trait]
impl MultipartUpload for ThrottledUpload {
    fn id(&self) -> Option<String> {
        self.inner.id()
    }
    async fn put_part(&self, part: PartInfo, data: Bytes) -> Result<()> {
        Throttled::take(&self.limiter, self.burst, data.len()).await;
        self.inner.put_part(part, data).await
    }
    async fn complete(self: Box<Self>, parts: usize, size: u64) -> Result<()> {
        self.inner.complete(parts, size).await
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl Store for Throttled {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn url(&self) -> String {
        self.inner.url()
    }
    async fn exists(&self) -> Result<bool> {
        self.inner.exists().await
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    async fn check(&self) -> Result<()> {
        self.inner.check().await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        Self::take(&self.limiter, self.burst, data.len()).await;
        self.inner.put(key, data).await
    }
    async fn start_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>> {
        Ok(Box::new(ThrottledUpload {
            inner: self.inner.start_multipart(key).await?,
            limiter: self.limiter.clone(),
            burst: self.burst,
        }))
    }
    async fn abort_multipart(&self, key: &str, id: &str) -> Result<()> {
        self.inner.abort_multipart(key, id).await
    }
    async fn get(&self, key: &str) -> Result<ByteStream> {
        let limiter = self.limiter.clone();
        let burst = self.burst;
        let stream = self.inner.get(key).await?.then(move |chunk| {
            let limiter = limiter.clone();
            async move {
                if let Ok(c) = &chunk {
                    Throttled::take(&limiter, burst, c.len()).await;
                }
                chunk
            }
        });
        Ok(Box::pin(stream))
    }
    async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<ByteStream> {
        let limiter = self.limiter.clone();
        let burst = self.burst;
        let stream = self
            .inner
            .get_range(key, start, end)
            .await?
            .then(move |chunk| {
                let limiter = limiter.clone();
                async move {
                    if let Ok(c) = &chunk {
                        Throttled::take(&limiter, burst, c.len()).await;
                    }
                    chunk
                }
            });
        Ok(Box::pin(stream))
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
}

impl Throttled {
    pub fn rate(&self) -> u64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("100MiB/s").expect("ok"), 100 << 20);
        assert_eq!(parse_rate("12.5MB/s").expect("ok"), 12_500_000);
        assert_eq!(parse_rate("2048").expect("ok"), 2048);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 parsecs").is_err());
        assert!(parse_rate("1B/s").is_err());
    }

    #[tokio::test]
    async fn a_capped_store_moves_bytes_no_faster_than_the_cap() {
        let store: Arc<dyn Store> = super::super::memory::MemoryStore::new();
        let t = Throttled::new(store, 4 << 20);
        // The first second's burst is free; 12 MiB more at 4 MiB/s takes >= 2 s.
        let start = std::time::Instant::now();
        for i in 0..4 {
            t.put(&format!("k{i}"), Bytes::from(vec![0u8; 4 << 20]))
                .await
                .expect("put");
        }
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(2500),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(t.rate(), 4 << 20);
    }
}
