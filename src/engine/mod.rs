//! The engine: runs a plan's phases in order, each phase's steps per its strategy,
//! every transition saved to the state store before it takes effect, transient
//! errors retried with backoff, every step given the run's cancellation signal.

pub mod actions;

use crate::checks::{Disk, RealDisk};
use crate::cluster::{Cluster, Selection};
use crate::manifest::Manifest;
use crate::plan::params::{CliParam, Env, Params};
use crate::plan::{Action, On, Plan, Strategy};
use crate::progress::{Event, Progress};
use crate::state::{NewRun, StateStore, Status};
use crate::store::{self, Store};
use crate::{Error, Result};
use backon::BackoffBuilder;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Retry settings for transient step errors.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, including the first.
    pub max_attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts, 1 s doubling to at most 30 s, with jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// One concrete step of a run.
#[derive(Debug, Clone)]
pub struct StepRef {
    pub id: String,
    pub phase: String,
    pub action: Action,
    pub node: Option<u32>,
}

/// Everything a step needs; shared by all steps of a run.
pub struct RunCtx {
    pub run_id: i64,
    pub plan: Plan,
    pub params: Params,
    pub cluster: Cluster,
    pub store: Arc<dyn Store>,
    pub snapshot: String,
    pub selection: Selection,
    pub state: StateStore,
    pub progress: Arc<dyn Progress>,
    pub disk: Arc<dyn Disk>,
    pub cancel: CancellationToken,
    pub started_at: String,
    manifest: tokio::sync::OnceCell<Manifest>,
    /// The store lock on the snapshot, released when the run ends.
    lock: std::sync::Mutex<Option<crate::lock::Held>>,
}

impl RunCtx {
    /// The manifest of the snapshot being restored (read once per process).
    pub async fn manifest(&self) -> Result<&Manifest> {
        self.manifest
            .get_or_try_init(|| crate::checks::read_manifest(&*self.store, &self.snapshot))
            .await
    }
}

/// The result of a run.
#[derive(Debug)]
pub struct Outcome {
    pub run_id: i64,
    pub status: Status,
    pub error: Option<Error>,
}

impl Outcome {
    pub fn into_result(self) -> Result<i64> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.run_id),
        }
    }
}

pub struct Engine {
    pub state: StateStore,
    pub progress: Arc<dyn Progress>,
    pub disk: Arc<dyn Disk>,
    pub cancel: CancellationToken,
    pub retry: RetryPolicy,
    /// Remove a stale lock on the snapshot (`--break-lock`).
    pub break_lock: bool,
}

impl Engine {
    pub fn new(state: StateStore, progress: Arc<dyn Progress>) -> Engine {
        Engine {
            state,
            progress,
            disk: Arc::new(RealDisk),
            cancel: CancellationToken::new(),
            retry: RetryPolicy::default(),
            break_lock: false,
        }
    }

    /// Validate parameters, create the run and execute it. Parameter errors are
    /// returned before any run is recorded or any step runs.
    pub async fn start(
        &self,
        plan: Plan,
        cli: &[CliParam],
        env: &dyn Env,
        cluster: Cluster,
    ) -> Result<Outcome> {
        let params = Params::resolve(&plan.params, cli, env)?;
        let ctx = self.prepare(plan, params, cluster, None).await?;
        self.execute(ctx).await
    }

    /// Resume a run that failed, was cancelled or was killed: finished steps are
    /// kept, the others run again. Secret parameters are not stored, so they must be
    /// given again (`-p` or the environment).
    pub async fn resume(&self, run_id: i64, cli: &[CliParam], env: &dyn Env) -> Result<Outcome> {
        let rec = self.state.run(run_id)?;
        if rec.status == Status::Complete {
            return Err(Error::Usage(format!("run {run_id} is already complete")));
        }
        if rec.status == Status::Running
            && let Some(pid) = rec.pid
            && pid != std::process::id() as i64
            && process_alive(pid)
        {
            return Err(Error::Usage(format!(
                "run {run_id} is still running (pid {pid}); stop it first with `cairn plan stop {run_id}`"
            )));
        }
        let plan = Plan::parse(&format!("run {run_id} plan {}", rec.plan), &rec.plan_source)?;
        // Stored (non-secret) values first; anything given now overrides them.
        let mut merged: Vec<CliParam> = rec
            .params
            .non_secret()
            .into_iter()
            .filter(|p| !cli.iter().any(|c| c.key == p.key))
            .collect();
        merged.extend(cli.iter().cloned());
        let params = Params::resolve(&plan.params, &merged, env)?;
        let cluster: Cluster = serde_json::from_str(&rec.cluster_json)
            .map_err(|e| Error::State(format!("run {run_id}: stored cluster: {e}")))?;
        let ctx = self
            .prepare(plan, params, cluster, Some((run_id, rec.created_at)))
            .await?;
        if ctx.snapshot != rec.snapshot {
            return Err(Error::Usage(format!(
                "run {run_id} was for snapshot {:?}; resume cannot change it to {:?}",
                rec.snapshot, ctx.snapshot
            )));
        }
        // Steps that did not finish run again.
        for s in self.state.steps(run_id)? {
            if !s.status.is_done() && s.status != Status::Pending {
                self.state
                    .set_step(run_id, &s.id, Status::Pending, None, None)?;
            }
        }
        self.execute(ctx).await
    }

