//! Real servers on 127.0.0.1, started per test on a free port with a fresh data dir
//! and killed (exactly the PID started) when the guard drops, also on failure.
//! scripts/install-test-servers installs them and scripts/test exports their paths.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const AK: &str = "cairn-test-access";
pub const SK: &str = "cairn-test-secret-Vq93";

pub struct Server {
    child: Child,
    pub endpoint: String,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of an installed tool, or `None` with a visible message. Under CI a
/// missing tool fails the test: CI must not skip real-server tests.
pub fn tool(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if Path::new(&p).exists() => Some(PathBuf::from(p)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{var} is not set or missing: CI must run the real-server tests (scripts/test installs them)"
            );
            eprintln!("SKIPPED: {var} not set; ./scripts/test installs the real servers");
            None
        }
    }
}

#[allow(clippy::zombie_processes)] // the returned guard kills and waits for it
/// Start `cmd`, wait for a line containing `marker` followed by a URL, and return
/// the server with that endpoint. Output keeps being drained in the background.
fn start(mut cmd: Command, marker: &str) -> Server {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("start server");
    let (tx, rx) = mpsc::channel::<String>();
    for pipe in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains(marker)
                && let Some(i) = line.find("http://127.0.0.1:")
            {
                let url = line[i..].split_whitespace().next().unwrap_or("");
                let url = url.trim_end_matches('/').to_string();
                let port: u16 = url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("port in the server's line");
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return Server {
                    child,
                    endpoint: format!("http://127.0.0.1:{port}"),
                    port,
                };
            }
            seen.push(line);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited with {status}: {}", seen.join("\n"));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not start: {}", seen.join("\n"));
}

/// s3s-fs (strict: checks signatures) serving `data` on `port` (0: any).
pub fn s3s_fs(data: &Path, port: u16) -> Option<Server> {
    s3s_fs_keyed(data, port, SK)
}

/// s3s-fs with its own secret key (a bucket is a directory of `data`).
pub fn s3s_fs_keyed(data: &Path, port: u16, secret: &str) -> Option<Server> {
    let bin = tool("CAIRN_TEST_S3S_FS")?;
    std::fs::create_dir_all(data).expect("data dir");
    let mut cmd = Command::new(bin);
    cmd.env("RUST_LOG", "info")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", AK, "--secret-key", secret])
        .arg(data);
    Some(start(cmd, "server is running at"))
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A private OpenSSH server on 127.0.0.1 with its own host key, user key and
/// config (no system file touched), and a client config in which `node0`, `node1`,
/// … all reach it.
pub struct Sshd {
    child: Child,
    /// `ssh -F <client_config> node0 -- …`
    pub client_config: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sshd(dir: &Path) -> Option<Sshd> {
    let bin = tool("CAIRN_TEST_SSHD")?;
    std::fs::create_dir_all(dir).unwrap();
    let keygen = |name: &str| {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(name))
            .status()
            .expect("ssh-keygen");
        assert!(st.success(), "ssh-keygen failed");
    };
    keygen("hostkey");
    keygen("userkey");
    std::fs::copy(dir.join("userkey.pub"), dir.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\nMaxStartups 100\nMaxSessions 100\n"
        ),
    )
    .unwrap();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let client = dir.join("ssh_config");
    std::fs::write(
        &client,
        format!(
            "Host node*\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {d}/userkey\n  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        ),
    )
    .unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    let mut child = Command::new(bin)
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .expect("start sshd");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "sshd exited with {st}: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
        }
        assert!(std::time::Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Sshd {
        child,
        client_config: client,
    })
}

/// moto's server (lenient, in memory, full multipart API).
pub fn moto() -> Option<Server> {
    let bin = tool("CAIRN_TEST_MOTO")?;
    let mut cmd = Command::new(bin);
    cmd.args(["-H", "127.0.0.1", "-p", "0"]);
    Some(start(cmd, "Running on"))
}

/// An SDK client for test set-up (buckets, listing uploads).
pub async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            AK, SK, None, None, "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Create a fresh bucket with a unique name.
pub async fn fresh_bucket(endpoint: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "cairn-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    s3_client(endpoint)
        .await
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .expect("create bucket");
    name
}

/// Azurite's well-known development account and key.
pub const AZ_ACCOUNT: &str = "devstoreaccount1";
pub const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob service on disk in `data`, on `port` (0: any). The endpoint
/// includes the account path.
pub fn azurite(data: &Path, port: u16) -> Option<Server> {
    let bin = tool("CAIRN_TEST_AZURITE")?;
    std::fs::create_dir_all(data).expect("data dir");
    let mut cmd = Command::new(bin);
    cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .arg("--location")
        .arg(data)
        .args(["--silent", "--disableTelemetry", "--skipApiVersionCheck"]);
    let mut s = start(cmd, "successfully listens on");
    s.endpoint = format!("{}/{AZ_ACCOUNT}", s.endpoint);
    Some(s)
}

/// Create a fresh container through cairn's own client stack (account key).
pub async fn fresh_container(endpoint: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "cairn-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let creds = azure_storage::StorageCredentials::access_key(AZ_ACCOUNT, AZ_KEY.to_string());
    azure_storage_blobs::prelude::ClientBuilder::with_location(
        azure_storage::CloudLocation::Custom {
            account: AZ_ACCOUNT.to_string(),
            uri: endpoint.to_string(),
        },
        creds,
    )
    .container_client(&name)
    .create()
    .await
    .expect("create container");
    name
}

/// The access tier Azurite reports for a blob.
pub async fn blob_tier(endpoint: &str, container: &str, blob: &str) -> Option<String> {
    let creds = azure_storage::StorageCredentials::access_key(AZ_ACCOUNT, AZ_KEY.to_string());
    let props = azure_storage_blobs::prelude::ClientBuilder::with_location(
        azure_storage::CloudLocation::Custom {
            account: AZ_ACCOUNT.to_string(),
            uri: endpoint.to_string(),
        },
        creds,
    )
    .blob_client(container, blob)
    .get_properties()
    .await
    .expect("blob properties");
    props.blob.properties.access_tier.map(|t| format!("{t:?}"))
}
