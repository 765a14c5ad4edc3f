//! `cairn serve`: the plans HTTP API (the DC/OS scheduler's `/v1/plans` shape and
//! cairn's own `/v1/runs`), server-sent events, `/metrics`, and the status page.
//!
//! On loopback it may run without a token; anywhere else it needs a bearer token
//! (read from a file, compared in constant time) and TLS.

use super::{RunView, Service};
use crate::plan::params::CliParam;
use crate::redact::redact;
use crate::state::Status;
use crate::{Error, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Request bodies (parameters) larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// How `cairn serve` listens.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// The bearer token every request must carry (read from a file).
    pub token: Option<String>,
    /// Certificate chain and private key (PEM) for TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl ServeOptions {
    /// Off loopback, a token and TLS are required.
    pub fn check(&self) -> Result<()> {
        if self.listen.ip().is_loopback() {
            return Ok(());
        }
        let mut missing = Vec::new();
        if self.token.is_none() {
            missing.push("a token (--token-file)");
        }
        if self.tls.is_none() {
            missing.push("TLS (--tls-cert and --tls-key)");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "--listen {}: off loopback the server needs {}",
                self.listen,
                missing.join(" and ")
            )))
        }
    }
}

#[derive(Clone)]
struct App {
    svc: Arc<Service>,
    token: Option<Arc<[u8; 32]>>,
}

fn digest(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(Sha256::digest(s.as_bytes()).as_slice());
    out
}

/// The router, with auth and the body limit.
pub fn router(svc: Arc<Service>, token: Option<&str>) -> Router {
    let app = App {
        svc,
        token: token.map(|t| Arc::new(digest(t))),
    };
    Router::new()
        .route("/", get(page))
        .route("/runs/{id}/fragment", get(run_fragment))
        .route("/sections/fragment", get(sections_fragment))
        .route("/metrics", get(metrics))
        .route("/v1/plans", get(plans))
        .route("/v1/plans/{plan}", get(plan))
        .route("/v1/plans/{plan}/start", post(plan_start))
        .route("/v1/plans/{plan}/stop", post(plan_stop))
        .route("/v1/plans/{plan}/interrupt", post(plan_stop))
        .route("/v1/plans/{plan}/continue", post(plan_continue))
        .route("/v1/runs", get(runs))
        .route("/v1/runs/{id}", get(run))
        .route("/v1/runs/{id}/stop", post(run_stop))
        .route("/v1/runs/{id}/resume", post(run_resume))
        .route("/v1/runs/{id}/events", get(run_events))
        .route("/v1/events", get(all_events))
        .route("/v1/snapshots", get(snapshots))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .with_state(app)
}

