//! The service layer: start, status, stop and resume of runs as a library API, and
//! the serialisable views of plans, runs and steps. Runs started here execute in
//! the background of this process; a run is live while its task is, whatever the
//! process id (one server holds many runs). The CLI (`cairn plan …`) and
//! `cairn serve` (HTTP) are its clients.

pub mod http;
pub mod metrics;
pub mod page;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::engine::{Engine, Outcome, Summary};
use crate::error::exit;
use crate::plan::Plan;
use crate::plan::params::{CliParam, ProcessEnv};
use crate::progress::{Event, Progress};
use crate::redact::redact;
use crate::state::{RunRecord, StateStore, Status, StepRecord};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

/// What a service is set up with.
#[derive(Debug, Clone, Default)]
pub struct ServiceConfig {
    /// The run-state home.
    pub home: PathBuf,
    pub plans_dir: Option<PathBuf>,
    /// The cluster description every run of this service is for.
    pub cluster: Option<PathBuf>,
    /// Store profiles.
    pub config: Config,
    /// Whether `config` was named (a resume then reads it, not the run's own).
    pub config_given: bool,
    /// Stores whose snapshots the status page lists (URLs or profile names).
    pub stores: Vec<String>,
}

/// The word a machine reads first: what happened.
pub fn outcome_word(error: Option<&Error>) -> &'static str {
    match error.map(|e| e.root()) {
        None => "success",
        Some(Error::Checks(_)) => "refused",
        Some(Error::Locked(_)) => "locked",
        Some(Error::Cancelled) => "cancelled",
        Some(Error::Usage(_) | Error::Params(_) | Error::Plan { .. } | Error::Cluster { .. }) => {
            "invalid"
        }
        Some(Error::Server { outcome, .. }) => outcome_static(outcome),
        Some(_) => "failed",
    }
}

fn outcome_static(word: &str) -> &'static str {
    match word {
        "success" => "success",
        "refused" => "refused",
        "locked" => "locked",
        "cancelled" => "cancelled",
        "invalid" => "invalid",
        "not_found" => "not_found",
        _ => "failed",
    }
}

/// The outcome and exit code a finished run's status implies (for runs this
/// process did not end itself).
fn from_status(status: Status) -> Option<(&'static str, i32)> {
    match status {
        Status::Complete => Some(("success", exit::OK)),
        Status::Refused => Some(("refused", exit::CHECK_REFUSED)),
        Status::Cancelled | Status::Interrupted => Some(("cancelled", exit::CANCELLED)),
        Status::Failed => Some(("failed", exit::FAILED)),
        _ => None,
    }
}

/// One step as shown: the stored record and, while it runs here, its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepView {
    #[serde(flatten)]
    pub step: StepRecord,
    #[serde(default)]
    pub bytes_done: Option<u64>,
    #[serde(default)]
    pub bytes_total: Option<u64>,
}

/// A phase of a run, with its steps in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseView {
    pub name: String,
    pub strategy: Option<String>,
    pub status: Status,
    pub steps: Vec<StepView>,
}

/// A run as shown by `plan status`, the API and the status page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunView {
    pub run: RunRecord,
    /// Whether its task runs in this process now.
    pub live: bool,
    /// Once it ended: `success`, `refused`, `failed`, `cancelled`…
    pub outcome: Option<String>,
    pub exit_code: Option<i32>,
    pub summary: Option<Summary>,
    pub phases: Vec<PhaseView>,
    /// Every step, in order (the phases' steps, flat).
    pub steps: Vec<StepView>,
    /// Where each parameter came from (cli, env, default, stored…).
    pub param_sources: BTreeMap<String, String>,
}

/// A plan, and its latest run's state (the DC/OS `GET /v1/plans/{plan}` shape:
/// phases with steps and statuses).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanView {
    pub name: String,
    pub description: String,
    pub status: Status,
    pub run: Option<i64>,
    pub phases: Vec<PhaseView>,
    pub errors: Vec<String>,
}

