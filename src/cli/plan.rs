//! `cairn plan list | show | start | status | history | stop | resume`.

use super::output::{print_json, progress};
use super::{Globals, PlanCmd, cancel_on_signals, usage};
use crate::cluster::Cluster;
use crate::engine::{Engine, Outcome, process_alive};
use crate::error::exit;
use crate::plan::Plan;
use crate::plan::params::{CliParam, ProcessEnv};
use crate::redact::redact;
use crate::state::{RunRecord, StateStore, Status};
use crate::{Error, Result};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

pub async fn run(g: &Globals, cmd: PlanCmd) -> Result<i32> {
    match cmd {
        PlanCmd::List => list(g),
        PlanCmd::Show { plan } => show(g, &plan),
        PlanCmd::Start {
            plan,
            params,
            cluster,
            break_lock,
            dry_run,
        } => {
            // DRY_RUN is cairn's, for every plan: taken out before the plan's own
            // parameters are checked.
            let mut dry = dry_run;
            let mut rest = Vec::new();
            for p in params {
                if p.key == "DRY_RUN" {
                    match p.value.trim().to_ascii_lowercase().as_str() {
                        "true" | "yes" | "1" => dry = true,
                        "false" | "no" | "0" | "" => {}
                        v => {
                            return Err(Error::Params(vec![format!(
                                "DRY_RUN={v:?}: give true or false"
                            )]));
                        }
                    }
                } else {
                    rest.push(p);
                }
            }
            if dry {
                return dry_run_start(g, &plan, &rest, cluster).await;
            }
            not_started_line(g, &plan, start(g, &plan, &rest, cluster, break_lock).await)
        }
        PlanCmd::Status { run } => status(g, run),
        PlanCmd::History { limit } => history(g, limit),
        PlanCmd::Stop { run } => stop(g, run).await,
        PlanCmd::Resume {
            run,
            params,
            break_lock,
        } => not_started_line(
            g,
            &format!("run {run}"),
            resume(g, run, &params, break_lock).await,
        ),
    }
}

fn list(g: &Globals) -> Result<i32> {
    let plans = Plan::list(g.plans_dir.as_deref())?;
    if g.json {
        let v: Vec<_> = plans
            .iter()
            .map(|p| json!({"name": p.name, "description": p.description}))
            .collect();
        print_json(&json!(v));
    } else {
        for p in plans {
            crate::out!("{:16} {}", p.name, p.description);
        }
    }
    Ok(exit::OK)
}

fn show(g: &Globals, name: &str) -> Result<i32> {
    let p = Plan::find(name, g.plans_dir.as_deref())?;
    let params: Vec<_> = p
        .params
        .iter()
        .map(|s| {
            json!({
                "name": s.name, "required": s.required, "default": s.default,
                "pattern": s.pattern.as_ref().map(|r| r.as_str()), "secret": s.secret,
                "description": s.description,
            })
        })
        .collect();
    let phases: Vec<_> = p
        .phases
        .iter()
        .map(|ph| {
            let (strategy, max) = ph.strategy_template();
            json!({"name": ph.name, "strategy": strategy, "max_concurrency": max, "steps": ph.steps})
        })
        .collect();
    if g.json {
        print_json(
            &json!({"name": p.name, "description": p.description, "parameters": params, "phases": phases, "on_failure": p.on_failure}),
        );
        return Ok(exit::OK);
    }
    crate::out!("{} — {}\n\nparameters:", p.name, p.description);
    for l in param_lines(&p) {
        crate::out!("{l}");
    }
    crate::out!("\nphases:");
    for ph in &p.phases {
        let (strategy, max) = ph.strategy_template();
        let steps: Vec<String> = ph
            .steps
            .iter()
            .map(|s| {
                let on = match s.on {
                    crate::plan::On::Once => "once",
                    crate::plan::On::EachNode => "on each node",
                };
                format!("{} {on}", s.action.name())
            })
            .collect();
        let param = |t: &str| {
            t.strip_prefix("${")
                .and_then(|t| t.strip_suffix('}'))
                .map(str::to_string)
        };
        let how = match param(strategy) {
            Some(p) => format!("serial or parallel ({p})"),
            None => strategy.to_string(),
        };
        match max {
            Some(m) => crate::out!(
                "  {:12} {how}, at most {} nodes at once: {}",
                ph.name,
                param(m).unwrap_or_else(|| m.to_string()),
                steps.join(", ")
            ),
            None => crate::out!("  {:12} {how}: {}", ph.name, steps.join(", ")),
        }
    }
    if !p.on_failure.is_empty() {
        let steps: Vec<&str> = p.on_failure.iter().map(|s| s.action.name()).collect();
        crate::out!("  on failure: {}", steps.join(", "));
    }
    Ok(exit::OK)
}

