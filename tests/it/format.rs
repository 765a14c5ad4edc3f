//! Snapshot format 2: kept format-1 snapshots still restore, node objects stay
//! standard `.tar.gz` files, and a partial restore reads only the blocks that hold
//! the files it restores (counted at a store wrapper over a real S3 server).

use super::helpers::*;
use super::servers::{self, AK, SK};
use async_trait::async_trait;
use bytes::Bytes;
use cairn::store::{ByteStream, Limits, MultipartUpload, ObjectMeta, Store};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Relative path → kind, size and SHA-256 of every regular file and target of
/// every link under `dir`, limited to the top-level names in `keep`, without the
/// service's own `snapshots` dirs (which backups leave out).
fn contents(dir: &Path, keep: &[&str]) -> BTreeMap<String, String> {
    tree(dir)
        .into_iter()
        .filter(|(k, _)| {
            keep.iter()
                .any(|t| k == t || k.starts_with(&format!("{t}/")))
        })
        .filter(|(k, _)| !k.split('/').any(|c| c == "snapshots"))
        .map(|(k, v)| {
            // Fingerprints are "kind mode mtime size links sha" or a link target:
            // keep the kind, size and content, not the time of the checkout.
            let f: Vec<&str> = v.split(' ').collect();
            let keep = match f.first() {
                Some(&"file") if f.len() >= 6 => format!("file {} {}", f[3], f[5]),
                Some(&"dir") => "dir".to_string(),
                _ => v.clone(),
            };
            (k, keep)
        })
        .collect()
}

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/demo-cluster")
}

