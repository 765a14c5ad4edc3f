//! Object stores.
//!
//! One small async trait, [`Store`], with a multipart writer ([`MultipartUpload`]) so
//! S3 parts and Azure blocks fit the same seam. A URL picks the backend
//! ([`open`]); [`upload_parts`] is the one shared writer that takes a stream of parts
//! from a producer, uploads a bounded number concurrently and aborts on failure.
//! Keys are `/`-separated and relative to the store's root or prefix.

pub mod azure;
pub mod local;
pub mod memory;
pub mod retry;
pub mod s3;
pub mod throttle;

use crate::{Error, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, FuturesUnordered, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A stored object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Last modification (Unix seconds), where the listing gives it.
    pub modified: Option<i64>,
}

/// A byte stream read from a store.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// Limits a backend imposes on multipart uploads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Smallest part size (except the last part).
    pub min_part_size: usize,
    /// Largest number of parts of one object.
    pub max_parts: usize,
    /// Parts uploaded concurrently per object.
    pub concurrency: usize,
}

/// Where a part goes in the object.
#[derive(Debug, Clone, Copy)]
pub struct PartInfo {
    /// 0-based part number.
    pub index: usize,
    /// Byte offset of the part in the object.
    pub offset: u64,
}

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// A printable description (URL without secrets).
    fn describe(&self) -> String;
    /// A URL that [`open`] opens again with the same options (the form an agent on
    /// a node is given).
    fn url(&self) -> String {
        self.describe()
    }
    /// Whether the store itself exists (a directory store's directory). Commands
    /// that read a store refuse a missing one instead of finding nothing in it; a
    /// backup creates it.
    async fn exists(&self) -> Result<bool> {
        Ok(true)
    }
    fn limits(&self) -> Limits;
    /// Pre-flight: the store exists and the credentials work. One clear message per
    /// cause (missing bucket, wrong key, wrong region).
    async fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Abort a multipart upload started by an earlier, killed process (its id was
    /// recorded in the run state). Absent uploads are not an error.
    async fn abort_multipart(&self, key: &str, id: &str) -> Result<()> {
        let _ = (key, id);
        Ok(())
    }
    /// Write a small object whole; visible only when complete.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// Start a multipart upload; the object is visible only after `complete`.
    async fn start_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>>;
    /// Read an object as a stream. [`Error::NotFound`] when absent.
    async fn get(&self, key: &str) -> Result<ByteStream>;
    /// Read bytes `[start, end)` of an object as a stream (ranged GETs on the
    /// remote backends). The caller keeps `end` within the object. This default
    /// reads from the start and drops what comes before the range.
    async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<ByteStream> {
        let whole = self.get(key).await?;
        Ok(slice_stream(whole, start, end))
    }
    /// Size of an object, or `None` when absent.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// All objects whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Delete an object; deleting an absent object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
}

