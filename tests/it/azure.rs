//! backup-azure / restore-azure and the Azure store against Azurite (Microsoft's
//! emulator, which checks shared-key signatures). A fresh container per test.

use super::helpers::*;
use super::servers::{self, AZ_ACCOUNT, AZ_KEY};
use cairn::store::Store;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn options(endpoint: &str) -> BTreeMap<String, String> {
    [
        ("account", AZ_ACCOUNT),
        ("key", AZ_KEY),
        ("endpoint", endpoint),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn az_args(endpoint: &str, container: &str, snapshot: &str) -> Vec<String> {
    [
        format!("SNAPSHOT_NAME={snapshot}"),
        format!("AZURE_STORAGE_ACCOUNT={AZ_ACCOUNT}"),
        format!("AZURE_STORAGE_KEY={AZ_KEY}"),
        format!("CONTAINER_NAME={container}"),
        format!("AZURE_ENDPOINT_URL={endpoint}"),
        "AZURE_PREFIX=team/backups".to_string(),
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

fn state_has(sb: &Sandbox, secret: &str) -> bool {
    sb.path("home").read_dir().unwrap().any(|f| {
        std::fs::read(f.unwrap().path())
            .unwrap()
            .windows(secret.len())
            .any(|w| w == secret.as_bytes())
    })
}

#[test]
fn azure_store_conforms_on_azurite() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = servers::azurite(dir.path(), 0) else {
        return;
    };
    rt().block_on(async {
        let container = servers::fresh_container(&server.endpoint).await;
        let store = cairn::store::azure::AzureStore::new(
            &format!("{container}/some/prefix"),
            &options(&server.endpoint),
        )
        .unwrap();
        cairn::store::conformance::run(&store).await;
    });
}

#[test]
fn backup_and_restore_round_trip_on_azurite() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = servers::azurite(dir.path(), 0) else {
        return;
    };
    let sb = Sandbox::new();
    let container = rt().block_on(servers::fresh_container(&server.endpoint));
    let src = source_cluster(sb.dir.path(), 3, 20 << 20);
    let mut params = az_args(&server.endpoint, &container, "snap");
    params.extend(["-p".into(), "STRATEGY=parallel".into()]);
    let out = cairn(
        &sb,
        &[
            "-v",
            "plan",
            "start",
            "backup-azure",
            "--cluster",
            src.to_str().unwrap(),
        ],
        &params,
    );
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(
        !o.contains(AZ_KEY) && !e.contains(AZ_KEY),
        "secret in output"
    );
    let tgt = target_cluster(sb.dir.path(), "tgt", 3);
    let out = cairn(
        &sb,
        &[
            "plan",
            "start",
            "restore-azure",
            "--cluster",
            tgt.to_str().unwrap(),
        ],
        &params,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 3);
    let keys: Vec<String> = rt().block_on(async {
        let store =
            cairn::store::azure::AzureStore::new(&container, &options(&server.endpoint)).unwrap();
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
    // A second snapshot lands beside the first, never over it.
    let second = az_args(&server.endpoint, &container, "snap-2");
    let out = cairn(
        &sb,
        &[
            "plan",
            "start",
            "backup-azure",
            "--cluster",
            src.to_str().unwrap(),
        ],
        &second,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let mut c = sb.command(&[
        "snapshots",
        "verify",
        "snap",
        "--store",
        &format!("az://{container}/team/backups"),
        "-q",
        "--read-data",
    ]);
    c.env("AZURE_STORAGE_ACCOUNT", AZ_ACCOUNT)
        .env("AZURE_STORAGE_KEY", AZ_KEY)
        .env("AZURE_ENDPOINT_URL", &server.endpoint);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(!text(&out).0.contains(AZ_KEY));
    assert!(!state_has(&sb, AZ_KEY), "secret in the state store");
}

#[test]
fn wrong_key_and_missing_container_fail_in_preflight() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = servers::azurite(dir.path(), 0) else {
        return;
    };
    let container = rt().block_on(servers::fresh_container(&server.endpoint));
    super::remote::refused_in_preflight(
        ("backup-azure", "restore-azure"),
        |secret, place| {
            az_args(&server.endpoint, place.unwrap_or(&container), "snap")
                .into_iter()
                .map(|p| match secret {
                    Some(w) if p.starts_with("AZURE_STORAGE_KEY=") => {
                        format!("AZURE_STORAGE_KEY={w}")
                    }
                    _ => p,
                })
                .collect()
        },
        "AZURE_STORAGE_KEY",
        // A well-formed key that is not the account's.
        "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk=",
        "no-such-container",
    );
}

#[test]
fn azurite_killed_mid_upload_fails_cleanly_and_resume_completes() {
    let data = tempfile::tempdir().unwrap();
    let Some(mut server) = servers::azurite(data.path(), 0) else {
        return;
    };
    let sb = Sandbox::new();
    let container = rt().block_on(servers::fresh_container(&server.endpoint));
    let src = source_cluster(sb.dir.path(), 2, 24 << 20);
    let params = az_args(&server.endpoint, &container, "snap");
    let mut args: Vec<String> = [
        "plan",
        "start",
        "backup-azure",
        "--cluster",
        src.to_str().unwrap(),
        "-q",
        "-p",
        "MAX_BANDWIDTH=4MiB/s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(params.iter().cloned());
    let child = sb
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_running(&sb, 1, "backup/backup-node/node-0");
    std::thread::sleep(Duration::from_millis(1000));
    server.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let (_, err) = text(&out);
    assert!(
        err.contains("cannot reach the endpoint") || err.contains("gave up"),
        "{err}"
    );
    let port = server.port;
    let server = servers::azurite(data.path(), port).unwrap();
    // Azurite saves its metadata database periodically, so a container created
    // just before the kill may be gone after it: create it again if so (the
    // emulator's own durability is not under test).
    rt().block_on(async {
        let creds = azure_storage::StorageCredentials::access_key(AZ_ACCOUNT, AZ_KEY.to_string());
        let _ = azure_storage_blobs::prelude::ClientBuilder::with_location(
            azure_storage::CloudLocation::Custom {
                account: AZ_ACCOUNT.to_string(),
                uri: server.endpoint.clone(),
            },
            creds,
        )
        .container_client(&container)
        .create()
        .await;
    });
    let exists = rt().block_on(async {
        let store =
            cairn::store::azure::AzureStore::new(&container, &options(&server.endpoint)).unwrap();
        store
            .head("team/backups/snap/manifest.json")
            .await
            .unwrap()
            .is_some()
    });
    assert!(!exists, "no manifest after a failed run");
    let secret = format!("AZURE_STORAGE_KEY={AZ_KEY}");
    let out = sb.run(&[
        "plan",
        "resume",
        "1",
        "-q",
        "-p",
        "MAX_BANDWIDTH=",
        "-p",
        &secret,
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let out = cairn(
        &sb,
        &[
            "plan",
            "start",
            "restore-azure",
            "--cluster",
            tgt.to_str().unwrap(),
            "-q",
        ],
        &params,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);
}

/// The service principal path up to what can be tested here: the token request the
/// client makes, answered by a local endpoint. (Azurite accepts bearer tokens only
/// over HTTPS with its OAuth mode, so the blob request itself is refused.)
#[test]
fn service_principal_requests_a_token_from_the_authority() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = servers::azurite(dir.path(), 0) else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let authority = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Read headers, then the body by Content-Length.
        loop {
            let n = conn.read(&mut buf).unwrap();
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if req.len() >= end + 4 + len {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        let body = r#"{"token_type":"Bearer","expires_in":3600,"ext_expires_in":3600,"access_token":"local-test-token"}"#;
        write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        String::from_utf8_lossy(&req).to_string()
    });
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10);
    let secret = "sp-Secret-Value-4471";
    let out = sb.run(&[
        "plan",
        "start",
        "backup-azure",
        "--cluster",
        src.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=snap",
        "-p",
        &format!("AZURE_STORAGE_ACCOUNT={AZ_ACCOUNT}"),
        "-p",
        "CONTAINER_NAME=whatever",
        "-p",
        &format!("AZURE_ENDPOINT_URL={}", server.endpoint),
        "-p",
        "CLIENT_ID=app-1234",
        "-p",
        "TENANT_ID=tenant-5678",
        "-p",
        &format!("CLIENT_SECRET={secret}"),
        "-p",
        &format!("AZURE_AUTHORITY_HOST={authority}"),
    ]);
    let req = seen.join().unwrap();
    assert!(
        req.starts_with("POST /tenant-5678/oauth2/v2.0/token"),
        "{req}"
    );
    assert!(req.contains("client_id=app-1234"), "{req}");
    assert!(req.contains("grant_type=client_credentials"), "{req}");
    assert!(
        req.contains("storage.azure.com"),
        "scope for storage: {req}"
    );
    assert!(
        req.contains(secret),
        "the secret goes to the authority, and only there"
    );
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let (o, e) = text(&out);
    assert!(!o.contains(secret) && !e.contains(secret));
    assert!(!state_has(&sb, secret));
}

#[test]
fn nightly_operations_and_manager_snapshots_on_azurite() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = servers::azurite(dir.path(), 0) else {
        return;
    };
    let container = rt().block_on(servers::fresh_container(&server.endpoint));
    super::remote::nightly_operations(
        "backup-azure",
        |snap| az_args(&server.endpoint, &container, snap),
        &format!("az://{container}/team/backups"),
        &[
            ("AZURE_STORAGE_ACCOUNT", AZ_ACCOUNT),
            ("AZURE_STORAGE_KEY", AZ_KEY),
            ("AZURE_ENDPOINT_URL", &server.endpoint),
        ],
        AZ_KEY,
    );
}
