//! `cairn --server URL plan …`: the CLI as a client of `cairn serve`, with the
//! same output and exit codes as a run in this process.

use super::output::{print_json, progress};
use super::plan::{End, print_end, print_history, print_status};
use super::{Globals, PlanCmd, usage};
use crate::error::exit;
use crate::plan::params::CliParam;
use crate::progress::Event;
use crate::service::RunView;
use crate::state::{RunRecord, Status};
use crate::{Error, Result};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

/// How often a followed run is read.
const POLL: Duration = Duration::from_millis(250);

struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    fn new(g: &Globals) -> Result<Client> {
        let Some(url) = &g.server else {
            return Err(usage("no --server given"));
        };
        let base = url.trim_end_matches('/').to_string();
        let parsed =
            reqwest::Url::parse(&base).map_err(|e| usage(format!("--server {url:?}: {e}")))?;
        match parsed.scheme() {
            "https" => {}
            "http"
                if parsed.host_str().is_some_and(|h| {
                    let h = h.trim_start_matches('[').trim_end_matches(']');
                    h.eq_ignore_ascii_case("localhost")
                        || h.parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }) => {}
            "http" => {
                return Err(usage(format!(
                    "--server {url}: plain http only to this machine (localhost, 127.0.0.1, [::1]); the token and the parameters would cross the network in clear: use https://"
                )));
            }
            _ => {
                return Err(usage(format!(
                    "--server {url:?}: give an http:// or https:// URL"
                )));
            }
        }
        let token = match &g.token_file {
            None => None,
            Some(p) => {
                let t = crate::plan::params::read_file_value("--token-file", p)
                    .map_err(Error::Usage)?;
                let t = t.trim().to_string();
                crate::redact::register(&t);
                Some(t)
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &g.server_ca {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| usage(format!("--server-ca {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(usage(format!(
                    "--server-ca {}: no certificate in the file",
                    ca.display()
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| usage(format!("--server-ca {}: {e}", ca.display())))?;
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::State(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            // A redirect could lead the token elsewhere: never followed.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::State(format!("HTTP client: {e}")))?;
        Ok(Client { base, http, token })
    }

    /// One request; a JSON error answer becomes the error it names (message,
    /// outcome and exit code, as the server's CLI would have given them).
    async fn call(&self, post: bool, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = if post {
            self.http.post(&url)
        } else {
            self.http.get(&url)
        };
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let res = req.send().await.map_err(|e| Error::Store {
            op: "connect to the server",
            key: self.base.clone(),
            message: crate::redact::redact(&error_chain(&e)),
            transient: true,
        })?;
        let status = res.status();
        if status.is_redirection() {
            let to = res
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string();
            return Err(Error::Usage(format!(
                "the server answered {status} to {to}: not followed (it could lead the token and parameters elsewhere); give that address as --server if it is the server"
            )));
        }
        let text = res.text().await.map_err(|e| Error::Store {
            op: "read the server's answer",
            key: self.base.clone(),
            message: error_chain(&e),
            transient: true,
        })?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let message = v
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("the server answered {status}: {}", text.trim()));
        let exit_code = v
            .get("exit_code")
            .and_then(Value::as_i64)
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(match status.as_u16() {
                401 | 403 | 413 => exit::USAGE,
                404 => exit::NOT_FOUND,
                _ => exit::FAILED,
            });
        let outcome = v
            .get("outcome")
            .and_then(Value::as_str)
            .unwrap_or("failed")
            .to_string();
        Err(Error::Server {
            message,
            outcome,
            exit_code,
        })
    }

    async fn run_view(&self, id: i64) -> Result<RunView> {
        let v = self.call(false, &format!("/v1/runs/{id}"), None).await?;
        serde_json::from_value(v).map_err(|e| Error::State(format!("the server's run view: {e}")))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The parameters as the server takes them: `-p K=@FILE` is read here (the
/// server takes every value as given, never as a path of its own).
fn params_body(params: &[CliParam]) -> Result<Value> {
    let mut m = serde_json::Map::new();
    for p in params {
        let value = if p.literal {
            p.value.clone()
        } else {
            crate::plan::params::read_value(&p.key, &p.value)
                .map_err(|e| Error::Params(vec![e]))?
                .0
        };
        if m.insert(p.key.clone(), Value::String(value)).is_some() {
            return Err(Error::Params(vec![format!(
                "{} given more than once",
                p.key
            )]));
        }
    }
    Ok(Value::Object(m))
}

pub async fn plan(g: &Globals, cmd: PlanCmd) -> Result<i32> {
    let c = Client::new(g)?;
    match cmd {
        PlanCmd::List => {
            let names: Vec<String> =
                serde_json::from_value(c.call(false, "/v1/plans", None).await?)
                    .map_err(|e| Error::State(format!("the server's plans: {e}")))?;
            let mut plans = Vec::new();
            for n in names {
                let v = c.call(false, &format!("/v1/plans/{n}"), None).await?;
                let d = v
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                plans.push((n, d));
            }
            super::plan::print_plan_list(g, &plans);
            Ok(exit::OK)
        }
        PlanCmd::Show { .. } => Err(usage(
            "`plan show` reads the plan files of this machine; run it without --server",
        )),
        PlanCmd::Start {
            plan,
            mut params,
            rehash,
            cluster,
            break_lock,
            dry_run,
            metrics_file,
        } => {
            if rehash {
                params.push(crate::plan::params::CliParam {
                    key: "REHASH".into(),
                    value: "true".into(),
                    literal: true,
                });
            }
            if cluster.is_some() {
                return Err(usage(
                    "--cluster: a server runs its plans on its own cluster description (cairn serve --cluster)",
                ));
            }
            if dry_run || params.iter().any(|p| p.key == "DRY_RUN") {
                return Err(usage(
                    "--dry-run runs in this process; run it without --server",
                ));
            }
            no_metrics_file(metrics_file.as_deref())?;
            let q = if break_lock { "?break_lock=true" } else { "" };
            let body = match params_body(&params) {
                Ok(b) => b,
                Err(e) => return super::plan::not_started_line(g, &plan, Err(e)),
            };
            let r = c
                .call(true, &format!("/v1/plans/{plan}/start{q}"), Some(body))
                .await;
            let id = match r.and_then(|v| run_id(&v)) {
                Ok(id) => id,
                Err(e) => return super::plan::not_started_line(g, &plan, Err(e)),
            };
            follow(g, &c, id).await
        }
        PlanCmd::Resume {
            run,
            params,
            break_lock,
            metrics_file,
        } => {
            no_metrics_file(metrics_file.as_deref())?;
            let q = if break_lock { "?break_lock=true" } else { "" };
            let body = match params_body(&params) {
                Ok(b) => b,
                Err(e) => return super::plan::not_started_line(g, &format!("run {run}"), Err(e)),
            };
            let r = c
                .call(true, &format!("/v1/runs/{run}/resume{q}"), Some(body))
                .await
                .and_then(|v| run_id(&v));
            let id = match r {
                Ok(id) => id,
                Err(e) => return super::plan::not_started_line(g, &format!("run {run}"), Err(e)),
            };
            follow(g, &c, id).await
        }
        PlanCmd::Status { run } => {
            let id = match run {
                Some(id) => id,
                None => latest(&c).await?,
            };
            let v = c.run_view(id).await?;
            let steps: Vec<_> = v.steps.iter().map(|s| s.step.clone()).collect();
            print_status(g, &v.run, &steps, &v.param_sources);
            Ok(exit::OK)
        }
        PlanCmd::History { limit } => {
            let v = c
                .call(false, &format!("/v1/runs?limit={limit}"), None)
                .await?;
            let runs: Vec<RunRecord> = serde_json::from_value(v)
                .map_err(|e| Error::State(format!("the server's runs: {e}")))?;
            print_history(g, &runs);
            Ok(exit::OK)
        }
        PlanCmd::Stop { run } => {
            let v = c.call(true, &format!("/v1/runs/{run}/stop"), None).await?;
            let status = v.get("status").and_then(Value::as_str).unwrap_or("?");
            if g.json {
                print_json(&json!({"run": run, "status": status}));
            } else {
                crate::out!("run {run}: {status}");
            }
            Ok(exit::OK)
        }
    }
}

/// A server's metrics are its own.
fn no_metrics_file(f: Option<&std::path::Path>) -> Result<()> {
    match f {
        Some(_) => Err(usage(
            "--metrics-file: a server's metrics are at its /metrics",
        )),
        None => Ok(()),
    }
}

fn run_id(v: &Value) -> Result<i64> {
    v.get("run")
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::State("the server's answer has no run id".into()))
}

async fn latest(c: &Client) -> Result<i64> {
    let v = c.call(false, "/v1/runs?limit=1", None).await?;
    v.as_array()
        .and_then(|a| a.first())
        .and_then(|r| r.get("id"))
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::NotFound("no runs yet".into()))
}

/// Follow a run on the server to its end, drawing its progress as a local run
/// would; Ctrl-C asks the server to stop it (it stays resumable).
async fn follow(g: &Globals, c: &Client, id: i64) -> Result<i32> {
    let show = progress(g.quiet || g.json);
    let interrupted = tokio_util::sync::CancellationToken::new();
    super::cancel_on_signals(interrupted.clone());
    let mut stop_sent = false;
    let mut seen: HashMap<String, (Status, Option<u64>)> = HashMap::new();
    let mut started = false;
    let mut failures = 0;
    loop {
        if interrupted.is_cancelled() && !stop_sent {
            stop_sent = true;
            if let Err(e) = c.call(true, &format!("/v1/runs/{id}/stop"), None).await {
                crate::say!("cairn: could not ask the server to stop run {id}: {e}");
            }
        }
        let v = match c.run_view(id).await {
            Ok(v) => {
                failures = 0;
                v
            }
            // A server restarting, a dropped connection: try a few more times.
            Err(e @ Error::Store { .. }) if failures < 40 => {
                failures += 1;
                tracing::warn!("following run {id}: {e}");
                tokio::time::sleep(POLL * 4).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !started {
            started = true;
            show.event(Event::RunStarted {
                run: id,
                plan: &v.run.plan,
                snapshot: &v.run.snapshot,
            });
        }
        for s in &v.steps {
            let st = s.step.status;
            let before = seen.get(&s.step.id).copied();
            let was = before.map(|b| b.0);
            if st == Status::Running && was != Some(Status::Running) {
                show.event(Event::StepStarted {
                    step: &s.step.id,
                    total: s.bytes_total,
                });
            }
            if let Some(done) = s.bytes_done
                && before.and_then(|b| b.1) != Some(done)
            {
                show.event(Event::Bytes {
                    step: &s.step.id,
                    done,
                });
            }
            let finished = matches!(
                st,
                Status::Complete | Status::Failed | Status::Cancelled | Status::Skipped
            );
            if finished && was.is_some_and(|w| w != st) {
                if was != Some(Status::Running) {
                    // It ran between two reads.
                    show.event(Event::StepStarted {
                        step: &s.step.id,
                        total: s.bytes_total,
                    });
                }
                show.event(Event::StepFinished {
                    step: &s.step.id,
                    status: st,
                    error: s.step.error.as_deref(),
                });
            }
            seen.insert(s.step.id.clone(), (st, s.bytes_done));
        }
        if !v.live
            && let (Some(outcome), Some(code)) = (&v.outcome, v.exit_code)
        {
            show.event(Event::RunFinished);
            print_end(
                g,
                &End {
                    rec: &v.run,
                    outcome,
                    status: v.run.status,
                    failed: code != exit::OK,
                    exit_code: code,
                    summary: v.summary.as_ref(),
                },
            );
            if code == exit::OK {
                return Ok(exit::OK);
            }
            return Err(Error::Server {
                message: v
                    .run
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("run {id} {}", v.run.status)),
                outcome: outcome.clone(),
                exit_code: code,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
