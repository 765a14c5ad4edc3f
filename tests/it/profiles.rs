//! Store profiles (`cairn.toml`): one name for a store in plans (`-p STORE=NAME`)
//! and in every `--store`, against a real S3 server and a directory store; a
//! resume reads the profile its run started with.

use super::helpers::*;
use super::servers::{self, AK, SK};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn keys(endpoint: &str, bucket: &str) -> Vec<String> {
    rt().block_on(async {
        let c = servers::s3_client(endpoint).await;
        let out = c.list_objects_v2().bucket(bucket).send().await.unwrap();
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    })
}

#[test]
fn a_profile_places_plans_and_snapshot_commands_on_s3_with_its_secret_from_a_file() {
    let data = tempfile::tempdir().unwrap();
    let Some(server) = servers::s3s_fs(data.path(), 0) else {
        return;
    };
    let sb = Sandbox::new();
    let bucket = rt().block_on(servers::fresh_bucket(&server.endpoint));
    let src = source_cluster(sb.dir.path(), 2, 1 << 20);
    std::fs::write(sb.path("aws-secret"), format!("{SK}\n")).unwrap();
    std::fs::write(sb.path("wrong-secret"), "not-the-secret-Zq81\n").unwrap();
    // Next to the cluster description: found without --config.
    write_config(
        &sb.path("cairn.toml"),
        &format!(
            "[stores.prod]\nurl = \"s3://{bucket}/team\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\naccess_key_id = \"{AK}\"\nsecret_access_key_file = \"aws-secret\"\n\n[stores.wrong]\nurl = \"s3://{bucket}/team\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\naccess_key_id = \"{AK}\"\nsecret_access_key_file = \"wrong-secret\"\n",
            server.endpoint, server.endpoint
        ),
    );
    let cluster = src.to_str().unwrap();
    let start = |plan: &str, cluster: &str, extra: &[&str]| {
        let mut a = vec!["plan", "start", plan, "-q", "--cluster", cluster];
        for e in extra {
            a.extend(["-p", e]);
        }
        sb.run(&a)
    };

    // Backup: no bucket, region or key given, none in the environment.
    let out = start("backup-s3", cluster, &["SNAPSHOT_NAME=snap", "STORE=prod"]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(!o.contains(SK) && !e.contains(SK), "secret in output");
    let stored = keys(&server.endpoint, &bucket);
    assert!(
        stored.contains(&"team/snap/manifest.json".to_string()),
        "{stored:?}"
    );

    // Listing, verify by the same name (the config is next to the working dir).
    let out = sb.ok(&["snapshots", "list", "--store", "prod", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "snap", "{v}");
    sb.ok(&[
        "snapshots",
        "verify",
        "snap",
        "--store",
        "prod",
        "-q",
        "--read-data",
    ]);

    // Restore by the profile: byte-identical.
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let out = start(
        "restore-s3",
        tgt.to_str().unwrap(),
        &["SNAPSHOT_NAME=snap", "STORE=prod"],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);
    // (verify recorded its result beside the snapshots)
    let stored = keys(&server.endpoint, &bucket);

    // Two answers to "where is the store" are refused before anything is written.
    let out = start(
        "backup-s3",
        cluster,
        &[
            "SNAPSHOT_NAME=two",
            "STORE=prod",
            &format!("S3_BUCKET_NAME={bucket}"),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(
        text(&out)
            .1
            .contains("S3_BUCKET_NAME cannot be given with it")
    );
    // A profile of another kind of store names the plan that fits it.
    write_config(
        &sb.path("cairn.toml"),
        &format!(
            "{}\n[stores.nas]\nurl = \"nas-dir\"\n",
            std::fs::read_to_string(sb.path("cairn.toml")).unwrap()
        ),
    );
    let out = start("backup-s3", cluster, &["SNAPSHOT_NAME=two", "STORE=nas"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("use plan backup-local"),
        "{:?}",
        text(&out)
    );
    // An unknown profile says which exist.
    let out = start("backup-s3", cluster, &["SNAPSHOT_NAME=two", "STORE=prdo"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("nas, prod, wrong"),
        "{:?}",
        text(&out)
    );
    // A wrong key from a profile fails the pre-flight, the key never printed.
    let out = start("backup-s3", cluster, &["SNAPSHOT_NAME=two", "STORE=wrong"]);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{o}\n{e}");
    assert!(!o.contains("not-the-secret-Zq81") && !e.contains("not-the-secret-Zq81"));
    assert!(!sb.path("nas-dir").exists());
    assert_eq!(
        keys(&server.endpoint, &bucket),
        stored,
        "a refused run wrote"
    );
    // The profile's secret never reaches the state store.
    for f in sb.path("home").read_dir().unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        assert!(!bytes.windows(SK.len()).any(|w| w == SK.as_bytes()));
    }
}

#[test]
fn a_resume_reads_the_profile_its_run_started_with_and_refuses_a_moved_store() {
    let sb = Sandbox::new();
    let nodes: Vec<(u32, std::path::PathBuf)> = (0..2)
        .map(|i| {
            let d = sb.path(&format!("src/node-{i}"));
            fill_node(&d, i, 20_000);
            (i, d)
        })
        .collect();
    std::fs::create_dir_all(sb.path("etc")).unwrap();
    // Node 1's pre-hook fails once: the run stops after node 0.
    let hook = "pre_hook = [\"sh\", \"-c\", \"if [ \\\"$CAIRN_NODE_INDEX\\\" = 1 ] && [ ! -e failed-once ]; then touch failed-once; exit 1; fi\"]";
    let c = cluster_file(&sb.path("etc/cluster.toml"), "src", &nodes, hook);
    let config = sb.path("etc/cairn.toml");
    write_config(&config, "[stores.nas]\nurl = \"../store\"\n");
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "-q",
        "--cluster",
        c.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=snap",
        "-p",
        "STORE=nas",
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    // Relative to the config file, not to the working directory.
    assert!(sb.path("store/snap/node-0.tar.gz").exists());
    assert!(!sb.path("store/snap/manifest.json").exists());

    // The profile now points elsewhere: the resume refuses to change stores.
    write_config(&config, "[stores.nas]\nurl = \"../elsewhere\"\n");
    let out = sb.run(&["plan", "resume", "1", "-q"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("store:"), "{:?}", text(&out));
    assert!(!sb.path("elsewhere").exists());

    // Put back, the resume (no --cluster, another config dir) finds it and ends.
    write_config(&config, "[stores.nas]\nurl = \"../store\"\n");
    let out = sb.run(&["plan", "resume", "1", "-q"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let out = sb.run(&[
        "plan",
        "start",
        "restore-local",
        "-q",
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=snap",
        "-p",
        &format!("BACKUP_DIR={}", sb.path("store").display()),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(&sb, "tgt", 2);

    // recover-nodes takes a URL or a profile as STORE; with a profile its store
    // parameters would be dropped, so giving one is refused.
    let out = sb.run(&[
        "plan",
        "start",
        "recover-nodes",
        "--dry-run",
        "--config",
        config.to_str().unwrap(),
        "--cluster",
        tgt.to_str().unwrap(),
        "-p",
        "SNAPSHOT_NAME=snap",
        "-p",
        "STORE=nas",
        "-p",
        "AWS_REGION=us-east-1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(
        text(&out).1.contains("AWS_REGION cannot be given"),
        "{:?}",
        text(&out)
    );

    // `--store NAME` that is a directory here and a profile is ambiguous; a bare
    // word that is neither is refused rather than becoming a new directory.
    std::fs::create_dir_all(sb.path("nas")).unwrap();
    let out = sb.run(&[
        "snapshots",
        "list",
        "--store",
        "nas",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("./nas"), "{:?}", text(&out));
    let out = sb.run(&["snapshots", "list", "--store", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    // A broken config stops only what uses a profile.
    write_config(&sb.path("cairn.toml"), "[stores.x\n");
    let out = sb.run(&["snapshots", "list", "--store", "store"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = sb.run(&["snapshots", "list", "--store", "x"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("cairn.toml"), "{:?}", text(&out));
}

#[test]
fn a_profile_and_encryption_reach_nodes_on_other_hosts() {
    let data = tempfile::tempdir().unwrap();
    let Some(server) = servers::s3s_fs(data.path(), 0) else {
        return;
    };
    let sb = Sandbox::new();
    let bucket = rt().block_on(servers::fresh_bucket(&server.endpoint));
    let bin = super::nodes::agent_bin(&sb);
    let cluster = super::nodes::exec_cluster(&sb, 2, 1000, &bin, super::nodes::env_prefix);
    std::fs::write(sb.path("aws-secret"), format!("{SK}\n")).unwrap();
    write_config(
        &sb.path("cairn.toml"),
        &format!(
            "[stores.prod]\nurl = \"s3://{bucket}/p\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\naccess_key_id = \"{AK}\"\nsecret_access_key_file = \"aws-secret\"\n",
            server.endpoint
        ),
    );
    let id = age::x25519::Identity::generate();
    std::fs::write(sb.path("recipients.txt"), format!("{}\n", id.to_public())).unwrap();
    {
        use age::secrecy::ExposeSecret;
        std::fs::write(
            sb.path("key.txt"),
            format!("{}\n", id.to_string().expose_secret()),
        )
        .unwrap();
    }
    let c = cluster.to_str().unwrap();
    // The agents get the profile's key over their stdin only; every output is clean.
    let out = sb.run(&[
        "plan",
        "start",
        "backup-s3",
        "-q",
        "--cluster",
        c,
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "STORE=prod",
        "-p",
        "ENCRYPT_TO=@recipients.txt",
    ]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(!o.contains(SK) && !e.contains(SK));
    let out = sb.run(&[
        "plan",
        "start",
        "restore-s3",
        "-q",
        "--cluster",
        c,
        "-p",
        "SNAPSHOT_NAME=s",
        "-p",
        "STORE=prod",
        "-p",
        "RESTORE_DIR=tgt",
        "-p",
        "AGE_IDENTITY=@key.txt",
    ]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(!o.contains(SK) && !e.contains(SK));
    assert_restored(&sb, "tgt", 2);
}
