//! S3 (and S3-compatible: MinIO, Ceph, …) on `aws-sdk-s3`.
//!
//! * URL `s3://bucket/prefix`; options `region`, `endpoint` (path-style addressing
//!   for S3-compatible servers), `access_key_id`, `secret_access_key`,
//!   `session_token`. Without keys the standard AWS chain applies (environment,
//!   profile, SSO, instance or container role).
//! * The SDK's retries are disabled; every request goes through
//!   [`super::retry::with_retries`] once (503 SlowDown, 429, 5xx, timeouts,
//!   connection failures).
//! * Uploads are multipart (parts of at least 8 MiB, at most 10,000 parts, 4 in
//!   flight); an upload that fails is aborted so no parts are left billing.
//! * Objects larger than two ranges are downloaded as ranged GETs, 4 in flight, in
//!   order — one huge node restores faster than one connection allows.

use super::retry::{RetryConfig, with_retries};
use super::{
    ByteStream, Limits, MultipartUpload, ObjectMeta, PartInfo, RANGE, Store, check_key,
    check_range, option, ranged_stream,
};
use crate::{Error, Result};
use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as AwsStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Key prefix, empty or ending with `/`.
    prefix: String,
    region: String,
    endpoint: Option<String>,
    retry: RetryConfig,
    /// Server-side encryption asked of every object (`SSE`, `SSE_KMS_KEY_ID`).
    sse: Option<aws_sdk_s3::types::ServerSideEncryption>,
    kms_key: Option<String>,
    /// Storage class of the data objects (`STORAGE_CLASS`).
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
}

/// The cloud's own protections asked by the options: server-side encryption
/// (`sse` = `aws:kms` with an optional `sse_kms_key_id`, or `AES256`) and a storage
/// class for the data objects — only classes read at once: a snapshot in GLACIER
/// or DEEP_ARCHIVE could not be restored without a thaw first.
type Protections = (
    Option<aws_sdk_s3::types::ServerSideEncryption>,
    Option<String>,
    Option<aws_sdk_s3::types::StorageClass>,
);

fn protections(options: &std::collections::BTreeMap<String, String>) -> Result<Protections> {
    use aws_sdk_s3::types::{ServerSideEncryption, StorageClass};
    let mut problems = Vec::new();
    let sse = match option(options, "sse") {
        None => None,
        Some("aws:kms") => Some(ServerSideEncryption::AwsKms),
        Some("AES256") => Some(ServerSideEncryption::Aes256),
        Some(other) => {
            problems.push(format!("SSE={other:?}: give aws:kms or AES256"));
            None
        }
    };
    let kms_key = option(options, "sse_kms_key_id").map(str::to_string);
    if kms_key.is_some() && sse != Some(ServerSideEncryption::AwsKms) {
        problems.push("SSE_KMS_KEY_ID needs SSE=aws:kms".into());
    }
    const READABLE: [&str; 6] = [
        "STANDARD",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER_IR",
        "REDUCED_REDUNDANCY",
    ];
    let storage_class = match option(options, "storage_class") {
        None => None,
        Some(c) if READABLE.contains(&c) => Some(StorageClass::from(c)),
        Some(c) => {
            problems.push(format!(
                "STORAGE_CLASS={c:?}: give a class read at once ({}); GLACIER and DEEP_ARCHIVE objects cannot be restored without a thaw",
                READABLE.join(", ")
            ));
            None
        }
    };
    if problems.is_empty() {
        Ok((sse, kms_key, storage_class))
    } else {
        Err(Error::Params(problems))
    }
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Classify an SDK error: what the user sees, and whether a retry may help.
fn sdk_err<E>(
    op: &'static str,
    key: &str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_string);
    let cause = crate::error::innermost(&e);
    // No credentials anywhere in the chain: no retry makes some appear.
    let no_credentials = matches!(&e, SdkError::DispatchFailure(d) if d.is_other() || d.is_user())
        && DisplayErrorContext(&e)
            .to_string()
            .to_ascii_lowercase()
            .contains("credentials");
    if no_credentials {
        return Error::Store {
            op,
            key: key.to_string(),
            message: format!(
                "no AWS credentials were found (the last provider tried said: {}): give AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or set up the standard chain (environment, ~/.aws/credentials, AWS_PROFILE, an instance or pod role)",
                crate::redact::redact(&cause)
            ),
            transient: false,
        };
    }
    let transient = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            matches!(status, Some(429) | Some(500..=599))
                || matches!(
                    code.as_deref(),
                    Some(
                        "SlowDown"
                            | "RequestTimeout"
                            | "InternalError"
                            | "ServiceUnavailable"
                            | "Throttling"
                    )
                )
        }
        _ => false,
    };
    let mut message = match (&e, status, code.as_deref()) {
        (SdkError::DispatchFailure(_), _, _) => "cannot connect to the S3 endpoint".to_string(),
        (SdkError::TimeoutError(_), _, _) => "request timed out".to_string(),
        (_, Some(s), Some(c)) => format!("HTTP {s} {c}"),
        (_, Some(s), None) => format!("HTTP {s}"),
        _ => String::new(),
    };
    if let Some(m) = e.message() {
        message.push_str(&format!(": {m}"));
    } else if !matches!(e, SdkError::ServiceError(_)) {
        // The root cause in one line ("Connection refused", "failed to lookup
        // address"), not the SDK's nested debug form.
        message.push_str(&format!(": {cause}"));
    }
    tracing::debug!("{op} {key}: {}", DisplayErrorContext(&e));
    Error::Store {
        op,
        key: key.to_string(),
        message: crate::redact::redact(&message),
        transient,
    }
}

