//! Command-line behaviour: parameters, secrets, plans, exit codes.

use super::helpers::*;

#[test]
fn every_plan_file_parses_and_is_shipped() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plans");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let plan = cairn::plan::Plan::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(p.file_stem().unwrap().to_str().unwrap(), plan.name);
        names.push(plan.name);
    }
    names.sort();
    let mut shipped: Vec<String> = cairn::plan::SHIPPED
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    shipped.sort();
    assert_eq!(names, shipped, "plans/ and the shipped list differ");
}

#[test]
fn unknown_and_missing_parameters_are_refused_before_anything_runs() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 10);
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        src.to_str().unwrap(),
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "SNAPSHOTNAME=typo",
        "-p",
        "BOGUS=1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let (_, err) = text(&out);
    assert!(
        err.contains("SNAPSHOTNAME") && err.contains("BOGUS"),
        "{err}"
    );
    assert!(
        err.contains("missing required parameter(s): SNAPSHOT_NAME"),
        "{err}"
    );
    // No run was recorded, the store was not created.
    let hist = sb.ok(&["plan", "history", "--json"]);
    assert_eq!(text(&hist).0.trim(), "[]");
    assert!(!sb.path("store").exists());
    // A value that fails its pattern is named too.
    let out = sb.run(&[
        "plan",
        "start",
        "backup-local",
        "--cluster",
        src.to_str().unwrap(),
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "SNAPSHOT_NAME=../escape",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("SNAPSHOT_NAME"));
    assert!(!sb.path("store").exists());
}

const SECRET: &str = "tOpS3cr3t-Zq8Yw1";

fn secret_plan(sb: &Sandbox) {
    let base = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/backup-local.toml"),
    )
    .unwrap();
    let plan = base
        .replace("name = \"backup-local\"", "name = \"backup-secret\"")
        .replace(
            "[parameters.BACKUP_DIR]",
            "[parameters.API_TOKEN]\nrequired = true\nsecret = true\nenv = true\n\n[parameters.BACKUP_DIR]",
        );
    std::fs::create_dir_all(sb.path("plans")).unwrap();
    std::fs::write(sb.path("plans/backup-secret.toml"), plan).unwrap();
}