/// Serve until `svc.shutdown` is cancelled; `ready` is told the bound address.
pub async fn serve(
    svc: Arc<Service>,
    opts: ServeOptions,
    ready: impl FnOnce(SocketAddr, bool),
) -> Result<()> {
    opts.check()?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| Error::Usage(format!("--listen {}: {e}", opts.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Usage(format!("--listen {}: {e}", opts.listen)))?;
    let shutdown = svc.shutdown.clone();
    let app = router(svc, opts.token.as_deref());
    match &opts.tls {
        None => {
            ready(addr, false);
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .map_err(|e| Error::State(format!("server: {e}")))
        }
        Some((cert, key)) => {
            let tls = tls_acceptor(cert, key)?;
            let listener = TlsListener::start(listener, tls, addr, shutdown.clone());
            ready(addr, true);
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .map_err(|e| Error::State(format!("server: {e}")))
        }
    }
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Usage(format!("--tls-cert {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Usage(format!(
            "--tls-cert {}: no certificate in the file",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Usage(format!("--tls-key {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Usage(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Usage(format!("--tls-cert/--tls-key: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// TLS connections, each handshake in a task of its own (a slow client holds up
/// no one), handed to axum once established.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    addr: SocketAddr,
}

impl TlsListener {
    fn start(
        tcp: tokio::net::TcpListener,
        tls: tokio_rustls::TlsAcceptor,
        addr: SocketAddr,
        stop: tokio_util::sync::CancellationToken,
    ) -> TlsListener {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = tcp.accept() => a,
                    _ = stop.cancelled() => return,
                };
                let (sock, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { rx, addr }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }
    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// An error as JSON: the message (redacted), the outcome word and the exit code
/// the CLI would give.
struct ApiError(StatusCode, Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e.root() {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Locked(_) | Error::Checks(_) | Error::Refused(_) => StatusCode::CONFLICT,
            Error::Usage(_) | Error::Params(_) | Error::Plan { .. } | Error::Cluster { .. } => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let word = super::outcome_word(Some(&self.1));
        let body = json!({
            "error": redact(&self.1.to_string()),
            "outcome": word,
            "exit_code": self.1.exit_code(),
        });
        (self.0, Json(body)).into_response()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// State-store reads (SQLite, which may wait on a run's write) on a blocking
/// thread, never on one of the runtime's.
async fn off_runtime<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&Service) -> Result<T> + Send + 'static,
) -> Result<T> {
    let svc = app.svc.clone();
    tokio::task::spawn_blocking(move || f(&svc))
        .await
        .map_err(|e| Error::State(format!("a state read failed: {e}")))?
}

fn token_of(h: &HeaderMap) -> Option<String> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return Some(t.trim().to_string());
    }
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("cairn_token=").map(str::to_string))
        .map(|t| percent_decode(&t))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Refuse what a web page elsewhere could make a browser send: without a token,
/// a Host that is not a loopback name (DNS rebinding); a POST from another
/// origin; a POST body that is not JSON (a cross-site form needs no preflight).
fn browser_guard(req: &Request, token: bool) -> Option<(StatusCode, &'static str)> {
    let h = req.headers();
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !token && !loopback_host(host) {
        return Some((
            StatusCode::FORBIDDEN,
            "without a token the server answers only to a loopback address or localhost",
        ));
    }
    if req.method() == axum::http::Method::POST {
        if let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok())
            && origin != format!("http://{host}")
            && origin != format!("https://{host}")
        {
            return Some((StatusCode::FORBIDDEN, "a request from another origin"));
        }
        let has_body = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
            || h.contains_key(header::TRANSFER_ENCODING);
        let json = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
        if has_body && !json {
            return Some((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the parameters as Content-Type: application/json",
            ));
        }
    }
    None
}

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((n, "")) => (n, None),
            Some((n, after)) => match after.strip_prefix(':') {
                Some(p) => (n, Some(p)),
                None => return false,
            },
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn auth(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some((status, why)) = browser_guard(&req, app.token.is_some()) {
        return (
            status,
            Json(
                json!({"error": why, "outcome": "invalid", "exit_code": crate::error::exit::USAGE}),
            ),
        )
            .into_response();
    }
    let Some(want) = &app.token else {
        return next.run(req).await;
    };
    let ok = token_of(req.headers()).is_some_and(|t| bool::from(digest(&t).ct_eq(want.as_slice())));
    if ok {
        return next.run(req).await;
    }
    if req.uri().path() == "/" {
        let mut r = (StatusCode::UNAUTHORIZED, Html(super::page::LOGIN)).into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Json(json!({
            "error": "a bearer token is required (Authorization: Bearer …)",
            "outcome": "invalid", "exit_code": crate::error::exit::USAGE,
        })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        Error::NotFound("no such endpoint (see /v1/plans, /v1/runs, /metrics, /)".into()),
    )
}

/// Every error an extractor or the router answers (a bad run id, a body over
/// the limit, a wrong method) as the same JSON as the API's own errors.
async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let typed = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json") || t.starts_with("text/html"));
    if !status.is_client_error() || typed {
        return res;
    }
    let body = axum::body::to_bytes(res.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_string()
    } else {
        text
    };
    let code = match status {
        StatusCode::NOT_FOUND => crate::error::exit::NOT_FOUND,
        _ => crate::error::exit::USAGE,
    };
    (
        status,
        Json(json!({"error": redact(&message), "outcome": "invalid", "exit_code": code})),
    )
        .into_response()
}

/// Parameters from a JSON object body (`{"SNAPSHOT_NAME": "x", …}`, as the DC/OS
/// CLI sends them); an empty body is no parameters.
fn params_of(body: &Bytes) -> Result<Vec<CliParam>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::Usage(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::Usage(
            "the body must be a JSON object of parameters: {\"NAME\": \"value\", …}".into(),
        ));
    }
    // Again, keeping every key: a name given twice is refused, not decided.
    let Pairs(pairs) = serde_json::from_slice(body)
        .map_err(|e| Error::Usage(format!("the body is not JSON: {e}")))?;
    let mut out = Vec::new();
    for (k, v) in pairs {
        let value = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(Error::Params(vec![format!(
                    "{k}: give a string, a number or a boolean"
                )]));
            }
        };
        out.push(CliParam {
            key: k,
            value,
            literal: true,
        });
    }
    Ok(out)
}

