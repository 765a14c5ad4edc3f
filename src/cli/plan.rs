//! `cairn plan list | show | start | status | history | stop | resume`.

use super::output::{print_json, progress};
use super::{Globals, PlanCmd, cancel_on_signals, usage};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::exit;
use crate::plan::Plan;
use crate::plan::params::{CliParam, ProcessEnv};
use crate::redact::redact;
use crate::service::{Service, ServiceConfig};
use crate::state::{RunRecord, Status};
use crate::{Error, Result};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub async fn run(g: &Globals, cmd: PlanCmd) -> Result<i32> {
    match cmd {
        PlanCmd::List => list(g),
        PlanCmd::Show { plan } => show(g, &plan),
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
            let r = start(
                g,
                &plan,
                &rest,
                cluster,
                break_lock,
                metrics_file.as_deref(),
            )
            .await;
            not_started_line(g, &plan, r)
        }
        PlanCmd::Status { run } => status(g, run),
        PlanCmd::History { limit } => history(g, limit),
        PlanCmd::Stop { run } => stop(g, run).await,
        PlanCmd::Resume {
            run,
            params,
            break_lock,
            metrics_file,
        } => not_started_line(
            g,
            &format!("run {run}"),
            resume(g, run, &params, break_lock, metrics_file.as_deref()).await,
        ),
    }
}

fn list(g: &Globals) -> Result<i32> {
    let plans: Vec<(String, String)> = Plan::list(g.plans_dir.as_deref())?
        .into_iter()
        .map(|p| (p.name, p.description))
        .collect();
    print_plan_list(g, &plans);
    Ok(exit::OK)
}

