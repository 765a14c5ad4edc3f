//! Nodes reached through an `exec` prefix: a real OpenSSH server on 127.0.0.1
//! (three host aliases, one server) and a generic prefix (`env X=1`). The agent is
//! this build's binary; the store is a real S3 server.

use super::helpers::*;
use super::servers::{self, AK};
use cairn::node::proto::PROTOCOL;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

/// This build's binary under a path of the sandbox's own, so that a test finds
/// its own agents among the processes of tests running beside it.
pub(super) fn agent_bin(sb: &Sandbox) -> String {
    let p = sb.path("bin/cairn");
    if !p.exists() {
        std::fs::create_dir_all(sb.path("bin")).unwrap();
        std::os::unix::fs::symlink(BIN, &p).unwrap();
    }
    p.to_str().unwrap().to_string()
}

/// The pids of this sandbox's agents.
fn agents_of(bin: &str) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|(_, (cmd, _))| cmd.starts_with(&format!("{bin} agent")))
        .map(|(pid, _)| pid)
        .collect()
}

/// A source cluster of `n` nodes whose node `i` is reached with `exec(i)`.
pub(super) fn exec_cluster(
    sb: &Sandbox,
    n: u32,
    extra: usize,
    agent: &str,
    exec: impl Fn(u32) -> Vec<String>,
) -> PathBuf {
    let mut text = format!("name = \"src\"\nagent_path = {agent:?}\n");
    for i in 0..n {
        let d = sb.path(&format!("src/node-{i}"));
        if !d.exists() {
            fill_node(&d, i, extra);
        }
        text.push_str(&format!(
            "[[nodes]]\nindex = {i}\ndata_dir = {:?}\nexec = {:?}\n",
            d.to_str().unwrap(),
            exec(i)
        ));
    }
    let path = sb.path("exec-cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn ssh_prefix(sshd: &servers::Sshd) -> impl Fn(u32) -> Vec<String> + '_ {
    move |i| {
        vec![
            "ssh".into(),
            "-F".into(),
            sshd.client_config.to_str().unwrap().into(),
            format!("node{i}"),
            "--".into(),
        ]
    }
}

pub(super) fn env_prefix(_: u32) -> Vec<String> {
    vec!["env".into(), "X=1".into()]
}

fn s3_params(endpoint: &str, bucket: &str, snapshot: &str, secret: &str) -> Vec<String> {
    [
        format!("SNAPSHOT_NAME={snapshot}"),
        format!("AWS_ACCESS_KEY_ID={AK}"),
        format!("AWS_SECRET_ACCESS_KEY={secret}"),
        "AWS_REGION=us-east-1".to_string(),
        format!("S3_BUCKET_NAME={bucket}"),
        format!("S3_ENDPOINT_URL={endpoint}"),
        "S3_PREFIX=nodes".to_string(),
    ]
    .into_iter()
    .flat_map(|p| ["-p".to_string(), p])
    .collect()
}

/// Restore a snapshot onto local dirs and compare with the source, node by node.
fn restored_equals_source(sb: &Sandbox, params: &[String], n: u32, target: &str) {
    let tgt = target_cluster(sb.dir.path(), target, n);
    let mut args = vec![
        "plan".to_string(),
        "start".into(),
        "restore-s3".into(),
        "-q".into(),
        "--cluster".into(),
        tgt.to_str().unwrap().into(),
    ];
    args.extend(params.iter().cloned());
    let out = sb.run_v(&args);
    assert!(out.status.success(), "restore: {:?}", text(&out));
    assert_restored(sb, target, n);
}

fn ok_v(sb: &Sandbox, args: &[String]) {
    let out = sb.run_v(args);
    assert!(out.status.success(), "{args:?}: {:?}", text(&out));
}

/// Each process's argv and environment, `pid → text`.
fn processes() -> BTreeMap<u32, (String, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let mut both = cmd.clone().into_bytes();
        both.extend(env);
        out.insert(pid, (cmd, both));
    }
    out
}

fn rchar(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
}