/// What the events stream carries (`GET /v1/runs/{id}/events`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEvent {
    pub run: i64,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    RunStarted {
        plan: String,
        snapshot: String,
    },
    StepStarted {
        step: String,
        total: Option<u64>,
    },
    Bytes {
        step: String,
        done: u64,
        total: Option<u64>,
    },
    StepFinished {
        step: String,
        status: Status,
        error: Option<String>,
    },
    Retry {
        step: String,
        attempt: u32,
        error: String,
    },
    RunFinished {
        status: Status,
        outcome: String,
        exit_code: i32,
        error: Option<String>,
        summary: Option<Summary>,
    },
}

/// A run's end as this process saw it.
#[derive(Debug, Clone)]
pub struct Ended {
    /// `success`, `refused`, `failed`, `cancelled`…
    pub outcome: &'static str,
    pub exit_code: i32,
    /// What a complete run moved.
    pub summary: Option<Summary>,
}

/// Bytes done and expected, per step id, of a run in progress.
type StepBytes = Arc<Mutex<BTreeMap<String, (u64, Option<u64>)>>>;

struct Live {
    cancel: CancellationToken,
    progress: StepBytes,
    done: tokio::sync::watch::Receiver<bool>,
}

/// The service: one state home, one cluster, many runs.
pub struct Service {
    pub cfg: ServiceConfig,
    pub state: StateStore,
    live: Mutex<HashMap<i64, Live>>,
    ended: Mutex<HashMap<i64, Ended>>,
    events: broadcast::Sender<Arc<RunEvent>>,
    pub metrics: metrics::Metrics,
    /// Cancelled to stop every live run (resumably): the parent of each run's
    /// cancellation.
    pub stop_runs: CancellationToken,
    /// Cancelled when the service's server shuts down (after its runs ended):
    /// event streams end.
    pub shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Service {
    pub fn new(cfg: ServiceConfig) -> Result<Arc<Service>> {
        let state = StateStore::open(&cfg.home)?;
        Ok(Self::with_state(cfg, state))
    }

    /// A service on a state store already open.
    pub fn with_state(cfg: ServiceConfig, state: StateStore) -> Arc<Service> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Service {
            cfg,
            state,
            live: Mutex::new(HashMap::new()),
            ended: Mutex::new(HashMap::new()),
            events,
            metrics: metrics::Metrics::default(),
            stop_runs: CancellationToken::new(),
            shutdown: CancellationToken::new(),
        })
    }

    /// Every event of every run from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RunEvent>> {
        self.events.subscribe()
    }

    pub fn plans(&self) -> Result<Vec<Plan>> {
        Plan::list(self.cfg.plans_dir.as_deref())
    }

    pub fn plan(&self, name: &str) -> Result<Plan> {
        Plan::find(name, self.cfg.plans_dir.as_deref())
    }

    fn cluster(&self) -> Result<Cluster> {
        let file = self.cfg.cluster.as_ref().ok_or_else(|| {
            Error::Usage(
                "no cluster description: start the service with --cluster FILE or CAIRN_CLUSTER"
                    .into(),
            )
        })?;
        Cluster::load(file)
    }

    fn engine(
        self: &Arc<Self>,
        break_lock: bool,
        also: Option<Arc<dyn Progress>>,
    ) -> (Engine, Arc<Sink>, oneshot::Receiver<i64>) {
        let (tx, rx) = oneshot::channel();
        let cancel = self.stop_runs.child_token();
        let sink = Arc::new(Sink {
            svc: Arc::downgrade(self),
            run: Mutex::new(None),
            started: Mutex::new(Some(tx)),
            cancel: cancel.clone(),
            progress: Arc::new(Mutex::new(BTreeMap::new())),
            last_bytes: Mutex::new(HashMap::new()),
            plan: Mutex::new(String::new()),
            done: Mutex::new(None),
            also,
            began: std::sync::atomic::AtomicBool::new(false),
        });
        let mut engine = Engine::new(self.state.clone(), sink.clone());
        engine.cancel = cancel;
        engine.break_lock = break_lock;
        engine.config = self.cfg.config.clone();
        engine.config_given = self.cfg.config_given;
        (engine, sink, rx)
    }

    /// Start a run of `plan` in the background and return its id once it is
    /// recorded. Bad parameters, an unknown plan, a held lock… are returned here,
    /// before any run is recorded.
    pub async fn start(
        self: &Arc<Self>,
        plan: &str,
        params: Vec<CliParam>,
        break_lock: bool,
    ) -> Result<i64> {
        self.start_with(plan, params, break_lock, None).await
    }

    /// [`Service::start`], every progress event also given to `also` (the CLI's
    /// renderer).
    pub async fn start_with(
        self: &Arc<Self>,
        plan: &str,
        params: Vec<CliParam>,
        break_lock: bool,
        also: Option<Arc<dyn Progress>>,
    ) -> Result<i64> {
        let plan = self.plan(plan)?;
        let cluster = self.cluster()?;
        let checked = plan.resolve_params(&params, &[], &ProcessEnv)?;
        crate::spec::compile(&plan, &checked, &cluster, String::new(), &self.cfg.config)?;
        let (engine, sink, rx) = self.engine(break_lock, also);
        *lock(&sink.plan) = plan.name.clone();
        let task = tokio::spawn(async move {
            let r = engine.start(plan, &params, &ProcessEnv, cluster).await;
            sink.finish(&engine.state, r)
        });
        self.wait_started(rx, task).await
    }

    /// Resume a run in the background (secret parameters given again).
    pub async fn resume(
        self: &Arc<Self>,
        run: i64,
        params: Vec<CliParam>,
        break_lock: bool,
    ) -> Result<i64> {
        self.resume_with(run, params, break_lock, None).await
    }

    /// [`Service::resume`], every progress event also given to `also`.
    pub async fn resume_with(
        self: &Arc<Self>,
        run: i64,
        params: Vec<CliParam>,
        break_lock: bool,
        also: Option<Arc<dyn Progress>>,
    ) -> Result<i64> {
        let rec = self.state.run(run)?;
        let (engine, sink, rx) = self.engine(break_lock, also);
        *lock(&sink.plan) = rec.plan.clone();
        // Live from now on (its reconcile may take a while): never shown as
        // interrupted meanwhile, and never resumed twice at once here.
        if !sink.claim(self, run) {
            return Err(Error::Usage(format!(
                "run {run} is running in this server; stop it first"
            )));
        }
        let task = tokio::spawn(async move {
            let r = engine.resume(run, &params, &ProcessEnv).await;
            sink.finish(&engine.state, r)
        });
        self.wait_started(rx, task).await
    }

    async fn wait_started(
        &self,
        rx: oneshot::Receiver<i64>,
        task: tokio::task::JoinHandle<Result<i64>>,
    ) -> Result<i64> {
        match rx.await {
            Ok(id) => Ok(id),
            // It ended before it started: the error is why.
            Err(_) => match task.await {
                Ok(r) => r,
                Err(e) => Err(Error::State(format!("the run's task failed: {e}"))),
            },
        }
    }

    /// Wait for a run started here to end; how it ended (`None` for a run this
    /// process did not run).
    pub async fn wait(&self, run: i64) -> Option<Ended> {
        let done = lock(&self.live).get(&run).map(|l| l.done.clone());
        if let Some(mut d) = done {
            let _ = d.wait_for(|d| *d).await;
        }
        lock(&self.ended).get(&run).cloned()
    }

    /// Ask a run to stop (it ends CANCELLED, resumable) and wait up to `wait` for
    /// it to end. A run whose process is gone is recorded as stopped.
    pub async fn stop(&self, run: i64, wait: Duration) -> Result<RunRecord> {
        let rec = self.state.run(run)?;
        let live = lock(&self.live)
            .get(&run)
            .map(|l| (l.cancel.clone(), l.done.clone()));
        if let Some((cancel, mut done)) = live {
            self.state.request_stop(run)?;
            cancel.cancel();
            let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
            return self.state.run(run);
        }
        if !matches!(rec.status, Status::Running | Status::Pending) {
            return Err(Error::Usage(format!(
                "run {run} is not running ({})",
                rec.status
            )));
        }
        self.state.request_stop(run)?;
        let ours = rec.pid == Some(std::process::id() as i64);
        let alive = !ours && rec.pid.is_some_and(crate::engine::process_alive);
        if !alive {
            // Its process (or, here, its task) is gone: record that, so a resume
            // can take over.
            self.state.set_run_status(
                run,
                Status::Cancelled,
                Some("stopped; its process had gone"),
            )?;
        } else {
            let until = Instant::now() + wait;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if self.state.run(run)?.status != Status::Running {
                    break;
                }
            }
        }
        self.state.run(run)
    }

    /// The latest run of a plan, if any.
    pub fn latest_of(&self, plan: &str) -> Result<Option<RunRecord>> {
        Ok(self.state.runs(1000)?.into_iter().find(|r| r.plan == plan))
    }

    /// The newest runs, as shown (see [`shown`]).
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        Ok(self.state.runs(limit)?.into_iter().map(shown).collect())
    }

    /// A run with its phases and steps, and live progress if it runs here.
    pub fn run_view(&self, run: i64) -> Result<RunView> {
        let mut rec = self.state.run(run)?;
        let steps = self.state.steps(run)?;
        let (live, progress) = match lock(&self.live).get(&run) {
            Some(l) => (true, lock(&l.progress).clone()),
            None => (false, BTreeMap::new()),
        };
        if !live
            && matches!(rec.status, Status::Running | Status::Pending)
            && rec.pid == Some(std::process::id() as i64)
        {
            // Recorded as running by this process, but no task of ours runs it.
            rec.status = Status::Interrupted;
        }
        let ended = lock(&self.ended).get(&run).cloned();
        let (outcome, exit_code, summary) = match ended {
            Some(e) => (Some(e.outcome.to_string()), Some(e.exit_code), e.summary),
            None if live => (None, None, None),
            None => match from_status(rec.status) {
                Some((o, c)) => (Some(o.to_string()), Some(c), None),
                None => (None, None, None),
            },
        };
        let spec = rec
            .spec_json
            .as_deref()
            .and_then(|j| crate::spec::RunSpec::from_json(j).ok());
        let param_sources = spec
            .as_ref()
            .map(|s| {
                s.param_sources
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let steps: Vec<StepView> = steps
            .into_iter()
            .map(|mut s| {
                s.error = s.error.as_deref().map(redact);
                let p = progress.get(&s.id).copied();
                StepView {
                    bytes_done: p.map(|p| p.0),
                    bytes_total: p.and_then(|p| p.1),
                    step: s,
                }
            })
            .collect();
        let strategies: Vec<(String, String)> = spec
            .map(|s| {
                s.phases
                    .iter()
                    .map(|p| (p.name.clone(), strategy_words(p.strategy)))
                    .collect()
            })
            .unwrap_or_default();
        let phases = phases_of(&steps, &strategies);
        let rec = shown(rec);
        Ok(RunView {
            run: rec,
            live,
            outcome,
            exit_code,
            summary,
            phases,
            steps,
            param_sources,
        })
    }

    /// A plan and its latest run (or its steps, all PENDING, if it never ran).
    pub fn plan_view(&self, name: &str) -> Result<PlanView> {
        let plan = self.plan(name)?;
        if let Some(rec) = self.latest_of(&plan.name)? {
            let v = self.run_view(rec.id)?;
            return Ok(PlanView {
                name: plan.name,
                description: plan.description,
                status: v.run.status,
                run: Some(rec.id),
                errors: v.run.error.iter().cloned().collect(),
                phases: v.phases,
            });
        }
        let steps = match self.cluster() {
            Ok(c) => crate::spec::expand_steps(&plan, &c),
            Err(_) => Vec::new(),
        };
        let views: Vec<StepView> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepView {
                step: StepRecord {
                    seq: i as i64,
                    id: s.id.clone(),
                    phase: s.phase.clone(),
                    action: s.action.name().to_string(),
                    target: s
                        .node
                        .map_or_else(|| "once".to_string(), |n| format!("node-{n}")),
                    status: Status::Pending,
                    attempts: 0,
                    error: None,
                    started_at: None,
                    finished_at: None,
                    output: None,
                    scratch: None,
                },
                bytes_done: None,
                bytes_total: None,
            })
            .collect();
        let strategies: Vec<(String, String)> = plan
            .phases
            .iter()
            .map(|p| (p.name.clone(), p.strategy_template().0.to_string()))
            .collect();
        Ok(PlanView {
            name: plan.name,
            description: plan.description,
            status: Status::Pending,
            run: None,
            phases: phases_of(&views, &strategies),
            errors: Vec::new(),
        })
    }

    /// Whether a run's task runs in this process.
    pub fn is_live(&self, run: i64) -> bool {
        lock(&self.live).contains_key(&run)
    }

    pub fn live_runs(&self) -> Vec<i64> {
        lock(&self.live).keys().copied().collect()
    }

    /// Wait (up to `wait`) for every live run to end.
    pub async fn drain(&self, wait: Duration) {
        let dones: Vec<_> = lock(&self.live).values().map(|l| l.done.clone()).collect();
        for mut d in dones {
            let _ = tokio::time::timeout(wait, d.wait_for(|d| *d)).await;
        }
    }

    /// Open a store by URL, directory or profile name (options from the
    /// environment, as `cairn snapshots --store` does).
    pub async fn open_store(&self, arg: &str) -> Result<Arc<dyn crate::store::Store>> {
        use crate::config::{StoreArg, is_profile_name};
        let placed = if is_profile_name(arg) {
            self.cfg.config.store_arg(arg)?
        } else {
            StoreArg::Url(arg.to_string())
        };
        let (url, options) = match placed {
            StoreArg::Profile(p) => (p.url.clone(), p.options()?),
            StoreArg::Url(u) => (u, crate::store::options_from_env()),
        };
        crate::store::open(&url, &options).await
    }

    /// Whether `arg` names a store of this service: one of its `--store`s, a
    /// store profile, or the store of a complete run.
    pub fn known_store(&self, arg: &str) -> Result<bool> {
        let profile = crate::config::is_profile_name(arg)
            && matches!(
                self.cfg.config.store_arg(arg),
                Ok(crate::config::StoreArg::Profile(_))
            );
        if profile || self.cfg.stores.iter().any(|s| s == arg) {
            return Ok(true);
        }
        // A run that completed wrote or read a snapshot there; a refused or
        // failed one proves nothing about the place it named.
        Ok(self
            .state
            .runs(10_000)?
            .iter()
            .any(|r| r.store == arg && r.status == Status::Complete))
    }

    /// The snapshots in a store.
    pub async fn snapshots(&self, arg: &str) -> Result<Vec<crate::snapshots::SnapshotSummary>> {
        let store = self.open_store(arg).await?;
        if !store.exists().await? {
            return Err(Error::NotFound(format!(
                "store {} does not exist",
                store.describe()
            )));
        }
        let mut list = crate::snapshots::list(&*store).await?;
        list.sort_by(|a, b| {
            let key = |s| crate::snapshots::when(s).unwrap_or(i64::MAX);
            key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
        });
        Ok(list)
    }

    /// The newest COMPLETE run of each plan and store (for the page and the
    /// metrics).
    pub fn last_successes(&self) -> Result<Vec<RunRecord>> {
        metrics::last_successes(&self.state)
    }

    fn emit(&self, run: i64, kind: EventKind) {
        let _ = self.events.send(Arc::new(RunEvent { run, kind }));
    }
}

