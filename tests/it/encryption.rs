//! Client-side encryption (age) on a directory store, S3 (s3s-fs) and Azure
//! (Azurite), and the cloud's own protections reaching the server (moto).

use super::helpers::*;
use super::servers::{self, AK, AZ_ACCOUNT, AZ_KEY, SK};
use std::path::{Path, PathBuf};

const MARKER: &[u8] = b"CAIRN-PLAINTEXT-MARKER-q81Zx";
const NAME: &str = "marker-file-name-7Hq2.db";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A key pair written as age-keygen writes it: `key.txt`, `recipients.txt`.
fn keys(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let key = dir.join(format!("{name}-key.txt"));
    let rec = dir.join(format!("{name}-recipients.txt"));
    std::fs::write(
        &key,
        format!(
            "# created: now\n# public key: {}\n{}\n",
            id.to_public(),
            id.to_string().expose_secret()
        ),
    )
    .unwrap();
    std::fs::write(&rec, format!("# {name}\n{}\n", id.to_public())).unwrap();
    (key, rec)
}

/// A source cluster whose node 0 holds a file with a telling name, and the
/// marker inside incompressible bytes (stored as is by gzip: visible in an
/// unencrypted archive).
fn marked_cluster(sb: &Sandbox, n: u32) -> PathBuf {
    let c = source_cluster(sb.dir.path(), n, 200_000);
    let mut data = noise(99, 300_000);
    data.splice(150_000..150_000, MARKER.iter().copied());
    std::fs::write(sb.path(&format!("src/node-0/app/users-1/{NAME}")), data).unwrap();
    c
}

/// Every file under `dir` (a store's bytes on disk) holds neither the marker nor
/// the file name.
fn no_plaintext(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            for needle in [MARKER, NAME.as_bytes()] {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(format!(
                        "{} holds {}",
                        p.display(),
                        String::from_utf8_lossy(needle)
                    ));
                }
            }
        }
    }
    found
}