fn node_bytes(sb: &Sandbox, n: u32) -> u64 {
    fn walk(p: &Path) -> u64 {
        let m = std::fs::symlink_metadata(p).unwrap();
        if m.is_dir() {
            std::fs::read_dir(p)
                .unwrap()
                .map(|e| walk(&e.unwrap().path()))
                .sum()
        } else {
            m.len()
        }
    }
    (0..n)
        .map(|i| walk(&sb.path(&format!("src/node-{i}"))))
        .sum()
}

/// backup-s3 of three nodes through `prefix`, watched from outside: no process of
/// the run (coordinator, ssh, agents) holds the secret in its argv or environment,
/// and the agents ran. Over ssh, a second backup after each node grew by 8 MiB
/// shows that what the coordinator reads does not grow with the data (its
/// counters, `rchar`, grow by under 1 % of the added bytes).
fn backup_through(prefix_kind: &str) {
    let sb = Sandbox::new();
    let secret = format!("nodes-secret-{prefix_kind}-{}-Zq81", std::process::id());
    let data = sb.path("s3data");
    std::fs::create_dir_all(data.join("nodes-bucket")).unwrap();
    let Some(s3) = servers::s3s_fs_keyed(&data, 0, &secret) else {
        return;
    };
    let mut sshd_ref = None;
    let cluster = if prefix_kind == "ssh" {
        let Some(s) = servers::sshd(&sb.path("sshd")) else {
            return;
        };
        let sshd = sshd_ref.insert(s);
        exec_cluster(&sb, 3, 1 << 20, &agent_bin(&sb), ssh_prefix(sshd))
    } else {
        exec_cluster(&sb, 3, 1 << 20, &agent_bin(&sb), env_prefix)
    };
    let bin = agent_bin(&sb);
    std::fs::write(sb.path("secret.txt"), format!("{secret}\n")).unwrap();
    let ssh = prefix_kind == "ssh";
    let backup = |snapshot: &str| -> u64 {
        let mut args = vec![
            "plan".to_string(),
            "start".into(),
            "backup-s3".into(),
            "-q".into(),
            "--cluster".into(),
            cluster.to_str().unwrap().into(),
            "-p".into(),
            "STRATEGY=parallel".into(),
        ];
        args.extend(s3_params(
            &s3.endpoint,
            "nodes-bucket",
            snapshot,
            "@secret.txt",
        ));
        watched(&sb, &args, &secret, &bin, s3.pid(), ssh)
    };
    let small = backup("small");
    let mut snapshot = "small";
    let mut added = 0;
    if ssh {
        let before = node_bytes(&sb, 3);
        for i in 0..3u64 {
            std::fs::write(
                sb.path(&format!("src/node-{i}/app/orders-2/grown.db")),
                noise(1000 + i, 8 << 20),
            )
            .unwrap();
        }
        added = node_bytes(&sb, 3) - before;
        // The agents are sshd's children, not the coordinator's: what the
        // coordinator read is its own (and its ssh clients').
        let big = backup("big");
        eprintln!("coordinator rchar: small {small}, big {big}, node data added {added}");
        assert!(
            big.saturating_sub(small) < added / 100,
            "the coordinator read {small} bytes for the small backup and {big} for the big one, which has {added} more bytes of node data"
        );
        snapshot = "big";
    }
    // The restore runs on the nodes too: into exec nodes whose data dirs are
    // fresh, through the same prefix, watched the same way.
    let restore = |snapshot: &str, target: &str| -> u64 {
        let mut text = format!("name = \"{target}\"\nagent_path = {bin:?}\n");
        for i in 0..3u32 {
            let exec = match &sshd_ref {
                Some(sshd) => ssh_prefix(sshd)(i),
                None => env_prefix(i),
            };
            text.push_str(&format!(
                "[[nodes]]\nindex = {i}\ndata_dir = {:?}\nexec = {:?}\n",
                sb.path(&format!("{target}/node-{i}")).to_str().unwrap(),
                exec
            ));
        }
        let path = sb.path(&format!("{target}-exec.toml"));
        std::fs::write(&path, text).unwrap();
        let mut args = vec![
            "plan".to_string(),
            "start".into(),
            "restore-s3".into(),
            "-q".into(),
            "--cluster".into(),
            path.to_str().unwrap().into(),
        ];
        args.extend(s3_params(
            &s3.endpoint,
            "nodes-bucket",
            snapshot,
            "@secret.txt",
        ));
        watched(&sb, &args, &secret, &bin, s3.pid(), ssh)
    };
    if ssh {
        let small = restore("small", "tgt-small");
        let big = restore(snapshot, "tgt");
        eprintln!("coordinator rchar: restore small {small}, big {big}");
        assert!(
            big.saturating_sub(small) < added / 100,
            "the coordinator read {small} bytes for the small restore and {big} for the big one, which has {added} more bytes of node data"
        );
    } else {
        restore(snapshot, "tgt");
    }
    assert_restored(&sb, "tgt", 3);
    // And onto this machine's own dirs, as any snapshot restores.
    restored_equals_source(
        &sb,
        &s3_params(&s3.endpoint, "nodes-bucket", snapshot, "@secret.txt"),
        3,
        "here",
    );
}