#[test]
fn a_kept_format_1_snapshot_restores_byte_for_byte_with_the_current_code() {
    let sb = Sandbox::new();
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/snapshots/v1/kept-v1");
    let manifest = std::fs::read_to_string(kept.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("\"format_version\": 1"),
        "the fixture is format 1"
    );
    std::fs::create_dir_all(sb.path("store/kept-v1")).unwrap();
    for f in std::fs::read_dir(&kept).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), sb.path("store/kept-v1").join(f.file_name())).unwrap();
    }
    let out = sb.ok(&[
        "snapshots",
        "verify",
        "kept-v1",
        "--store",
        "store",
        "--read-data",
    ]);
    assert!(text(&out).0.contains("kept-v1"), "{:?}", text(&out));
    let tgt = target_cluster(sb.dir.path(), "tgt", 3);
    sb.ok(&start_args("restore-local", &tgt, "kept-v1", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    for i in 0..3 {
        let want = contents(&demo().join(format!("node-{i}")), &["app", "metrics"]);
        let got = contents(&sb.path(&format!("tgt/node-{i}")), &["app", "metrics"]);
        assert!(want.len() > 5, "node {i}: the demo cluster has files");
        assert_eq!(
            want, got,
            "node {i} differs from the cluster it was taken from"
        );
    }
    // A partial restore of a format-1 snapshot reads the whole object (it has no
    // index) and still restores just the path.
    let part = target_cluster(sb.dir.path(), "part", 3);
    sb.ok(
        &start_args("restore-local", &part, "kept-v1", &["PATHS=app"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let got = contents(&sb.path("part/node-1"), &["app", "metrics"]);
    assert_eq!(got, contents(&demo().join("node-1"), &["app"]));
}

#[test]
fn a_new_snapshot_is_indexed_and_its_objects_are_plain_tar_gz() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 3 << 20);
    sb.ok(&start_args("backup-local", &src, "s", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.path("store/s/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format_version"], 3);
    let obj = m["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["key"] == "node-0.tar.gz")
        .unwrap();
    assert!(
        obj["index"]["offsets"].as_array().unwrap().len() >= 3,
        "{obj}"
    );
    let files = m["cluster"]["nodes"][0]["files"].as_array().unwrap();
    assert!(
        files
            .iter()
            .all(|f| f["entry"]["length"].as_u64().unwrap() >= 512)
    );
    // `tar xzf` reads it as the standard archive it is.
    let x = sb.path("x");
    std::fs::create_dir(&x).unwrap();
    let st = std::process::Command::new("tar")
        .arg("xzf")
        .arg(sb.path("store/s/node-0.tar.gz"))
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    let source = contents(&sb.path("src/node-0"), &["app", "metrics"]);
    assert_eq!(contents(&x, &["app", "metrics"]), source);

    // A partial restore of one table reads only its blocks (-v logs it) and keeps
    // modes, times, the link and the odd names exactly.
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let mut args = vec!["-v".to_string()];
    args.extend(start_args(
        "restore-local",
        &tgt,
        "s",
        &["PATHS=app/users-1"],
    ));
    let out = sb.run_v(&args);
    let (o, e) = text(&out);
    assert!(
        out.status.success(),
        "{o}
{e}"
    );
    assert!(e.contains("reading only the blocks"), "{e}");
    for i in 0..2 {
        let want: BTreeMap<_, _> = tree(&sb.path(&format!("src/node-{i}")))
            .into_iter()
            .filter(|(k, _)| k.starts_with("app/users-1"))
            .collect();
        let got: BTreeMap<_, _> = tree(&sb.path(&format!("tgt/node-{i}")))
            .into_iter()
            .filter(|(k, _)| k.starts_with("app/"))
            .collect();
        assert_eq!(want.len(), 5, "{want:?}");
        assert_eq!(got, want, "node {i}");
    }

    // `snapshots show` lists the files and where they are.
    let out = sb.ok(&["snapshots", "show", "s", "app/users-1", "--store", "store"]);
    let (o, _) = text(&out);
    assert!(o.contains("format 3"), "{o}");
    assert!(o.contains("app/users-1/nb-1-Data.db  at "), "{o}");
    assert!(!o.contains("big.db") && !o.contains("metrics/"), "{o}");
    let out = sb.ok(&["--json", "snapshots", "show", "s", "--store", "store"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"][1]["seekable"], true);
    assert!(v["nodes"][1]["files"].as_array().unwrap().len() >= 6);
    let out = sb.run(&[
        "snapshots",
        "show",
        "s",
        "app/nothing-here",
        "--store",
        "store",
    ]);
    assert_eq!(out.status.code(), Some(5), "{:?}", text(&out));
}

/// A store that counts the bytes read from it.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn Store>,
    read: Arc<AtomicU64>,
}

impl Counting {
    fn counted(&self, s: ByteStream) -> ByteStream {
        let read = self.read.clone();
        Box::pin(s.inspect(move |c| {
            if let Ok(c) = c {
                read.fetch_add(c.len() as u64, Ordering::SeqCst);
            }
        }))
    }
}

#[async_trait]
impl Store for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    async fn put(&self, key: &str, data: Bytes) -> cairn::Result<()> {
        self.inner.put(key, data).await
    }
    async fn start_multipart(&self, key: &str) -> cairn::Result<Box<dyn MultipartUpload>> {
        self.inner.start_multipart(key).await
    }
    async fn get(&self, key: &str) -> cairn::Result<ByteStream> {
        Ok(self.counted(self.inner.get(key).await?))
    }
    async fn get_range(&self, key: &str, start: u64, end: u64) -> cairn::Result<ByteStream> {
        Ok(self.counted(self.inner.get_range(key, start, end).await?))
    }
    async fn head(&self, key: &str) -> cairn::Result<Option<ObjectMeta>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> cairn::Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> cairn::Result<()> {
        self.inner.delete(key).await
    }
}

fn random_file(path: &Path, len: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    let mut src = std::fs::File::open("/dev/urandom").unwrap().take(len);
    std::io::copy(&mut src, &mut f).unwrap();
}

#[test]
fn one_file_of_a_256_mib_node_restores_reading_at_most_3_mib() {
    let data = tempfile::tempdir().unwrap();
    let Some(server) = servers::s3s_fs(data.path(), 0) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(servers::fresh_bucket(&server.endpoint));
    let sb = Sandbox::new();
    // 256 MiB of incompressible SSTables in 4 tables; the wanted 1 MiB file sits in
    // the middle, at no block boundary.
    let node = sb.path("big/node-0");
    let mut n = 0;
    for t in 0..4 {
        for i in 0..8 {
            let len = if t == 2 && i == 3 {
                1 << 20
            } else {
                (8 << 20) + (256 << 10) + n * 97
            };
            random_file(&node.join(format!("ks/t{t}/nb-{i}-big-Data.db")), len);
            n += 1;
        }
    }
    let total: u64 = walk_sizes(&node);
    assert!(total >= 256 << 20, "{total}");
    let cluster = cluster_file(&sb.path("big.toml"), "big", &[(0, node.clone())], "");
    let params: Vec<String> = [
        "SNAPSHOT_NAME=big".to_string(),
        format!("AWS_ACCESS_KEY_ID={AK}"),
        format!("AWS_SECRET_ACCESS_KEY={SK}"),
        "AWS_REGION=us-east-1".to_string(),
        format!("S3_BUCKET_NAME={bucket}"),
        format!("S3_ENDPOINT_URL={}", server.endpoint),
    ]
    .into_iter()
    .flat_map(|p| ["-p".to_string(), p])
    .collect();
    let mut args = vec![
        "plan",
        "start",
        "backup-s3",
        "-q",
        "--cluster",
        cluster.to_str().unwrap(),
    ];
    args.extend(params.iter().map(String::as_str));
    sb.ok(&args);

    let wanted = "ks/t2/nb-3-big-Data.db";
    let options: BTreeMap<String, String> = [
        ("region", "us-east-1"),
        ("endpoint", server.endpoint.as_str()),
        ("access_key_id", AK),
        ("secret_access_key", SK),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let out = sb.path("restored");
    std::fs::create_dir(&out).unwrap();
    let (read, object_size) = rt.block_on(async {
        let inner = cairn::store::open(&format!("s3://{bucket}"), &options)
            .await
            .unwrap();
        let read = Arc::new(AtomicU64::new(0));
        let store = Counting {
            inner,
            read: read.clone(),
        };
        let m = cairn::checks::read_manifest(&store, "big").await.unwrap();
        let info = m.node(0).unwrap().clone();
        let object = m.object(&info.object).unwrap().clone();
        let size = object.size;
        read.store(0, Ordering::SeqCst);
        let selection = cairn::cluster::Selection::parse("")
            .with_paths(wanted)
            .unwrap();
        let done = cairn::node::restore::read_object(
            &store,
            &format!("big/{}", info.object),
            info,
            object,
            selection,
            Some(out.clone()),
            None,
            None,
            vec![],
            |_| {},
            &tokio_util::sync::CancellationToken::new(),
            cairn::node::restore::Part::Own,
        )
        .await
        .unwrap();
        assert_eq!(done.files, 1);
        (read.load(Ordering::SeqCst), size)
    });
    eprintln!("ranged restore of 1 MiB read {read} of {object_size} bytes");
    assert!(object_size >= 256 << 20, "{object_size}");
    assert!(
        read <= 3 << 20,
        "read {read} bytes of a {object_size}-byte object for 1 MiB"
    );
    assert_eq!(
        std::fs::read(out.join(wanted)).unwrap(),
        std::fs::read(node.join(wanted)).unwrap()
    );
    assert_eq!(walk_sizes(&out), 1 << 20, "only the wanted file");

    // Through the plan: the same file, restored and moved into an empty target.
    let tgt = cluster_file(
        &sb.path("tgt.toml"),
        "tgt",
        &[(0, sb.path("tgt/node-0"))],
        "",
    );
    let path = format!("PATHS={wanted}");
    let mut args = vec![
        "-v",
        "--json",
        "plan",
        "start",
        "restore-s3",
        "--cluster",
        tgt.to_str().unwrap(),
    ];
    args.extend(params.iter().map(String::as_str));
    args.extend(["-p", path.as_str()]);
    let o = sb.ok(&args);
    let (out, e) = text(&o);
    assert!(e.contains("reading only the blocks"), "{e}");
    // The summary counts what came from the store, not the whole object.
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stored = v["summary"]["stored_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored <= 3 << 20, "{v}");
    assert_eq!(
        std::fs::read(sb.path("tgt/node-0").join(wanted)).unwrap(),
        std::fs::read(node.join(wanted)).unwrap()
    );
    assert_eq!(walk_sizes(&sb.path("tgt/node-0")), 1 << 20);
}

fn walk_sizes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            total += walk_sizes(&e.path());
        } else if m.is_file() {
            total += m.len();
        }
    }
    total
}

#[test]
fn zstd_backups_restore_whole_and_in_part_and_zstd_reads_them() {
    let Some(zstd) = servers::tool("CAIRN_TEST_ZSTD") else {
        return;
    };
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 5 << 20);
    let bad = sb.run_v(&start_args("backup-local", &src, "z", &["COMPRESSION=lz4"]));
    assert_eq!(bad.status.code(), Some(2), "{:?}", text(&bad));
    assert!(text(&bad).1.contains("COMPRESSION"), "{:?}", text(&bad));
    assert!(
        !sb.path("store/z").exists(),
        "a refused backup writes nothing"
    );

    sb.ok(&start_args(
        "backup-local",
        &src,
        "z",
        &["COMPRESSION=zstd", "STRATEGY=parallel"],
    )
    .iter()
    .map(String::as_str)
    .collect::<Vec<_>>());
    let obj = sb.path("store/z/node-1.tar.zst");
    assert!(obj.exists() && !sb.path("store/z/node-1.tar.gz").exists());
    // `zstd -d | tar x` reads it.
    let x = sb.path("x");
    std::fs::create_dir(&x).unwrap();
    let tar = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' -d -c < '{}' | tar xf - -C '{}'",
            zstd.display(),
            obj.display(),
            x.display()
        ))
        .status()
        .unwrap();
    assert!(tar.success());
    assert_eq!(
        contents(&x, &["app", "metrics"]),
        contents(&sb.path("src/node-1"), &["app", "metrics"])
    );
    sb.ok(&[
        "snapshots",
        "verify",
        "z",
        "--store",
        "store",
        "--read-data",
    ]);
    // Whole: every node equal to its source, modes, times and links included.
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    sb.ok(&start_args("restore-local", &tgt, "z", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_restored(&sb, "tgt", 2);
    // In part: one table, from its frames alone.
    let part = target_cluster(sb.dir.path(), "part", 2);
    let mut args = vec!["-v".to_string()];
    args.extend(start_args(
        "restore-local",
        &part,
        "z",
        &["PATHS=app/users-1"],
    ));
    let out = sb.run_v(&args);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(e.contains("reading only the blocks"), "{e}");
    let want: BTreeMap<_, _> = tree(&sb.path("src/node-0"))
        .into_iter()
        .filter(|(k, _)| k.starts_with("app/users-1"))
        .collect();
    let got: BTreeMap<_, _> = tree(&sb.path("part/node-0"))
        .into_iter()
        .filter(|(k, _)| k.starts_with("app/"))
        .collect();
    assert_eq!(got, want);
    // The manifest indexes the frames: the first starts the object.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.path("store/z/manifest.json")).unwrap()).unwrap();
    assert!(
        m["objects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["key"] == "node-0.tar.zst" && o["index"]["offsets"][0] == 0),
        "{m}"
    );
}

#[test]
fn paths_outside_keyspaces_are_refused_before_anything_runs() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    sb.ok(&start_args("backup-local", &src, "s", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let out = sb.run_v(&start_args(
        "restore-local",
        &tgt,
        "s",
        &["KEYSPACES=metrics", "PATHS=app/users-1"],
    ));
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("KEYSPACES"), "{:?}", text(&out));
    assert!(!sb.path("tgt").exists());
    let out = sb.run(&["snapshots", "show", "s", "../x", "--store", "store"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    let out = sb.run(&["snapshots", "show", "../s", "--store", "store"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    // An empty table is in the tree, not among the files: shown, not "nothing".
    sb.ok(&[
        "snapshots",
        "show",
        "s",
        "app/empty-table",
        "--store",
        "store",
    ]);
}

#[test]
fn snapshots_copy_moves_a_snapshot_through_s3_and_azure_and_it_restores_byte_for_byte() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let Some(s3) = servers::s3s_fs(d1.path(), 0) else {
        return;
    };
    let Some(az) = servers::azurite(d2.path(), 0) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(servers::fresh_bucket(&s3.endpoint));
    let container = rt.block_on(servers::fresh_container(&az.endpoint));
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 12 << 20);
    sb.ok(
        &start_args("backup-local", &src, "s", &["COMPRESSION=zstd"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    // Both kinds of store configured at once, each with its own endpoint.
    let run = |args: &[&str]| {
        let mut c = sb.command(args);
        c.env("AWS_ACCESS_KEY_ID", AK)
            .env("AWS_SECRET_ACCESS_KEY", SK)
            .env("AWS_REGION", "us-east-1")
            .env("S3_ENDPOINT_URL", &s3.endpoint)
            .env("AZURE_STORAGE_ACCOUNT", servers::AZ_ACCOUNT)
            .env("AZURE_STORAGE_KEY", servers::AZ_KEY)
            .env("AZURE_ENDPOINT_URL", &az.endpoint);
        c.output().unwrap()
    };
    let s3_url = format!("s3://{bucket}/copied");
    let az_url = format!("az://{container}/copied");
    for (from, to) in [
        ("store", s3_url.as_str()),
        (s3_url.as_str(), az_url.as_str()),
        (az_url.as_str(), "./back"),
    ] {
        let out = run(&["snapshots", "copy", "s", "--from", from, "--to", to]);
        let (o, e) = text(&out);
        assert!(out.status.success(), "{from} -> {to}: {o}\n{e}");
        assert!(o.contains("copied snapshot s"), "{o}");
        assert!(
            !o.contains(servers::AZ_KEY) && !e.contains(SK),
            "a secret in the output"
        );
    }
    let out = run(&[
        "snapshots",
        "verify",
        "s",
        "--store",
        &az_url,
        "--read-data",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    // Restored from the last copy, every byte and attribute as backed up.
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let mut args = start_args("restore-local", &tgt, "s", &[]);
    let at = args.iter().position(|a| a == "BACKUP_DIR=store").unwrap();
    args[at] = "BACKUP_DIR=back".into();
    sb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_restored(&sb, "tgt", 2);
    // A complete snapshot is never overwritten.
    let out = run(&["snapshots", "copy", "s", "--from", "store", "--to", &s3_url]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    // A source object that does not match its manifest is not copied, and the
    // copy stays incomplete (no manifest).
    let obj = sb.path("store/s/node-1.tar.zst");
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&obj, &bytes).unwrap();
    let out = run(&[
        "snapshots",
        "copy",
        "s",
        "--from",
        "store",
        "--to",
        "./other",
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).1.contains("node-1.tar.zst"), "{:?}", text(&out));
    assert!(!sb.path("other/s/manifest.json").exists());
    assert!(!sb.path("other/s/node-1.tar.zst").exists());
}

#[test]
fn snapshots_diff_names_what_was_added_removed_and_changed() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 1000);
    sb.ok(&start_args("backup-local", &src, "a", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    std::fs::write(
        sb.path("src/node-0/app/users-1/nb-2-Data.db"),
        b"new sstable",
    )
    .unwrap();
    std::fs::remove_file(sb.path("src/node-0/app/users-1/nb-1-TOC.txt")).unwrap();
    std::fs::write(
        sb.path("src/node-1/metrics/readings-3/data.db"),
        b"rewritten",
    )
    .unwrap();
    sb.ok(&start_args("backup-local", &src, "b", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let out = sb.ok(&["snapshots", "diff", "a", "b", "--store", "store"]);
    let (o, _) = text(&out);
    assert!(o.contains("node 0: 1 added, 1 removed, 0 changed"), "{o}");
    assert!(o.contains("+ app/users-1/nb-2-Data.db"), "{o}");
    assert!(o.contains("- app/users-1/nb-1-TOC.txt"), "{o}");
    assert!(o.contains("node 1: 0 added, 0 removed, 1 changed"), "{o}");
    assert!(o.contains("~ metrics/readings-3/data.db"), "{o}");
    let out = sb.ok(&["--json", "snapshots", "diff", "a", "a", "--store", "store"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["nodes"].as_array().unwrap().iter().all(
        |n| n["added"].as_array().unwrap().is_empty()
            && n["changed"].as_array().unwrap().is_empty()
            && n["unchanged"].as_u64().unwrap() > 0
    ));
    let out = sb.run(&["snapshots", "diff", "a", "nope", "--store", "store"]);
    assert_eq!(out.status.code(), Some(5), "{:?}", text(&out));
}

/// Copy `from` (a directory store) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn verify_checks_what_partial_restores_trust_and_a_whole_restore_agrees() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 4 << 20);
    sb.ok(&start_args("backup-local", &src, "s", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let out = sb.ok(&[
        "snapshots",
        "verify",
        "s",
        "--store",
        "store",
        "--read-data",
    ]);
    assert!(text(&out).0.contains("OK"), "{:?}", text(&out));
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 6] = [
        (
            "total",
            |m| {
                let o = m["objects"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .find(|o| o["key"] == "node-0.tar.gz")
                    .unwrap();
                let t = o["index"]["total"].as_u64().unwrap();
                o["index"]["total"] = (t - 512).into();
            },
            "block index is wrong",
        ),
        (
            "twice",
            |m| {
                let o = m["objects"][0].clone();
                m["objects"].as_array_mut().unwrap().push(o);
            },
            "twice",
        ),
        (
            "index",
            |m| {
                let o = m["objects"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .find(|o| o["key"] == "node-0.tar.gz")
                    .unwrap();
                let at = o["index"]["offsets"][2].as_u64().unwrap();
                o["index"]["offsets"][2] = (at + 7).into();
            },
            "block index is wrong",
        ),
        (
            "tree",
            |m| {
                let t = m["cluster"]["nodes"][0]["tree"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .find(|t| t["path"] == "app/users-1")
                    .unwrap();
                t["mode"] = 0o700.into();
            },
            "does not describe the archive",
        ),
        (
            "entry",
            |m| {
                let f = m["cluster"]["nodes"][0]["files"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .find(|f| f["path"] == "app/users-1/nb-1-TOC.txt")
                    .unwrap();
                let at = f["entry"]["offset"].as_u64().unwrap();
                f["entry"]["offset"] = (at + 512).into();
            },
            "not where the manifest places it",
        ),
        (
            "path",
            |m| m["cluster"]["nodes"][0]["files"][0]["path"] = "app/../../x".into(),
            "not a relative path",
        ),
    ];
    for (name, edit, says) in cases {
        let store = sb.path(&format!("edited-{name}"));
        copy_dir(&sb.path("store"), &store);
        let path = store.join("s/manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut m);
        std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        let out = sb.run(&[
            "snapshots",
            "verify",
            "s",
            "--store",
            store.to_str().unwrap(),
            "--read-data",
        ]);
        let (o, e) = text(&out);
        assert_ne!(out.status.code(), Some(0), "{name}: {o}\n{e}");
        assert!(o.contains(says) || e.contains(says), "{name}: {o}\n{e}");
        if name == "entry" {
            // A partial restore reads the file from where the manifest says; what
            // it finds there is not echoed into messages or the run state.
            let tgt = target_cluster(sb.dir.path(), "tgt-part", 1);
            let mut args = start_args(
                "restore-local",
                &tgt,
                "s",
                &["PATHS=app/users-1/nb-1-TOC.txt"],
            );
            let at = args.iter().position(|a| a == "BACKUP_DIR=store").unwrap();
            args[at] = format!("BACKUP_DIR={}", store.display());
            let out = sb.run_v(&args);
            let (o, e) = text(&out);
            assert_eq!(out.status.code(), Some(1), "{o}\n{e}");
            assert!(
                !e.contains("Data.db\nTOC") && !o.contains("Data.db\nTOC"),
                "{e}"
            );
            assert!(e.contains("an entry header is not valid"), "{e}");
            let status = sb.run(&["plan", "status"]);
            assert!(
                !text(&status).0.contains("Data.db\nTOC"),
                "{:?}",
                text(&status)
            );
        }
        if name == "tree" || name == "entry" {
            // A whole restore reads the same archive and refuses the same way.
            let tgt = target_cluster(sb.dir.path(), &format!("tgt-{name}"), 1);
            let mut args = start_args("restore-local", &tgt, "s", &[]);
            let at = args.iter().position(|a| a == "BACKUP_DIR=store").unwrap();
            args[at] = format!("BACKUP_DIR={}", store.display());
            let out = sb.run_v(&args);
            assert_eq!(out.status.code(), Some(1), "{name}: {:?}", text(&out));
            assert!(text(&out).1.contains(says), "{name}: {:?}", text(&out));
            assert!(tree(&sb.path(&format!("tgt-{name}/node-0"))).is_empty());
        }
    }
}

#[test]
fn a_copy_never_lands_inside_its_source_and_replaces_an_incomplete_snapshot_whole() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    sb.ok(&start_args("backup-local", &src, "s", &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    std::os::unix::fs::symlink(sb.path("store"), sb.path("alias")).unwrap();
    for to in ["./store/s", "./store/sub", "./alias", "./alias/deeper"] {
        let out = sb.run(&["snapshots", "copy", "s", "--from", "store", "--to", to]);
        assert_eq!(out.status.code(), Some(2), "{to}: {:?}", text(&out));
    }
    assert!(!sb.path("store/s/s").exists() && !sb.path("store/sub").exists());
    // Left by an unfinished copy: junk and a damaged object, no manifest.
    std::fs::create_dir_all(sb.path("dest/s")).unwrap();
    std::fs::write(sb.path("dest/s/junk.bin"), b"left over").unwrap();
    std::fs::write(sb.path("dest/s/node-0.tar.gz"), b"half an object").unwrap();
    sb.ok(&[
        "snapshots",
        "copy",
        "s",
        "--from",
        "store",
        "--to",
        "./dest",
    ]);
    assert!(!sb.path("dest/s/junk.bin").exists());
    let names = |d: &str| {
        let mut v: Vec<String> = std::fs::read_dir(sb.path(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("dest/s"), names("store/s"));
    sb.ok(&["snapshots", "verify", "s", "--store", "dest", "--read-data"]);
}