/// `plan list`: name and description, a line each (or one JSON array).
pub(super) fn print_plan_list(g: &Globals, plans: &[(String, String)]) {
    if g.json {
        let v: Vec<_> = plans
            .iter()
            .map(|(n, d)| json!({"name": n, "description": d}))
            .collect();
        print_json(&json!(v));
    } else {
        for (n, d) in plans {
            crate::out!("{n:16} {d}");
        }
    }
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

/// The service this command is a client of: runs execute in this process, drawn
/// by this terminal's renderer; Ctrl-C or SIGTERM stops them (resumably).
fn service(g: &Globals, cluster: Option<PathBuf>, config: Config) -> Result<Arc<Service>> {
    let svc = Service::with_state(
        ServiceConfig {
            home: g.home.clone(),
            plans_dir: g.plans_dir.clone(),
            cluster,
            config,
            config_given: g.config.is_some(),
            stores: Vec::new(),
        },
        g.state()?,
    );
    cancel_on_signals(svc.stop_runs.clone());
    Ok(svc)
}

use crate::service::outcome_word;

/// With --json, a run that could not even start (bad parameters, lock held…) still
/// ends with one summary line.
pub(super) fn not_started_line(g: &Globals, what: &str, r: Result<i32>) -> Result<i32> {
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
    metrics_file: Option<&std::path::Path>,
) -> Result<i32> {
    let plan = Plan::find(name, g.plans_dir.as_deref())?;
    let cluster_file = cluster
        .ok_or_else(|| usage("no cluster description: pass --cluster FILE or set CAIRN_CLUSTER"))?;
    let cluster = Cluster::load(&cluster_file)?;
    let config = g.config(Some(&cluster_file))?;
    // Bad parameters are refused before a state home is made or opened.
    let checked = plan.resolve_params(params, &[], &ProcessEnv)?;
    crate::spec::compile(&plan, &checked, &cluster, String::new(), &config)?;
    let svc = service(g, Some(cluster_file), config)?;
    let show = progress(g.quiet || g.json);
    let run = svc
        .start_with(&plan.name, params.to_vec(), break_lock, Some(show))
        .await?;
    finish(g, &svc, run, metrics_file).await
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
    if let Some(mode) = &p.mode {
        crate::out!("  a {mode}");
    }
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

async fn resume(
    g: &Globals,
    run: i64,
    params: &[CliParam],
    break_lock: bool,
    metrics_file: Option<&std::path::Path>,
) -> Result<i32> {
    let svc = service(g, None, g.config(None)?)?;
    let show = progress(g.quiet || g.json);
    let run = svc
        .resume_with(run, params.to_vec(), break_lock, Some(show))
        .await?;
    finish(g, &svc, run, metrics_file).await
}

/// Wait for the run to end and print its summary; the error (if any) goes back
/// to main, with the exit code the run ended with.
async fn finish(
    g: &Globals,
    svc: &Service,
    run: i64,
    metrics_file: Option<&std::path::Path>,
) -> Result<i32> {
    let end = svc.wait(run).await;
    let rec = svc.state.run(run)?;
    let (word, code, summary) = match &end {
        Some(e) => (e.outcome, e.exit_code, e.summary.clone()),
        None => ("failed", exit::FAILED, None),
    };
    if let Some(path) = metrics_file
        && let Err(e) = svc
            .metrics
            .render(&svc.state)
            .and_then(|t| crate::service::metrics::write_file(path, &t))
    {
        tracing::warn!("--metrics-file: {e}");
    }
    print_end(
        g,
        &End {
            rec: &rec,
            outcome: word,
            status: rec.status,
            failed: code != exit::OK,
            exit_code: code,
            summary: summary.as_ref(),
        },
    );
    if code == exit::OK {
        return Ok(exit::OK);
    }
    Err(Error::Server {
        message: rec
            .error
            .clone()
            .unwrap_or_else(|| format!("run {run} {}", rec.status)),
        outcome: word.to_string(),
        exit_code: code,
    })
}

/// How a run ended, as printed by a local run and by `--server`.
pub(super) struct End<'a> {
    pub rec: &'a RunRecord,
    pub outcome: &'a str,
    pub status: Status,
    pub failed: bool,
    pub exit_code: i32,
    pub summary: Option<&'a crate::engine::Summary>,
}

/// The last lines (or the JSON line) of a run.
pub(super) fn print_end(g: &Globals, e: &End<'_>) {
    let rec = e.rec;
    if g.json {
        STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
        print_json(&json!({
            "run": rec.id, "plan": rec.plan, "snapshot": rec.snapshot, "store": rec.store,
            "outcome": e.outcome,
            "status": rec.status, "error": rec.error,
            "started_at": rec.created_at, "finished_at": rec.finished_at,
            "exit_code": e.exit_code,
            "summary": e.summary,
        }));
    } else if !e.failed {
        crate::out!(
            "run {} {}: {} snapshot {} in {}",
            rec.id,
            rec.status,
            rec.plan,
            rec.snapshot,
            rec.store
        );
        if let Some(s) = e.summary {
            crate::out!("  {}", summary_line(s));
        }
    } else if e.status == Status::Refused {
        crate::say!(
            "run {} REFUSED by its pre-flight checks; nothing was changed",
            rec.id
        );
    } else if e.status != Status::Complete {
        crate::say!(
            "run {} {}; `cairn plan status {}` shows its steps, `cairn plan resume {}` continues it",
            rec.id,
            rec.status,
            rec.id,
            rec.id
        );
    }
}

fn status(g: &Globals, run: Option<i64>) -> Result<i32> {
    let state = g.state()?;
    let id = match run {
        Some(id) => id,
        None => {
            state
                .latest_run()?
                .ok_or_else(|| Error::NotFound("no runs yet".into()))?
                .id
        }
    };
    // The view `cairn serve` gives of the run.
    let svc = Service::with_state(ServiceConfig::default(), state);
    let v = svc.run_view(id)?;
    let steps: Vec<_> = v.steps.into_iter().map(|s| s.step).collect();
    print_status(g, &v.run, &steps, &v.param_sources);
    Ok(exit::OK)
}

/// `plan status`: the run, its parameters and each step.
pub(super) fn print_status(
    g: &Globals,
    rec: &RunRecord,
    steps: &[crate::state::StepRecord],
    sources: &std::collections::BTreeMap<String, String>,
) {
    if g.json {
        print_json(&json!({"run": rec, "steps": steps, "param_sources": sources}));
        return;
    }
    print_run(rec, sources);
    crate::out!();
    for s in steps {
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
    print_history(g, &g.state()?.runs(limit)?);
    Ok(exit::OK)
}

/// `plan history`: one line per run, newest first.
pub(super) fn print_history(g: &Globals, runs: &[RunRecord]) {
    if g.json {
        print_json(&json!(runs));
        return;
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
}

async fn stop(g: &Globals, run: i64) -> Result<i32> {
    let svc = Service::with_state(ServiceConfig::default(), g.state()?);
    let rec = svc.stop(run, Duration::from_secs(20)).await?;
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
    let differential = s
        .differential
        .as_ref()
        .map(|d| {
            format!(
                "; differential of {}: {} unchanged file(s), {}, referenced there",
                d.parent,
                d.unchanged_files,
                crate::checks::human(d.unchanged_bytes)
            )
        })
        .unwrap_or_default();
    format!(
        "{} node(s), {} file(s), {} of data, {} stored{ratio}, {:.1} s, {rate}{differential}",
        s.nodes,
        s.files,
        crate::checks::human(s.bytes),
        crate::checks::human(s.stored_bytes),
        s.duration_secs
    )
}
