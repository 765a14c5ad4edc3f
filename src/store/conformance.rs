//! The store conformance suite: every backend must pass it. Unit tests run it on
//! the memory and local stores; integration tests run it on real servers.
#![allow(clippy::unwrap_used)]

use super::{Store, get_bytes, upload_parts};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub async fn run(store: &dyn Store) {
    let cancel = CancellationToken::new();
    store.check().await.expect("check");
    // put / head / get
    store
        .put("c/a.txt", Bytes::from_static(b"hello"))
        .await
        .expect("put");
    let head = store.head("c/a.txt").await.expect("head").expect("present");
    assert_eq!(head.size, 5);
    assert_eq!(
        &get_bytes(store, "c/a.txt", 1 << 20).await.expect("get")[..],
        b"hello"
    );
    assert!(store.head("c/missing").await.expect("head").is_none());
    assert!(matches!(
        store.get("c/missing").await.err(),
        Some(crate::Error::NotFound(_))
    ));

    // multipart: full parts of the backend's minimum size and a short last one
    // reassemble in order (large enough to take a ranged download path)
    let part = store.limits().min_part_size;
    let (tx, rx) = mpsc::channel(2);
    let parts: Vec<Bytes> = (0..4u8)
        .map(|i| {
            let len = if i == 3 { 1000 } else { part };
            Bytes::from(
                (0..len)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
                    .collect::<Vec<u8>>(),
            )
        })
        .collect();
    let expected: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
    let producer = async move {
        for p in parts {
            tx.send(p).await.map_err(|_| crate::Error::Cancelled)?;
        }
        Ok(())
    };
    let producer = tokio::spawn(producer);
    let joined = async {
        producer
            .await
            .map_err(|e| crate::Error::State(e.to_string()))?
    };
    let mut started = None;
    let (size, ()) = upload_parts(store, "c/big.bin", rx, part, joined, &cancel, |id| {
        started = Some(id.to_string())
    })
    .await
    .expect("multipart");
    let _ = started;
    assert_eq!(size, expected.len() as u64);
    assert_eq!(
        store
            .head("c/big.bin")
            .await
            .expect("head")
            .expect("present")
            .size,
        size
    );
    let got = get_bytes(store, "c/big.bin", 1 << 30).await.expect("get");
    assert!(got.to_vec() == expected, "multipart object differs");

    // ranged reads: inside one part, across parts, up to the end, and one byte
    let len = expected.len() as u64;
    for (start, end) in [
        (7, 1000),
        (part as u64 - 10, part as u64 * 2 + 10),
        (len - 1500, len),
        (len / 2, len / 2 + 1),
    ] {
        let mut s = store
            .get_range("c/big.bin", start, end)
            .await
            .expect("range");
        let mut got = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut s).await {
            got.extend_from_slice(&chunk.expect("range chunk"));
        }
        assert!(
            got[..] == expected[start as usize..end as usize],
            "range {start}-{end} differs ({} bytes)",
            got.len()
        );
    }
    // Absent: said when the read starts or by its first chunk.
    let missing = match store.get_range("c/missing", 0, 1).await {
        Err(e) => e,
        Ok(mut s) => futures::StreamExt::next(&mut s)
            .await
            .expect("an item")
            .expect_err("absent"),
    };
    assert!(matches!(missing, crate::Error::NotFound(_)), "{missing}");

    // a cancelled upload leaves nothing visible
    let (tx, rx) = mpsc::channel(2);
    let cancelled = CancellationToken::new();
    tx.send(Bytes::from_static(b"partial")).await.expect("send");
    cancelled.cancel();
    let r = upload_parts(
        store,
        "c/aborted.bin",
        rx,
        part,
        async { Ok(()) },
        &cancelled,
        |_| {},
    )
    .await;
    assert!(r.is_err());
    assert!(store.head("c/aborted.bin").await.expect("head").is_none());
    drop(tx);

    // a producer that fails after sending data leaves nothing visible either
    let (tx, rx) = mpsc::channel(2);
    tx.send(Bytes::from_static(b"half of it"))
        .await
        .expect("send");
    drop(tx);
    let failing = async { Err::<(), _>(crate::Error::archive("x", "producer failed")) };
    let r = upload_parts(store, "c/truncated.bin", rx, part, failing, &cancel, |_| {}).await;
    assert!(matches!(r, Err(crate::Error::Archive { .. })));
    assert!(store.head("c/truncated.bin").await.expect("head").is_none());

    // list is sorted, prefix-filtered and excludes incomplete uploads
    let keys: Vec<String> = store
        .list("c/")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, vec!["c/a.txt", "c/big.bin"]);
    assert!(store.list("zzz/").await.expect("list").is_empty());

    // delete is idempotent
    store.delete("c/a.txt").await.expect("delete");
    store.delete("c/a.txt").await.expect("delete again");
    assert!(store.head("c/a.txt").await.expect("head").is_none());
    store.delete("c/big.bin").await.expect("delete");
    assert!(store.list("c/").await.expect("list").is_empty());
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_store_conforms() {
        super::run(&*super::super::memory::MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn local_store_conforms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::super::local::LocalStore::new(dir.path()).expect("store");
        super::run(&store).await;
        // no temp file left behind by the aborted upload
        let tmp = dir.path().join(".cairn-tmp");
        let left = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0);
    }
}
