//! The engine: runs a plan's phases in order, each phase's steps per its strategy,
//! every transition saved to the state store before it takes effect, transient
//! errors retried with backoff, every step given the run's cancellation signal.

pub mod actions;
pub mod preview;

use crate::checks::{Disk, RealDisk};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::manifest::Manifest;
use crate::plan::params::{CliParam, Env, Params};
use crate::plan::{Action, Plan, Strategy};
use crate::progress::{Event, Progress};
use crate::spec::{self, RunKind, RunSpec};
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

pub use crate::spec::StepRef;

/// Everything a step needs; shared by all steps of a run.
pub struct RunCtx {
    pub run_id: i64,
    pub plan: Plan,
    /// The compiled run: the only source of what the run does.
    pub spec: RunSpec,
    /// Parameter values, secrets included: only for store options and the
    /// environment of hooks, never read by name.
    pub params: Params,
    pub cluster: Cluster,
    pub store: Arc<dyn Store>,
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
            .get_or_try_init(|| async {
                crate::checks::read_manifest(&*self.store, &self.spec.snapshot)
                    .await?
                    .open(self.spec.keys.as_ref())
            })
            .await
    }
}

/// The result of a run.
#[derive(Debug)]
pub struct Outcome {
    pub run_id: i64,
    pub status: Status,
    pub error: Option<Error>,
    /// What a complete backup or restore moved, for the final summary line.
    pub summary: Option<Summary>,
}

/// A finished run in figures: data bytes (uncompressed), bytes in the store (the
/// node objects), nodes, and this process's time on the run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub nodes: usize,
    pub files: u64,
    pub bytes: u64,
    pub stored_bytes: u64,
    pub duration_secs: f64,
    /// `stored_bytes / bytes` (0 when no data).
    #[serde(default)]
    pub ratio: f64,
    /// Data bytes per second of `duration_secs`.
    #[serde(default)]
    pub bytes_per_sec: f64,
    /// A differential backup: its parent, and the files (and their bytes) it
    /// references there instead of storing them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential: Option<DifferentialSummary>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DifferentialSummary {
    pub parent: String,
    pub unchanged_files: u64,
    pub unchanged_bytes: u64,
}