fn engine(g: &Globals, break_lock: bool) -> Result<Engine> {
    let mut engine = Engine::new(g.state()?, progress(g.quiet || g.json));
    engine.break_lock = break_lock;
    cancel_on_signals(engine.cancel.clone());
    Ok(engine)
}

/// The word a machine reads first: what happened.
fn outcome_word(error: Option<&Error>) -> &'static str {
    match error.map(|e| e.root()) {
        None => "success",
        Some(Error::Checks(_)) => "refused",
        Some(Error::Locked(_)) => "locked",
        Some(Error::Cancelled) => "cancelled",
        Some(Error::Usage(_) | Error::Params(_) | Error::Plan { .. } | Error::Cluster { .. }) => {
            "invalid"
        }
        Some(_) => "failed",
    }
}

/// With --json, a run that could not even start (bad parameters, lock held…) still
/// ends with one summary line.
fn not_started_line(g: &Globals, what: &str, r: Result<i32>) -> Result<i32> {
    if g.json
        && let Err(e) = &r
        && !matches!(e, Error::Step { .. })
        && !STARTED.load(std::sync::atomic::Ordering::SeqCst)
    {
        print_json(&json!({
            "run": null, "plan": what, "outcome": outcome_word(Some(e)), "status": "NOT_STARTED",
            "error": redact(&e.to_string()), "exit_code": e.exit_code(),
        }));
    }
    r
}

/// Set once a run's summary line has been printed.
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn start(
    g: &Globals,
    name: &str,
    params: &[CliParam],
    cluster: Option<PathBuf>,
    break_lock: bool,
) -> Result<i32> {
    let plan = Plan::find(name, g.plans_dir.as_deref())?;
    let cluster_file = cluster
        .ok_or_else(|| usage("no cluster description: pass --cluster FILE or set CAIRN_CLUSTER"))?;
    let cluster = Cluster::load(&cluster_file)?;
    let config = g.config(Some(&cluster_file))?;
    // Bad parameters are refused before a state home is made or opened.
    let checked = plan.resolve_params(params, &[], &ProcessEnv)?;
    crate::spec::compile(&plan, &checked, &cluster, String::new(), &config)?;
    let mut engine = engine(g, break_lock)?;
    engine.config = config;
    engine.config_given = g.config.is_some();
    let outcome = engine.start(plan, params, &ProcessEnv, cluster).await?;
    finish(g, &engine.state, outcome)
}

/// `plan start --dry-run`: the pre-flight, and what the run would do.
async fn dry_run_start(
    g: &Globals,
    name: &str,
    params: &[CliParam],
    cluster: Option<PathBuf>,
) -> Result<i32> {
    let plan = Plan::find(name, g.plans_dir.as_deref())?;
    let cluster_file = cluster
        .ok_or_else(|| usage("no cluster description: pass --cluster FILE or set CAIRN_CLUSTER"))?;
    let cluster = Cluster::load(&cluster_file)?;
    let config = g.config(Some(&cluster_file))?;
    let p = crate::engine::preview::preview(
        plan,
        params,
        &ProcessEnv,
        cluster,
        std::sync::Arc::new(crate::checks::RealDisk),
        &config,
    )
    .await?;
    if g.json {
        STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
        print_json(&json!({"dry_run": true, "outcome": "success", "preview": p}));
        return Ok(exit::OK);
    }
    let what = match p.kind {
        crate::spec::RunKind::Restore => "restore",
        _ => "back up",
    };
    crate::out!(
        "dry run of {}: the checks pass; it would {what} snapshot {} in {} (nothing was changed)",
        p.plan,
        p.snapshot,
        p.store
    );
    for n in &p.nodes {
        let ks = if n.keyspaces.is_empty() {
            "no keyspace".to_string()
        } else {
            format!(
                "{} keyspace(s) {}",
                n.keyspaces.len(),
                n.keyspaces.join(", ")
            )
        };
        let size = match (n.files, n.bytes) {
            (Some(f), Some(b)) => format!(", {f} file(s), {}", crate::checks::human(b)),
            _ => String::new(),
        };
        let arrow = if p.kind == crate::spec::RunKind::Restore {
            "into"
        } else {
            "from"
        };
        crate::out!(
            "  node {} ({}): {ks}{size} {arrow} {}",
            n.node,
            n.via,
            n.data_dir.display()
        );
        for d in &n.creates {
            crate::out!("    would make {}", d.display());
        }
    }
    if let (Some(f), Some(b)) = (p.files, p.bytes) {
        crate::out!("  total: {f} file(s), {}", crate::checks::human(b));
    }
    if p.manager {
        crate::out!("  and the manager's state from the snapshot's manager.zip");
    }
    Ok(exit::OK)
}