/// A JSON object's members in order, duplicates kept.
struct Pairs(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of parameters")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Pairs, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry::<String, serde_json::Value>()? {
                    out.push(kv);
                }
                Ok(Pairs(out))
            }
        }
        d.deserialize_map(Members)
    }
}

#[derive(serde::Deserialize, Default)]
struct StartQuery {
    #[serde(default)]
    break_lock: bool,
}

fn known_plan(app: &App, name: &str) -> ApiResult<crate::plan::Plan> {
    app.svc.plan(name).map_err(|e| match e {
        Error::Usage(m) => ApiError(StatusCode::NOT_FOUND, Error::Usage(m)),
        e => e.into(),
    })
}

async fn plans(State(app): State<App>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(app.svc.plans()?.into_iter().map(|p| p.name).collect()))
}

async fn plan(State(app): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    known_plan(&app, &name)?;
    Ok(Json(off_runtime(&app, move |svc| svc.plan_view(&name)).await?).into_response())
}

async fn plan_start(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<StartQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    known_plan(&app, &name)?;
    let params = params_of(&body)?;
    let id = app.svc.start(&name, params, q.break_lock).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"message": "Received cmd: start", "plan": name, "run": id})),
    )
        .into_response())
}

fn conflict(msg: String) -> ApiError {
    ApiError(StatusCode::CONFLICT, Error::Usage(msg))
}

/// The plan's one run in progress (here or in another process); several are
/// named, not guessed between.
fn plan_running(app: &App, name: &str) -> ApiResult<crate::state::RunRecord> {
    let running: Vec<_> = app
        .svc
        .runs(10_000)?
        .into_iter()
        .filter(|r| r.plan == name)
        .filter(|r| app.svc.is_live(r.id) || matches!(r.status, Status::Running | Status::Pending))
        .collect();
    match running.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(conflict(format!("plan {name} has no run in progress"))),
        many => {
            let ids: Vec<String> = many.iter().map(|r| r.id.to_string()).collect();
            Err(conflict(format!(
                "plan {name} has {} runs in progress ({}); stop one by its id: POST /v1/runs/{{id}}/stop",
                many.len(),
                ids.join(", ")
            )))
        }
    }
}

/// The plan's newest run, when it can be continued (failed, cancelled or
/// interrupted, and not running here).
fn plan_resumable(app: &App, name: &str) -> ApiResult<crate::state::RunRecord> {
    let newest = app
        .svc
        .runs(10_000)?
        .into_iter()
        .find(|r| r.plan == name)
        .ok_or_else(|| conflict(format!("plan {name} has no run")))?;
    let resumable = matches!(
        newest.status,
        Status::Failed | Status::Cancelled | Status::Interrupted
    ) && !app.svc.is_live(newest.id);
    if resumable {
        Ok(newest)
    } else {
        Err(conflict(format!(
            "the newest run of plan {name}, run {}, is {}: nothing to continue",
            newest.id, newest.status
        )))
    }
}