impl S3Store {
    /// `rest` is `bucket[/prefix]`.
    pub async fn new(rest: &str, options: &BTreeMap<String, String>) -> Result<S3Store> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Usage("store URL s3:// needs a bucket name".into()));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            check_key(prefix)
                .map_err(|_| Error::Usage(format!("S3 prefix {prefix:?} is not valid")))?;
        }
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = option(options, "region") {
            loader = loader.region(Region::new(region.to_string()));
        }
        match (
            option(options, "access_key_id"),
            option(options, "secret_access_key"),
        ) {
            (Some(ak), Some(sk)) => {
                let token = option(options, "session_token").map(str::to_string);
                loader = loader.credentials_provider(Credentials::new(
                    ak,
                    sk,
                    token,
                    None,
                    "cairn-parameters",
                ));
            }
            (None, None) => {}
            _ => {
                return Err(Error::Params(vec![
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together: give both or neither (the standard AWS chain)".into(),
                ]));
            }
        }
        let shared = loader.load().await;
        let region = shared
            .region()
            .map(|r| r.to_string())
            .ok_or_else(|| Error::Params(vec!["no AWS region: set AWS_REGION".into()]))?;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            // Parts are checked end to end by SHA-256 in the manifest; the optional
            // CRC32 trailer would re-frame every part (aws-chunked) and double its
            // memory while in flight.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            );
        let endpoint = option(options, "endpoint").map(str::to_string);
        if let Some(ep) = &endpoint {
            conf = conf.endpoint_url(ep).force_path_style(true);
        }
        let (sse, kms_key, storage_class) = protections(options)?;
        Ok(S3Store {
            client: Client::from_conf(conf.build()),
            bucket: bucket.to_string(),
            prefix,
            region,
            endpoint,
            retry: RetryConfig::default(),
            sse,
            kms_key,
            storage_class,
        })
    }

    fn full(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    async fn fetch_range(&self, key: &str, full: &str, start: u64, end: u64) -> Result<Bytes> {
        with_retries(self.retry, "s3 ranged get", || async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(full)
                .range(format!("bytes={start}-{}", end - 1))
                .send()
                .await
                .map_err(|e| {
                    if e.raw_response().map(|r| r.status().as_u16()) == Some(404) {
                        Error::NotFound(format!("s3://{}/{full}", self.bucket))
                    } else {
                        sdk_err("get", key, e)
                    }
                })?;
            let data = out.body.collect().await.map_err(|e| Error::Store {
                op: "get",
                key: key.to_string(),
                message: format!("reading the body: {e}"),
                transient: true,
            })?;
            let data = data.into_bytes();
            check_range(key, start, end, &data)?;
            Ok(data)
        })
        .await
    }
}