    async fn prepare(
        &self,
        plan: Plan,
        params: Params,
        cluster: Cluster,
        existing: Option<(i64, String)>,
    ) -> Result<RunCtx> {
        // Strategies are checked now so a bad value fails before the first step.
        for ph in &plan.phases {
            ph.strategy(&params)?;
        }
        let snapshot = params.expand(&plan.target.snapshot);
        if snapshot.is_empty() {
            return Err(Error::Params(vec!["the snapshot name is empty".into()]));
        }
        crate::store::check_key(&snapshot).map_err(|_| {
            Error::Params(vec![format!(
                "snapshot name {snapshot:?} is not a valid folder name"
            )])
        })?;
        let selection = Selection::parse(&params.expand(&plan.target.keyspaces))
            .with_paths(params.get("PATHS"))?;
        let options = plan
            .target
            .store_options
            .iter()
            .map(|(k, v)| (k.clone(), params.expand(v)))
            .collect();
        let mut store = store::open(&params.expand(&plan.target.store), &options).await?;
        let bandwidth = params.expand(&plan.target.bandwidth);
        if !bandwidth.trim().is_empty() {
            let rate = store::throttle::parse_rate(&bandwidth)?;
            store = Arc::new(store::throttle::Throttled::new(store, rate));
        }
        let cluster = restrict_cluster(cluster, &params)?;
        let lock = self
            .lock(&plan, &store, &snapshot, existing.as_ref().map(|e| e.0))
            .await?;
        let created = match existing {
            Some(x) => Ok(x),
            None => {
                let steps = expand_steps(&plan, &cluster)
                    .into_iter()
                    .map(|s| {
                        let target = s.node.map_or("once".to_string(), |n| format!("node-{n}"));
                        (s.id, s.phase, s.action.name().to_string(), target)
                    })
                    .collect();
                let cluster_json =
                    serde_json::to_string(&cluster).map_err(|e| Error::State(e.to_string()))?;
                let redacted = params.redacted();
                self.state
                    .create_run(&NewRun {
                        plan: &plan.name,
                        plan_source: &plan.source,
                        params: &redacted,
                        cluster_json: &cluster_json,
                        store: &store.describe(),
                        snapshot: &snapshot,
                        steps,
                    })
                    .and_then(|id| Ok((id, self.state.run(id)?.created_at)))
            }
        };
        let created = match (created, &lock) {
            (Ok((id, at)), Some(l)) => l.set_run(&self.run_ref(id)).await.map(|()| (id, at)),
            (c, _) => c,
        };
        let (run_id, started_at) = match created {
            Ok(x) => x,
            Err(e) => {
                if let Some(l) = lock {
                    l.release().await;
                }
                return Err(e);
            }
        };
        Ok(RunCtx {
            run_id,
            plan,
            params,
            cluster,
            store,
            snapshot,
            selection,
            state: self.state.clone(),
            progress: self.progress.clone(),
            disk: self.disk.clone(),
            cancel: self.cancel.child_token(),
            started_at,
            manifest: Default::default(),
            lock: std::sync::Mutex::new(lock),
        })
    }

    /// Backups lock their snapshot exclusively, restores share it.
    /// How a lock names a run: unique across hosts and state homes.
    fn run_ref(&self, run: i64) -> String {
        format!(
            "{}:{}#{run}",
            crate::lock::hostname(),
            self.state.path().display()
        )
    }

    async fn lock(
        &self,
        plan: &Plan,
        store: &Arc<dyn Store>,
        snapshot: &str,
        resuming: Option<i64>,
    ) -> Result<Option<crate::lock::Held>> {
        use crate::lock::{Mode, Request, Settings, acquire};
        let (mode, purpose) = if plan.has_action(Action::BackupNode) {
            (Mode::Exclusive, "backup")
        } else if plan.has_action(Action::StageNode) {
            (Mode::Shared, "restore")
        } else {
            return Ok(None);
        };
        // An unreachable store or wrong credentials are refused like any other
        // pre-flight problem, before anything is written.
        store
            .check()
            .await
            .map_err(|e| Error::Checks(vec![e.to_string()]))?;
        let owner = format!("plan {}", plan.name);
        let run = resuming.map(|r| self.run_ref(r));
        let req = Request {
            snapshot,
            mode,
            purpose,
            owner: &owner,
            break_stale: self.break_lock,
            run: run.as_deref(),
        };
        match acquire(store.clone(), &req, Settings::from_env()).await {
            Ok(h) => Ok(Some(h)),
            Err(e @ Error::Locked(_)) => Err(e),
            Err(e) => Err(Error::Checks(vec![format!(
                "cannot take the lock on snapshot {snapshot:?}: {e}"
            )])),
        }
    }