/// A run record as it may be shown: every registered secret masked in its error
/// and its parameters (a second fence; secret parameters are stored masked).
pub fn shown(mut r: RunRecord) -> RunRecord {
    r.error = r.error.as_deref().map(redact);
    for v in r.params.0.values_mut() {
        *v = redact(v);
    }
    r
}

/// `serial`, `parallel`, or `parallel, at most N at once`.
fn strategy_words(s: crate::plan::Strategy) -> String {
    match s {
        crate::plan::Strategy::Serial => "serial".into(),
        crate::plan::Strategy::Parallel { max_concurrency } if max_concurrency >= 1 << 20 => {
            "parallel".into()
        }
        crate::plan::Strategy::Parallel { max_concurrency } => {
            format!("parallel, at most {max_concurrency} at once")
        }
    }
}

/// Group steps into phases, in the order they first appear; a phase's status is
/// what its steps add up to.
fn phases_of(steps: &[StepView], strategies: &[(String, String)]) -> Vec<PhaseView> {
    let mut phases: Vec<PhaseView> = Vec::new();
    for s in steps {
        match phases.iter_mut().find(|p| p.name == s.step.phase) {
            Some(p) => p.steps.push(s.clone()),
            None => phases.push(PhaseView {
                name: s.step.phase.clone(),
                strategy: strategies
                    .iter()
                    .find(|(n, _)| *n == s.step.phase)
                    .map(|(_, st)| st.clone()),
                status: Status::Pending,
                steps: vec![s.clone()],
            }),
        }
    }
    for p in &mut phases {
        let has = |st: Status| p.steps.iter().any(|s| s.step.status == st);
        p.status = if p.steps.iter().all(|s| s.step.status.is_done()) {
            Status::Complete
        } else if has(Status::Running) {
            Status::Running
        } else if has(Status::Failed) {
            Status::Failed
        } else if has(Status::Cancelled) {
            Status::Cancelled
        } else {
            Status::Pending
        };
    }
    phases
}