struct S3Upload {
    store: S3Store,
    key: String,
    full: String,
    upload_id: String,
    etags: Mutex<BTreeMap<i32, String>>,
}

#[async_trait]
impl MultipartUpload for S3Upload {
    fn id(&self) -> Option<String> {
        Some(self.upload_id.clone())
    }

    async fn put_part(&self, part: PartInfo, data: Bytes) -> Result<()> {
        let number = i32::try_from(part.index + 1)
            .map_err(|_| Error::store("upload part", &self.key, "too many parts"))?;
        let s = &self.store;
        let etag = with_retries(s.retry, "s3 upload part", || async {
            let out = s
                .client
                .upload_part()
                .bucket(&s.bucket)
                .key(&self.full)
                .upload_id(&self.upload_id)
                .part_number(number)
                .body(AwsStream::from(data.clone()))
                .send()
                .await
                .map_err(|e| sdk_err("upload part", &self.key, e))?;
            out.e_tag
                .ok_or_else(|| Error::store("upload part", &self.key, "no ETag in the response"))
        })
        .await?;
        let mut etags = match self.etags.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        etags.insert(number, etag);
        Ok(())
    }

    async fn complete(self: Box<Self>, parts: usize, _size: u64) -> Result<()> {
        if parts == 0 {
            // S3 needs at least one part: an empty object is one empty part.
            self.put_part(
                PartInfo {
                    index: 0,
                    offset: 0,
                },
                Bytes::new(),
            )
            .await?;
        }
        let etags = match self.etags.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let want = parts.max(1);
        if etags.len() != want {
            return Err(Error::store(
                "complete",
                &self.key,
                format!("{} of {want} parts uploaded", etags.len()),
            ));
        }
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                etags
                    .into_iter()
                    .map(|(n, e)| CompletedPart::builder().part_number(n).e_tag(e).build())
                    .collect(),
            ))
            .build();
        let s = &self.store;
        with_retries(s.retry, "s3 complete upload", || async {
            s.client
                .complete_multipart_upload()
                .bucket(&s.bucket)
                .key(&self.full)
                .upload_id(&self.upload_id)
                .multipart_upload(completed.clone())
                .send()
                .await
                .map_err(|e| sdk_err("complete upload", &self.key, e))
        })
        .await?;
        Ok(())
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        self.store.abort_multipart(&self.key, &self.upload_id).await
    }
}

#[async_trait]
impl Store for S3Store {
    fn describe(&self) -> String {
        match &self.endpoint {
            Some(ep) => format!("s3://{}/{} (endpoint {ep})", self.bucket, self.prefix),
            None => format!("s3://{}/{}", self.bucket, self.prefix),
        }
    }

    fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
    }

    fn limits(&self) -> Limits {
        Limits {
            min_part_size: 8 << 20,
            max_parts: 10_000,
            concurrency: 4,
        }
    }

    async fn check(&self) -> Result<()> {
        let r = self.client.head_bucket().bucket(&self.bucket).send().await;
        let Err(e) = r else { return Ok(()) };
        let status = e.raw_response().map(|r| r.status().as_u16());
        let actual_region = e
            .raw_response()
            .and_then(|r| r.headers().get("x-amz-bucket-region"))
            .map(str::to_string);
        let b = &self.bucket;
        let msg = match (status, actual_region) {
            (Some(404), _) => format!("bucket {b:?} does not exist (S3_BUCKET_NAME)"),
            (Some(403), _) => format!(
                "access to bucket {b:?} denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and the bucket policy"
            ),
            (Some(301 | 400), Some(actual)) if actual != self.region => format!(
                "bucket {b:?} is in region {actual}, not {} (AWS_REGION)",
                self.region
            ),
            (Some(301), _) => format!("bucket {b:?} is not in region {} (AWS_REGION)", self.region),
            _ => {
                let e = sdk_err("check bucket", b, e);
                format!("bucket {b:?} cannot be reached: {e}")
            }
        };
        Err(Error::Store {
            op: "check",
            key: format!("s3://{b}"),
            message: msg,
            transient: false,
        })
    }

    async fn abort_multipart(&self, key: &str, id: &str) -> Result<()> {
        let full = self.full(key)?;
        let r = with_retries(self.retry, "s3 abort upload", || async {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(id)
                .send()
                .await
                .map_err(|e| sdk_err("abort upload", key, e))
        })
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(Error::Store { message, .. }) if message.contains("NoSuchUpload") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full(key)?;
        with_retries(self.retry, "s3 put", || async {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .set_server_side_encryption(self.sse.clone())
                .set_ssekms_key_id(self.kms_key.clone())
                .body(AwsStream::from(data.clone()))
                .send()
                .await
                .map_err(|e| sdk_err("put", key, e))
        })
        .await?;
        Ok(())
    }

    async fn start_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>> {
        let full = self.full(key)?;
        let out = with_retries(self.retry, "s3 start upload", || async {
            self.client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .set_server_side_encryption(self.sse.clone())
                .set_ssekms_key_id(self.kms_key.clone())
                .set_storage_class(self.storage_class.clone())
                .send()
                .await
                .map_err(|e| sdk_err("start upload", key, e))
        })
        .await?;
        let upload_id = out
            .upload_id
            .ok_or_else(|| Error::store("start upload", key, "no upload id in the response"))?;
        Ok(Box::new(S3Upload {
            store: self.clone(),
            key: key.to_string(),
            full,
            upload_id,
            etags: Mutex::new(BTreeMap::new()),
        }))
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let full = self.full(key)?;
        let size = self
            .head(key)
            .await?
            .ok_or_else(|| Error::NotFound(format!("s3://{}/{full}", self.bucket)))?
            .size;
        if size > 2 * RANGE {
            let this = self.clone();
            let key = key.to_string();
            return Ok(ranged_stream(size, move |start, end| {
                let (this, key, full) = (this.clone(), key.clone(), full.clone());
                async move { this.fetch_range(&key, &full, start, end).await }
            }));
        }
        let out = with_retries(self.retry, "s3 get", || async {
            self.client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| sdk_err("get", key, e))
        })
        .await?;
        let key = key.to_string();
        let stream = futures::stream::unfold(Some(out.body), move |body| {
            let key = key.clone();
            async move {
                let mut body = body?;
                match body.next().await {
                    Some(Ok(b)) => Some((Ok(b), Some(body))),
                    Some(Err(e)) => Some((
                        Err(Error::Store {
                            op: "get",
                            key,
                            message: format!("reading the body: {e}"),
                            transient: true,
                        }),
                        None,
                    )),
                    None => None,
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<ByteStream> {
        let full = self.full(key)?;
        let this = self.clone();
        let key = key.to_string();
        Ok(super::ranged_stream_between(start, end, move |s, e| {
            let (this, key, full) = (this.clone(), key.clone(), full.clone());
            async move { this.fetch_range(&key, &full, s, e).await }
        }))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let full = self.full(key)?;
        let r = with_retries(self.retry, "s3 head", || async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
            {
                Ok(out) => Ok(Some(out.content_length.unwrap_or(0))),
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
                Err(e) => Err(sdk_err("head", key, e)),
            }
        })
        .await?;
        Ok(r.map(|size| ObjectMeta {
            key: key.to_string(),
            size: u64::try_from(size).unwrap_or(0),
            modified: None,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = with_retries(self.retry, "s3 list", || async {
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .set_continuation_token(token.clone())
                    .send()
                    .await
                    .map_err(|e| sdk_err("list", prefix, e))
            })
            .await?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let Some(rel) = k.strip_prefix(&self.prefix) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: rel.to_string(),
                    size: u64::try_from(o.size().unwrap_or(0)).unwrap_or(0),
                    modified: o.last_modified().map(|t| t.secs()),
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full(key)?;
        with_retries(self.retry, "s3 delete", || async {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| sdk_err("delete", key, e))
        })
        .await?;
        Ok(())
    }
}