#[async_trait]
pub trait MultipartUpload: Send + Sync {
    /// The backend's id of this upload, if it has one worth recording for cleanup.
    fn id(&self) -> Option<String> {
        None
    }
    /// Upload one part; several may be in flight at once.
    async fn put_part(&self, part: PartInfo, data: Bytes) -> Result<()>;
    /// Make the object visible from `parts` parts totalling `size` bytes.
    async fn complete(self: Box<Self>, parts: usize, size: u64) -> Result<()>;
    /// Drop everything uploaded so far.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// Parse a store URL: `s3://bucket/prefix`, `az://container/prefix`, `file:///abs/dir`, `file://relative/dir`,
/// a plain path, or `memory://name`. `options` carries backend settings (endpoint,
/// region, credentials); empty values count as absent.
pub async fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Arc<dyn Store>> {
    // An endpoint given for one kind of store (from the environment, where both
    // may be set: a copy from S3 to Azure) goes to that kind only.
    let for_kind = |own: &str| {
        let mut o = options.clone();
        if let Some(e) = options.get(own) {
            o.insert("endpoint".into(), e.clone());
        }
        o.remove("s3_endpoint");
        o.remove("azure_endpoint");
        o
    };
    if let Some(rest) = url.strip_prefix("az://") {
        return Ok(Arc::new(azure::AzureStore::new(
            rest,
            &for_kind("azure_endpoint"),
        )?));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        return Ok(Arc::new(
            s3::S3Store::new(rest, &for_kind("s3_endpoint")).await?,
        ));
    }
    if let Some(rest) = url.strip_prefix("file://") {
        if rest.is_empty() {
            return Err(Error::Usage("store URL file:// needs a directory".into()));
        }
        return Ok(Arc::new(local::LocalStore::new(rest)?));
    }
    if let Some(name) = url.strip_prefix("memory://") {
        return Ok(memory::MemoryStore::named(name));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return Err(Error::Usage(format!(
            "store scheme {scheme}:// is not supported (supported: s3://, az://, file://, memory://)"
        )));
    }
    if url.is_empty() {
        return Err(Error::Usage("empty store URL".into()));
    }
    Ok(Arc::new(local::LocalStore::new(url)?))
}

/// Backend options that hold secrets.
pub const SECRET_OPTIONS: [&str; 4] =
    ["secret_access_key", "session_token", "key", "client_secret"];

/// A non-empty backend option (`store_options` of a plan; empty means absent).
pub fn option<'a>(options: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    options
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Size of one ranged read of the remote backends.
pub const RANGE: u64 = 8 << 20;
/// Ranged reads in flight per object.
pub const RANGE_CONCURRENCY: usize = 4;

/// An object of `size` bytes read as [`RANGE`]-sized ranges, [`RANGE_CONCURRENCY`]
/// in flight, yielded in order. `fetch(start, end)` reads one range (retrying as it
/// sees fit); the remote backends share this instead of each splitting ranges.
pub fn ranged_stream<F, Fut>(size: u64, fetch: F) -> ByteStream
where
    F: Fn(u64, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Bytes>> + Send + 'static,
{
    ranged_stream_between(0, size, fetch)
}

/// Bytes `[start, end)` of an object read as [`ranged_stream`] reads a whole one.
pub fn ranged_stream_between<F, Fut>(start: u64, end: u64, fetch: F) -> ByteStream
where
    F: Fn(u64, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Bytes>> + Send + 'static,
{
    let ranges: Vec<(u64, u64)> = (start..end)
        .step_by(usize::try_from(RANGE).unwrap_or(usize::MAX))
        .map(|s| (s, (s + RANGE).min(end)))
        .collect();
    Box::pin(
        futures::stream::iter(ranges)
            .map(move |(start, end)| fetch(start, end))
            .buffered(RANGE_CONCURRENCY),
    )
}

/// Bytes `[start, end)` of `whole`, a stream that starts at byte 0.
pub fn slice_stream(whole: ByteStream, start: u64, end: u64) -> ByteStream {
    let mut at = 0u64;
    Box::pin(
        whole
            .take_while(move |_| {
                let more = at < end;
                futures::future::ready(more)
            })
            .filter_map(move |chunk| {
                let out = chunk.map(|c| {
                    let (from, to) = (at, at + c.len() as u64);
                    at = to;
                    let lo = start.clamp(from, to) - from;
                    let hi = end.clamp(from, to) - from;
                    c.slice(lo as usize..hi as usize)
                });
                futures::future::ready(match out {
                    Ok(c) if c.is_empty() => None,
                    other => Some(other),
                })
            }),
    )
}

/// A ranged read must return exactly the bytes asked for; a short one is retried.
pub fn check_range(key: &str, start: u64, end: u64, data: &Bytes) -> Result<()> {
    if data.len() as u64 == end - start {
        Ok(())
    } else {
        Err(Error::Store {
            op: "get",
            key: key.to_string(),
            message: format!("range {start}-{end} returned {} bytes", data.len()),
            transient: true,
        })
    }
}

/// Validate a key: relative, `/`-separated, no empty, `.` or `..` segments.
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.starts_with('/')
        || key.contains('\\')
        || key.contains('\0')
        || key
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(Error::store("use key", key, "invalid object key"));
    }
    Ok(())
}

/// Choose a part size for an object expected to be about `expected` bytes so that it
/// never needs more than the backend's part limit (with headroom for growth and
/// for incompressible data, which a compressed stream can slightly exceed).
pub fn part_size_for(limits: Limits, expected: u64) -> usize {
    let budget = (limits.max_parts as u64 / 10).saturating_mul(9).max(1);
    let needed = expected.saturating_add(expected / 8).div_ceil(budget);
    let needed = usize::try_from(needed).unwrap_or(usize::MAX);
    // Round up to a whole MiB.
    let mib = 1 << 20;
    needed.max(limits.min_part_size).div_ceil(mib) * mib
}

/// MiB of part data in flight across every upload of the process, whatever the
/// number of nodes running in parallel: memory stays bounded.
pub const UPLOAD_BUDGET_MIB: u32 = 64;

static UPLOAD_BUDGET: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(UPLOAD_BUDGET_MIB as usize)));