fn start(sb: &Sandbox, plan: &str, cluster: &Path, params: &[String]) -> std::process::Output {
    let mut a: Vec<String> = ["plan", "start", plan, "-q", "--cluster"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(cluster.to_str().unwrap().into());
    for p in params {
        a.push("-p".into());
        a.push(p.clone());
    }
    sb.run_v(&a)
}

fn p(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn an_encrypted_local_snapshot_holds_no_plaintext_and_restores_only_with_its_key() {
    let sb = Sandbox::new();
    let src = marked_cluster(&sb, 2);
    let (key, rec) = keys(sb.dir.path(), "main");
    let (other, _) = keys(sb.dir.path(), "other");
    let to = format!("ENCRYPT_TO=@{}", rec.display());

    // The same data unencrypted shows the marker and the name: the check can fail.
    let out = start(
        &sb,
        "backup-local",
        &src,
        &p(&["SNAPSHOT_NAME=clear", "BACKUP_DIR=clear"]),
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(!no_plaintext(&sb.path("clear")).is_empty());

    let out = start(
        &sb,
        "backup-local",
        &src,
        &["SNAPSHOT_NAME=enc".into(), "BACKUP_DIR=store".into(), to],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let found = no_plaintext(&sb.path("store"));
    assert!(found.is_empty(), "{found:?}");
    // Listing and retention read the clear part; the manifest names no file.
    let out = sb.ok(&["snapshots", "list", "--store", "store", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "enc");
    assert_eq!(v[0]["nodes"], 2);

    // The age tool opens a node object and tar lists its files: no lock-in.
    if let Some(age) = servers::tool("CAIRN_TEST_AGE") {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{} -d -i {} {} | tar tzf -",
                age.display(),
                key.display(),
                sb.path("store/enc/node-0.tar.gz").display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{:?}", text(&out));
        assert!(text(&out).0.contains(NAME), "{}", text(&out).0);
    }

    // Without the identity, or with another one, the restore is refused in its
    // pre-flight and writes nothing.
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    for extra in [None, Some(format!("AGE_IDENTITY=@{}", other.display()))] {
        let mut params = p(&["SNAPSHOT_NAME=enc", "BACKUP_DIR=store"]);
        params.extend(extra.clone());
        let out = start(&sb, "restore-local", &tgt, &params);
        assert_eq!(out.status.code(), Some(3), "{extra:?}: {:?}", text(&out));
        assert!(text(&out).1.contains("enc"), "{:?}", text(&out));
        assert!(
            !sb.path("tgt").exists(),
            "{extra:?}: a refused restore wrote"
        );
    }
    // With it: byte-identical.
    let id = format!("AGE_IDENTITY=@{}", key.display());
    let out = start(
        &sb,
        "restore-local",
        &tgt,
        &[
            "SNAPSHOT_NAME=enc".into(),
            "BACKUP_DIR=store".into(),
            id.clone(),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);
    // The identity never reaches the output or the state store.
    let secret = std::fs::read_to_string(&key).unwrap();
    let secret = secret.lines().last().unwrap();
    for f in sb.path("home").read_dir().unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    // A partial restore (one keyspace of one node) and a sampled verify work.
    let part = target_cluster(sb.dir.path(), "part", 2);
    let out = start(
        &sb,
        "restore-local",
        &part,
        &[
            "SNAPSHOT_NAME=enc".into(),
            "BACKUP_DIR=store".into(),
            "KEYSPACES=metrics".into(),
            "NODES=1".into(),
            id.clone(),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        tree(&sb.path("part/node-1/metrics")),
        tree(&sb.path("src/node-1/metrics"))
    );
    assert!(!sb.path("part/node-0").exists() && !sb.path("part/node-1/app").exists());
    let key_s = key.to_str().unwrap();
    let out = sb.ok(&[
        "snapshots",
        "verify",
        "enc",
        "--store",
        "store",
        "--sample",
        "50",
        "--identity",
        key_s,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["report"]["files"].as_u64().unwrap() > 0, "{v}");
    // Without the key, verify still checks every stored byte, and says what not.
    let out = sb.ok(&[
        "snapshots",
        "verify",
        "enc",
        "--store",
        "store",
        "--read-data",
    ]);
    assert!(
        text(&out).0.contains("encrypted snapshot"),
        "{:?}",
        text(&out)
    );

    // One flipped byte of ciphertext: verify and restore name the object.
    let obj = sb.path("store/enc/node-1.tar.gz");
    let mut bytes = std::fs::read(&obj).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&obj, &bytes).unwrap();
    let out = sb.run(&[
        "snapshots",
        "verify",
        "enc",
        "--store",
        "store",
        "--read-data",
        "--identity",
        key_s,
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).0.contains("node-1.tar.gz"), "{:?}", text(&out));
    let out = sb.run(&[
        "snapshots",
        "verify",
        "enc",
        "--store",
        "store",
        "--read-data",
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let bad = target_cluster(sb.dir.path(), "bad", 2);
    let out = start(
        &sb,
        "restore-local",
        &bad,
        &["SNAPSHOT_NAME=enc".into(), "BACKUP_DIR=store".into(), id],
    );
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).1.contains("node-1.tar.gz"), "{:?}", text(&out));
    for i in 0..2 {
        let d = sb.path(&format!("bad/node-{i}"));
        assert!(
            !d.exists() || std::fs::read_dir(&d).unwrap().next().is_none(),
            "node {i} written"
        );
    }

    // An unencrypted snapshot still restores without (and with) an identity.
    let clear = target_cluster(sb.dir.path(), "clear-tgt", 2);
    let out = start(
        &sb,
        "restore-local",
        &clear,
        &[
            "SNAPSHOT_NAME=clear".into(),
            "BACKUP_DIR=clear".into(),
            format!("AGE_IDENTITY=@{}", key.display()),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "clear-tgt", 2);
}

#[test]
fn a_passphrase_snapshot_resumed_with_another_passphrase_is_remade_under_it() {
    let sb = Sandbox::new();
    let nodes: Vec<(u32, PathBuf)> = (0..2)
        .map(|i| {
            let d = sb.path(&format!("src/node-{i}"));
            fill_node(&d, i, 20_000);
            (i, d)
        })
        .collect();
    let hook = "pre_hook = [\"sh\", \"-c\", \"if [ \\\"$CAIRN_NODE_INDEX\\\" = 1 ] && [ ! -e failed-once ]; then touch failed-once; exit 1; fi\"]";
    let c = cluster_file(&sb.path("src.toml"), "src", &nodes, hook);
    std::fs::write(sb.path("first"), "first passphrase, long\n").unwrap();
    std::fs::write(sb.path("second"), "second passphrase, long\n").unwrap();
    let out = start(
        &sb,
        "backup-local",
        &c,
        &p(&[
            "SNAPSHOT_NAME=s",
            "BACKUP_DIR=store",
            "ENCRYPT_PASSPHRASE=@first",
        ]),
    );
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(sb.path("store/s/node-0.tar.gz").exists());
    // Resumed without the passphrase: refused (it is never stored).
    let out = sb.run(&["plan", "resume", "1", "-q"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    // With another one: node 0 is made again under it, so one passphrase opens all.
    let out = sb.run(&[
        "plan",
        "resume",
        "1",
        "-q",
        "-p",
        "ENCRYPT_PASSPHRASE=@second",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let out = start(
        &sb,
        "restore-local",
        &tgt,
        &p(&[
            "SNAPSHOT_NAME=s",
            "BACKUP_DIR=store",
            "AGE_PASSPHRASE=@first",
        ]),
    );
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let out = start(
        &sb,
        "restore-local",
        &tgt,
        &p(&[
            "SNAPSHOT_NAME=s",
            "BACKUP_DIR=store",
            "AGE_PASSPHRASE=@second",
        ]),
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);
}

#[test]
fn encrypted_round_trips_on_s3_and_azure_leave_no_plaintext_on_the_servers() {
    let s3_data = tempfile::tempdir().unwrap();
    let az_data = tempfile::tempdir().unwrap();
    let Some(s3) = servers::s3s_fs(s3_data.path(), 0) else {
        return;
    };
    let Some(az) = servers::azurite(az_data.path(), 0) else {
        return;
    };
    let sb = Sandbox::new();
    let src = marked_cluster(&sb, 2);
    let (key, rec) = keys(sb.dir.path(), "main");
    let bucket = rt().block_on(servers::fresh_bucket(&s3.endpoint));
    let container = rt().block_on(servers::fresh_container(&az.endpoint));
    let s3_params = |snap: &str| {
        vec![
            format!("SNAPSHOT_NAME={snap}"),
            format!("AWS_ACCESS_KEY_ID={AK}"),
            format!("AWS_SECRET_ACCESS_KEY={SK}"),
            "AWS_REGION=us-east-1".to_string(),
            format!("S3_BUCKET_NAME={bucket}"),
            format!("S3_ENDPOINT_URL={}", s3.endpoint),
        ]
    };
    let az_params = |snap: &str| {
        vec![
            format!("SNAPSHOT_NAME={snap}"),
            format!("AZURE_STORAGE_ACCOUNT={AZ_ACCOUNT}"),
            format!("AZURE_STORAGE_KEY={AZ_KEY}"),
            format!("CONTAINER_NAME={container}"),
            format!("AZURE_ENDPOINT_URL={}", az.endpoint),
        ]
    };
    for (kind, params, data) in [
        ("s3", s3_params("enc"), s3_data.path()),
        ("azure", az_params("enc"), az_data.path()),
    ] {
        let mut b = params.clone();
        b.push(format!("ENCRYPT_TO=@{}", rec.display()));
        if kind == "azure" {
            b.push("ACCESS_TIER=Cool".into());
        }
        let out = start(&sb, &format!("backup-{kind}"), &src, &b);
        assert!(out.status.success(), "{kind}: {:?}", text(&out));
        if kind == "azure" {
            // The tier reaches the service (Azurite's view of the blob).
            let tier = rt().block_on(servers::blob_tier(
                &az.endpoint,
                &container,
                "enc/node-0.tar.gz",
            ));
            assert_eq!(tier.as_deref(), Some("Cool"));
        }
        let found = no_plaintext(data);
        assert!(found.is_empty(), "{kind}: {found:?}");
        let tgt = target_cluster(sb.dir.path(), &format!("tgt-{kind}"), 2);
        let out = start(&sb, &format!("restore-{kind}"), &tgt, &params);
        assert_eq!(out.status.code(), Some(3), "{kind}: {:?}", text(&out));
        assert!(!sb.path(&format!("tgt-{kind}")).exists());
        let mut r = params.clone();
        r.push(format!("AGE_IDENTITY=@{}", key.display()));
        let out = start(&sb, &format!("restore-{kind}"), &tgt, &r);
        assert!(out.status.success(), "{kind}: {:?}", text(&out));
        assert_restored(&sb, &format!("tgt-{kind}"), 2);
    }
}

#[test]
fn server_side_encryption_and_storage_class_reach_the_server() {
    let Some(moto) = servers::moto() else {
        return;
    };
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10_000);
    let bucket = rt().block_on(servers::fresh_bucket(&moto.endpoint));
    let out = start(
        &sb,
        "backup-s3",
        &src,
        &[
            "SNAPSHOT_NAME=snap".into(),
            format!("AWS_ACCESS_KEY_ID={AK}"),
            format!("AWS_SECRET_ACCESS_KEY={SK}"),
            "AWS_REGION=us-east-1".into(),
            format!("S3_BUCKET_NAME={bucket}"),
            format!("S3_ENDPOINT_URL={}", moto.endpoint),
            "SSE=AES256".into(),
            "STORAGE_CLASS=STANDARD_IA".into(),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let (sse, class, manifest_sse) = rt().block_on(async {
        let c = servers::s3_client(&moto.endpoint).await;
        let node = c
            .head_object()
            .bucket(&bucket)
            .key("snap/node-0.tar.gz")
            .send()
            .await
            .unwrap();
        let m = c
            .head_object()
            .bucket(&bucket)
            .key("snap/manifest.json")
            .send()
            .await
            .unwrap();
        (
            node.server_side_encryption()
                .map(|s| s.as_str().to_string()),
            node.storage_class().map(|s| s.as_str().to_string()),
            m.server_side_encryption().map(|s| s.as_str().to_string()),
        )
    });
    assert_eq!(sse.as_deref(), Some("AES256"));
    assert_eq!(class.as_deref(), Some("STANDARD_IA"));
    assert_eq!(manifest_sse.as_deref(), Some("AES256"));
    // A class that cannot be read at once is refused before anything is written.
    let out = start(
        &sb,
        "backup-s3",
        &src,
        &[
            "SNAPSHOT_NAME=cold".into(),
            format!("AWS_ACCESS_KEY_ID={AK}"),
            format!("AWS_SECRET_ACCESS_KEY={SK}"),
            "AWS_REGION=us-east-1".into(),
            format!("S3_BUCKET_NAME={bucket}"),
            format!("S3_ENDPOINT_URL={}", moto.endpoint),
            "STORAGE_CLASS=DEEP_ARCHIVE".into(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("thaw"), "{:?}", text(&out));
}

#[test]
fn nodes_reached_with_exec_encrypt_and_decrypt_on_their_hosts() {
    let sb = Sandbox::new();
    let bin = super::nodes::agent_bin(&sb);
    let cluster = super::nodes::exec_cluster(&sb, 2, 1000, &bin, super::nodes::env_prefix);
    let (key, rec) = keys(sb.dir.path(), "main");
    let out = start(
        &sb,
        "backup-local",
        &cluster,
        &[
            "SNAPSHOT_NAME=s".into(),
            "BACKUP_DIR=store".into(),
            format!("ENCRYPT_TO=@{}", rec.display()),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let head = std::fs::read(sb.path("store/s/node-1.tar.gz")).unwrap();
    assert!(head.starts_with(b"age-encryption.org/v1"));
    let out = start(
        &sb,
        "restore-local",
        &cluster,
        &[
            "SNAPSHOT_NAME=s".into(),
            "BACKUP_DIR=store".into(),
            "RESTORE_DIR=tgt".into(),
            format!("AGE_IDENTITY=@{}", key.display()),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);
}

#[test]
fn key_mistakes_are_refused_and_tampering_is_recorded() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 20_000);
    let (key, rec) = keys(sb.dir.path(), "main");
    let (_, other_rec) = keys(sb.dir.path(), "other");
    std::fs::write(sb.path("empty"), "").unwrap();
    // A secret key where the recipients go, an empty file, a junk line: each is
    // refused (never a clear backup), the key never echoed nor stored.
    let secret = std::fs::read_to_string(&key).unwrap();
    let secret = secret.lines().last().unwrap().to_string();
    for bad in [
        format!("ENCRYPT_TO=@{}", key.display()),
        "ENCRYPT_TO=@empty".to_string(),
        "ENCRYPT_PASSPHRASE=@empty".to_string(),
        "ENCRYPT_TO=age1 age1".to_string(),
    ] {
        let out = start(
            &sb,
            "backup-local",
            &src,
            &[
                "SNAPSHOT_NAME=bad".into(),
                "BACKUP_DIR=store".into(),
                bad.clone(),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {:?}", text(&out));
        let (o, e) = text(&out);
        assert!(
            !o.contains(&secret) && !e.contains(&secret),
            "{bad}: secret echoed"
        );
        assert!(!sb.path("store/bad").exists(), "{bad}: a backup ran");
    }
    assert!(
        !sb.path("home").exists()
            || !std::fs::read_dir(sb.path("home")).unwrap().any(|f| {
                std::fs::read(f.unwrap().path())
                    .unwrap()
                    .windows(secret.len())
                    .any(|w| w == secret.as_bytes())
            })
    );

    let out = start(
        &sb,
        "backup-local",
        &src,
        &[
            "SNAPSHOT_NAME=s".into(),
            "BACKUP_DIR=store".into(),
            format!("ENCRYPT_TO=@{}", rec.display()),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let id = format!("AGE_IDENTITY=@{}", key.display());
    let key_s = key.to_str().unwrap();

    // A damaged node object does not stop a partial restore of the other node.
    let obj1 = sb.path("store/s/node-1.tar.gz");
    let good1 = std::fs::read(&obj1).unwrap();
    std::fs::write(&obj1, &good1[..good1.len() / 2]).unwrap();
    let part = target_cluster(sb.dir.path(), "part", 2);
    let out = start(
        &sb,
        "restore-local",
        &part,
        &[
            "SNAPSHOT_NAME=s".into(),
            "BACKUP_DIR=store".into(),
            "NODES=0".into(),
            id.clone(),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        without(tree(&sb.path("src/node-0")), &["system"]),
        tree(&sb.path("part/node-0"))
    );
    // A damaged age header, with the key that opened the manifest, is damage
    // (exit 1, named), not a wrong key.
    let mut flipped = good1.clone();
    flipped[40] ^= 0x01;
    std::fs::write(&obj1, &flipped).unwrap();
    let out = sb.run(&[
        "snapshots",
        "verify",
        "s",
        "--store",
        "store",
        "--read-data",
        "--identity",
        key_s,
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(
        text(&out).0.contains("node-1.tar.gz") && text(&out).0.contains("damaged"),
        "{:?}",
        text(&out)
    );
    std::fs::write(&obj1, &good1).unwrap();

    // The clear part names other recipients than the sealed part: altered, and
    // the failed verification is what the store records.
    sb.ok(&[
        "snapshots",
        "verify",
        "s",
        "--store",
        "store",
        "--identity",
        key_s,
    ]);
    let mpath = sb.path("store/s/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let other_pub = std::fs::read_to_string(&other_rec).unwrap();
    let other_pub = other_pub.lines().last().unwrap();
    m["encryption"]["scheme"]["recipients"] = serde_json::json!([other_pub]);
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let out = sb.run(&[
        "snapshots",
        "verify",
        "s",
        "--store",
        "store",
        "--identity",
        key_s,
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).0.contains("altered"), "{:?}", text(&out));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.path("store/.cairn-verify/s.json")).unwrap())
            .unwrap();
    assert_eq!(record["ok"], false, "{record}");
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let out = start(
        &sb,
        "restore-local",
        &tgt,
        &["SNAPSHOT_NAME=s".into(), "BACKUP_DIR=store".into(), id],
    );
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(!sb.path("tgt").exists());
}