async fn resume(g: &Globals, run: i64, params: &[CliParam], break_lock: bool) -> Result<i32> {
    let mut engine = engine(g, break_lock)?;
    engine.config = g.config(None)?;
    engine.config_given = g.config.is_some();
    let outcome = engine.resume(run, params, &ProcessEnv).await?;
    finish(g, &engine.state, outcome)
}

/// Print the summary of a finished run; the error (if any) goes back to main.
fn finish(g: &Globals, state: &StateStore, outcome: Outcome) -> Result<i32> {
    let rec = state.run(outcome.run_id)?;
    if g.json {
        STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
        print_json(&json!({
            "run": rec.id, "plan": rec.plan, "snapshot": rec.snapshot, "store": rec.store,
            "outcome": outcome_word(outcome.error.as_ref()),
            "status": rec.status, "error": rec.error,
            "started_at": rec.created_at, "finished_at": rec.finished_at,
            "exit_code": outcome.error.as_ref().map_or(exit::OK, Error::exit_code),
            "summary": outcome.summary,
        }));
    } else if outcome.error.is_none() {
        crate::out!(
            "run {} {}: {} snapshot {} in {}",
            rec.id,
            rec.status,
            rec.plan,
            rec.snapshot,
            rec.store
        );
        if let Some(s) = &outcome.summary {
            crate::out!("  {}", summary_line(s));
        }
    } else if outcome.status == Status::Refused {
        crate::say!(
            "run {} REFUSED by its pre-flight checks; nothing was changed",
            rec.id
        );
    } else if outcome.status != Status::Complete {
        crate::say!(
            "run {} {}; `cairn plan status {}` shows its steps, `cairn plan resume {}` continues it",
            rec.id,
            rec.status,
            rec.id,
            rec.id
        );
    }
    outcome.into_result().map(|_| exit::OK)
}

fn status(g: &Globals, run: Option<i64>) -> Result<i32> {
    let state = g.state()?;
    let rec = match run {
        Some(id) => state.run(id)?,
        None => state
            .latest_run()?
            .ok_or_else(|| Error::NotFound("no runs yet".into()))?,
    };
    let steps = state.steps(rec.id)?;
    let sources = param_sources(&rec);
    if g.json {
        print_json(&json!({"run": rec, "steps": steps, "param_sources": sources}));
        return Ok(exit::OK);
    }
    print_run(&rec, &sources);
    crate::out!();
    for s in &steps {
        let err = s
            .error
            .as_deref()
            .map(|e| format!("  {}", redact(e)))
            .unwrap_or_default();
        crate::out!(
            "  {:34} {:10} attempts {}{}",
            s.id,
            s.status,
            s.attempts,
            err
        );
    }
    Ok(exit::OK)
}