async fn plan_stop(State(app): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    known_plan(&app, &name)?;
    let r = plan_running(&app, &name)?;
    let rec = app.svc.stop(r.id, Duration::from_secs(30)).await?;
    Ok(
        Json(json!({"message": "Received cmd: stop", "run": rec.id, "status": rec.status}))
            .into_response(),
    )
}

async fn plan_continue(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<StartQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    known_plan(&app, &name)?;
    let params = params_of(&body)?;
    let r = plan_resumable(&app, &name)?;
    let id = app.svc.resume(r.id, params, q.break_lock).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"message": "Received cmd: continue", "plan": name, "run": id})),
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn runs(
    State(app): State<App>,
    Query(l): Query<Limit>,
) -> ApiResult<Json<Vec<crate::state::RunRecord>>> {
    let limit = l.limit.unwrap_or(50).min(10_000);
    Ok(Json(off_runtime(&app, move |svc| svc.runs(limit)).await?))
}

async fn run(State(app): State<App>, Path(id): Path<i64>) -> ApiResult<Json<RunView>> {
    Ok(Json(off_runtime(&app, move |svc| svc.run_view(id)).await?))
}

async fn run_stop(State(app): State<App>, Path(id): Path<i64>) -> ApiResult<Response> {
    let rec = app.svc.stop(id, Duration::from_secs(30)).await?;
    Ok(Json(json!({"run": rec.id, "status": rec.status})).into_response())
}

async fn run_resume(
    State(app): State<App>,
    Path(id): Path<i64>,
    Query(q): Query<StartQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let params = params_of(&body)?;
    let id = app.svc.resume(id, params, q.break_lock).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"run": id}))).into_response())
}

type SseItem = std::result::Result<SseEvent, axum::Error>;