/// A run's progress, as the engine reports it: kept for the views, sent to the
/// events stream, counted in the metrics.
struct Sink {
    svc: Weak<Service>,
    run: Mutex<Option<i64>>,
    started: Mutex<Option<oneshot::Sender<i64>>>,
    cancel: CancellationToken,
    progress: StepBytes,
    last_bytes: Mutex<HashMap<String, Instant>>,
    plan: Mutex<String>,
    /// Set on RunStarted: the run's end is signalled through it.
    done: Mutex<Option<tokio::sync::watch::Sender<bool>>>,
    /// Also given every event (the CLI's renderer).
    also: Option<Arc<dyn Progress>>,
    /// Set once the run began (RunStarted).
    began: std::sync::atomic::AtomicBool,
}

/// Bytes events go out at most this often per step.
const BYTES_EVERY: Duration = Duration::from_millis(250);

impl Progress for Sink {
    fn event(&self, event: Event<'_>) {
        if let Some(a) = &self.also {
            a.event(event.clone());
        }
        let Some(svc) = self.svc.upgrade() else {
            return;
        };
        let run = *lock(&self.run);
        match event {
            Event::RunStarted {
                run: id,
                plan,
                snapshot,
            } => {
                // A resume claimed its run before it began; a new run is
                // claimed now.
                if lock(&self.run).is_none() {
                    self.claim(&svc, id);
                }
                self.began.store(true, std::sync::atomic::Ordering::SeqCst);
                lock(&svc.ended).remove(&id);
                svc.metrics.active(1);
                svc.emit(
                    id,
                    EventKind::RunStarted {
                        plan: plan.to_string(),
                        snapshot: snapshot.to_string(),
                    },
                );
                if let Some(tx) = lock(&self.started).take() {
                    let _ = tx.send(id);
                }
            }
            Event::StepStarted { step, total } => {
                lock(&self.progress).insert(step.to_string(), (0, total));
                if let Some(id) = run {
                    svc.emit(
                        id,
                        EventKind::StepStarted {
                            step: step.to_string(),
                            total,
                        },
                    );
                }
            }
            Event::Bytes { step, done } => {
                let total = {
                    let mut p = lock(&self.progress);
                    let e = p.entry(step.to_string()).or_insert((0, None));
                    e.0 = done;
                    e.1
                };
                let now = Instant::now();
                let due = {
                    let mut last = lock(&self.last_bytes);
                    match last.get(step) {
                        Some(t) if now.duration_since(*t) < BYTES_EVERY => false,
                        _ => {
                            last.insert(step.to_string(), now);
                            true
                        }
                    }
                };
                if let (true, Some(id)) = (due, run) {
                    svc.emit(
                        id,
                        EventKind::Bytes {
                            step: step.to_string(),
                            done,
                            total,
                        },
                    );
                }
            }
            Event::StepFinished {
                step,
                status,
                error,
            } => {
                if let Some(id) = run {
                    svc.emit(
                        id,
                        EventKind::StepFinished {
                            step: step.to_string(),
                            status,
                            error: error.map(redact),
                        },
                    );
                }
            }
            Event::Retry {
                step,
                attempt,
                error,
            } => {
                svc.metrics.retry(&lock(&self.plan));
                if let Some(id) = run {
                    svc.emit(
                        id,
                        EventKind::Retry {
                            step: step.to_string(),
                            attempt,
                            error: redact(error),
                        },
                    );
                }
            }
            Event::RunFinished => {}
        }
    }
}

