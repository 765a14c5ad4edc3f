//! An in-memory store for unit tests (`memory://name`, shared within the process).

use super::{ByteStream, Limits, MultipartUpload, ObjectMeta, PartInfo, Store, check_key};
use crate::{Error, Result};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};

type Objects = Arc<Mutex<BTreeMap<String, Bytes>>>;

static NAMED: LazyLock<Mutex<BTreeMap<String, Arc<MemoryStore>>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

#[derive(Debug, Default)]
pub struct MemoryStore {
    name: String,
    objects: Objects,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl MemoryStore {
    pub fn new() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::default())
    }

    /// The process-wide store of this name (created empty on first use).
    pub fn named(name: &str) -> Arc<MemoryStore> {
        lock(&NAMED)
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(MemoryStore {
                    name: name.to_string(),
                    objects: Default::default(),
                })
            })
            .clone()
    }

    /// Replace an object's bytes (tests corrupt objects with it).
    pub fn overwrite(&self, key: &str, data: Bytes) {
        lock(&self.objects).insert(key.to_string(), data);
    }
}

struct MemoryUpload {
    key: String,
    objects: Objects,
    parts: Mutex<BTreeMap<usize, Bytes>>,
}

#[async_trait]
impl MultipartUpload for MemoryUpload {
    async fn put_part(&self, part: PartInfo, data: Bytes) -> Result<()> {
        lock(&self.parts).insert(part.index, data);
        Ok(())
    }
    async fn complete(self: Box<Self>, parts: usize, size: u64) -> Result<()> {
        let map = std::mem::take(&mut *lock(&self.parts));
        if map.len() != parts || map.keys().copied().ne(0..parts) {
            return Err(Error::store("complete", &self.key, "parts missing"));
        }
        let mut all = bytes::BytesMut::with_capacity(size as usize);
        for p in map.values() {
            all.extend_from_slice(p);
        }
        if all.len() as u64 != size {
            return Err(Error::store("complete", &self.key, "size mismatch"));
        }
        lock(&self.objects).insert(self.key.clone(), all.freeze());
        Ok(())
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn describe(&self) -> String {
        format!("memory://{}", self.name)
    }
    fn limits(&self) -> Limits {
        Limits {
            min_part_size: 1 << 20,
            max_parts: 10_000,
            concurrency: 4,
        }
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        check_key(key)?;
        lock(&self.objects).insert(key.to_string(), data);
        Ok(())
    }
    async fn start_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>> {
        check_key(key)?;
        Ok(Box::new(MemoryUpload {
            key: key.to_string(),
            objects: self.objects.clone(),
            parts: Default::default(),
        }))
    }
    async fn get(&self, key: &str) -> Result<ByteStream> {
        check_key(key)?;
        let data = lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("{}/{key}", self.describe())))?;
        // Hand it out in chunks, as a network store would.
        let chunks: Vec<Result<Bytes>> = (0..data.len())
            .step_by(64 << 10)
            .map(|i| Ok(data.slice(i..(i + (64 << 10)).min(data.len()))))
            .collect();
        Ok(Box::pin(futures::stream::iter(chunks)))
    }
    async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<ByteStream> {
        check_key(key)?;
        let data = lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("{}/{key}", self.describe())))?;
        let lo = usize::try_from(start).unwrap_or(usize::MAX).min(data.len());
        let hi = usize::try_from(end)
            .unwrap_or(usize::MAX)
            .clamp(lo, data.len());
        let part = data.slice(lo..hi);
        Ok(Box::pin(futures::stream::iter([Ok(part)])))
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        check_key(key)?;
        Ok(lock(&self.objects).get(key).map(|d| ObjectMeta {
            key: key.to_string(),
            size: d.len() as u64,
            modified: None,
        }))
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(lock(&self.objects)
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, d)| ObjectMeta {
                key: k.clone(),
                size: d.len() as u64,
                modified: None,
            })
            .collect())
    }
    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        lock(&self.objects).remove(key);
        Ok(())
    }
}