impl Summary {
    /// With `ratio` and `bytes_per_sec` worked out from the other figures.
    pub fn with_rates(mut self) -> Summary {
        self.ratio = if self.bytes > 0 {
            self.stored_bytes as f64 / self.bytes as f64
        } else {
            0.0
        };
        self.bytes_per_sec = if self.duration_secs > 0.0 {
            self.bytes as f64 / self.duration_secs
        } else {
            0.0
        };
        self
    }
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
    /// Store profiles (`cairn.toml`) for `STORE=NAME`.
    pub config: Config,
    /// Whether `config` was named (`--config`): a resume then reads it rather than
    /// the file the run started with.
    pub config_given: bool,
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
            config: Config::default(),
            config_given: false,
        }
    }

    /// Validate parameters, compile the run spec, create the run and execute it.
    /// Parameter errors are returned before any run is recorded or any step runs.
    pub async fn start(
        &self,
        plan: Plan,
        cli: &[CliParam],
        env: &dyn Env,
        cluster: Cluster,
    ) -> Result<Outcome> {
        let params = plan.resolve_params(cli, &[], env)?;
        let token = spec::new_token(self.state.path());
        let (mut spec, run_cluster) = spec::compile(&plan, &params, &cluster, token, &self.config)?;
        let store = open_store(&mut spec).await?;
        let ctx = self
            .prepare(plan, spec, params, cluster, run_cluster, store, None)
            .await?;
        self.execute(ctx).await
    }

    /// Resume a run that failed, was cancelled or was killed: finished steps whose
    /// effects still exist are kept, the others run again. Secret parameters are not
    /// stored, so they must be given again (`-p` or the environment). Parameters
    /// that would change what the run does are refused; strategy, concurrency and
    /// bandwidth may change.
    pub async fn resume(&self, run_id: i64, cli: &[CliParam], env: &dyn Env) -> Result<Outcome> {
        let rec = self.state.run(run_id)?;
        match rec.status {
            Status::Complete => {
                return Err(Error::Usage(format!("run {run_id} is already complete")));
            }
            Status::Refused => {
                return Err(Error::Usage(format!(
                    "run {run_id} was refused by its pre-flight checks and did nothing; fix what they named and start a new run"
                )));
            }
            Status::Running | Status::Pending => {
                return Err(Error::Usage(format!(
                    "run {run_id} is still running (pid {}); stop it first with `cairn plan stop {run_id}`",
                    rec.pid.unwrap_or_default()
                )));
            }
            _ => {}
        }
        if rec.spec_json.is_none() {
            return Err(Error::Usage(format!(
                "run {run_id} was recorded by an earlier cairn without a run spec and cannot be resumed safely; start a new run (its staging dirs .cairn-staging-{run_id} in the data dirs can be removed)"
            )));
        }
        // One resumer per run: two at once would redo the same steps over each other.
        if !self.state.claim_run(&rec)? {
            return Err(Error::Usage(format!(
                "run {run_id} is being resumed by another process"
            )));
        }
        match self.resume_claimed(run_id, &rec, cli, env).await {
            Ok(ctx) => self.execute(ctx).await,
            Err(e) => {
                // Nothing ran: the run goes back to a resumable status with the
                // error it had (this attempt's error is reported to its caller).
                let back = match rec.status {
                    Status::Cancelled => Status::Cancelled,
                    _ => Status::Failed,
                };
                let _ = self
                    .state
                    .set_run_status(run_id, back, rec.error.as_deref());
                Err(e)
            }
        }
    }

    /// The part of a resume after the run is claimed: compile, compare, lock,
    /// reconcile.
    async fn resume_claimed(
        &self,
        run_id: i64,
        rec: &crate::state::RunRecord,
        cli: &[CliParam],
        env: &dyn Env,
    ) -> Result<Arc<RunCtx>> {
        let Some(spec_json) = rec.spec_json.as_deref() else {
            return Err(Error::State(format!("run {run_id} has no run spec")));
        };
        let stored = RunSpec::from_json(spec_json)?;
        let plan = Plan::parse(&format!("run {run_id} plan {}", rec.plan), &rec.plan_source)?;
        let params = plan.resolve_params(cli, &rec.params.non_secret(), env)?;
        let cluster: Cluster = serde_json::from_str(&rec.cluster_json)
            .map_err(|e| Error::State(format!("run {run_id}: stored cluster: {e}")))?;
        // The profile is read again from the file the run started with, unless
        // another is named now.
        let config = match (&stored.config, self.config_given) {
            (Some(path), false) => Config::load(path)?,
            _ => self.config.clone(),
        };
        let (mut spec, run_cluster) =
            spec::compile(&plan, &params, &cluster, stored.token.clone(), &config)?;
        let store = open_store(&mut spec).await?;
        // Compared as stored: secrets masked on both sides.
        let changed = stored.fixed_differences(&RunSpec::from_json(&spec.to_json()?)?);
        if !changed.is_empty() {
            return Err(Error::Usage(format!(
                "resume cannot change what run {run_id} does ({}); resume it with its own parameters, or start a new run",
                changed.join("; ")
            )));
        }
        let ctx = self
            .prepare(
                plan,
                spec,
                params,
                cluster,
                run_cluster,
                store,
                Some((run_id, rec.created_at.clone())),
            )
            .await?;
        if let Err(e) = self.reconcile(&ctx).await {
            ctx.release_lock().await;
            return Err(e);
        }
        Ok(ctx)
    }

    /// Before a resumed run goes on: steps that did not finish run again; a commit
    /// a kill interrupted is rolled back; finished steps whose effects are gone (a
    /// removed staging dir, a deleted object) are marked to be redone.
    async fn reconcile(&self, ctx: &Arc<RunCtx>) -> Result<()> {
        let run_id = ctx.run_id;
        let (spec_json, id) = (ctx.spec.to_json()?, run_id);
        self.state.call(move |s| s.set_spec(id, &spec_json)).await?;
        let records = self.state.steps(run_id)?;
        for s in &records {
            if !s.status.is_done() && s.status != Status::Pending {
                self.state
                    .set_step(run_id, &s.id, Status::Pending, None, None)?;
            }
        }
        // A data dir swapped for a link since the run began is never followed.
        if ctx.plan.has_action(Action::CheckRestore) {
            let problems = actions::data_dirs_fit(ctx).await;
            if !problems.is_empty() {
                return Err(Error::Refused(problems));
            }
        }
        for s in &records {
            if s.action == Action::CommitRestore.name() && s.status != Status::Complete {
                actions::roll_back_commit(ctx, &s.id).await?;
            }
        }
        actions::snapshot_unchanged(ctx).await?;
        let mut gone = Vec::new();
        for step in &ctx.spec.steps {
            let Some(rec) = records.iter().find(|r| r.id == step.id) else {
                continue;
            };
            if rec.status != Status::Complete {
                continue;
            }
            if let Err(why) =
                actions::effects_hold(ctx, step, rec.output.as_deref(), actions::Depth::Content)
                    .await
            {
                tracing::warn!(step = %step.id, "redoing the step: {why}");
                gone.push((step.id.clone(), why));
            }
        }
        for (id, why) in gone {
            self.state.set_pending(run_id, &[id], &why)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &self,
        plan: Plan,
        spec: RunSpec,
        params: Params,
        cluster: Cluster,
        run_cluster: Cluster,
        store: Arc<dyn Store>,
        existing: Option<(i64, String)>,
    ) -> Result<Arc<RunCtx>> {
        let lock = self
            .lock(&spec, &store, existing.as_ref().map(|e| e.0))
            .await?;
        let created = match existing {
            Some(x) => Ok(x),
            None => {
                let steps = spec
                    .steps
                    .iter()
                    .map(|s| {
                        let target = s.node.map_or("once".to_string(), |n| format!("node-{n}"));
                        (
                            s.id.clone(),
                            s.phase.clone(),
                            s.action.name().to_string(),
                            target,
                        )
                    })
                    .collect();
                let cluster_json =
                    serde_json::to_string(&cluster).map_err(|e| Error::State(e.to_string()))?;
                let redacted = params.redacted();
                let spec_json = spec.to_json()?;
                self.state
                    .create_run(&NewRun {
                        plan: &plan.name,
                        plan_source: &plan.source,
                        params: &redacted,
                        cluster_json: &cluster_json,
                        store: &crate::redact::redact(&spec.store),
                        snapshot: &crate::redact::redact(&spec.snapshot),
                        spec_json: &spec_json,
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
        Ok(Arc::new(RunCtx {
            run_id,
            plan,
            spec,
            params,
            cluster: run_cluster,
            store,
            state: self.state.clone(),
            progress: self.progress.clone(),
            disk: self.disk.clone(),
            cancel: self.cancel.child_token(),
            started_at,
            manifest: Default::default(),
            lock: std::sync::Mutex::new(lock),
        }))
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
        spec: &RunSpec,
        store: &Arc<dyn Store>,
        resuming: Option<i64>,
    ) -> Result<Option<crate::lock::Held>> {
        use crate::lock::{Mode, Request, Settings, acquire};
        let snapshot = spec.snapshot.as_str();
        let (mode, purpose) = match spec.kind {
            RunKind::Backup => (Mode::Exclusive, "backup"),
            RunKind::Restore => (Mode::Shared, "restore"),
            RunKind::Other => return Ok(None),
        };
        // An unreachable store or wrong credentials are refused like any other
        // pre-flight problem, before anything is written.
        store
            .check()
            .await
            .map_err(|e| Error::Checks(vec![e.to_string()]))?;
        let owner = format!("plan {}", spec.plan);
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

    async fn execute(&self, ctx: Arc<RunCtx>) -> Result<Outcome> {
        let began = std::time::Instant::now();
        let run_id = ctx.run_id;
        self.state.set_run_status(run_id, Status::Running, None)?;
        tracing::info!(run = run_id, plan = %ctx.spec.plan, snapshot = %ctx.spec.snapshot, store = %ctx.store.describe(), "run started");
        ctx.progress.event(Event::RunStarted {
            run: run_id,
            plan: &ctx.spec.plan,
            snapshot: &ctx.spec.snapshot,
        });
        let watcher = spawn_stop_watcher(ctx.clone());
        let mut failure: Option<(Error, bool)> = None;
        for phase in &ctx.spec.phases {
            let records = self.state.steps(run_id)?;
            let todo: Vec<StepRef> = ctx
                .spec
                .steps
                .iter()
                .filter(|s| s.phase == phase.name)
                .filter(|s| {
                    records
                        .iter()
                        .find(|r| r.id == s.id)
                        .is_none_or(|r| !r.status.is_done())
                })
                .cloned()
                .collect();
            if todo.is_empty() {
                continue;
            }
            tracing::info!(run = run_id, phase = %phase.name, steps = todo.len(), strategy = ?phase.strategy, "phase");
            let preflight = todo
                .iter()
                .all(|s| matches!(s.action, Action::CheckBackup | Action::CheckRestore));
            if let Err(e) = self.run_phase(&ctx, phase.strategy, todo).await {
                failure = Some((e, preflight));
                break;
            }
        }
        watcher.abort();
        let cancelled = ctx.cancel.is_cancelled()
            || failure
                .as_ref()
                .is_some_and(|(e, _)| matches!(e.root(), Error::Cancelled));
        let status = match (&failure, cancelled) {
            (None, _) => Status::Complete,
            (Some(_), true) => Status::Cancelled,
            (Some((e, true)), false)
                if matches!(e.root(), Error::Checks(_) | Error::NotFound(_)) =>
            {
                Status::Refused
            }
            (Some(_), false) => Status::Failed,
        };
        if status == Status::Failed {
            self.run_on_failure(&ctx, false).await;
        } else if status == Status::Cancelled {
            // A cancelled run keeps what a resume reuses (staged data), but no
            // node keeps a snapshot pinning files the service has deleted.
            self.run_on_failure(&ctx, true).await;
        }
        let error = match (failure, cancelled) {
            (Some(_), true) => Some(Error::Cancelled),
            (Some((e, _)), false) if status == Status::Refused => Some(e.root_owned()),
            (f, _) => f.map(|(e, _)| e),
        };
        let msg = error.as_ref().map(|e| e.to_string());
        ctx.release_lock().await;
        self.state.set_run_status(run_id, status, msg.as_deref())?;
        tracing::info!(run = run_id, status = %status, "run finished");
        let summary = if status == Status::Complete {
            actions::summary(&ctx, began.elapsed().as_secs_f64()).await
        } else {
            None
        };
        self.progress.event(Event::RunFinished);
        Ok(Outcome {
            run_id,
            status,
            error,
            summary,
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
            let work = async {
                crate::failpoint::hit(&format!("before:{}", step.id))?;
                let out = actions::run(ctx, step).await?;
                crate::failpoint::hit(&format!("after:{}", step.id))?;
                Ok(out)
            };
            // A commit is never dropped halfway: it sees the cancellation itself,
            // and moves back what it moved on every node before it returns, so a
            // cancelled restore leaves the target as it was.
            let result = if step.action == Action::CommitRestore {
                work.await
            } else {
                tokio::select! {
                    r = work => r,
                    _ = ctx.cancel.cancelled() => Err(Error::Cancelled),
                }
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
                    // A refusal's problems are printed once, by the run's end.
                    let shown = (!matches!(e.root(), Error::Checks(_))).then_some(msg.as_str());
                    ctx.progress.event(Event::StepFinished {
                        step: &step.id,
                        status: Status::Failed,
                        error: shown,
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

    async fn run_on_failure(&self, ctx: &Arc<RunCtx>, snapshots_only: bool) {
        for spec in &ctx.plan.on_failure {
            if snapshots_only && spec.action != Action::DropSnapshots {
                continue;
            }
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

/// Open the store the spec names, wrapped in the run's bandwidth cap, and record
/// its resolved name in the spec.
async fn open_store(spec: &mut RunSpec) -> Result<Arc<dyn Store>> {
    let mut store = store::open(&spec.store, &spec.store_options).await?;
    spec.store = store.describe();
    if let Some(rate) = spec.bandwidth {
        store = Arc::new(store::throttle::Throttled::new(store, rate));
    }
    Ok(store)
}

/// How a run reaches a node's disk: in this process, or through the node's `exec`
/// prefix and a `cairn agent` on its host.
pub fn node_exec(
    node: &crate::cluster::Node,
    store: &Arc<dyn Store>,
    spec: &RunSpec,
    params: &Params,
    disk: &Arc<dyn Disk>,
) -> Box<dyn crate::node::NodeExec> {
    if !node.is_remote() {
        return Box::new(crate::node::Local {
            store: store.clone(),
            disk: disk.clone(),
        });
    }
    Box::new(crate::node::Remote {
        node: node.clone(),
        store: store.clone(),
        target: crate::node::StoreTarget {
            url: store.url(),
            options: spec.store_options.clone(),
            bandwidth: spec.bandwidth,
        },
        // Secret parameters, and the secrets a store profile brought (not
        // parameters): the agent masks them all in what it prints.
        secrets: params
            .iter()
            .filter(|(k, _)| params.is_secret(k))
            .map(|(_, v)| v.clone())
            .chain(
                spec.store_options
                    .iter()
                    .filter(|(k, _)| crate::store::SECRET_OPTIONS.contains(&k.as_str()))
                    .map(|(_, v)| v.clone()),
            )
            .filter(|v| !v.is_empty())
            .collect(),
    })
}

impl RunCtx {
    /// How this run reaches a node's disk (see [`node_exec`]).
    pub fn exec(&self, node: &crate::cluster::Node) -> Box<dyn crate::node::NodeExec> {
        node_exec(node, &self.store, &self.spec, &self.params, &self.disk)
    }

    /// Release the store lock (once).
    async fn release_lock(&self) {
        let held = match self.lock.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(l) = held {
            l.release().await;
        }
    }
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
    // A process that has exited but is not yet reaped (a zombie: state Z, or X
    // while it goes) runs nothing: its run is not alive.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod liveness_tests {
    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = i64::from(child.id());
        // Exited, not yet reaped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::process_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "a zombie counts as alive"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "still unreaped"
        );
        let _ = child.wait();
        assert!(super::process_alive(i64::from(std::process::id())));
    }
}