    async fn execute(&self, ctx: RunCtx) -> Result<Outcome> {
        let ctx = Arc::new(ctx);
        let run_id = ctx.run_id;
        self.state.set_run_status(run_id, Status::Running, None)?;
        tracing::info!(run = run_id, plan = %ctx.plan.name, snapshot = %ctx.snapshot, store = %ctx.store.describe(), "run started");
        ctx.progress.event(Event::RunStarted {
            run: run_id,
            plan: &ctx.plan.name,
            snapshot: &ctx.snapshot,
        });
        let watcher = spawn_stop_watcher(ctx.clone());
        let mut failure: Option<Error> = None;
        for phase in &ctx.plan.phases {
            let strategy = phase.strategy(&ctx.params)?;
            let records = self.state.steps(run_id)?;
            let todo: Vec<StepRef> = expand_steps(&ctx.plan, &ctx.cluster)
                .into_iter()
                .filter(|s| s.phase == phase.name)
                .filter(|s| {
                    records
                        .iter()
                        .find(|r| r.id == s.id)
                        .is_none_or(|r| !r.status.is_done())
                })
                .collect();
            if todo.is_empty() {
                continue;
            }
            tracing::info!(run = run_id, phase = %phase.name, steps = todo.len(), ?strategy, "phase");
            if let Err(e) = self.run_phase(&ctx, strategy, todo).await {
                failure = Some(e);
                break;
            }
        }
        watcher.abort();
        let cancelled = ctx.cancel.is_cancelled()
            || failure
                .as_ref()
                .is_some_and(|e| matches!(e.root(), Error::Cancelled));
        let status = match (&failure, cancelled) {
            (None, _) => Status::Complete,
            (Some(_), true) => Status::Cancelled,
            (Some(_), false) => Status::Failed,
        };
        if status == Status::Failed {
            self.run_on_failure(&ctx).await;
        }
        let error = match (failure, cancelled) {
            (Some(_), true) => Some(Error::Cancelled),
            (f, _) => f,
        };
        let msg = error.as_ref().map(|e| e.to_string());
        let held = match ctx.lock.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(l) = held {
            l.release().await;
        }
        self.state.set_run_status(run_id, status, msg.as_deref())?;
        tracing::info!(run = run_id, status = %status, "run finished");
        Ok(Outcome {
            run_id,
            status,
            error,
        })
    }

    async fn run_phase(
        &self,
        ctx: &Arc<RunCtx>,
        strategy: Strategy,
        steps: Vec<StepRef>,
    ) -> Result<()> {
        match strategy {
            Strategy::Serial => {
                for s in steps {
                    self.run_step(ctx, &s).await?;
                }
                Ok(())
            }
            Strategy::Parallel { max_concurrency } => {
                // After the first failure no new step starts; steps in flight finish
                // (their work is kept for a resume) and the first error is returned.
                let stop = CancellationToken::new();
                let results: Vec<Result<()>> = futures::stream::iter(steps)
                    .map(|s| {
                        let stop = stop.clone();
                        async move {
                            if stop.is_cancelled() {
                                return Ok(());
                            }
                            let r = self.run_step(ctx, &s).await;
                            if r.is_err() {
                                stop.cancel();
                            }
                            r
                        }
                    })
                    .buffer_unordered(max_concurrency.max(1))
                    .collect()
                    .await;
                results.into_iter().collect()
            }
        }
    }

