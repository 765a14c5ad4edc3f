//! backup-s3 / restore-s3 and the S3 store against two real S3 servers: s3s-fs
//! (strict, on disk) and moto (lenient, full multipart API). A fresh bucket per test.

use super::helpers::*;
use super::servers::{self, AK, SK, Server};
use cairn::store::Store;
use std::collections::BTreeMap;
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn options(endpoint: &str) -> BTreeMap<String, String> {
    [
        ("region", "us-east-1"),
        ("endpoint", endpoint),
        ("access_key_id", AK),
        ("secret_access_key", SK),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn s3_args(endpoint: &str, bucket: &str, snapshot: &str) -> Vec<String> {
    [
        format!("SNAPSHOT_NAME={snapshot}"),
        format!("AWS_ACCESS_KEY_ID={AK}"),
        format!("AWS_SECRET_ACCESS_KEY={SK}"),
        "AWS_REGION=us-east-1".to_string(),
        format!("S3_BUCKET_NAME={bucket}"),
        format!("S3_ENDPOINT_URL={endpoint}"),
        "S3_PREFIX=team/backups".to_string(),
    ]
    .into_iter()
    .flat_map(|p| ["-p".to_string(), p])
    .collect()
}

fn cairn(sb: &Sandbox, head: &[&str], params: &[String]) -> std::process::Output {
    let mut args: Vec<&str> = head.to_vec();
    args.extend(params.iter().map(String::as_str));
    sb.run(&args)
}

fn conformance(server: &Server) {
    rt().block_on(async {
        let bucket = servers::fresh_bucket(&server.endpoint).await;
        let store = cairn::store::s3::S3Store::new(
            &format!("{bucket}/some/prefix"),
            &options(&server.endpoint),
        )
        .await
        .unwrap();
        cairn::store::conformance::run(&store).await;
    });
}

#[test]
fn s3_store_conforms_on_s3s_fs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = servers::s3s_fs(dir.path(), 0) else {
        return;
    };
    conformance(&server);
}

#[test]
fn s3_store_conforms_on_moto() {
    let Some(server) = servers::moto() else {
        return;
    };
    conformance(&server);
}

fn round_trip(server: &Server, strategy: &str) {
    let sb = Sandbox::new();
    let bucket = rt().block_on(servers::fresh_bucket(&server.endpoint));
    let src = source_cluster(sb.dir.path(), 3, 3 << 20);
    let mut params = s3_args(&server.endpoint, &bucket, "snap");
    params.extend(["-p".into(), format!("STRATEGY={strategy}")]);
    let out = cairn(
        &sb,
        &[
            "-v",
            "plan",
            "start",
            "backup-s3",
            "--cluster",
            src.to_str().unwrap(),
        ],
        &params,
    );
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(!o.contains(SK) && !e.contains(SK), "secret in output");
    let tgt = target_cluster(sb.dir.path(), "tgt", 3);
    let out = cairn(
        &sb,
        &[
            "plan",
            "start",
            "restore-s3",
            "--cluster",
            tgt.to_str().unwrap(),
        ],
        &params,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 3);
    // Layout in the bucket, listing and verify through the store URL.
    let keys: Vec<String> = rt().block_on(async {
        let store = cairn::store::s3::S3Store::new(&bucket, &options(&server.endpoint))
            .await
            .unwrap();
        store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    });
    assert_eq!(
        keys,
        vec![
            "team/backups/snap/manager.zip",
            "team/backups/snap/manifest.json",
            "team/backups/snap/node-0.tar.gz",
            "team/backups/snap/node-1.tar.gz",
            "team/backups/snap/node-2.tar.gz"
        ]
    );
    let url = format!("s3://{bucket}/team/backups");
    let env = |c: &mut std::process::Command| {
        c.env("AWS_ACCESS_KEY_ID", AK)
            .env("AWS_SECRET_ACCESS_KEY", SK)
            .env("AWS_REGION", "us-east-1")
            .env("S3_ENDPOINT_URL", &server.endpoint);
    };
    let mut c = sb.command(&[
        "snapshots",
        "verify",
        "snap",
        "--store",
        &url,
        "-q",
        "--read-data",
    ]);
    env(&mut c);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        !sb.path("home").read_dir().unwrap().any(|f| {
            std::fs::read(f.unwrap().path())
                .unwrap()
                .windows(SK.len())
                .any(|w| w == SK.as_bytes())
        }),
        "secret in the state store"
    );
}

#[test]
fn backup_and_restore_round_trip_on_s3s_fs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = servers::s3s_fs(dir.path(), 0) else {
        return;
    };
    round_trip(&server, "parallel");
}

#[test]
fn backup_and_restore_round_trip_on_moto() {
    let Some(server) = servers::moto() else {
        return;
    };
    round_trip(&server, "serial");
}

#[test]
fn wrong_credentials_and_missing_bucket_fail_in_preflight() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = servers::s3s_fs(dir.path(), 0) else {
        return;
    };
    let bucket = rt().block_on(servers::fresh_bucket(&server.endpoint));
    super::remote::refused_in_preflight(
        ("backup-s3", "restore-s3"),
        |secret, place| {
            s3_args(&server.endpoint, place.unwrap_or(&bucket), "snap")
                .into_iter()
                .map(|p| match secret {
                    Some(w) if p.starts_with("AWS_SECRET_ACCESS_KEY=") => {
                        format!("AWS_SECRET_ACCESS_KEY={w}")
                    }
                    _ => p,
                })
                .collect()
        },
        "AWS_SECRET_ACCESS_KEY",
        "definitely-Wrong-Secret-77",
        "no-such-bucket-here",
    );
}