/// Budget permits (MiB, rounded up) a part holds while it is uploaded; a part larger
/// than the whole budget takes all of it.
fn part_permits(len: usize) -> u32 {
    u32::try_from(len.div_ceil(1 << 20))
        .unwrap_or(u32::MAX)
        .clamp(1, UPLOAD_BUDGET_MIB)
}

/// Read the object `key` with `consume`, which runs on a blocking thread and reads
/// it as a `std::io::Read` while the download is driven here; `cancel` stops it.
pub async fn read_stream<T: Send + 'static>(
    store: &dyn Store,
    key: &str,
    cancel: &CancellationToken,
    consume: impl FnOnce(crate::archive::io::ChannelReader) -> Result<T> + Send + 'static,
) -> Result<T> {
    let mut stream = store.get(key).await?;
    // Chunks may be whole ranges (8 MiB): keep the queue short.
    let (tx, rx) = mpsc::channel::<Result<Bytes>>(2);
    let consumer =
        tokio::task::spawn_blocking(move || consume(crate::archive::io::ChannelReader::new(rx)));
    let pump = async {
        while let Some(chunk) = stream.next().await {
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
        drop(tx);
    };
    tokio::select! {
        _ = pump => {}
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    }
    consumer
        .await
        .map_err(|e| Error::State(format!("read worker failed: {e}")))?
}

/// Read the byte ranges `ranges` of `key`, in order, and hand them to `consume` on
/// a blocking thread as one [`SegmentReader`](crate::archive::io::SegmentReader)
/// that ends at the end of each range. A failed read reaches `consume` as an error.
pub async fn read_ranges<T: Send + 'static>(
    store: &dyn Store,
    key: &str,
    ranges: Vec<(u64, u64)>,
    cancel: &CancellationToken,
    consume: impl FnOnce(crate::archive::io::SegmentReader) -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::channel::<Result<Option<Bytes>>>(2);
    let consumer =
        tokio::task::spawn_blocking(move || consume(crate::archive::io::SegmentReader::new(rx)));
    let pump = async {
        for (start, end) in ranges {
            let mut stream = match store.get_range(key, start, end).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            while let Some(chunk) = stream.next().await {
                let failed = chunk.is_err();
                if tx.send(chunk.map(Some)).await.is_err() || failed {
                    return;
                }
            }
            if tx.send(Ok(None)).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = pump => {}
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    }
    drop(tx);
    consumer
        .await
        .map_err(|e| Error::State(format!("read worker failed: {e}")))?
}

/// Upload what `produce` writes into the object `key`: `produce` runs on a blocking
/// thread and writes into a [`PartSink`](crate::archive::io::PartSink) that hands
/// parts of a size fit for `expected` bytes to [`upload_parts`]. Returns what
/// `produce` returned, with the object's size and SHA-256, once every byte written
/// has been uploaded. `on_started` gets the multipart upload id before any part is
/// sent.
pub async fn upload_stream<T: Send + 'static>(
    store: &dyn Store,
    key: &str,
    expected: u64,
    cancel: &CancellationToken,
    on_started: impl FnOnce(&str),
    produce: impl FnOnce(&mut crate::archive::io::PartSink) -> Result<T> + Send + 'static,
) -> Result<(T, u64, String)> {
    let part_size = part_size_for(store.limits(), expected);
    // One part queued, one being filled, and the process-wide upload budget bound
    // the memory of an upload.
    let (tx, rx) = mpsc::channel(1);
    let name = key.to_string();
    let worker = tokio::task::spawn_blocking(move || {
        let mut sink = crate::archive::io::PartSink::new(part_size, tx);
        let out = produce(&mut sink)?;
        let (size, sha256) = sink.finish().map_err(|e| Error::io("send", &name, e))?;
        Ok::<_, Error>((out, size, sha256))
    });
    let producer = async {
        worker
            .await
            .map_err(|e| Error::State(format!("upload worker failed: {e}")))?
    };
    let (uploaded, (out, size, sha256)) =
        upload_parts(store, key, rx, part_size, producer, cancel, on_started).await?;
    if uploaded != size {
        return Err(Error::store(
            "upload",
            key,
            format!("uploaded {uploaded} bytes of {size}"),
        ));
    }
    Ok((out, size, sha256))
}