#[test]
fn a_secret_never_appears_in_output_state_or_json() {
    let sb = Sandbox::new();
    secret_plan(&sb);
    for i in 0..2 {
        fill_node(&sb.path(&format!("n{i}")), i, 10);
    }
    // Node 0's hook prints the secret; node 1's hook fails with it in its message.
    let mut cluster = String::from("name = \"s\"\nhook_secrets = [\"API_TOKEN\"]\n");
    cluster.push_str("[[nodes]]\nindex = 0\ndata_dir = \"n0\"\npre_hook = [\"sh\", \"-c\", \"echo token=$API_TOKEN; echo err-token=$API_TOKEN >&2\"]\n");
    cluster.push_str("[[nodes]]\nindex = 1\ndata_dir = \"n1\"\npre_hook = [\"sh\", \"-c\", \"echo failing with $API_TOKEN >&2; exit 3\"]\n");
    std::fs::write(sb.path("c.toml"), cluster).unwrap();
    std::fs::write(sb.path("token"), format!("{SECRET}\n")).unwrap();

    let mut outputs = Vec::new();
    // Secret from a file, verbose logs, JSON summary.
    let out = sb.run(&[
        "--plans-dir",
        "plans",
        "-v",
        "--json",
        "plan",
        "start",
        "backup-secret",
        "--cluster",
        "c.toml",
        "-p",
        "SNAPSHOT_NAME=s1",
        "-p",
        "BACKUP_DIR=store",
        "-p",
        "API_TOKEN=@token",
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let (stdout, stderr) = text(&out);
    assert!(
        stderr.contains("token=********"),
        "the hook ran and its output was redacted: {stderr}"
    );
    assert!(stderr.contains("failing with ********"), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(summary["status"], "FAILED");
    outputs.push(stdout);
    outputs.push(stderr);
    // Secret from the command line and from the environment.
    let out = sb.run(&[
        "--plans-dir",
        "plans",
        "-v",
        "plan",
        "start",
        "backup-secret",
        "--cluster",
        "c.toml",
        "-p",
        "SNAPSHOT_NAME=s2",
        "-p",
        "BACKUP_DIR=store",
        "-p",
        &format!("API_TOKEN={SECRET}"),
    ]);
    outputs.extend([text(&out).0, text(&out).1]);
    let out = sb
        .command(&[
            "--plans-dir",
            "plans",
            "-v",
            "plan",
            "start",
            "backup-secret",
            "--cluster",
            "c.toml",
            "-p",
            "SNAPSHOT_NAME=s3",
            "-p",
            "BACKUP_DIR=store",
        ])
        .env("API_TOKEN", SECRET)
        .output()
        .unwrap();
    outputs.extend([text(&out).0, text(&out).1]);
    // Every way of reading state back.
    for args in [
        vec!["plan", "status", "1"],
        vec!["plan", "status", "--json", "2"],
        vec!["plan", "history", "--json"],
        vec!["plan", "history"],
    ] {
        let out = sb.ok(&args);
        outputs.extend([text(&out).0, text(&out).1]);
    }
    let status = sb.ok(&["plan", "status", "--json", "3"]);
    assert!(
        text(&status).0.contains("\"API_TOKEN\":\"********\""),
        "{}",
        text(&status).0
    );
    for o in &outputs {
        assert!(!o.contains(SECRET), "secret leaked in: {o}");
    }
    // The state store files, byte for byte (the WAL included).
    let mut files = 0;
    for e in std::fs::read_dir(sb.path("home")).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        files += 1;
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "secret stored in the state store"
        );
    }
    assert!(files >= 1);
}

#[test]
fn plan_list_and_show() {
    let sb = Sandbox::new();
    let out = sb.ok(&["plan", "list"]);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("backup-local") && stdout.contains("restore-local"));
    let out = sb.ok(&["plan", "show", "restore-local", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["on_failure"][0]["action"], "discard-staging");
    let out = sb.run(&["plan", "show", "nope"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A store that does not exist is an error for the commands that read one (exit
/// 5, naming it), not an empty list.
#[test]
fn a_missing_directory_store_is_not_found_not_empty() {
    let sb = Sandbox::new();
    for args in [
        vec!["snapshots", "list", "--store", "no/such/dir"],
        vec!["snapshots", "verify", "s", "--store", "no/such/dir"],
        vec!["snapshots", "last", "--store", "no/such/dir"],
    ] {
        let out = sb.run(&args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {:?}", text(&out));
        let (so, err) = text(&out);
        assert!(err.contains("does not exist"), "{args:?}: {err}");
        assert!(!so.contains("no snapshots"), "{args:?}: {so}");
    }
    assert!(!sb.path("no").exists(), "the store was created by a read");
    // An existing, empty store is listed as empty.
    std::fs::create_dir_all(sb.path("empty")).unwrap();
    let out = sb.ok(&["snapshots", "list", "--store", "empty"]);
    assert!(text(&out).0.contains("no snapshots"));
}

/// `snapshots list` is in time order (oldest first) under a header, and its JSON
/// says bytes, times and duration.
#[test]
fn snapshots_list_is_in_time_order_with_a_header_and_complete_json() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    for (i, name) in ["c-first", "a-second", "b-third"].iter().enumerate() {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        sb.ok(&[
            "plan",
            "start",
            "backup-local",
            "-q",
            "--cluster",
            src.to_str().unwrap(),
            "-p",
            &format!("SNAPSHOT_NAME={name}"),
            "-p",
            "BACKUP_DIR=store",
        ]);
    }
    let out = sb.ok(&["snapshots", "list", "--store", "store"]);
    let (so, _) = text(&out);
    let lines: Vec<&str> = so.lines().collect();
    assert!(lines[0].starts_with("SNAPSHOT"), "{so}");
    assert!(
        lines[0].contains("FINISHED") && lines[0].contains("STORED"),
        "{so}"
    );
    let order: Vec<&str> = lines[1..]
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(order, ["c-first", "a-second", "b-third"], "{so}");
    let out = sb.ok(&["snapshots", "list", "--store", "store", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &v[0];
    assert_eq!(first["name"], "c-first");
    assert!(first["bytes"].as_u64().unwrap() > 0, "{first}");
    assert!(first["stored_bytes"].as_u64().unwrap() > 0, "{first}");
    assert!(first["started_at"].is_string(), "{first}");
    assert!(first["duration_secs"].is_i64(), "{first}");
}

/// Without --home or CAIRN_HOME the state lives in the per-user state dir, so
/// runs are found from any working directory, and a new home is announced; a
/// `./.cairn` that holds a state (the first releases' default) is still used.
#[test]
fn the_default_state_home_is_per_user_and_announced() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 1000);
    let user = sb.path("user");
    std::fs::create_dir_all(sb.path("elsewhere")).unwrap();
    let run = |cwd: &std::path::Path, args: &[&str]| {
        sb.command(args)
            .current_dir(cwd)
            .env_remove("CAIRN_HOME")
            .env_remove("XDG_STATE_HOME")
            .env("HOME", &user)
            .output()
            .unwrap()
    };
    let out = run(
        sb.dir.path(),
        &[
            "plan",
            "start",
            "backup-local",
            "-q",
            "--cluster",
            src.to_str().unwrap(),
            "-p",
            "SNAPSHOT_NAME=s",
            "-p",
            "BACKUP_DIR=store",
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let home = user.join(".local/state/cairn");
    assert!(
        text(&out)
            .1
            .contains(&format!("new state home {}", home.display())),
        "{:?}",
        text(&out)
    );
    assert!(home.join("state.db").is_file());
    assert!(
        !sb.path(".cairn").exists(),
        "a home was made in the working directory"
    );
    let out = run(&sb.path("elsewhere"), &["plan", "history"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.contains("backup-local"), "{:?}", text(&out));
    assert!(!text(&out).1.contains("new state home"), "{:?}", text(&out));
    // A first-release home in the working directory keeps being used.
    let legacy = sb.path("legacy");
    let out = sb
        .command(&["plan", "history"])
        .env("CAIRN_HOME", legacy.join(".cairn"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = run(&legacy, &["plan", "history"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(!text(&out).0.contains("backup-local"), "{:?}", text(&out));
    assert!(!text(&out).1.contains("new state home"), "{:?}", text(&out));
}

/// Output into a closed pipe (`cairn … | head -0`) ends the output, not the
/// command: no panic, exit 0.
#[test]
fn a_closed_stdout_is_not_a_crash() {
    let sb = Sandbox::new();
    for args in [vec!["plan", "list"], vec!["plan", "show", "backup-local"]] {
        let mut child = sb
            .command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let (_, err) = text(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// A store that cannot be used fails in one line that says why, with no SDK
/// internals and no colour codes (stderr is no terminal): missing credentials
/// fail at once (no retry makes them appear), an endpoint nobody listens on
/// names the refusal.
#[test]
fn store_errors_are_one_clear_line_and_missing_credentials_fail_fast() {
    let sb = Sandbox::new();
    let home = sb.path("user-home");
    std::fs::create_dir_all(&home).unwrap();
    let base = |c: &mut std::process::Command| {
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.env("HOME", &home)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
            .env("AWS_REGION", "us-east-1")
            .env_remove("NO_COLOR");
    };
    let started = std::time::Instant::now();
    let mut c = sb.command(&["snapshots", "list", "--store", "s3://bkt/p"]);
    base(&mut c);
    let out = c.output().unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "missing credentials took {:?}",
        started.elapsed()
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no AWS credentials were found"), "{err}");
    assert!(!err.contains("retrying"), "{err}");

    let mut c = sb.command(&["snapshots", "list", "--store", "s3://bkt/p"]);
    base(&mut c);
    c.env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-7Qx");
    let out = c.output().unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "cairn: store list: cannot connect to the S3 endpoint: Connection refused"
        ),
        "{err}"
    );
    for noise in ["DispatchFailure", "ConnectorError", "\u{1b}["] {
        assert!(!err.contains(noise), "{noise:?} in {err}");
    }
    assert!(!err.contains("not-a-real-secret-7Qx"), "{err}");
}

/// A dry run checks everything a run would and says what it would write where,
/// and changes nothing: not the target, not the store, not the state home (no run
/// is recorded). Refused as the run would be, with the same exit code.
#[test]
fn a_dry_run_checks_and_reports_but_changes_nothing() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 1000);
    let args = |plan: &str, cluster: &std::path::Path, snap: &str, extra: &[&str]| {
        start_args(plan, cluster, snap, extra)
    };
    let out = sb.run_v(&args("backup-local", &src, "s", &[]));
    assert!(out.status.success(), "{:?}", text(&out));
    let everything = || exact_tree(sb.dir.path());
    let before = everything();

    // A restore into a new dir: what goes where, how much; nothing made.
    let mut a = args("restore-local", &src, "s", &["RESTORE_DIR=tgt"]);
    a.push("--dry-run".into());
    let out = sb.run_v(&a);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so} {se}");
    assert!(so.contains("dry run of restore-local"), "{so}");
    assert!(
        so.contains("node 0 (local)") && so.contains("node 1 (local)"),
        "{so}"
    );
    assert!(so.contains("keyspace(s) app, metrics"), "{so}");
    assert!(
        so.contains("would make") && so.contains("tgt/node-1"),
        "{so}"
    );
    assert!(so.contains("total: "), "{so}");
    assert!(!sb.path("tgt").exists());
    assert_eq!(everything(), before, "the dry run changed something");

    // Onto the source itself: refused as the run would be (exit 3), by -p.
    let out = sb.run_v(&args("restore-local", &src, "s", &["DRY_RUN=true"]));
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("already exist"), "{:?}", text(&out));
    assert_eq!(
        everything(),
        before,
        "the refused dry run changed something"
    );

    // A backup: the keyspaces it would read; no snapshot, no probe object.
    let mut a = args("backup-local", &src, "s2", &[]);
    a.push("--dry-run".into());
    let out = sb.run_v(&a);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so} {se}");
    assert!(so.contains("would back up snapshot s2"), "{so}");
    assert_eq!(everything(), before, "the backup dry run changed something");
    // And a backup onto a snapshot that exists is refused.
    let mut a = args("backup-local", &src, "s", &[]);
    a.push("--dry-run".into());
    let out = sb.run_v(&a);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let out = sb.run_v(&args("restore-local", &src, "s", &["DRY_RUN=maybe"]));
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    let h = sb.ok(&["plan", "history"]);
    assert_eq!(
        text(&h)
            .0
            .lines()
            .filter(|l| l.contains("restore-local"))
            .count(),
        0,
        "a dry run was recorded: {:?}",
        text(&h)
    );
}

/// Help that answers: `plan start PLAN --help` lists the plan's parameters with
/// what each value must be; a bad value is explained in words, not as a regex;
/// completions and a manual page come from the same command tree.
#[test]
fn help_lists_plan_parameters_and_completions_and_man_are_printed() {
    let sb = Sandbox::new();
    let out = sb.ok(&["plan", "start", "restore-s3", "--help"]);
    let (so, _) = text(&out);
    assert!(so.contains("--dry-run"), "{so}");
    assert!(so.contains("Parameters of plan restore-s3"), "{so}");
    assert!(
        so.contains("SNAPSHOT_NAME") && so.contains("[required]"),
        "{so}"
    );
    assert!(so.contains("value: serial or parallel"), "{so}");
    assert!(!so.contains("[default \"\"]"), "{so}");

    let out = sb.ok(&["plan", "show", "restore-s3"]);
    let (so, _) = text(&out);
    assert!(!so.contains("EachNode") && !so.contains(" on Once"), "{so}");
    assert!(so.contains("stage-node on each node"), "{so}");

    let src = source_cluster(sb.dir.path(), 1, 10);
    let out = sb.run_v(&start_args(
        "backup-local",
        &src,
        "s",
        &["STRATEGY=sideways"],
    ));
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    let (_, se) = text(&out);
    assert!(
        se.contains("STRATEGY: value \"sideways\" is not valid: give serial or parallel"),
        "{se}"
    );
    assert!(!se.contains("^("), "{se}");

    for shell in ["bash", "zsh", "fish"] {
        let out = sb.ok(&["completions", shell]);
        let (so, _) = text(&out);
        assert!(
            so.contains("snapshots") && so.contains("manager-snapshot"),
            "{shell}: {so}"
        );
    }
    let out = sb.ok(&["man"]);
    let (so, _) = text(&out);
    assert!(so.contains(".TH cairn 1"), "{so}");
    assert!(!sb.path("home").exists(), "help made a state home");
}

/// On a terminal (tmux), a parallel three-node backup draws its bars and leaves
/// none behind: the screen at the end holds the run's lines and the summary,
/// no frozen bar.
#[test]
fn a_parallel_backup_on_a_terminal_leaves_no_bar_and_ends_with_a_summary() {
    let Some(tmux) = super::servers::tool("CAIRN_TEST_TMUX") else {
        return;
    };
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 3 << 20);
    let socket = format!("cairn-test-{}", std::process::id());
    let script = sb.path("run.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncd {dir:?}\nCAIRN_HOME={home:?} {bin:?} plan start backup-local --cluster {src:?} -p SNAPSHOT_NAME=s -p BACKUP_DIR=store -p STRATEGY=parallel -p MAX_CONCURRENCY=3 -p MAX_BANDWIDTH=4MiB\necho \"exit-$?-done\"\nsleep 60\n",
            dir = sb.dir.path(),
            home = sb.path("home"),
            bin = env!("CARGO_BIN_EXE_cairn"),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tm = |args: &[&str]| {
        std::process::Command::new(&tmux)
            .args(["-L", &socket])
            .args(args)
            .env_remove("NO_COLOR")
            .output()
            .unwrap()
    };
    let started = tm(&[
        "new-session",
        "-d",
        "-x",
        "160",
        "-y",
        "50",
        "-s",
        "t",
        script.to_str().unwrap(),
    ]);
    assert!(started.status.success(), "{:?}", text(&started));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut saw_bar = false;
    let screen = loop {
        let out = tm(&["capture-pane", "-p", "-t", "t"]);
        let screen = String::from_utf8_lossy(&out.stdout).into_owned();
        saw_bar |= screen.contains("] ") && screen.contains("backup/backup-node");
        if screen.contains("-done") {
            break screen;
        }
        if std::time::Instant::now() > deadline {
            tm(&["kill-server"]);
            panic!("the backup did not end:\n{screen}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    tm(&["kill-server"]);
    assert!(screen.contains("exit-0-done"), "{screen}");
    assert!(saw_bar, "no progress bar was drawn on the terminal");
    assert!(
        screen.contains("3 node(s),") && screen.contains("stored"),
        "{screen}"
    );
    for line in screen.lines() {
        assert!(
            !(line.contains('[') && line.contains("] ") && line.contains("eta")),
            "a bar was left on the screen: {line:?}\n{screen}"
        );
    }
}

/// README's exit-code table, command by command: every code it lists is what
/// the commands return, and every code is exercised here (130, a cancelled run, in
/// `resume::` and `faults::`, which stop runs mid-way).
#[test]
fn the_exit_code_table_holds_command_by_command() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 10_000);
    let cluster = src.to_str().unwrap().to_string();
    sb.ok(&[
        "plan",
        "start",
        "backup-local",
        "-q",
        "--cluster",
        &cluster,
        "-p",
        "SNAPSHOT_NAME=snap",
        "-p",
        "BACKUP_DIR=store",
    ]);
    let tgt = target_cluster(sb.dir.path(), "tgt", 2);
    let tgt = tgt.to_str().unwrap().to_string();
    std::fs::create_dir_all(sb.path("empty-store")).unwrap();
    std::fs::write(sb.path("broken.toml"), "name = \n").unwrap();
    let start = |plan: &str, cluster: &str, params: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["plan", "start", plan, "-q", "--cluster", cluster]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for p in params {
            v.push("-p".into());
            v.push(p.to_string());
        }
        v
    };
    let s = |a: &[&str]| -> Vec<String> { a.iter().map(|s| s.to_string()).collect() };
    let future = "2099-01-01T00:00:00Z";
    let mut table: Vec<(i32, Vec<String>)> = vec![
        (0, s(&["plan", "list"])),
        (0, s(&["plan", "show", "restore-s3"])),
        (0, s(&["plan", "history"])),
        (0, s(&["plan", "status"])),
        (0, s(&["snapshots", "list", "--store", "store"])),
        (
            0,
            s(&["snapshots", "verify", "snap", "--store", "store", "-q"]),
        ),
        (
            0,
            s(&["snapshots", "last", "--store", "store", "--max-age", "1h"]),
        ),
        (0, s(&["manager-snapshot", "list", "--store", "store"])),
        // 2: bad input, whichever command it reaches.
        (2, s(&["no-such-command"])),
        (2, s(&["plan", "status", "first"])),
        (2, s(&["plan", "show", "no-such-plan"])),
        (2, start("no-such-plan", &cluster, &["SNAPSHOT_NAME=x"])),
        (
            2,
            start(
                "backup-local",
                "missing.toml",
                &["SNAPSHOT_NAME=x", "BACKUP_DIR=store"],
            ),
        ),
        (
            2,
            start(
                "backup-local",
                "broken.toml",
                &["SNAPSHOT_NAME=x", "BACKUP_DIR=store"],
            ),
        ),
        (
            2,
            start(
                "backup-local",
                &cluster,
                &["SNAPSHOT_NAME=x", "BACKUP_DIR=store", "BOGUS=1"],
            ),
        ),
        (2, start("backup-local", &cluster, &["SNAPSHOT_NAME=x"])),
        (
            2,
            start(
                "backup-local",
                &cluster,
                &["SNAPSHOT_NAME=.cairn-x", "BACKUP_DIR=store"],
            ),
        ),
        (
            2,
            start(
                "backup-local",
                &cluster,
                &["SNAPSHOT_NAME=x", "STORE=no-profile"],
            ),
        ),
        (
            2,
            start(
                "restore-local",
                &tgt,
                &["SNAPSHOT_NAME=snap", "BACKUP_DIR=store", "NODES=7"],
            ),
        ),
        (
            2,
            start(
                "backup-local",
                &cluster,
                &["SNAPSHOT_NAME=x", "BACKUP_DIR=store", "ENCRYPT_TO=age1nope"],
            ),
        ),
        (
            2,
            start(
                "backup-local",
                &cluster,
                &[
                    "SNAPSHOT_NAME=x",
                    "BACKUP_DIR=store",
                    "ENCRYPT_TO=age1nope",
                    "ENCRYPT_PASSPHRASE=long enough",
                ],
            ),
        ),
        (
            2,
            start(
                "restore-local",
                &tgt,
                &[
                    "SNAPSHOT_NAME=snap",
                    "BACKUP_DIR=store",
                    "AGE_IDENTITY=not a key file",
                ],
            ),
        ),
        (
            2,
            s(&[
                "snapshots",
                "prune",
                "--store",
                "store",
                "--policy",
                "often",
            ]),
        ),
        (
            2,
            s(&["snapshots", "last", "--store", "store", "--max-age", "soon"]),
        ),
        (2, s(&["snapshots", "list", "--store", "ftp://host/x"])),
        (2, s(&["snapshots", "list", "--store", "no-profile-no-dir"])),
        // 3: refused by a pre-flight check (the source nodes hold the keyspaces).
        (
            3,
            start(
                "restore-local",
                &cluster,
                &["SNAPSHOT_NAME=snap", "BACKUP_DIR=store"],
            ),
        ),
        // 5: not found.
        (5, s(&["plan", "status", "99"])),
        (5, s(&["plan", "resume", "99"])),
        (5, s(&["snapshots", "verify", "nope", "--store", "store"])),
        (5, s(&["snapshots", "delete", "nope", "--store", "store"])),
        (5, s(&["snapshots", "list", "--store", "no/such/dir"])),
        (5, s(&["snapshots", "last", "--store", "empty-store"])),
        (
            5,
            s(&[
                "manager-snapshot",
                "download",
                "nope",
                "-o",
                "m.zip",
                "--store",
                "store",
            ]),
        ),
        (
            5,
            start(
                "restore-local",
                &tgt,
                &["SNAPSHOT_NAME=nope", "BACKUP_DIR=store"],
            ),
        ),
        // 6: the newest complete snapshot is older than --max-age.
        (
            6,
            s(&[
                "snapshots",
                "last",
                "--store",
                "store",
                "--max-age",
                "1h",
                "--now",
                future,
            ]),
        ),
    ];
    let mut seen = std::collections::BTreeSet::new();
    let mut wrong = Vec::new();
    let mut check = |table: &[(i32, Vec<String>)]| {
        for (want, args) in table {
            let out = sb.run_v(args);
            seen.insert(*want);
            if out.status.code() != Some(*want) {
                wrong.push(format!(
                    "{args:?}: exit {:?}, README says {want}: {}",
                    out.status.code(),
                    text(&out).1.trim()
                ));
            }
        }
    };
    check(&table);
    // 4: a lock held by another host's run.
    lock_file(
        &sb.path("store"),
        "snap",
        "backup",
        chrono::Utc::now().timestamp(),
    );
    table = vec![
        (4, s(&["snapshots", "delete", "snap", "--store", "store"])),
        (
            4,
            start(
                "backup-local",
                &cluster,
                &["SNAPSHOT_NAME=snap", "BACKUP_DIR=store"],
            ),
        ),
        (
            4,
            start(
                "restore-local",
                &tgt,
                &["SNAPSHOT_NAME=snap", "BACKUP_DIR=store"],
            ),
        ),
    ];
    check(&table);
    std::fs::remove_dir_all(sb.path("store/.cairn-locks")).unwrap();
    // 1: the command ran and failed — verify reads a flipped byte.
    let obj = sb.path("store/snap/node-0.tar.gz");
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&obj, bytes).unwrap();
    table = vec![(
        1,
        s(&[
            "snapshots",
            "verify",
            "snap",
            "--store",
            "store",
            "--read-data",
            "-q",
        ]),
    )];
    check(&table);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        !sb.path("tgt").exists(),
        "a refused or invalid restore wrote"
    );

    // Every code of README's table is exercised (130 elsewhere, see above).
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("### Exit codes").nth(1).unwrap();
    let listed: std::collections::BTreeSet<i32> = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            l.trim_start_matches('|')
                .split('|')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    seen.insert(130);
    assert_eq!(listed, seen, "README's exit codes vs the ones exercised");
}