    async fn run_step(&self, ctx: &Arc<RunCtx>, step: &StepRef) -> Result<()> {
        if ctx.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.max_attempts.saturating_sub(1))
            .with_jitter()
            .build();
        let mut attempt = 1u32;
        loop {
            self.save(ctx, step, Status::Running, None, None).await?;
            let result = tokio::select! {
                r = actions::run(ctx, step) => r,
                _ = ctx.cancel.cancelled() => Err(Error::Cancelled),
            };
            match result {
                Ok(output) => {
                    self.save(ctx, step, Status::Complete, None, output).await?;
                    ctx.progress.event(Event::StepFinished {
                        step: &step.id,
                        status: Status::Complete,
                        error: None,
                    });
                    return Ok(());
                }
                Err(e) if matches!(e.root(), Error::Cancelled) || ctx.cancel.is_cancelled() => {
                    self.save(ctx, step, Status::Cancelled, Some("cancelled".into()), None)
                        .await?;
                    ctx.progress.event(Event::StepFinished {
                        step: &step.id,
                        status: Status::Cancelled,
                        error: None,
                    });
                    return Err(Error::Cancelled);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if e.is_transient()
                        && let Some(delay) = delays.next()
                    {
                        tracing::warn!(step = %step.id, attempt, "transient error, retrying in {:?}: {msg}", delay);
                        ctx.progress.event(Event::Retry {
                            step: &step.id,
                            attempt,
                            error: &msg,
                        });
                        self.save(ctx, step, Status::Failed, Some(msg.clone()), None)
                            .await?;
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = ctx.cancel.cancelled() => {
                                self.save(ctx, step, Status::Cancelled, Some("cancelled".into()), None).await?;
                                return Err(Error::Cancelled);
                            }
                        }
                        attempt += 1;
                        continue;
                    }
                    self.save(ctx, step, Status::Failed, Some(msg.clone()), None)
                        .await?;
                    ctx.progress.event(Event::StepFinished {
                        step: &step.id,
                        status: Status::Failed,
                        error: Some(&msg),
                    });
                    return Err(Error::Step {
                        step: step.id.clone(),
                        source: Box::new(e),
                    });
                }
            }
        }
    }

    /// Save a step transition, off the async threads, before the engine moves on.
    async fn save(
        &self,
        ctx: &RunCtx,
        step: &StepRef,
        status: Status,
        error: Option<String>,
        output: Option<String>,
    ) -> Result<()> {
        let (run, id) = (ctx.run_id, step.id.clone());
        self.state
            .call(move |s| s.set_step(run, &id, status, error.as_deref(), output.as_deref()))
            .await
    }

    async fn run_on_failure(&self, ctx: &Arc<RunCtx>) {
        for spec in &ctx.plan.on_failure {
            let step = StepRef {
                id: format!("on-failure/{}", spec.action.name()),
                phase: "on-failure".into(),
                action: spec.action,
                node: None,
            };
            if let Err(e) = actions::run(ctx, &step).await {
                tracing::warn!(step = %step.id, "on-failure step failed: {e}");
            }
        }
    }
}

/// The concrete steps of a plan for a cluster, in execution order.
pub fn expand_steps(plan: &Plan, cluster: &Cluster) -> Vec<StepRef> {
    let mut out = Vec::new();
    for phase in &plan.phases {
        for spec in &phase.steps {
            match spec.on {
                On::Once => out.push(StepRef {
                    id: format!("{}/{}", phase.name, spec.action.name()),
                    phase: phase.name.clone(),
                    action: spec.action,
                    node: None,
                }),
                On::EachNode => {
                    for n in &cluster.nodes {
                        out.push(StepRef {
                            id: format!("{}/{}/node-{}", phase.name, spec.action.name(), n.index),
                            phase: phase.name.clone(),
                            action: spec.action,
                            node: Some(n.index),
                        })
                    }
                }
            }
        }
    }
    out
}

/// Cancel the run when `cairn plan stop` asks for it.
fn spawn_stop_watcher(ctx: Arc<RunCtx>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let state = ctx.state.clone();
            let id = ctx.run_id;
            if let Ok(true) = state.call(move |s| s.stop_requested(id)).await {
                tracing::warn!(run = id, "stop requested");
                ctx.cancel.cancel();
                return;
            }
        }
    })
}

/// Whether a process with this pid exists (Linux: /proc).
pub fn process_alive(pid: i64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Apply a restore's `NODES` (only these node indexes) and `RESTORE_DIR` (restore
/// node `i` into `<RESTORE_DIR>/node-<i>` instead of its data dir) parameters.
fn restrict_cluster(mut cluster: Cluster, params: &Params) -> Result<Cluster> {
    let nodes = params.get("NODES").trim();
    if !nodes.is_empty() {
        let mut wanted = std::collections::BTreeSet::new();
        for n in nodes.split([',', ' ']).filter(|s| !s.is_empty()) {
            let i: u32 = n
                .parse()
                .map_err(|_| Error::Params(vec![format!("NODES: {n:?} is not a node index")]))?;
            if cluster.node(i).is_none() {
                return Err(Error::Params(vec![format!(
                    "NODES: the cluster description has no node {i}"
                )]));
            }
            wanted.insert(i);
        }
        cluster.nodes.retain(|n| wanted.contains(&n.index));
        cluster.partial = true;
    }
    let dir = params.get("RESTORE_DIR").trim();
    if !dir.is_empty() {
        let dir = std::path::absolute(dir).map_err(|e| Error::io("resolve", dir, e))?;
        for n in &mut cluster.nodes {
            n.data_dir = dir.join(format!("node-{}", n.index));
            n.pre_hook.clear();
            n.post_hook.clear();
        }
    }
    Ok(cluster)
}
