//! `cairn serve`: the plans HTTP API, its events, errors, auth and TLS, metrics,
//! the status page in a real browser, and the CLI as the server's client.

use super::helpers::*;
use super::servers::tool;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A `cairn serve` of a sandbox, on a free loopback port (or as `listen` says).
struct Served {
    child: Child,
    url: String,
}

impl Served {
    fn start(sb: &Sandbox, cluster: &Path, extra: &[&str]) -> Served {
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            cluster.to_str().unwrap(),
            "--store",
            "store",
        ];
        args.extend_from_slice(extra);
        Self::spawn(sb, &args)
    }

    fn spawn(sb: &Sandbox, args: &[&str]) -> Served {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(sb.path("serve.log"))
            .unwrap();
        let mut child = sb
            .command(args)
            .env("CAIRN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .rsplit_once("listening on ")
            .map(|(_, u)| u.to_string())
            .unwrap_or_else(|| {
                panic!(
                    "serve did not start: {line:?}; log: {}",
                    std::fs::read_to_string(sb.path("serve.log")).unwrap_or_default()
                )
            });
        Served { child, url }
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP client for the tests (reqwest on a runtime of its own).
struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Http {
        Self::with_ca(None)
    }

    fn with_ca(ca: Option<&Path>) -> Http {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = ca {
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Http {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .build()
                .unwrap(),
        }
    }

    /// (status, body) of a request; `Err` if no answer came at all.
    fn try_call(
        &self,
        method: &str,
        url: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> Result<(u16, String), String> {
        self.rt.block_on(async {
            let mut r = match method {
                "POST" => self.client.post(url),
                _ => self.client.get(url),
            };
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            if let Some(b) = body {
                r = r.header("content-type", "application/json").body(b);
            }
            let res = r.send().await.map_err(|e| format!("{e:?}"))?;
            let status = res.status().as_u16();
            Ok((status, res.text().await.map_err(|e| e.to_string())?))
        })
    }

    fn call(&self, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
        let (s, text) = self
            .try_call(method, url, body.map(|b| b.to_string()), None)
            .unwrap();
        (
            s,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn get(&self, url: &str) -> Value {
        let (s, v) = self.call("GET", url, None);
        assert_eq!(s, 200, "GET {url}: {v}");
        v
    }

    /// The events of a run from its stream, up to and including `run_finished`.
    fn events(&self, url: &str) -> Vec<Value> {
        self.rt.block_on(async {
            let mut res = self.client.get(url).send().await.unwrap();
            assert_eq!(res.status().as_u16(), 200);
            let ct = res.headers()["content-type"].to_str().unwrap().to_string();
            assert!(ct.starts_with("text/event-stream"), "{ct}");
            let mut buf = String::new();
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(180);
            while let Some(chunk) = tokio::time::timeout_at(deadline.into(), res.chunk())
                .await
                .unwrap()
                .unwrap()
            {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    for l in frame.lines() {
                        if let Some(d) = l.strip_prefix("data: ") {
                            out.push(serde_json::from_str::<Value>(d).unwrap());
                        }
                    }
                }
            }
            out
        })
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn step_status(view: &Value, step: &str) -> String {
    view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == step)
        .map(|s| s["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Wait for a run the server runs to end; its view.
fn wait_done(http: &Http, base: &str, run: i64) -> Value {
    let mut v = Value::Null;
    wait_for(&format!("run {run} to end"), || {
        v = http.get(&format!("{base}/v1/runs/{run}"));
        v["live"] == false && !v["exit_code"].is_null()
    });
    v
}

fn start(http: &Http, base: &str, plan: &str, params: Value) -> i64 {
    let (s, v) = http.call(
        "POST",
        &format!("{base}/v1/plans/{plan}/start"),
        Some(params),
    );
    assert_eq!(s, 202, "start {plan}: {v}");
    v["run"].as_i64().unwrap()
}

fn restore_and_compare(sb: &Sandbox, snap: &str, extra: &[&str]) {
    let target = target_cluster(sb.dir.path(), &format!("t-{snap}"), 3);
    let mut args = start_args("restore-local", &target, snap, extra);
    args.extend(["-p".into(), format!("RESTORE_DIR=r-{snap}")]);
    let out = sb.run_v(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_restored(sb, &format!("r-{snap}"), 3);
}

#[test]
fn api_starts_a_plan_streams_its_events_and_agrees_with_plan_status() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 200_000);
    let srv = Served::start(&sb, &src, &[]);
    let http = Http::new();
    let base = &srv.url;

    let plans = http.get(&format!("{base}/v1/plans"));
    assert!(
        plans
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "backup-local"),
        "{plans}"
    );
    // Never run: its steps, all PENDING.
    let p = http.get(&format!("{base}/v1/plans/backup-local"));
    assert_eq!(p["status"], "PENDING");
    assert!(p["run"].is_null());
    let names: Vec<&str> = p["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ph| ph["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"backup"), "{p}");

    let run = start(
        &http,
        base,
        "backup-local",
        json!({"SNAPSHOT_NAME": "s1", "BACKUP_DIR": "store", "STRATEGY": "parallel", "MAX_BANDWIDTH": "1MiB/s"}),
    );
    let events = http.events(&format!("{base}/v1/runs/{run}/events"));
    assert_eq!(events[0]["type"], "snapshot", "{:?}", events[0]);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "run_finished", "{last}");
    assert_eq!(last["status"], "COMPLETE");
    assert_eq!(last["exit_code"], 0);
    assert!(
        last["summary"]["bytes"].as_u64().unwrap() > 600_000,
        "{last}"
    );
    for i in 0..3 {
        let id = format!("backup/backup-node/node-{i}");
        let of = |t: &str| {
            events
                .iter()
                .position(|e| e["type"] == t && e["step"] == id.as_str())
        };
        let (Some(a), Some(b)) = (of("step_started"), of("step_finished")) else {
            panic!("no start and end of {id} in the events");
        };
        assert!(a < b);
        assert!(events[b]["status"] == "COMPLETE");
    }
    assert!(events.iter().all(|e| e["run"] == run));

    // The API's view is what `plan status` says, here and through --server.
    let api = http.get(&format!("{base}/v1/runs/{run}"));
    let local = sb.ok(&["plan", "status", "--json", &run.to_string()]);
    let local: Value = serde_json::from_slice(&local.stdout).unwrap();
    let pairs = |steps: &Value| -> Vec<(String, String)> {
        steps
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().into(),
                    s["status"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(pairs(&api["steps"]), pairs(&local["steps"]));
    assert_eq!(api["run"]["status"], local["run"]["status"]);
    assert_eq!(api["run"]["status"], "COMPLETE");
    let remote = sb.ok(&[
        "--server",
        base,
        "plan",
        "status",
        "--json",
        &run.to_string(),
    ]);
    let remote: Value = serde_json::from_slice(&remote.stdout).unwrap();
    assert_eq!(remote, local);
    let p = http.get(&format!("{base}/v1/plans/backup-local"));
    assert_eq!(p["status"], "COMPLETE");
    assert_eq!(p["run"], run);

    // What the server backed up restores byte for byte.
    restore_and_compare(&sb, "s1", &[]);
    assert!(srv.stop().success());
}

#[test]
fn api_errors_are_json_that_name_the_problem() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 0);
    let srv = Served::start(&sb, &src, &[]);
    let http = Http::new();
    let base = &srv.url;
    let post = |path: &str, body: Option<String>| {
        let (s, t) = http
            .try_call("POST", &format!("{base}{path}"), body, None)
            .unwrap();
        (
            s,
            serde_json::from_str::<Value>(&t).unwrap_or(Value::String(t)),
        )
    };

    let (s, v) = post("/v1/plans/nope/start", Some("{}".into()));
    assert_eq!(s, 404);
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    assert_eq!(v["exit_code"], 2);

    let (s, v) = post(
        "/v1/plans/backup-local/start",
        Some(json!({"SNAPSHOT_NAME": "x", "BACKUP_DIR": "store", "BOGUS": "1"}).to_string()),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("BOGUS"), "{v}");
    assert_eq!(v["exit_code"], 2);
    assert_eq!(v["outcome"], "invalid");

    let (s, v) = post(
        "/v1/plans/backup-local/start",
        Some(json!({"BACKUP_DIR": "store"}).to_string()),
    );
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap().contains("SNAPSHOT_NAME"),
        "{v}"
    );

    let (s, v) = post(
        "/v1/plans/backup-local/start",
        Some("SNAPSHOT_NAME=x".into()),
    );
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");
    let (s, v) = post(
        "/v1/plans/backup-local/start",
        Some(json!({"SNAPSHOT_NAME": ["a"]}).to_string()),
    );
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap().contains("SNAPSHOT_NAME"),
        "{v}"
    );

    // A body over the limit is refused before it is read.
    let big = json!({"SNAPSHOT_NAME": "x", "TAGS": "t".repeat(70 * 1024)}).to_string();
    let (s, v) = post("/v1/plans/backup-local/start", Some(big));
    assert_eq!(s, 413);
    assert_eq!(v["exit_code"], 2, "{v}");

    // What a web page elsewhere could make a browser send: a form post, a post
    // from another origin, a name that resolves to loopback (DNS rebinding).
    let raw = |headers: &[(&str, &str)], body: &str| -> u16 {
        http.rt.block_on(async {
            let mut r = http
                .client
                .post(format!("{base}/v1/plans/backup-local/start"));
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let ok_body = json!({"SNAPSHOT_NAME": "csrf", "BACKUP_DIR": "store"}).to_string();
    assert_eq!(
        raw(
            &[("content-type", "application/x-www-form-urlencoded")],
            "SNAPSHOT_NAME=csrf"
        ),
        415
    );
    assert_eq!(raw(&[("content-type", "text/plain")], &ok_body), 415);
    assert_eq!(
        raw(
            &[
                ("content-type", "application/json"),
                ("origin", "http://evil.example")
            ],
            &ok_body
        ),
        403
    );
    assert_eq!(
        raw(
            &[
                ("content-type", "application/json"),
                ("host", "evil.example")
            ],
            &ok_body
        ),
        403
    );

    let (s, v) = http.call("GET", &format!("{base}/v1/runs/999"), None);
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["exit_code"], 5);
    // Whatever the router or an extractor refuses is JSON too.
    for (method, path, want) in [
        ("GET", "/v1/runs/abc", 400),
        ("GET", "/v1/nothing-here", 404),
        ("GET", "/v1/plans/backup-local/start", 405),
    ] {
        let (s, v) = http.call(method, &format!("{base}{path}"), None);
        assert_eq!(s, want, "{path}: {v}");
        assert!(
            v["error"].is_string() && v["exit_code"].is_number(),
            "{path}: {v}"
        );
    }
    // A name given twice is refused, not decided.
    let (s, v) = post(
        "/v1/plans/backup-local/start",
        Some(r#"{"SNAPSHOT_NAME":"a","SNAPSHOT_NAME":"b","BACKUP_DIR":"store"}"#.into()),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("more than once"),
        "{v}"
    );
    // A value is a value: never a file of the server's, whatever it looks like.
    std::fs::write(sb.path("private.txt"), "private-words-of-the-server\n").unwrap();
    let (s, v) = post(
        "/v1/plans/backup-local/start",
        Some(json!({"SNAPSHOT_NAME": "x", "BACKUP_DIR": "store", "MAX_BANDWIDTH": format!("@{}", sb.path("private.txt").display())}).to_string()),
    );
    assert_eq!(s, 400, "{v}");
    assert!(!v.to_string().contains("private-words"), "{v}");
    // Only stores of the server are listed, not any directory named, nor the
    // place a refused run named.
    let (s, v) = post(
        "/v1/plans/restore-local/start",
        Some(
            json!({"SNAPSHOT_NAME": "none", "BACKUP_DIR": "/etc", "RESTORE_DIR": "r"}).to_string(),
        ),
    );
    assert_eq!(s, 202, "{v}");
    let refused = v["run"].as_i64().unwrap();
    let v = wait_done(&http, base, refused);
    assert_ne!(v["exit_code"], 0, "{v}");
    for store in ["/etc", "file:///etc"] {
        let (s, v) = http.call("GET", &format!("{base}/v1/snapshots?store={store}"), None);
        assert_eq!(s, 403, "{store}: {v}");
    }
    let (s, v) = post("/v1/plans/backup-local/stop", None);
    assert_eq!(s, 409, "{v}");
    // None of the others recorded a run, and nothing was written.
    assert_eq!(
        http.get(&format!("{base}/v1/runs"))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(!sb.path("store").exists());
}

#[test]
fn a_secret_in_the_body_is_never_stored_logged_or_returned() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 0);
    let srv = Served::start(&sb, &src, &[]);
    let http = Http::new();
    let base = &srv.url;
    let secret = "pass-phrase-8f3K2-never-shown";
    // Subscribed before the run starts: every event of it.
    let all = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let http = Http::new();
            http.rt.block_on(async {
                let mut res = http
                    .client
                    .get(format!("{base}/v1/events"))
                    .send()
                    .await
                    .unwrap();
                let mut text = String::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                while let Ok(Ok(Some(c))) = tokio::time::timeout_at(deadline, res.chunk()).await {
                    text.push_str(&String::from_utf8_lossy(&c));
                    if text.contains("\"run_finished\"") {
                        break;
                    }
                }
                text
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        let run = start(
            &http,
            base,
            "backup-local",
            json!({"SNAPSHOT_NAME": "enc", "BACKUP_DIR": "store", "ENCRYPT_PASSPHRASE": secret}),
        );
        let v = wait_done(&http, base, run);
        assert_eq!(v["exit_code"], 0, "{v}");
        h.join().unwrap()
    });
    assert!(all.contains("run_finished"), "{all}");
    // The secret repeated in a parameter that is stored as given is refused.
    let (s, t) = http
        .try_call(
            "POST",
            &format!("{base}/v1/plans/backup-local/start"),
            Some(json!({"SNAPSHOT_NAME": "enc2", "BACKUP_DIR": "store", "ENCRYPT_PASSPHRASE": secret, "TAGS": secret}).to_string()),
            None,
        )
        .unwrap();
    assert_eq!(s, 400, "{t}");
    assert!(t.contains("TAGS"), "{t}");
    // In another case too (an age key is the same key in either case).
    let (s, t) = http
        .try_call(
            "POST",
            &format!("{base}/v1/plans/backup-local/start"),
            Some(json!({"SNAPSHOT_NAME": "enc3", "BACKUP_DIR": format!("st-{}", secret.to_uppercase()), "ENCRYPT_PASSPHRASE": secret}).to_string()),
            None,
        )
        .unwrap();
    assert_eq!(s, 400, "{t}");
    assert!(
        t.contains("BACKUP_DIR: holds the value of the secret"),
        "{t}"
    );
    assert!(!t.to_lowercase().contains(&secret.to_lowercase()), "{t}");
    let mut seen = vec![("events".to_string(), all)];
    for path in [
        "/v1/runs",
        "/v1/runs/1",
        "/v1/plans/backup-local",
        "/metrics",
        "/",
        "/v1/snapshots",
    ] {
        let (_, t) = http
            .try_call("GET", &format!("{base}{path}"), None, None)
            .unwrap();
        seen.push((path.to_string(), t));
    }
    // A resume of the complete run, its parameters echoed in an error.
    let (_, t) = http
        .try_call(
            "POST",
            &format!("{base}/v1/runs/1/resume"),
            Some(json!({"ENCRYPT_PASSPHRASE": secret}).to_string()),
            None,
        )
        .unwrap();
    seen.push(("resume".into(), t));
    assert!(srv.stop().success());
    seen.push((
        "log".into(),
        std::fs::read_to_string(sb.path("serve.log")).unwrap(),
    ));
    for f in std::fs::read_dir(sb.path("home")).unwrap() {
        let p = f.unwrap().path();
        seen.push((
            p.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(),
        ));
    }
    for (what, text) in &seen {
        assert!(!text.contains(secret), "the secret is in {what}");
        assert!(
            !text.contains("never-shown"),
            "part of the secret is in {what}"
        );
    }
    // It was used: the snapshot opens with it and only with it.
    let pf = sb.path("pass.txt");
    std::fs::write(&pf, secret).unwrap();
    restore_and_compare(&sb, "enc", &[&format!("AGE_PASSPHRASE=@{}", pf.display())]);
}

#[test]
fn stop_then_continue_through_the_plan_api_completes_the_same_runs() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 1_500_000);
    let srv = Served::start(&sb, &src, &[]);
    let http = Http::new();
    let base = &srv.url;
    let slow = |snap: &str| {
        let run = start(
            &http,
            base,
            "backup-local",
            json!({"SNAPSHOT_NAME": snap, "BACKUP_DIR": "store", "MAX_BANDWIDTH": "500KiB/s"}),
        );
        wait_for("node 0's upload to run", || {
            step_status(
                &http.get(&format!("{base}/v1/runs/{run}")),
                "backup/backup-node/node-0",
            ) == "RUNNING"
        });
        run
    };
    let (a, b) = (slow("sc"), slow("sc2"));
    // Two runs of the plan: the plan's stop names them rather than pick one.
    let (s, v) = http.call("POST", &format!("{base}/v1/plans/backup-local/stop"), None);
    assert_eq!(s, 409, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains(&a.to_string()) && e.contains(&b.to_string()),
        "{v}"
    );
    let (s, v) = http.call("POST", &format!("{base}/v1/runs/{b}/stop"), None);
    assert_eq!((s, v["status"].as_str()), (200, Some("CANCELLED")), "{v}");
    // One left: the plan's stop stops it.
    let (s, v) = http.call("POST", &format!("{base}/v1/plans/backup-local/stop"), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["run"], a);
    assert_eq!(v["status"], "CANCELLED", "{v}");
    for run in [a, b] {
        let v = http.get(&format!("{base}/v1/runs/{run}"));
        assert_eq!(v["exit_code"], 130, "{v}");
        assert_eq!(v["live"], false);
    }
    assert!(!sb.path("store/sc/manifest.json").exists());
    assert!(!sb.path("store/sc2/manifest.json").exists());
    // Continue: the plan's newest run (b), faster, to the end; then a by its id.
    let (s, v) = http.call(
        "POST",
        &format!("{base}/v1/plans/backup-local/continue"),
        Some(json!({"MAX_BANDWIDTH": ""})),
    );
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["run"], b);
    let (s, v) = http.call(
        "POST",
        &format!("{base}/v1/runs/{a}/resume"),
        Some(json!({"MAX_BANDWIDTH": ""})),
    );
    assert_eq!(s, 202, "{v}");
    for run in [a, b] {
        let v = wait_done(&http, base, run);
        assert_eq!(v["run"]["status"], "COMPLETE", "{v}");
        assert_eq!(v["exit_code"], 0);
        assert!(
            v["steps"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["status"] == "COMPLETE" || s["status"] == "SKIPPED"),
            "{v}"
        );
    }
    // Nothing left to continue.
    let (s, v) = http.call(
        "POST",
        &format!("{base}/v1/plans/backup-local/continue"),
        None,
    );
    assert_eq!(s, 409, "{v}");
    restore_and_compare(&sb, "sc", &[]);
    restore_and_compare(&sb, "sc2", &[]);
}

#[test]
fn sigterm_to_the_server_stops_its_runs_resumably() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 1_500_000);
    let srv = Served::start(&sb, &src, &[]);
    let http = Http::new();
    let base = srv.url.clone();
    // A remote CLI run: it follows the run to its end.
    let client = sb
        .command(&[
            "--server",
            &base,
            "plan",
            "start",
            "backup-local",
            "-q",
            "-p",
            "SNAPSHOT_NAME=st",
            "-p",
            "BACKUP_DIR=store",
            "-p",
            "MAX_BANDWIDTH=500KiB/s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = 1;
    wait_for("node 0's upload to run", || {
        let (s, v) = http.call("GET", &format!("{base}/v1/runs/{run}"), None);
        s == 200 && step_status(&v, "backup/backup-node/node-0") == "RUNNING"
    });
    let events = std::thread::spawn({
        let url = format!("{base}/v1/runs/{run}/events");
        move || Http::new().events(&url)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(srv.stop().success());
    // The stream told the end before it closed, and the client exits as a
    // local run stopped by a signal would.
    let events = events.join().unwrap();
    let last = events.last().unwrap();
    assert_eq!(last["type"], "run_finished", "{events:?}");
    assert_eq!(last["status"], "CANCELLED");
    let out = client.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{:?}", text(&out));
    let st = sb.ok(&["plan", "status", "--json", &run.to_string()]);
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["run"]["status"], "CANCELLED", "{st}");
    assert!(!sb.path("store/st/manifest.json").exists());
    // The CLI resumes what the server began.
    sb.ok(&["plan", "resume", "-q", &run.to_string()]);
    restore_and_compare(&sb, "st", &[]);
}

/// A CA and a certificate for 127.0.0.1 signed by it.
fn certificate(sb: &Sandbox, openssl: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(openssl)
            .args(args)
            .current_dir(sb.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {:?}", text(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=cairn test CA",
    ]);
    run(&a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&a);
    std::fs::write(
        sb.path("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    (sb.path("ca.pem"), sb.path("cert.pem"), sb.path("key.pem"))
}

#[test]
fn off_loopback_the_server_needs_a_token_and_tls() {
    let Some(openssl) = tool("CAIRN_TEST_OPENSSL") else {
        return;
    };
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 0);
    let c = src.to_str().unwrap();
    // Without them it does not start, and says what is missing.
    let out = sb.run(&["serve", "--listen", "0.0.0.0:0", "--cluster", c]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    let (_, err) = text(&out);
    assert!(
        err.contains("--token-file") && err.contains("--tls-cert"),
        "{err}"
    );

    let (ca, cert, key) = certificate(&sb, &openssl);
    let token = "tok-5vQ9xw-Lr7m2-secret-value";
    std::fs::write(sb.path("token"), format!("{token}\n")).unwrap();
    let srv = Served::spawn(
        &sb,
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--cluster",
            c,
            "--token-file",
            "token",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(srv.url.starts_with("https://"), "{}", srv.url);
    let port = srv.url.rsplit(':').next().unwrap().to_string();
    let base = format!("https://127.0.0.1:{port}");
    let http = Http::with_ca(Some(&ca));
    for (tok, want) in [
        (None, 401),
        (Some("wrong-token-of-some-length"), 401),
        (Some(token), 200),
    ] {
        for path in ["/v1/plans", "/metrics", "/v1/runs"] {
            let (s, body) = http
                .try_call("GET", &format!("{base}{path}"), None, tok)
                .unwrap();
            assert_eq!(s, want, "{path} with {tok:?}: {body}");
            assert!(!body.contains(token));
        }
    }
    let (s, body) = http
        .try_call("GET", &format!("{base}/"), None, None)
        .unwrap();
    assert_eq!(s, 401);
    assert!(
        body.contains("<form"),
        "the page asks for the token: {body}"
    );
    // Plain HTTP gets no answer from the TLS port.
    assert!(
        Http::new()
            .try_call(
                "GET",
                &format!("http://127.0.0.1:{port}/v1/plans"),
                None,
                None
            )
            .is_err()
    );

    // The CLI as the client: with the token, a backup; without, exit 2 (401).
    let cli = |extra: &[&str], snap: &str| {
        let mut a: Vec<String> = [
            "--server",
            base.as_str(),
            "--server-ca",
            ca.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(
            [
                "plan",
                "start",
                "backup-local",
                "-q",
                "-p",
                &format!("SNAPSHOT_NAME={snap}"),
                "-p",
                "BACKUP_DIR=store",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        sb.run_v(&a)
    };
    let out = cli(&[], "t0");
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("token"), "{:?}", text(&out));
    let out = cli(&["--token-file", "token"], "t1");
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(sb.path("store/t1/manifest.json").exists());
    // A server whose certificate is not trusted is not talked to.
    let a: Vec<String> = [
        "--server",
        base.as_str(),
        "--token-file",
        "token",
        "plan",
        "history",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = sb.run_v(&a);
    assert!(!out.status.success());
    let (o, e) = text(&out);
    assert!(!o.contains(token) && !e.contains(token));
    assert!(srv.stop().success());
}

/// Parse metrics text with the Prometheus project's own Python parser; returns
/// `[(name, labels, value)]`.
fn parse_metrics(python: &Path, body: &str, openmetrics: bool) -> Vec<(String, Value, f64)> {
    let parser = if openmetrics {
        "from prometheus_client.openmetrics.parser import text_string_to_metric_families"
    } else {
        "from prometheus_client.parser import text_string_to_metric_families"
    };
    let script = format!(
        "import sys, json\n{parser}\nout = []\nfor f in text_string_to_metric_families(sys.stdin.read()):\n    for s in f.samples:\n        out.append([s.name, s.labels, s.value])\nprint(json.dumps(out))\n"
    );
    let mut child = std::process::Command::new(python)
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the metrics: {:?}\n{body}",
        text(&out)
    );
    let v: Vec<(String, Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    v
}

fn sample(m: &[(String, Value, f64)], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m.iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|s| s.2)
}

#[test]
fn metrics_parse_and_move_after_a_run() {
    let Some(python) = tool("CAIRN_TEST_PYTHON") else {
        return;
    };
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 2, 0);
    let srv = Served::start(&sb, &src, &[]);
    let http = Http::new();
    let base = &srv.url;
    let (_, before) = http
        .try_call("GET", &format!("{base}/metrics"), None, None)
        .unwrap();
    let before = parse_metrics(&python, &before, true);
    assert_eq!(sample(&before, "cairn_runs_active", &[]), Some(0.0));
    assert_eq!(
        sample(&before, "cairn_runs_total", &[("plan", "backup-local")]),
        None
    );
    let t0 = chrono::Utc::now().timestamp() as f64;
    let run = start(
        &http,
        base,
        "backup-local",
        json!({"SNAPSHOT_NAME": "m1", "BACKUP_DIR": "store"}),
    );
    assert_eq!(wait_done(&http, base, run)["exit_code"], 0);
    // A store whose path holds what the text format must escape.
    let odd = "od\"d\\store\nx";
    let r_odd = start(
        &http,
        base,
        "backup-local",
        json!({"SNAPSHOT_NAME": "m0", "BACKUP_DIR": odd}),
    );
    assert_eq!(wait_done(&http, base, r_odd)["exit_code"], 0);
    let r2 = start(
        &http,
        base,
        "backup-local",
        json!({"SNAPSHOT_NAME": "m1", "BACKUP_DIR": "store"}),
    );
    assert_eq!(wait_done(&http, base, r2)["exit_code"], 3);
    let (_, after) = http
        .try_call("GET", &format!("{base}/metrics"), None, None)
        .unwrap();
    let m = parse_metrics(&python, &after, true);
    let ok = [("plan", "backup-local"), ("outcome", "success")];
    assert_eq!(sample(&m, "cairn_runs_total", &ok), Some(2.0), "{after}");
    let odd_url = format!("file://{}", sb.path(odd).display());
    assert!(
        sample(
            &m,
            "cairn_last_success_timestamp_seconds",
            &[("store", odd_url.as_str())]
        )
        .is_some(),
        "the odd store's label reads back as its URL: {after}"
    );
    assert_eq!(
        m.iter().filter(|s| s.0 == "cairn_runs_total").count(),
        2,
        "{after}"
    );
    assert_eq!(
        sample(
            &m,
            "cairn_runs_total",
            &[("plan", "backup-local"), ("outcome", "refused")]
        ),
        Some(1.0)
    );
    let last = sample(
        &m,
        "cairn_last_success_timestamp_seconds",
        &[("plan", "backup-local")],
    )
    .unwrap();
    assert!(last >= t0 - 1.0, "{last} < {t0}");
    let up = sample(
        &m,
        "cairn_uploaded_bytes_total",
        &[("plan", "backup-local")],
    )
    .unwrap();
    assert!(up > 10_000.0, "{after}");
    // The counter adds both complete runs; the gauge is the last one's.
    let last_stored = sample(
        &m,
        "cairn_last_run_stored_bytes",
        &[("plan", "backup-local")],
    )
    .unwrap();
    assert!(up > last_stored && last_stored > 10_000.0, "{after}");
    assert!(
        sample(&m, "cairn_last_run_data_bytes", &[("plan", "backup-local")]).unwrap() > 10_000.0
    );
    assert!(srv.stop().success());

    // A CLI run writes the node exporter's textfile, in the classic text format.
    let mut a = start_args("backup-local", &src, "m2", &[]);
    a.extend(["--metrics-file".into(), "m.prom".into()]);
    let out = sb.run_v(&a);
    assert!(out.status.success(), "{:?}", text(&out));
    let file = std::fs::read_to_string(sb.path("m.prom")).unwrap();
    let m = parse_metrics(&python, &file, false);
    assert!(
        sample(
            &m,
            "cairn_last_success_timestamp_seconds",
            &[("plan", "backup-local")]
        )
        .is_some(),
        "{file}"
    );
    assert_eq!(sample(&m, "cairn_runs_total", &ok), Some(1.0), "{file}");
}

#[test]
fn the_cli_through_a_server_gives_the_exit_codes_of_a_local_run() {
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 1, 0);
    let srv = Served::start(&sb, &src, &[]);
    let base = srv.url.clone();
    lock_file(
        &sb.path("store"),
        "held",
        "backup",
        chrono::Utc::now().timestamp(),
    );
    let c = src.to_str().unwrap();
    // (local args, remote args) side by side: the same command, here and there.
    let both = |args: &[&str]| -> (i32, i32, Value, Value) {
        let run = |remote: bool| {
            let mut a: Vec<&str> = Vec::new();
            if remote {
                a.extend(["--server", base.as_str()]);
            }
            a.extend(["--json", "-q"]);
            let named: Vec<String> = args
                .iter()
                .map(|x| x.replace("@NAME", if remote { "remote-ok" } else { "local-ok" }))
                .collect();
            for x in &named {
                let x = x.as_str();
                if x == "@C" {
                    if !remote {
                        a.extend(["--cluster", c]);
                    }
                } else {
                    a.push(x);
                }
            }
            let out = sb.run(&a);
            let last = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("null")
                .to_string();
            (
                out.status.code().unwrap(),
                serde_json::from_str(&last).unwrap_or(Value::Null),
            )
        };
        let (l, lj) = run(false);
        let (r, rj) = run(true);
        (l, r, lj, rj)
    };
    let cases: Vec<(&str, Vec<&str>, i32)> = vec![
        (
            "success",
            vec![
                "plan",
                "start",
                "backup-local",
                "@C",
                "-p",
                "SNAPSHOT_NAME=@NAME",
                "-p",
                "BACKUP_DIR=store",
            ],
            0,
        ),
        (
            "refused",
            vec![
                "plan",
                "start",
                "backup-local",
                "@C",
                "-p",
                "SNAPSHOT_NAME=done",
                "-p",
                "BACKUP_DIR=store",
            ],
            3,
        ),
        (
            "bad parameter",
            vec![
                "plan",
                "start",
                "backup-local",
                "@C",
                "-p",
                "SNAPSHOT_NAME=x",
                "-p",
                "BACKUP_DIR=store",
                "-p",
                "NOPE=1",
            ],
            2,
        ),
        (
            "unknown plan",
            vec![
                "plan",
                "start",
                "no-such-plan",
                "@C",
                "-p",
                "SNAPSHOT_NAME=x",
            ],
            2,
        ),
        (
            "locked",
            vec![
                "plan",
                "start",
                "backup-local",
                "@C",
                "-p",
                "SNAPSHOT_NAME=held",
                "-p",
                "BACKUP_DIR=store",
            ],
            4,
        ),
        ("no such run", vec!["plan", "status", "4242"], 5),
    ];
    sb.ok(&[
        "plan",
        "start",
        "backup-local",
        "-q",
        "--cluster",
        c,
        "-p",
        "SNAPSHOT_NAME=done",
        "-p",
        "BACKUP_DIR=store",
    ]);
    for (what, args, want) in cases {
        let (l, r, lj, rj) = both(&args);
        assert_eq!(
            (l, r),
            (want, want),
            "{what}: local {l} {lj}, remote {r} {rj}"
        );
        if args[1] == "start" {
            assert_eq!(lj["outcome"], rj["outcome"], "{what}: {lj} {rj}");
            assert_eq!(lj["exit_code"], rj["exit_code"], "{what}");
        }
    }
    // CAIRN_SERVER in the environment is for plan commands: the others run here;
    // --server on their command line is named as a mistake.
    let out = sb
        .command(&["snapshots", "list", "--store", "store"])
        .env("CAIRN_SERVER", &base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let out = sb.run(&["--server", &base, "snapshots", "list", "--store", "store"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    // A redirect is never followed: it could lead the parameters elsewhere.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    let redirecting = std::thread::spawn(move || {
        let (mut c, _) = trap.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = std::io::Read::read(&mut c, &mut buf);
        std::io::Write::write_all(
            &mut c,
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://192.0.2.1:9/v1/plans\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    });
    let out = sb.run(&[
        "--server",
        &format!("http://127.0.0.1:{trap_port}"),
        "plan",
        "start",
        "backup-local",
        "-p",
        "SNAPSHOT_NAME=x",
        "-p",
        "ENCRYPT_PASSPHRASE=redirected-secret-value",
    ]);
    redirecting.join().unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("not followed"), "{:?}", text(&out));
    // Plain http to another machine would carry the token and the parameters in
    // clear: refused before anything is sent.
    let out = sb.run(&["--server", "http://192.0.2.1:9", "plan", "history"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("https://"), "{:?}", text(&out));
    assert!(srv.stop().success());
}

#[test]
fn status_page_in_headless_chromium_shows_steps_advancing_to_complete() {
    let (Some(chromium), Some(playwright)) =
        (tool("CAIRN_TEST_CHROMIUM"), tool("CAIRN_TEST_PLAYWRIGHT"))
    else {
        return;
    };
    let sb = Sandbox::new();
    let src = source_cluster(sb.dir.path(), 3, 1_000_000);
    let srv = Served::start(&sb, &src, &[]);
    let http = Http::new();
    let base = &srv.url;
    // A snapshot already in the store, for the page's snapshot list.
    let first = start(
        &http,
        base,
        "backup-local",
        json!({"SNAPSHOT_NAME": "earlier", "BACKUP_DIR": "store"}),
    );
    assert_eq!(wait_done(&http, base, first)["exit_code"], 0);
    // Serial and throttled: each node's upload runs for seconds, the page sees
    // them start and end.
    let run = start(
        &http,
        base,
        "backup-local",
        json!({"SNAPSHOT_NAME": "watched", "BACKUP_DIR": "store", "MAX_BANDWIDTH": "600KiB/s", "MODE": "full"}),
    );
    let shot = sb.path("status-page.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/status-page.cjs");
    let out = std::process::Command::new("node")
        .arg(&script)
        .args([
            base.as_str(),
            &run.to_string(),
            shot.to_str().unwrap(),
            "watched",
        ])
        .env("CAIRN_TEST_CHROMIUM", &chromium)
        .env("CAIRN_TEST_PLAYWRIGHT", &playwright)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let page: Value = serde_json::from_str(text(&out).0.lines().last().unwrap()).unwrap();
    assert_eq!(page["loads"], 1, "the page was never reloaded: {page}");
    assert_eq!(page["errors"], json!([]), "{page}");
    assert_eq!(page["live"], "live", "{page}");
    assert_ne!(
        page["initial"], "COMPLETE",
        "the page loaded after the run had ended: {page}"
    );
    let steps = page["steps"].as_array().unwrap();
    let api = http.get(&format!("{base}/v1/runs/{run}"));
    assert_eq!(
        steps.len(),
        api["steps"].as_array().unwrap().len(),
        "{page}"
    );
    for s in steps {
        assert_eq!(s["status"], "COMPLETE", "{s}");
        assert_eq!(s["text"], "COMPLETE", "{s}");
        assert_eq!(s["value"], s["max"], "a finished step's bar is full: {s}");
    }
    // The last node's upload started after the page loaded: the page showed it
    // RUNNING, then COMPLETE, from the events alone.
    let last = steps
        .iter()
        .find(|s| s["id"] == "backup/backup-node/node-2")
        .unwrap();
    let seen: Vec<&str> = last["seen"].as_str().unwrap().split(' ').collect();
    let r = seen.iter().position(|s| *s == "RUNNING");
    let c = seen.iter().position(|s| *s == "COMPLETE");
    assert!(matches!((r, c), (Some(r), Some(c)) if r < c), "{last}");
    // The page as served lists the earlier snapshot and the last success.
    let (_, html) = http
        .try_call("GET", &format!("{base}/"), None, None)
        .unwrap();
    assert!(html.contains("data-name=\"earlier\""), "{html}");
    assert!(html.contains("data-plan=\"backup-local\""));
    // The screenshot, for people.
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::write(keep, png);
    assert!(srv.stop().success());
}