/// Events of one run (`Some`) or all runs: first a `snapshot` of each run
/// concerned, then every change; a run's stream ends after its `run_finished`.
fn event_stream(
    app: &App,
    run: Option<i64>,
) -> ApiResult<impl futures::Stream<Item = SseItem> + use<>> {
    let rx = app.svc.subscribe();
    let mut first = Vec::new();
    let mut over = false;
    if let Some(id) = run {
        let v = app.svc.run_view(id)?;
        over = !v.live && v.outcome.is_some();
        first
            .push(SseEvent::default().json_data(json!({"type": "snapshot", "run": id, "view": v})));
    }
    let svc = app.svc.clone();
    let live = futures::stream::unfold((rx, over), move |(mut rx, over)| {
        let svc = svc.clone();
        async move {
            if over {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if run.is_some_and(|id| id != ev.run) {
                            continue;
                        }
                        let end = run.is_some()
                            && matches!(ev.kind, super::EventKind::RunFinished { .. });
                        return Some((SseEvent::default().json_data(&*ev), (rx, end)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow a reader: a fresh view replaces what it missed.
                        let msg = match run.map(|id| svc.run_view(id)) {
                            Some(Ok(v)) => json!({"type": "snapshot", "run": v.run.id, "view": v}),
                            _ => json!({"type": "lagged"}),
                        };
                        return Some((SseEvent::default().json_data(msg), (rx, false)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    let stop = app.svc.shutdown.clone().cancelled_owned();
    Ok(futures::stream::iter(first).chain(live).take_until(stop))
}

async fn run_events(State(app): State<App>, Path(id): Path<i64>) -> ApiResult<Response> {
    let s = event_stream(&app, Some(id))?;
    Ok(Sse::new(s).keep_alive(KeepAlive::default()).into_response())
}

async fn all_events(State(app): State<App>) -> ApiResult<Response> {
    let s = event_stream(&app, None)?;
    Ok(Sse::new(s).keep_alive(KeepAlive::default()).into_response())
}

#[derive(serde::Deserialize)]
struct StoreQuery {
    store: Option<String>,
}

async fn snapshots(State(app): State<App>, Query(q): Query<StoreQuery>) -> ApiResult<Response> {
    let store = match q.store.or_else(|| app.svc.cfg.stores.first().cloned()) {
        Some(s) => s,
        None => {
            return Err(Error::Usage(
                "name the store: /v1/snapshots?store=URL (or start the server with --store)".into(),
            )
            .into());
        }
    };
    // Only stores the server was told of or has run with: not any directory or
    // endpoint a caller names.
    if !app.svc.known_store(&store)? {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            Error::Usage(format!(
                "store {store:?} is not one of this server's (its --store, its store profiles, or a store its runs used)"
            )),
        ));
    }
    let list = app.svc.snapshots(&store).await?;
    Ok(Json(crate::redact::redact_json(&json!(list))).into_response())
}

async fn metrics(State(app): State<App>) -> ApiResult<Response> {
    let text = off_runtime(&app, |svc| svc.metrics.render(&svc.state)).await?;
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(r)
}

async fn page(State(app): State<App>) -> ApiResult<Html<String>> {
    Ok(Html(super::page::render(&app.svc).await?))
}

async fn run_fragment(State(app): State<App>, Path(id): Path<i64>) -> ApiResult<Html<String>> {
    let v = off_runtime(&app, move |svc| svc.run_view(id)).await?;
    Ok(Html(super::page::run_block(&v)))
}

/// The last-success and snapshot sections, redrawn when a run ends.
async fn sections_fragment(State(app): State<App>) -> ApiResult<Html<String>> {
    let last = super::page::last_section(&app.svc)?;
    let snaps = super::page::snapshots_section(&app.svc).await;
    Ok(Html(format!("<div>{last}{snaps}</div>")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parameters_come_from_a_json_object_of_scalars() {
        let p = params_of(&Bytes::from_static(br#"{"A":"x","N":3,"B":true}"#)).unwrap();
        let got: Vec<(String, String)> = p.into_iter().map(|p| (p.key, p.value)).collect();
        assert_eq!(
            got,
            vec![
                ("A".to_string(), "x".to_string()),
                ("N".to_string(), "3".to_string()),
                ("B".to_string(), "true".to_string())
            ]
        );
        assert!(params_of(&Bytes::from_static(b"  \n")).unwrap().is_empty());
        // A name given twice is kept twice (the parameters refuse it by name).
        let p = params_of(&Bytes::from_static(br#"{"A":"1","A":"2"}"#)).unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| p.literal));
        for bad in [&b"[1]"[..], b"A=x", br#"{"A":null}"#, br#"{"A":{"b":1}}"#] {
            assert!(params_of(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn off_loopback_needs_token_and_tls() {
        let opts = |addr: &str, token: bool, tls: bool| ServeOptions {
            listen: addr.parse().unwrap(),
            token: token.then(|| "t".repeat(20)),
            tls: tls.then(|| ("c".into(), "k".into())),
        };
        assert!(opts("127.0.0.1:1", false, false).check().is_ok());
        assert!(opts("[::1]:1", false, false).check().is_ok());
        assert!(opts("0.0.0.0:1", true, false).check().is_err());
        assert!(opts("0.0.0.0:1", false, true).check().is_err());
        assert!(opts("10.1.2.3:1", true, true).check().is_ok());
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; cairn_token=x%2By%ZZ"),
        );
        assert_eq!(token_of(&h).as_deref(), Some("x+y%ZZ"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer  tok "),
        );
        assert_eq!(token_of(&h).as_deref(), Some("tok"));
        assert_eq!(percent_decode("%e2%82%ac%"), "€%");
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1:1",
            "127.3.4.5",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example:8080",
            "10.0.0.1:80",
            "localhost.evil.example",
            "[::2]:1",
        ] {
            assert!(!loopback_host(h), "{h}");
        }
    }
}