#[test]
fn a_failed_upload_is_aborted_on_the_server() {
    let Some(server) = servers::moto() else {
        return;
    };
    rt().block_on(async {
        let bucket = servers::fresh_bucket(&server.endpoint).await;
        let store = cairn::store::s3::S3Store::new(&bucket, &options(&server.endpoint))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(bytes::Bytes::from(vec![7u8; 8 << 20]))
            .await
            .unwrap();
        drop(tx);
        let failing = async { Err::<(), _>(cairn::Error::archive("x", "a file vanished")) };
        let mut id = None;
        let cancel = tokio_util::sync::CancellationToken::new();
        let r = cairn::store::upload_parts(
            &store,
            "snap/node-0.tar.gz",
            rx,
            8 << 20,
            failing,
            &cancel,
            |u| id = Some(u.to_string()),
        )
        .await;
        assert!(r.is_err());
        assert!(id.is_some(), "the upload had started");
        let uploads = servers::s3_client(&server.endpoint)
            .await
            .list_multipart_uploads()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        assert!(
            uploads.uploads().is_empty(),
            "orphaned upload left: {:?}",
            uploads.uploads()
        );
        assert!(store.head("snap/node-0.tar.gz").await.unwrap().is_none());
    });
}

#[test]
fn server_killed_mid_upload_fails_cleanly_and_resume_completes() {
    let data = tempfile::tempdir().unwrap();
    let Some(mut server) = servers::s3s_fs(data.path(), 0) else {
        return;
    };
    let sb = Sandbox::new();
    let bucket = rt().block_on(servers::fresh_bucket(&server.endpoint));
    let src = source_cluster(sb.dir.path(), 2, 48 << 20);
    let params = s3_args(&server.endpoint, &bucket, "snap");
    let mut args = vec![
        "plan".to_string(),
        "start".into(),
        "backup-s3".into(),
        "--cluster".into(),
        src.to_str().unwrap().into(),
        "-q".into(),
        // The cap makes node 0 take seconds, so the kill lands mid-upload.
        "-p".into(),
        "MAX_BANDWIDTH=4MiB/s".into(),
    ];
    args.extend(params.iter().cloned());
    let child = sb
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the server once node 0's upload has started.
    wait_until_running(&sb, 1, "backup/backup-node/node-0");
    std::thread::sleep(Duration::from_millis(1000));
    server.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let (_, err) = text(&out);
    assert!(
        err.contains("cannot connect to the S3 endpoint") || err.contains("gave up"),
        "{err}"
    );
    assert!(
        !data
            .path()
            .join(&bucket)
            .join("team/backups/snap/manifest.json")
            .exists()
    );
    // The upload id was recorded so the resumed step can abort it.
    let conn = rusqlite::Connection::open(sb.path("home/state.db")).unwrap();
    let scratch: Option<String> = conn
        .query_row(
            "SELECT scratch FROM steps WHERE id = 'backup/backup-node/node-0'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let upload_id = serde_json::from_str::<serde_json::Value>(
        &scratch.expect("upload id recorded"),
    )
    .unwrap()["upload_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Back on the same port and data; resume completes.
    assert!(
        std::fs::read_dir(data.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(&upload_id)),
        "the killed upload's parts are on the server before the resume"
    );
    let _server = servers::s3s_fs(data.path(), server.port).unwrap();
    let mut resume = vec!["plan", "resume", "1", "-q", "-p", "MAX_BANDWIDTH="];
    let secret = format!("AWS_SECRET_ACCESS_KEY={SK}");
    resume.extend(["-p", &secret]);
    let out = sb.run(&resume);
    assert!(out.status.success(), "{:?}", text(&out));
    // The killed attempt's multipart upload no longer exists: s3s-fs keeps an open
    // upload's parts as `.upload*-<id>*` files in its data dir (its ListParts answers
    // for any id, so the files are the evidence).
    let leftovers = |id: &str| -> Vec<String> {
        std::fs::read_dir(data.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(id))
            .collect()
    };
    assert!(
        leftovers(&upload_id).is_empty(),
        "the killed upload is still open: {:?}",
        leftovers(&upload_id)
    );
    assert!(leftovers(".upload").is_empty(), "an upload was left open");
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let out = cairn(
        &sb,
        &[
            "plan",
            "start",
            "restore-s3",
            "--cluster",
            tgt.to_str().unwrap(),
            "-q",
        ],
        &params,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);
}

#[test]
fn nightly_operations_and_manager_snapshots_on_s3() {
    let Some(server) = servers::moto() else {
        return;
    };
    let bucket = rt().block_on(servers::fresh_bucket(&server.endpoint));
    super::remote::nightly_operations(
        "backup-s3",
        |snap| s3_args(&server.endpoint, &bucket, snap),
        &format!("s3://{bucket}/team/backups"),
        &[
            ("AWS_ACCESS_KEY_ID", AK),
            ("AWS_SECRET_ACCESS_KEY", SK),
            ("AWS_REGION", "us-east-1"),
            ("S3_ENDPOINT_URL", &server.endpoint),
        ],
        SK,
    );
}