/// Upload the parts received on `parts` (each `part_size` bytes but the last) as one
/// object at `key`: at most `limits.concurrency` parts in flight per object and
/// [`UPLOAD_BUDGET_MIB`] for the whole process, the channel bound giving
/// backpressure to the producer. `producer` is the (already running) task that sends the parts; the
/// object is completed only when the input ended *and* the producer succeeded, so a
/// producer that fails midway never leaves a truncated object. On any error or
/// cancellation the upload is aborted and nothing becomes visible.
/// Returns the object size and the producer's result.
pub async fn upload_parts<P>(
    store: &dyn Store,
    key: &str,
    mut parts: mpsc::Receiver<Bytes>,
    part_size: usize,
    producer: impl std::future::Future<Output = Result<P>>,
    cancel: &CancellationToken,
    on_started: impl FnOnce(&str),
) -> Result<(u64, P)> {
    let upload = store.start_multipart(key).await?;
    if let Some(id) = upload.id() {
        on_started(&id);
    }
    let concurrency = store.limits().concurrency.max(1);
    let permits = part_permits(part_size);
    let sent = async {
        let mut in_flight = FuturesUnordered::new();
        let mut index = 0usize;
        let mut offset = 0u64;
        let mut input_done = false;
        loop {
            if input_done && in_flight.is_empty() {
                break;
            }
            let want_more = !input_done && in_flight.len() < concurrency;
            // The budget is taken before the next part is received, and this
            // upload's parts in flight keep being driven meanwhile: no upload ever
            // waits for budget held by its own stalled parts.
            tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                r = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(r) = r { r? }
                }
                budget = UPLOAD_BUDGET.clone().acquire_many_owned(permits), if want_more => {
                    let budget = budget
                        .map_err(|_| Error::store("upload", key, "upload budget closed"))?;
                    let next = tokio::select! {
                        p = parts.recv() => p,
                        _ = cancel.cancelled() => return Err(Error::Cancelled),
                    };
                    match next {
                        Some(data) => {
                            let info = PartInfo { index, offset };
                            index += 1;
                            offset += data.len() as u64;
                            let upload = &upload;
                            in_flight.push(async move {
                                let r = upload.put_part(info, data).await;
                                drop(budget);
                                r
                            });
                        }
                        None => input_done = true,
                    }
                }
            }
        }
        Ok((index, offset))
    }
    .await;
    // Stop the producer if it is still sending (it sees a closed channel).
    drop(parts);
    let produced = producer.await;
    match (sent, produced) {
        (Ok((count, size)), Ok(p)) => {
            upload.complete(count, size).await?;
            Ok((size, p))
        }
        (sent, produced) => {
            if let Err(abort_err) = upload.abort().await {
                tracing::warn!(key, "aborting the upload failed too: {abort_err}");
            }
            // The upload's own error explains a producer's broken pipe, not the reverse.
            match (sent, produced) {
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                (Ok(_), Ok(_)) => Err(Error::store("upload", key, "unreachable")),
            }
        }
    }
}

