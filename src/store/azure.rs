//! Azure Blob storage on `azure_storage_blobs` (0.21, the line with account-key auth).
//!
//! * URL `az://container/prefix`; options `account`, `key` (account key), or the
//!   service principal `client_id`, `tenant_id`, `client_secret` (with an optional
//!   `authority_host`), and `endpoint` (Azurite, sovereign clouds).
//! * Block blobs: blocks of at least 8 MiB (grown so a blob never needs more than
//!   50,000), 4 in flight, then one `Put Block List`. On failure nothing is committed
//!   and the uncommitted blocks expire on their own. Block ids all have the same
//!   length, as the service requires.
//! * Blobs larger than two ranges are read as 8 MiB ranged GETs, 4 in flight.
//! * The SDK's retries are off; every request goes through
//!   [`super::retry::with_retries`] once (503 ServerBusy, 500, timeouts).

use super::retry::{RetryConfig, with_retries};
use super::{
    ByteStream, Limits, MultipartUpload, ObjectMeta, PartInfo, Store, check_key, check_range,
    option, ranged_stream,
};
use crate::{Error, Result};
use async_trait::async_trait;
use azure_storage::{CloudLocation, StorageCredentials};
use azure_storage_blobs::blob::{BlobBlockType, BlockList};
use azure_storage_blobs::prelude::{BlobClient, BlockId, ClientBuilder, ContainerClient};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone)]
pub struct AzureStore {
    container: ContainerClient,
    account: String,
    container_name: String,
    prefix: String,
    endpoint: Option<String>,
    retry: RetryConfig,
    /// Access tier of the data blobs (`ACCESS_TIER`).
    tier: Option<azure_storage_blobs::prelude::AccessTier>,
}

impl std::fmt::Debug for AzureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn status_of(e: &azure_core::Error) -> Option<(u16, Option<String>)> {
    match e.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, error_code } => {
            Some((u16::from(*status), error_code.clone()))
        }
        _ => None,
    }
}

/// Classify an SDK error: what the user sees, and whether a retry may help.
fn az_err(op: &'static str, key: &str, e: azure_core::Error) -> Error {
    let (transient, message) = match (e.kind(), status_of(&e)) {
        (_, Some((status, code))) => (
            (status == 408 || status == 429 || status >= 500)
                && code.as_deref() != Some("FeatureNotSupported"),
            format!("HTTP {status} {}", code.unwrap_or_default()),
        ),
        (azure_core::error::ErrorKind::Io, _) => (
            true,
            format!("cannot reach the endpoint: {}", crate::error::innermost(&e)),
        ),
        (azure_core::error::ErrorKind::Credential, _) => (
            false,
            format!("cannot get a token for the service principal: {e}"),
        ),
        _ => (true, e.to_string()),
    };
    Error::Store {
        op,
        key: key.to_string(),
        message: crate::redact::redact(message.trim()),
        transient,
    }
}

