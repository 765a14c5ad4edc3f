//! Nightly operations and manager snapshots against a remote store (S3 or Azure):
//! the same steps for each backend, called from `s3.rs` and `azure.rs`.

use super::helpers::*;
use std::process::Output;

fn plan_run(sb: &Sandbox, plan: &str, cluster: &std::path::Path, params: &[String]) -> Output {
    let mut a = vec![
        "plan",
        "start",
        plan,
        "--cluster",
        cluster.to_str().unwrap(),
    ];
    a.extend(params.iter().map(String::as_str));
    sb.run(&a)
}

/// A wrong secret and a missing bucket/container are refused in the pre-flight
/// (exit 3), with a message naming the parameter or the missing name, the wrong
/// secret nowhere in the output, no hook run and no run recorded.
/// `args(secret, place)` gives the plan's `-p` arguments.
pub fn refused_in_preflight(
    plans: (&str, &str),
    args: impl Fn(Option<&str>, Option<&str>) -> Vec<String>,
    secret_param: &str,
    wrong: &str,
    missing: &str,
) {
    let sb = Sandbox::new();
    let marker = sb.path("hook-ran");
    let node = sb.path("src/node-0");
    fill_node(&node, 0, 10);
    let hook = format!("pre_hook = [\"touch\", {:?}]", marker.to_str().unwrap());
    let c = cluster_file(&sb.path("src.toml"), "src", &[(0, node)], &hook);
    let out = plan_run(&sb, plans.0, &c, &args(Some(wrong), None));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let (o, e) = text(&out);
    assert!(e.contains("denied") && e.contains(secret_param), "{e}");
    assert!(!o.contains(wrong) && !e.contains(wrong));
    assert!(!marker.exists(), "a hook ran before the refusal");
    // Refused before a run was even recorded: no node was touched.
    let status = sb.run(&["plan", "status", "--json"]);
    assert_eq!(status.status.code(), Some(5), "{:?}", text(&status));

    let params = args(None, Some(missing));
    let out = plan_run(&sb, plans.0, &c, &params);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(
        text(&out)
            .1
            .contains(&format!("{missing:?} does not exist")),
        "{:?}",
        text(&out)
    );
    let tgt = target_cluster(sb.dir.path(), "tgt", 1);
    let out = plan_run(&sb, plans.1, &tgt, &params);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(!marker.exists(), "a hook ran before the refusal");
}

/// Two backups, verify with data recorded, prune keeping only the newest, `last`,
/// and a manager snapshot created, listed and restored through the store URL.
/// `args(snapshot)` gives the plan's `-p` arguments, `env` the store credentials
/// for the URL commands; `secret` must appear in no output.
pub fn nightly_operations(
    plan: &str,
    args: impl Fn(&str) -> Vec<String>,
    url: &str,
    env: &[(&str, &str)],
    secret: &str,
) {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 100_000);
    let run = |head: &[&str], extra: &[String]| -> Output {
        let mut a: Vec<&str> = head.to_vec();
        a.extend(extra.iter().map(String::as_str));
        let mut c = sb.command(&a);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let (o, e) = text(&out);
        assert!(
            !o.contains(secret) && !e.contains(secret),
            "secret in output"
        );
        out
    };
    let ok = |head: &[&str], extra: &[String]| -> Output {
        let out = run(head, extra);
        assert!(out.status.success(), "{head:?}: {:?}", text(&out));
        out
    };
    let cluster = src.to_str().unwrap();
    for snap in ["old", "new"] {
        ok(
            &["plan", "start", plan, "--cluster", cluster, "-q"],
            &args(snap),
        );
        if snap == "new" {
            continue;
        }
        // A file changes between the two: "new" is a differential holding it,
        // and referencing the rest in "old"'s objects.
        let f = sb.path("src/node-1/app/users-1/nb-1-TOC.txt");
        std::fs::write(&f, b"Data.db\nTOC.txt\nIndex.db\n").unwrap();
        let t = filetime::FileTime::from_unix_time(1_700_000_100, 0);
        filetime::set_file_times(&f, t, t).unwrap();
        filetime::set_file_times(sb.path("src/node-1/app/users-1"), t, t).unwrap();
    }
    ok(
        &[
            "snapshots",
            "verify",
            "new",
            "--store",
            url,
            "--read-data",
            "-q",
        ],
        &[],
    );
    let list = ok(&["snapshots", "list", "--store", url, "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let mut names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["new", "old"]);
    let new = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "new")
        .unwrap();
    assert_eq!(new["verified"]["mode"], "read-data");
    assert_eq!(new["verified"]["ok"], true);

    // A day later, a policy of one hour keeps only the newest.
    let later = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    ok(
        &[
            "snapshots",
            "prune",
            "--store",
            url,
            "--policy",
            "1h",
            "--now",
            &later,
        ],
        &[],
    );
    // "new" is a differential of "old": old's manifest is gone, the objects
    // new references stay in its folder, held for it.
    let list = ok(&["snapshots", "list", "--store", url, "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let complete: Vec<&serde_json::Value> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["complete"] == true)
        .collect();
    assert_eq!(complete.len(), 1, "{v}");
    assert_eq!(complete[0]["name"], "new");
    assert_eq!(complete[0]["parent"], "old");
    let old = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "old")
        .unwrap();
    assert_eq!(old["held_for"], serde_json::json!(["new"]), "{v}");
    assert!(old.get("started_at").is_none_or(|s| s.is_null()));
    // Every byte new needs is still there, read back from the store.
    let out = ok(
        &["snapshots", "verify", "new", "--store", url, "--read-data"],
        &[],
    );
    assert!(text(&out).0.contains("OK"), "{:?}", text(&out));
    // And it restores byte for byte, read from both snapshots' objects.
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    ok(
        &[
            "plan",
            "start",
            &plan.replace("backup", "restore"),
            "--cluster",
            tgt.to_str().unwrap(),
            "-q",
        ],
        &args("new"),
    );
    assert_restored(&sb, "tgt", 2);
    let out = ok(
        &["snapshots", "last", "--store", url, "--max-age", "1h"],
        &[],
    );
    assert!(text(&out).0.starts_with("new "), "{:?}", text(&out));
    let out = run(
        &[
            "snapshots",
            "last",
            "--store",
            url,
            "--max-age",
            "1h",
            "--now",
            &later,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(6));

    // cairn's own state as a manager snapshot in the remote store, restored into a
    // fresh home.
    ok(
        &[
            "manager-snapshot",
            "create",
            "m1",
            "--store",
            url,
            "--cluster",
            cluster,
        ],
        &[],
    );
    let list = ok(&["manager-snapshot", "list", "--store", url, "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"m1") && ids.contains(&"new"), "{ids:?}");
    let fresh = sb.path("fresh-home");
    let mut c = sb.command(&["manager-snapshot", "restore", "m1", "--store", url]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.env("CAIRN_HOME", &fresh).output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let hist = sb
        .command(&["plan", "history", "--json"])
        .env("CAIRN_HOME", &fresh)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&hist.stdout).contains(plan),
        "{:?}",
        text(&hist)
    );
    ok(&["manager-snapshot", "delete", "m1", "--store", url], &[]);
}
