//! Runs killed or stopped mid-way are resumed to completion, byte-identical.

use super::helpers::*;
use std::time::{Duration, Instant};

fn step_status(sb: &Sandbox, run: u32) -> serde_json::Value {
    let out = sb.ok(&["plan", "status", "--json", &run.to_string()]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn step<'a>(v: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap()
}

fn restore_and_compare(sb: &Sandbox, snapshot: &str, n: u32) {
    let tgt = target_cluster(sb.dir.path(), &format!("tgt-{snapshot}"), n);
    sb.ok(&[
        "plan",
        "start",
        "restore-local",
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        &format!("SNAPSHOT_NAME={snapshot}"),
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert_restored(sb, &format!("tgt-{snapshot}"), n);
}

#[test]
fn sigkilled_between_nodes_resumes_without_redoing_finished_steps() {
    let sb = Sandbox::new();
    let nodes: Vec<(u32, std::path::PathBuf)> = (0..3)
        .map(|i| {
            let d = sb.path(&format!("src/node-{i}"));
            fill_node(&d, i, 50_000);
            (i, d)
        })
        .collect();
    // Every node's pre-hook kills cairn (its parent) once, when node 1 starts.
    let hook = "pre_hook = [\"sh\", \"-c\", \"if [ \\\"$CAIRN_NODE_INDEX\\\" = 1 ] && [ ! -e killed ]; then touch killed; kill -9 $PPID; sleep 5; fi\"]";
    let c = cluster_file(&sb.path("src.toml"), "src", &nodes, hook);
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        c.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=snap",
        "-p",
        "BACKUP_DIR=store",
    ]);
    assert_eq!(
        out.status.code(),
        None,
        "killed by a signal: {:?}",
        text(&out)
    );
    let v = step_status(&sb, 1);
    assert_eq!(v["run"]["status"], "INTERRUPTED");
    assert_eq!(step(&v, "backup/backup-node/node-0")["status"], "COMPLETE");
    assert_eq!(step(&v, "backup/backup-node/node-1")["status"], "RUNNING");
    assert!(!sb.path("store/snap/manifest.json").exists());

    sb.ok(&["plan", "resume", "1"]);
    let v = step_status(&sb, 1);
    assert_eq!(v["run"]["status"], "COMPLETE");
    assert_eq!(
        step(&v, "backup/backup-node/node-0")["attempts"],
        1,
        "node 0 was not redone"
    );
    assert_eq!(step(&v, "backup/backup-node/node-1")["attempts"], 2);
    assert_eq!(step(&v, "preflight/check-backup")["attempts"], 1);

    // Byte-identical to an uninterrupted run of the same data.
    sb.ok(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        c.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=again",
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "MODE=full",
    ]);
    for i in 0..3 {
        let a = std::fs::read(sb.path(&format!("store/snap/node-{i}.tar.gz"))).unwrap();
        let b = std::fs::read(sb.path(&format!("store/again/node-{i}.tar.gz"))).unwrap();
        assert_eq!(a, b, "node {i}");
    }
    restore_and_compare(&sb, "snap", 3);
}

#[test]
fn sigkilled_mid_stream_resumes_to_a_complete_identical_snapshot() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 24 << 20);
    // The bandwidth cap makes each node take seconds (about 8), so the kill lands
    // mid-stream and a busy machine's status polls still see node 1 running.
    let mut child = sb
        .command(&[
            "plan",
            "start",
            "backup-local",
            "--cluster",
            src.to_str().unwrap(),
            "-p",
            "SNAPSHOT_NAME=snap",
            "-p",
            "BACKUP_DIR=store",
            "-p",
            "MAX_BANDWIDTH=3MiB/s",
            "-q",
        ])
        .spawn()
        .unwrap();
    // Wait until node 1 is streaming, then kill -9.
    wait_until_running(&sb, 1, "backup/backup-node/node-1");
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!sb.path("store/snap/manifest.json").exists());
    let list = sb.ok(&["snapshots", "list", "--store", "store", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v[0]["complete"], false);

    let v = step_status(&sb, 1);
    assert_eq!(step(&v, "backup/backup-node/node-0")["status"], "COMPLETE");
    assert_eq!(step(&v, "backup/backup-node/node-1")["status"], "RUNNING");
    // Resume without the cap (an override of a stored parameter).
    sb.ok(&["plan", "resume", "1", "-q", "-p", "MAX_BANDWIDTH="]);
    let v = step_status(&sb, 1);
    assert_eq!(v["run"]["status"], "COMPLETE");
    assert_eq!(step(&v, "backup/backup-node/node-0")["attempts"], 1);
    sb.ok(&[
        "snapshots",
        "verify",
        "snap",
        "--store",
        "store",
        "-q",
        "--read-data",
    ]);
    restore_and_compare(&sb, "snap", 2);
}

#[test]
fn plan_stop_cancels_a_running_run_and_resume_completes_it() {
    let sb = Sandbox::new();
    let nodes: Vec<(u32, std::path::PathBuf)> = (0..2)
        .map(|i| {
            let d = sb.path(&format!("src/node-{i}"));
            fill_node(&d, i, 1000);
            (i, d)
        })
        .collect();
    let hook = "pre_hook = [\"sh\", \"-c\", \"if [ ! -e slept ]; then touch slept; sleep 30; fi\"]";
    let c = cluster_file(&sb.path("src.toml"), "src", &nodes, hook);
    let child = sb
        .command(&[
            "plan",
            "start",
            "backup-local",
            "--cluster",
            c.to_str().unwrap(),
            "-p",
            "SNAPSHOT_NAME=snap",
            "-p",
            "BACKUP_DIR=store",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sb.path("slept").exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let out = sb.ok(&["plan", "stop", "1"]);
    assert!(text(&out).0.contains("CANCELLED"), "{:?}", text(&out));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{:?}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stop did not interrupt the hook"
    );
    let v = step_status(&sb, 1);
    assert_eq!(v["run"]["status"], "CANCELLED");
    assert_eq!(step(&v, "backup/backup-node/node-0")["status"], "CANCELLED");
    sb.ok(&["plan", "resume", "1"]);
    assert_eq!(step_status(&sb, 1)["run"]["status"], "COMPLETE");
    restore_and_compare(&sb, "snap", 2);
}