impl AzureStore {
    /// `rest` is `container[/prefix]`.
    pub fn new(rest: &str, options: &BTreeMap<String, String>) -> Result<AzureStore> {
        let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if container.is_empty() {
            return Err(Error::Usage(
                "store URL az:// needs a container name".into(),
            ));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            check_key(prefix)
                .map_err(|_| Error::Usage(format!("Azure prefix {prefix:?} is not valid")))?;
        }
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let account = option(options, "account")
            .ok_or_else(|| Error::Params(vec!["AZURE_STORAGE_ACCOUNT is needed".into()]))?
            .to_string();
        let credentials = match (
            option(options, "key"),
            option(options, "client_id"),
            option(options, "tenant_id"),
            option(options, "client_secret"),
        ) {
            (Some(key), _, _, _) => {
                StorageCredentials::access_key(account.clone(), key.to_string())
            }
            (None, Some(client), Some(tenant), Some(secret)) => {
                let host = option(options, "authority_host")
                    .unwrap_or("https://login.microsoftonline.com");
                let host = azure_core::Url::parse(host).map_err(|e| {
                    Error::Params(vec![format!("AZURE_AUTHORITY_HOST {host:?}: {e}")])
                })?;
                let credential = azure_identity::ClientSecretCredential::new(
                    azure_core::new_http_client(),
                    host,
                    tenant.to_string(),
                    client.to_string(),
                    secret.to_string(),
                );
                StorageCredentials::token_credential(Arc::new(credential))
            }
            _ => {
                return Err(Error::Params(vec![
                    "give AZURE_STORAGE_KEY, or CLIENT_ID, TENANT_ID and CLIENT_SECRET of a service principal".into(),
                ]));
            }
        };
        let endpoint = option(options, "endpoint").map(|e| e.trim_end_matches('/').to_string());
        let location = match &endpoint {
            Some(uri) => CloudLocation::Custom {
                account: account.clone(),
                uri: uri.clone(),
            },
            None => CloudLocation::Public {
                account: account.clone(),
            },
        };
        let container_client = ClientBuilder::with_location(location, credentials)
            .retry(azure_core::RetryOptions::none())
            .container_client(container);
        use azure_storage_blobs::prelude::AccessTier;
        let tier = match option(options, "access_tier") {
            None => None,
            Some("Hot") => Some(AccessTier::Hot),
            Some("Cool") => Some(AccessTier::Cool),
            Some("Cold") => Some(AccessTier::Cold),
            // Archive blobs cannot be read without rehydrating them first.
            Some(other) => {
                return Err(Error::Params(vec![format!(
                    "ACCESS_TIER={other:?}: give Hot, Cool or Cold (Archive blobs cannot be restored without rehydration)"
                )]));
            }
        };
        Ok(AzureStore {
            container: container_client,
            account,
            container_name: container.to_string(),
            prefix,
            endpoint,
            retry: RetryConfig::default(),
            tier,
        })
    }

    fn blob(&self, key: &str) -> Result<BlobClient> {
        check_key(key)?;
        Ok(self.container.blob_client(format!("{}{key}", self.prefix)))
    }

    async fn fetch_range(
        &self,
        key: &str,
        blob: &BlobClient,
        start: u64,
        end: u64,
    ) -> Result<Bytes> {
        with_retries(self.retry, "azure ranged get", || async {
            // The SDK asks for a CRC64 of any range under 4 MiB, which Azurite does
            // not support; asking for at least 4 MiB is harmless because the
            // service stops at the end of the blob (only the last range is short).
            // A short range inside the blob (a ranged read of one file) is cut
            // back to what was asked.
            let asked = end.max(start + (4 << 20));
            let mut pages = blob
                .get()
                .range(start..asked)
                .chunk_size(asked - start)
                .into_stream();
            let page = pages
                .next()
                .await
                .ok_or_else(|| Error::store("get", key, "empty response"))?
                .map_err(|e| match status_of(&e) {
                    Some((404, _)) => Error::NotFound(format!(
                        "az://{}/{}{key}",
                        self.container_name, self.prefix
                    )),
                    _ => az_err("get", key, e),
                })?;
            let data = page
                .data
                .collect()
                .await
                .map_err(|e| az_err("get", key, e))?;
            let want = usize::try_from(end - start).unwrap_or(usize::MAX);
            let data = if data.len() > want {
                data.slice(..want)
            } else {
                data
            };
            check_range(key, start, end, &data)?;
            Ok(data)
        })
        .await
    }
}

/// Same-length block ids (the service refuses mixed lengths): the part number.
fn block_id(index: usize) -> BlockId {
    BlockId::new(Bytes::from(format!("cairn-{index:010}")))
}

struct AzureUpload {
    store: AzureStore,
    key: String,
    blob: BlobClient,
}

#[async_trait]
impl MultipartUpload for AzureUpload {
    async fn put_part(&self, part: PartInfo, data: Bytes) -> Result<()> {
        with_retries(self.store.retry, "azure put block", || async {
            self.blob
                .put_block(block_id(part.index), data.clone())
                .await
                .map_err(|e| az_err("put block", &self.key, e))
        })
        .await?;
        Ok(())
    }