impl Sink {
    /// Make `id` this sink's run, live in the service (its task runs here), unless
    /// another task has it.
    fn claim(&self, svc: &Service, id: i64) -> bool {
        let mut live = lock(&svc.live);
        if live.contains_key(&id) {
            return false;
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        *lock(&self.done) = Some(tx);
        *lock(&self.run) = Some(id);
        live.insert(
            id,
            Live {
                cancel: self.cancel.clone(),
                progress: self.progress.clone(),
                done: rx,
            },
        );
        true
    }

    /// The run's task ended: record how, tell the stream and the metrics, and
    /// give the caller the run id or the error of a run that never started.
    fn finish(&self, state: &StateStore, r: Result<Outcome>) -> Result<i64> {
        let svc = self.svc.upgrade();
        let run = *lock(&self.run);
        let plan = lock(&self.plan).clone();
        if !self.began.load(std::sync::atomic::Ordering::SeqCst) {
            // It never began (a resume refused before it ran anything): the run
            // is as it was; only its claim goes.
            if let (Some(svc), Some(id)) = (&svc, run) {
                lock(&svc.live).remove(&id);
            }
            if let Some(tx) = lock(&self.done).take() {
                let _ = tx.send(true);
            }
            return match r {
                Ok(o) => Ok(o.run_id),
                Err(e) => Err(e),
            };
        }
        let (outcome, exit_code, summary, error, run_id) = match &r {
            Ok(o) => (
                outcome_word(o.error.as_ref()),
                o.error.as_ref().map_or(exit::OK, Error::exit_code),
                o.summary.clone(),
                o.error.as_ref().map(|e| redact(&e.to_string())),
                Some(o.run_id),
            ),
            Err(e) => (
                outcome_word(Some(e)),
                e.exit_code(),
                None,
                Some(redact(&e.to_string())),
                run,
            ),
        };
        if let (Some(svc), Some(id)) = (&svc, run_id.or(run)) {
            let rec = state.run(id).ok();
            let status = rec.as_ref().map_or(Status::Failed, |r| r.status);
            lock(&svc.ended).insert(
                id,
                Ended {
                    outcome,
                    exit_code,
                    summary: summary.clone(),
                },
            );
            let was_live = lock(&svc.live).remove(&id).is_some();
            if was_live {
                svc.metrics.active(-1);
            }
            let kind = rec
                .as_ref()
                .and_then(|r| r.spec_json.as_deref())
                .and_then(|j| crate::spec::RunSpec::from_json(j).ok())
                .map(|s| s.kind);
            svc.metrics.run_ended(
                &plan,
                rec.as_ref().map_or("", |r| r.store.as_str()),
                outcome,
                kind,
                summary.as_ref(),
            );
            svc.emit(
                id,
                EventKind::RunFinished {
                    status,
                    outcome: outcome.to_string(),
                    exit_code,
                    error,
                    summary,
                },
            );
            if let Some(tx) = lock(&self.done).take() {
                let _ = tx.send(true);
            }
        }
        match r {
            Ok(o) => Ok(o.run_id),
            Err(e) => Err(e),
        }
    }
}