/// Run `cairn args…` to its end while watching every process: none (coordinator,
/// ssh, agents) holds `secret` in its argv or environment, agents (and ssh
/// clients) were seen. Returns the coordinator's last `rchar`.
fn watched(sb: &Sandbox, args: &[String], secret: &str, bin: &str, skip: u32, ssh: bool) -> u64 {
    let mut child = sb
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let coordinator = child.id();
    let (mut agents_seen, mut ssh_seen, mut last_rchar) = (0, 0, 0u64);
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the run hangs");
        if let Some(r) = rchar(coordinator) {
            last_rchar = r;
        }
        for (pid, (cmd, all)) in processes() {
            if pid == skip {
                continue;
            }
            if cmd.starts_with(&format!("{bin} agent")) {
                agents_seen += 1;
            }
            if cmd.starts_with("ssh ") {
                ssh_seen += 1;
            }
            assert!(
                !all.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "process {pid} ({cmd}) holds the secret in its argv or environment"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{args:?}: {:?}", text(&out));
    let (so, se) = text(&out);
    assert!(!so.contains(secret) && !se.contains(secret));
    assert!(agents_seen > 0, "no agent process was seen");
    if ssh {
        assert!(ssh_seen > 0, "no ssh process was seen");
    }
    last_rchar
}

#[test]
fn backup_s3_over_ssh_restores_byte_identical_and_keeps_data_and_secrets_off_the_coordinator() {
    backup_through("ssh");
}

#[test]
fn backup_s3_over_a_generic_prefix_restores_byte_identical() {
    backup_through("env");
}

/// A backup-s3 over ssh onto moto (which lists multipart uploads), started and
/// left running: `nodes` nodes of `mib` MiB each, capped at `bandwidth` per agent.
struct SshBackup {
    _moto: servers::Server,
    _sshd: servers::Sshd,
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
    bucket: String,
    bin: String,
    params: Vec<String>,
}

impl SshBackup {
    fn start(
        sb: &Sandbox,
        nodes: u32,
        mib: usize,
        strategy: &str,
        bandwidth: &str,
    ) -> Option<(SshBackup, std::process::Child)> {
        let moto = servers::moto()?;
        let sshd = servers::sshd(&sb.path("sshd"))?;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let bucket = rt.block_on(servers::fresh_bucket(&moto.endpoint));
        let client = rt.block_on(servers::s3_client(&moto.endpoint));
        let bin = agent_bin(sb);
        let cluster = exec_cluster(sb, nodes, mib << 20, &bin, ssh_prefix(&sshd));
        let params = s3_params(&moto.endpoint, &bucket, "snap", servers::SK);
        let mut args = vec![
            "plan".to_string(),
            "start".into(),
            "backup-s3".into(),
            "-q".into(),
            "--cluster".into(),
            cluster.to_str().unwrap().into(),
            "-p".into(),
            format!("STRATEGY={strategy}"),
            "-p".into(),
            format!("MAX_BANDWIDTH={bandwidth}"),
        ];
        args.extend(params.iter().cloned());
        let child = sb
            .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let run = SshBackup {
            _moto: moto,
            _sshd: sshd,
            rt,
            client,
            bucket,
            bin,
            params,
        };
        Some((run, child))
    }

    fn open_uploads(&self) -> usize {
        self.rt
            .block_on(
                self.client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .send(),
            )
            .unwrap()
            .uploads()
            .len()
    }

    /// `plan resume 1` without the bandwidth cap; then the snapshot must restore
    /// byte-identically.
    fn resume_and_restore(&self, sb: &Sandbox, nodes: u32) {
        let out = sb.run(&[
            "plan",
            "resume",
            "1",
            "-q",
            "-p",
            &format!("AWS_ACCESS_KEY_ID={AK}"),
            "-p",
            &format!("AWS_SECRET_ACCESS_KEY={}", servers::SK),
            "-p",
            "MAX_BANDWIDTH=",
        ]);
        assert!(out.status.success(), "resume: {:?}", text(&out));
        assert_eq!(self.open_uploads(), 0);
        restored_equals_source(sb, &self.params, nodes, "tgt");
    }
}

/// The agent of node 1 is killed while it uploads: that step fails, the run fails,
/// no multipart upload is left on the server, and `plan resume` completes a
/// snapshot that restores byte-identically.
#[test]
fn a_killed_agent_fails_its_step_leaves_no_upload_and_resume_completes() {
    let sb = Sandbox::new();
    let Some((run, child)) = SshBackup::start(&sb, 2, 12, "serial", "2MiB") else {
        return;
    };
    // Wait for node 0's agent to have an upload open, then kill it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let agent = loop {
        assert!(Instant::now() < deadline, "no upload started");
        if run.open_uploads() > 0
            && let Some(pid) = agents_of(&run.bin).first()
        {
            break *pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Mid-upload (12 MiB at 2 MiB/s), once the agent has reported its upload id:
    // an agent killed in the instant between opening the upload and reporting it
    // leaves an upload nobody knows of (a known gap: the store cannot list them).
    std::thread::sleep(Duration::from_millis(1000));
    let st = Command::new("kill")
        .args(["-KILL", &agent.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let (_, err) = text(&out);
    assert!(err.contains("node 0"), "{err}");
    assert!(err.contains("agent"), "{err}");
    assert_eq!(
        run.open_uploads(),
        0,
        "the dead agent's upload was left open"
    );
    let st = sb.ok(&["plan", "status", "1"]);
    assert!(
        text(&st).0.starts_with("run 1  backup-s3  FAILED"),
        "{:?}",
        text(&st)
    );
    run.resume_and_restore(&sb, 2);
}

/// An agent of another protocol is refused in the pre-flight, and the problems of
/// two nodes (that one, and a missing data dir on another) come in one message;
/// nothing is written to the store.
#[test]
fn preflight_refuses_another_protocol_and_reports_two_nodes_at_once() {
    let sb = Sandbox::new();
    let fake = sb.path("old-cairn");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho '{\"hello\":{\"protocol\":99,\"version\":\"9.0.0\"}}'\ncat >/dev/null\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cluster = exec_cluster(&sb, 2, 1000, &agent_bin(&sb), env_prefix);
    let text_ = std::fs::read_to_string(&cluster).unwrap();
    // Node 0 runs the old agent; node 1's data dir is missing.
    let text_ = text_.replacen(
        "[[nodes]]\nindex = 0\n",
        &format!(
            "[[nodes]]\nindex = 0\nagent_path = {:?}\n",
            fake.to_str().unwrap()
        ),
        1,
    );
    let text_ = text_.replace("src/node-1", "src/gone-1");
    std::fs::write(&cluster, text_).unwrap();
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        cluster.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let (_, err) = text(&out);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains("node 0: the agent (cairn 9.0.0) speaks agent protocol 99"),
        "{err}"
    );
    assert!(
        err.contains("node 1: data dir") && err.contains("gone-1"),
        "{err}"
    );
    assert!(!sb.path("store/s").exists());
}

/// A restore onto nodes reached with exec runs on their hosts (RESTORE_DIR is
/// a directory there); the pre-flight reports the clashes of both nodes in one
/// message and leaves their data dirs as they were; an agent path a shell would
/// read is refused when the cluster description is read.
#[test]
fn restore_onto_exec_nodes_runs_on_their_hosts_and_refuses_clashes_up_front() {
    let sb = Sandbox::new();
    let cluster = exec_cluster(&sb, 2, 1000, &agent_bin(&sb), env_prefix);
    let c = cluster.to_str().unwrap();
    ok_v(&sb, &start_args("backup-local", &cluster, "s", &[]));
    // Onto the source nodes themselves: every keyspace exists on both.
    let before: Vec<_> = (0..2)
        .map(|i| exact_tree(&sb.path(&format!("src/node-{i}"))))
        .collect();
    let out = sb.run(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        c,
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let (_, err) = text(&out);
    assert!(
        err.contains("node 0: keyspace(s) already exist")
            && err.contains("node 1: keyspace(s) already exist"),
        "{err}"
    );
    for (i, t) in before.iter().enumerate() {
        assert_eq!(&exact_tree(&sb.path(&format!("src/node-{i}"))), t);
    }
    ok_v(
        &sb,
        &start_args("restore-local", &cluster, "s", &["RESTORE_DIR=tgt"]),
    );
    assert_restored(&sb, "tgt", 2);
    // A second restore there clashes, node by node, and changes nothing.
    let restored: Vec<_> = (0..2)
        .map(|i| exact_tree(&sb.path(&format!("tgt/node-{i}"))))
        .collect();
    let out = sb.run_v(&start_args(
        "restore-local",
        &cluster,
        "s",
        &["RESTORE_DIR=tgt"],
    ));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    for (i, t) in restored.iter().enumerate() {
        assert_eq!(&exact_tree(&sb.path(&format!("tgt/node-{i}"))), t);
    }
    // An agent path with a space or a semicolon never reaches a shell.
    for bad in ["/opt/my cairn", "cairn;touch pwned"] {
        let text_ = std::fs::read_to_string(&cluster).unwrap().replace(
            &format!("agent_path = {:?}", agent_bin(&sb)),
            &format!("agent_path = {bad:?}"),
        );
        let bad_cluster = sb.path("bad-agent.toml");
        std::fs::write(&bad_cluster, text_).unwrap();
        let out = sb.run_v(&start_args("backup-local", &bad_cluster, "s2", &[]));
        assert_eq!(out.status.code(), Some(2), "{bad}: {:?}", text(&out));
        assert!(text(&out).1.contains("agent_path"), "{:?}", text(&out));
        assert!(!sb.path("pwned").exists());
    }
}

/// An agent that says hello and then nothing is given up after the cluster's
/// `agent_timeout`, naming the node; the pre-flight refuses the run.
#[test]
fn a_silent_agent_is_given_up_after_the_agent_timeout() {
    let sb = Sandbox::new();
    let fake = sb.path("hung-cairn");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho '{{\"hello\":{{\"protocol\":{PROTOCOL},\"version\":\"0.1.0\"}}}}'\nexec sleep 600\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cluster = exec_cluster(&sb, 1, 1000, fake.to_str().unwrap(), env_prefix);
    let text_ = std::fs::read_to_string(&cluster).unwrap();
    std::fs::write(&cluster, format!("agent_timeout = \"5s\"\n{text_}")).unwrap();
    let started = Instant::now();
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        cluster.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let (_, err) = text(&out);
    assert!(
        err.contains("node 0: the agent said nothing for 5s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let left = processes()
        .into_values()
        .filter(|(cmd, _)| cmd.contains("sleep 600"))
        .count();
    assert_eq!(left, 0, "the hung agent was left running");
}

/// `plan stop` during a backup over ssh: the agents on the nodes stop (their
/// stdin closed), no multipart upload is left, the run is CANCELLED and resumes
/// to a snapshot that restores byte-identically.
#[test]
fn plan_stop_stops_the_agents_on_the_nodes_and_resume_completes() {
    let sb = Sandbox::new();
    let Some((run, child)) = SshBackup::start(&sb, 2, 24, "parallel", "1MiB") else {
        return;
    };
    let agents = || agents_of(&run.bin).len();
    let deadline = Instant::now() + Duration::from_secs(120);
    while run.open_uploads() < 2 {
        assert!(Instant::now() < deadline, "the uploads did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(agents(), 2);
    sb.ok(&["plan", "stop", "1"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{:?}", text(&out));
    // Each agent has over 20 s of upload left at 1 MiB/s: gone within 6 s means
    // stopped, not finished.
    let deadline = Instant::now() + Duration::from_secs(6);
    while agents() > 0 {
        assert!(
            Instant::now() < deadline,
            "the agents on the nodes kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(run.open_uploads(), 0, "an upload was left open");
    run.resume_and_restore(&sb, 2);
}

/// An agent whose answer does not hold fails its step: no manifest is written,
/// the run is not COMPLETE. Forged: an object the store does not have, a file
/// path that leaves the data dir, counts that do not add up; and failures whose
/// exit codes would make the coordinator say success or cancelled.
#[test]
fn an_agent_answer_the_store_contradicts_is_refused() {
    let sb = Sandbox::new();
    let fake = sb.path("forging-cairn");
    std::fs::write(
        &fake,
        format!(
            r#"#!/usr/bin/env python3
import json, os, sys
print(json.dumps({{"hello": {{"protocol": {PROTOCOL}, "version": "0.1.0"}}}}), flush=True)
sys.stdin.readline()
req = json.loads(sys.stdin.readline())
mode = os.environ["FORGE"]
z = "0" * 64
if req["op"] == "inspect_backup":
    print(json.dumps({{"done": {{"keyspaces": ["app"], "problems": [], "loose": [], "version": "0.1.0"}}}}), flush=True)
    sys.exit(0)
if req["op"] == "fs":
    # The snapshot's own operations answer honestly: the forgery is the backup's.
    kind = req["fs"]["fs"]
    answer = {{"take_snapshot": {{"files": 1, "bytes": 5, "excluded": 0, "secs": 0.0}},
              "snapshot_exists": True}}.get(kind)
    print(json.dumps({{"done": answer}}), flush=True)
    sys.exit(0)
if mode.startswith("exit"):
    print(json.dumps({{"failed": {{"message": "it broke", "exit_code": int(mode[4:]), "transient": False}}}}), flush=True)
    sys.exit(0)
files = [{{"path": "app/t/a.db", "size": 5, "sha256": z}}]
count = 1
if mode == "escape":
    files = [{{"path": "app/../../../outside.db", "size": 5, "sha256": z}}]
if mode == "counts":
    count = 2
out = {{"node": {{"index": 0, "object": "node-0.tar.gz", "keyspaces": ["app"],
                "file_count": count, "bytes": 5, "compressed_bytes": 10, "files": files}},
       "object": {{"key": "node-0.tar.gz", "size": 10, "sha256": z}}}}
print(json.dumps({{"done": out}}), flush=True)
"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cases = [
        ("missing", "the store holds no s-missing/node-0.tar.gz"),
        ("escape", "is no plain path in a keyspace"),
        ("counts", "it counts 2 files and lists 1"),
        ("exit0", "it broke"),
        ("exit130", "it broke"),
    ];
    for (run, (mode, says)) in cases.iter().enumerate() {
        let cluster = exec_cluster(&sb, 1, 1000, fake.to_str().unwrap(), |_| {
            vec!["env".into(), format!("FORGE={mode}")]
        });
        let snap = format!("s-{mode}");
        let out = sb.run(&[
            "plan",
            "start",
            "backup-local",
            "--cluster",
            cluster.to_str().unwrap(),
            "-p",
            &format!("SNAPSHOT_NAME={snap}"),
            "-p",
            "BACKUP_DIR=store",
        ]);
        assert_eq!(out.status.code(), Some(1), "{mode}: {:?}", text(&out));
        let (_, err) = text(&out);
        if !mode.starts_with("exit") {
            assert!(err.contains("the agent's answer does not hold"), "{err}");
        }
        assert!(err.contains(says), "{mode}: {err}");
        assert!(!sb.path(&format!("store/{snap}/manifest.json")).exists());
        let st = sb.ok(&["plan", "status", &(run + 1).to_string()]);
        assert!(
            text(&st).0.contains("backup-local  FAILED"),
            "{mode}: {:?}",
            text(&st)
        );
    }
}

/// An agent killed while it stages its node fails the restore: nothing of the
/// snapshot is in any node's data dir and no staging is left behind; `plan
/// resume` then restores every node byte-identically.
#[test]
fn a_killed_agent_mid_restore_fails_the_run_and_resume_restores_every_node() {
    let sb = Sandbox::new();
    let bin = agent_bin(&sb);
    let child = slow_exec_restore(&sb, &bin, 6 << 20, "parallel");
    // Wait for an agent that is staging (its staging dir has data), then kill it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let staging_bytes = || -> u64 {
        (0..2)
            .filter_map(|i| std::fs::read_dir(sb.path(&format!("tgt/node-{i}"))).ok())
            .flat_map(|rd| rd.flatten())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".cairn-staging-")
            })
            .map(|e| tree(&e.path()).len() as u64)
            .sum()
    };
    loop {
        assert!(Instant::now() < deadline, "no agent started staging");
        if staging_bytes() > 0 && !agents_of(&bin).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(pid) = agents_of(&bin).first() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).1.contains("agent"), "{:?}", text(&out));
    // Nothing was moved into place.
    assert_nothing_moved(&sb, 2);
    let st = sb.ok(&["plan", "status", "2"]);
    assert!(
        text(&st).0.starts_with("run 2  restore-local  FAILED"),
        "{:?}",
        text(&st)
    );
    let out = sb.ok(&["plan", "resume", "2", "-q"]);
    assert!(out.status.success());
    assert_restored(&sb, "tgt", 2);
    for i in 0..2 {
        let staging: Vec<_> = std::fs::read_dir(sb.path(&format!("tgt/node-{i}")))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".cairn-"))
            .collect();
        assert!(staging.is_empty(), "node {i}: staging left: {staging:?}");
    }
}

/// A staged file rewritten before the commit — same size, its mtime put back —
/// is caught before anything moves (its inode change time differs): the run is
/// refused with the target untouched, and `plan resume` stages it again and
/// restores every node byte-identically.
#[test]
fn a_staged_file_changed_before_the_commit_is_never_committed() {
    let sb = Sandbox::new();
    let bin = agent_bin(&sb);
    let child = slow_exec_restore(&sb, &bin, 4 << 20, "serial");
    let staging_of = |i: u32| {
        std::fs::read_dir(sb.path(&format!("tgt/node-{i}")))
            .ok()?
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".cairn-staging-")
            })
            .map(|e| e.path())
    };
    // Node 0 is staged (its record is written) while node 1 stages.
    let deadline = Instant::now() + Duration::from_secs(120);
    let staged0 = loop {
        assert!(Instant::now() < deadline, "node 0 was never staged");
        if let (Some(s0), Some(_)) = (staging_of(0), staging_of(1))
            && s0.join(".cairn-staged.json").exists()
        {
            break s0;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let victim = staged0.join("app/orders-2/grown.db");
    let victim = if victim.exists() {
        victim
    } else {
        let t = tree(&staged0);
        let rel = t
            .keys()
            .find(|k| k.ends_with(".db"))
            .expect("a staged data file")
            .clone();
        staged0.join(rel)
    };
    let before = std::fs::metadata(&victim).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0x55;
    std::fs::write(&victim, &bytes).unwrap();
    let mtime = filetime::FileTime::from_last_modification_time(&before);
    filetime::set_file_mtime(&victim, mtime).unwrap();
    assert_eq!(std::fs::metadata(&victim).unwrap().len(), before.len());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("no longer holds what was staged"),
        "{:?}",
        text(&out)
    );
    assert_nothing_moved(&sb, 2);
    ok_v(
        &sb,
        &["plan".into(), "resume".into(), "2".into(), "-q".into()],
    );
    assert_restored(&sb, "tgt", 2);
}

/// A restore-local of a fresh two-node exec cluster (env prefix, `extra` bytes a
/// node) into RESTORE_DIR=tgt at 1 MiB/s, running: a window to act in.
fn slow_exec_restore(sb: &Sandbox, bin: &str, extra: usize, strategy: &str) -> std::process::Child {
    let cluster = exec_cluster(sb, 2, extra, bin, env_prefix);
    ok_v(sb, &start_args("backup-local", &cluster, "s", &[]));
    let strategy = format!("STRATEGY={strategy}");
    let args = start_args(
        "restore-local",
        &cluster,
        "s",
        &["RESTORE_DIR=tgt", "MAX_BANDWIDTH=1MiB", &strategy],
    );
    sb.command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// No node of `tgt` holds anything but cairn's own (staging) entries.
fn assert_nothing_moved(sb: &Sandbox, nodes: u32) {
    for i in 0..nodes {
        let left: Vec<String> = std::fs::read_dir(sb.path(&format!("tgt/node-{i}")))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with(".cairn-"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "node {i} holds {left:?} after a failed restore"
        );
    }
}