    async fn complete(self: Box<Self>, parts: usize, _size: u64) -> Result<()> {
        let list = BlockList {
            blocks: (0..parts)
                .map(|i| BlobBlockType::new_uncommitted(block_id(i)))
                .collect(),
        };
        with_retries(self.store.retry, "azure put block list", || async {
            let mut put = self.blob.put_block_list(list.clone());
            if let Some(t) = self.store.tier {
                put = put.access_tier(t);
            }
            put.await
                .map_err(|e| az_err("put block list", &self.key, e))
        })
        .await?;
        Ok(())
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        // Uncommitted blocks are never committed and expire on the service's side.
        Ok(())
    }
}

#[async_trait]
impl Store for AzureStore {
    fn describe(&self) -> String {
        match &self.endpoint {
            Some(ep) => format!(
                "az://{}/{} (endpoint {ep})",
                self.container_name, self.prefix
            ),
            None => format!(
                "az://{}/{} (account {})",
                self.container_name, self.prefix, self.account
            ),
        }
    }

    fn url(&self) -> String {
        format!(
            "az://{}/{}",
            self.container_name,
            self.prefix.trim_end_matches('/')
        )
    }

    fn limits(&self) -> Limits {
        Limits {
            min_part_size: 8 << 20,
            max_parts: 50_000,
            concurrency: 4,
        }
    }

    async fn check(&self) -> Result<()> {
        let Err(e) = self.container.get_properties().await else {
            return Ok(());
        };
        let c = &self.container_name;
        let msg = match status_of(&e) {
            Some((404, _)) => format!("container {c:?} does not exist (CONTAINER_NAME)"),
            Some((403, _)) => format!(
                "access to container {c:?} denied: check AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY (or the service principal's role)"
            ),
            _ => format!(
                "container {c:?} cannot be reached: {}",
                az_err("check", c, e)
            ),
        };
        Err(Error::Store {
            op: "check",
            key: format!("az://{c}"),
            message: msg,
            transient: false,
        })
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let blob = self.blob(key)?;
        with_retries(self.retry, "azure put", || async {
            blob.put_block_blob(data.clone())
                .await
                .map_err(|e| az_err("put", key, e))
        })
        .await?;
        Ok(())
    }

    async fn start_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>> {
        Ok(Box::new(AzureUpload {
            store: self.clone(),
            key: key.to_string(),
            blob: self.blob(key)?,
        }))
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let size = self
            .head(key)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("az://{}/{}{key}", self.container_name, self.prefix))
            })?
            .size;
        let blob = self.blob(key)?;
        if size == 0 {
            return Ok(Box::pin(futures::stream::empty()));
        }
        let this = self.clone();
        let key = key.to_string();
        Ok(ranged_stream(size, move |start, end| {
            let (this, key, blob) = (this.clone(), key.clone(), blob.clone());
            async move { this.fetch_range(&key, &blob, start, end).await }
        }))
    }

    async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<ByteStream> {
        let blob = self.blob(key)?;
        let this = self.clone();
        let key = key.to_string();
        Ok(super::ranged_stream_between(start, end, move |s, e| {
            let (this, key, blob) = (this.clone(), key.clone(), blob.clone());
            async move { this.fetch_range(&key, &blob, s, e).await }
        }))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let blob = self.blob(key)?;
        with_retries(self.retry, "azure head", || async {
            match blob.get_properties().await {
                Ok(p) => Ok(Some(ObjectMeta {
                    key: key.to_string(),
                    size: p.blob.properties.content_length,
                    modified: Some(p.blob.properties.last_modified.unix_timestamp()),
                })),
                Err(e) if matches!(status_of(&e), Some((404, _))) => Ok(None),
                Err(e) => Err(az_err("head", key, e)),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut pages = self.container.list_blobs().prefix(full).into_stream();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| az_err("list", prefix, e))?;
            for b in page.blobs.blobs() {
                let Some(rel) = b.name.strip_prefix(&self.prefix) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: rel.to_string(),
                    size: b.properties.content_length,
                    modified: Some(b.properties.last_modified.unix_timestamp()),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let blob = self.blob(key)?;
        with_retries(self.retry, "azure delete", || async {
            match blob.delete().await {
                Ok(_) => Ok(()),
                Err(e) if matches!(status_of(&e), Some((404, _))) => Ok(()),
                Err(e) => Err(az_err("delete", key, e)),
            }
        })
        .await
    }
}