/// Where each parameter of a run came from (cli, file, env, default, stored).
fn param_sources(r: &RunRecord) -> std::collections::BTreeMap<String, String> {
    r.spec_json
        .as_deref()
        .and_then(|j| crate::spec::RunSpec::from_json(j).ok())
        .map(|s| {
            s.param_sources
                .into_iter()
                .map(|(k, v)| (k, v.as_str().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn print_run(r: &RunRecord, sources: &std::collections::BTreeMap<String, String>) {
    crate::out!(
        "run {}  {}  {}  snapshot {}  store {}",
        r.id,
        r.plan,
        r.status,
        r.snapshot,
        r.store
    );
    crate::out!(
        "  created {}  updated {}{}",
        r.created_at,
        r.updated_at,
        r.finished_at
            .as_deref()
            .map(|f| format!("  finished {f}"))
            .unwrap_or_default()
    );
    crate::out!("  parameters:");
    for (k, v) in &r.params.0 {
        let from = sources.get(k).map_or("", String::as_str);
        if from == "unset" {
            continue;
        }
        crate::out!("    {k:24} {v:?} ({from})");
    }
    if let Some(e) = &r.error {
        crate::out!("  error: {}", redact(e));
    }
}

fn history(g: &Globals, limit: usize) -> Result<i32> {
    let runs = g.state()?.runs(limit)?;
    if g.json {
        print_json(&json!(runs));
        return Ok(exit::OK);
    }
    for r in runs {
        crate::out!(
            "{:5} {:24} {:16} {:10} {}",
            r.id,
            r.created_at,
            r.plan,
            r.status,
            r.snapshot
        );
    }
    Ok(exit::OK)
}

async fn stop(g: &Globals, run: i64) -> Result<i32> {
    let state = g.state()?;
    let rec = state.run(run)?;
    if !matches!(rec.status, Status::Running | Status::Pending) {
        return Err(usage(format!("run {run} is not running ({})", rec.status)));
    }
    state.request_stop(run)?;
    let alive = rec.pid.is_some_and(process_alive);
    if !alive {
        // Its process is gone (killed): record that, so resume can take over.
        state.set_run_status(
            run,
            Status::Cancelled,
            Some("stopped; its process had gone"),
        )?;
    } else {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if state.run(run)?.status != Status::Running {
                break;
            }
        }
    }
    let rec = state.run(run)?;
    if g.json {
        print_json(&json!({"run": run, "status": rec.status}));
    } else {
        crate::out!("run {run}: {}", rec.status);
    }
    Ok(exit::OK)
}

/// A plan's parameters, one or two lines each, as `plan show` and `plan start
/// PLAN --help` print them.
pub fn param_lines(p: &Plan) -> Vec<String> {
    let mut lines = Vec::new();
    for s in &p.params {
        let mut flags = Vec::new();
        match &s.default {
            _ if s.required => flags.push("required".to_string()),
            Some(d) if !d.is_empty() => flags.push(format!("default {d}")),
            _ => flags.push("optional".to_string()),
        }
        if s.secret {
            flags.push("secret: never stored or printed".to_string());
        }
        lines.push(format!(
            "  {:24} {} [{}]",
            s.name,
            s.description,
            flags.join("; ")
        ));
        if let Some(re) = &s.pattern {
            let words = crate::plan::params::describe_pattern(re.as_str());
            lines.push(format!(
                "  {:24} {}",
                "",
                words.replacen("give ", "value: ", 1)
            ));
        }
    }
    lines
}

/// `cairn plan start PLAN --help`: the command's help and the plan's own
/// parameters (clap cannot know them: they come from the plan file).
pub fn start_help(args: &[String]) -> Option<String> {
    let pos = args.iter().position(|a| a == "plan")?;
    let rest = &args[pos + 1..];
    if rest.first().map(String::as_str) != Some("start") {
        return None;
    }
    if !rest.iter().any(|a| a == "--help" || a == "-h") {
        return None;
    }
    let name = rest[1..].iter().find(|a| !a.starts_with('-'))?;
    let dir = args
        .iter()
        .position(|a| a == "--plans-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CAIRN_PLANS").map(PathBuf::from));
    let plan = Plan::find(name, dir.as_deref()).ok()?;
    let mut cmd = <crate::cli::Cli as clap::CommandFactory>::command();
    let start = cmd
        .find_subcommand_mut("plan")?
        .find_subcommand_mut("start")?;
    let mut text = start.render_long_help().to_string();
    text.push_str(&format!(
        "\nParameters of plan {} (-p KEY=VALUE; {}):\n",
        plan.name, plan.description
    ));
    text.push_str(&param_lines(&plan).join("\n"));
    Some(text)
}

/// `3 nodes, 1204 files, 1.2 GiB of data, 412.3 MiB stored (34 %), 12.4 s, 99.1 MiB/s`
fn summary_line(s: &crate::engine::Summary) -> String {
    let ratio = if s.bytes > 0 {
        format!(" ({:.0} %)", s.stored_bytes as f64 * 100.0 / s.bytes as f64)
    } else {
        String::new()
    };
    let rate = if s.duration_secs > 0.0 {
        crate::checks::human((s.bytes as f64 / s.duration_secs) as u64) + "/s"
    } else {
        "-".into()
    };
    format!(
        "{} node(s), {} file(s), {} of data, {} stored{ratio}, {:.1} s, {rate}",
        s.nodes,
        s.files,
        crate::checks::human(s.bytes),
        crate::checks::human(s.stored_bytes),
        s.duration_secs
    )
}