/// Read a whole (small) object into memory, refusing more than `max` bytes.
pub async fn get_bytes(store: &dyn Store, key: &str, max: u64) -> Result<Bytes> {
    let mut stream = store.get(key).await?;
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if (buf.len() + chunk.len()) as u64 > max {
            return Err(Error::store(
                "get",
                key,
                format!("object larger than {max} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

pub mod conformance;

/// Store options for commands that take a `--store URL` (no plan parameters), from
/// the environment: for S3 the region and `S3_ENDPOINT_URL` (credentials from the
/// AWS chain); for Azure `AZURE_STORAGE_ACCOUNT`, `AZURE_STORAGE_KEY` or the service
/// principal's `CLIENT_ID` / `TENANT_ID` / `CLIENT_SECRET`, and `AZURE_ENDPOINT_URL`.
pub fn options_from_env() -> std::collections::BTreeMap<String, String> {
    let mut o = std::collections::BTreeMap::new();
    let env = |vars: &[&str]| {
        vars.iter()
            .find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()))
    };
    let options: [(&str, &[&str], bool); 8] = [
        ("region", &["AWS_REGION", "AWS_DEFAULT_REGION"], false),
        (
            "endpoint",
            &[
                "S3_ENDPOINT_URL",
                "AZURE_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3",
                "AWS_ENDPOINT_URL",
            ],
            false,
        ),
        ("account", &["AZURE_STORAGE_ACCOUNT"], false),
        ("key", &["AZURE_STORAGE_KEY"], true),
        ("client_id", &["CLIENT_ID", "AZURE_CLIENT_ID"], false),
        ("tenant_id", &["TENANT_ID", "AZURE_TENANT_ID"], false),
        (
            "client_secret",
            &["CLIENT_SECRET", "AZURE_CLIENT_SECRET"],
            true,
        ),
        ("authority_host", &["AZURE_AUTHORITY_HOST"], false),
    ];
    for (opt, vars, secret) in options {
        if let Some(v) = env(vars) {
            if secret {
                crate::redact::register(&v);
            }
            o.insert(opt.to_string(), v);
        }
    }
    // Each kind's own endpoint, when both are set ([`open`] picks by the URL).
    if let Some(v) = env(&["S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]) {
        o.insert("s3_endpoint".into(), v);
    }
    if let Some(v) = env(&["AZURE_ENDPOINT_URL"]) {
        o.insert("azure_endpoint".into(), v);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_respects_part_limit() {
        let limits = Limits {
            min_part_size: 8 << 20,
            max_parts: 10_000,
            concurrency: 4,
        };
        assert_eq!(part_size_for(limits, 1 << 20), 8 << 20);
        let five_tb: u64 = 5 << 40;
        let ps = part_size_for(limits, five_tb) as u64;
        assert!(five_tb.div_ceil(ps) <= 10_000, "part size {ps}");
        assert_eq!(ps % (1 << 20), 0);
    }

    #[tokio::test]
    async fn many_concurrent_uploads_share_the_budget_without_deadlock() {
        let store = memory::MemoryStore::new();
        let cancel = CancellationToken::new();
        let part = 8 << 20;
        let uploads = (0..12).map(|n| {
            let store = store.clone();
            let cancel = cancel.clone();
            async move {
                let (tx, rx) = mpsc::channel(1);
                let producer = tokio::spawn(async move {
                    for _ in 0..5 {
                        tx.send(Bytes::from(vec![n as u8; part]))
                            .await
                            .map_err(|_| Error::Cancelled)?;
                    }
                    Ok::<_, Error>(())
                });
                let joined = async { producer.await.map_err(|e| Error::State(e.to_string()))? };
                upload_parts(&*store, &format!("k{n}"), rx, part, joined, &cancel, |_| {}).await
            }
        });
        let all = futures::future::join_all(uploads);
        let results = tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("no deadlock");
        for r in results {
            assert_eq!(r.expect("upload").0, 5 * part as u64);
        }
        // Every permit comes back (other tests of this process may hold some for a
        // moment: wait for them rather than race them).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while UPLOAD_BUDGET.available_permits() != UPLOAD_BUDGET_MIB as usize {
            assert!(
                std::time::Instant::now() < deadline,
                "upload budget permits leaked: {} of {}",
                UPLOAD_BUDGET.available_permits(),
                UPLOAD_BUDGET_MIB
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn keys_are_validated() {
        for bad in ["", "/a", "a//b", "a/../b", "./a", "a\\b"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        check_key("snap/node-0.tar.gz").expect("valid");
    }
}
