//! `cairn snapshots list | verify | delete | prune | last` against a store URL.

use super::output::{print_json, progress};
use super::{Globals, SnapshotsCmd, cancel_on_signals, usage};
use crate::checks::human;
use crate::error::exit;
use crate::lock::{self, Mode, Request, Settings};
use crate::retention::{self, Policy};
use crate::snapshots::{self, VerifyMode};
use crate::store::Store;
use crate::{Error, Result};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::sync::Arc;

/// Open a store these commands read: one that does not exist is an error (exit
/// 5), not an empty list.
async fn open(g: &Globals, arg: &str) -> Result<Arc<dyn Store>> {
    let store = g.open_store(arg, None).await?;
    if !store.exists().await? {
        return Err(Error::NotFound(format!(
            "store {} does not exist (check --store; a backup creates it)",
            store.describe()
        )));
    }
    Ok(store)
}

fn now_or(given: Option<String>) -> Result<DateTime<Utc>> {
    match given {
        None => Ok(Utc::now()),
        Some(t) => DateTime::parse_from_rfc3339(&t)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| usage(format!("--now {t:?}: {e}"))),
    }
}

fn age(d: chrono::TimeDelta) -> String {
    humantime::format_duration(std::time::Duration::from_secs(
        u64::try_from(d.num_seconds()).unwrap_or(0),
    ))
    .to_string()
}

/// A store's URL with a directory store's path resolved (links followed, for the
/// part that exists), so two spellings of one place compare equal.
fn resolved_url(url: &str) -> String {
    let Some(path) = url.strip_prefix("file://") else {
        return url.trim_end_matches('/').to_string();
    };
    let mut existing = std::path::Path::new(path);
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(p), Some(n)) => {
                rest.push(n.to_os_string());
                existing = p;
            }
            _ => break,
        }
    }
    let mut r = existing
        .canonicalize()
        .unwrap_or_else(|_| existing.to_path_buf());
    for n in rest.iter().rev() {
        r.push(n);
    }
    format!("file://{}", r.display())
        .trim_end_matches('/')
        .to_string()
}

/// Hold `mode` on `name` for the length of `work`.
async fn locked<T>(
    store: &Arc<dyn Store>,
    name: &str,
    mode: Mode,
    purpose: &str,
    break_lock: bool,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let owner = format!("snapshots {purpose}");
    let req = Request {
        snapshot: name,
        mode,
        purpose,
        owner: &owner,
        break_stale: break_lock,
        run: None,
    };
    let held = lock::acquire(store.clone(), &req, Settings::from_env()).await?;
    let r = work.await;
    held.release().await;
    r
}

pub async fn run(g: &Globals, cmd: SnapshotsCmd) -> Result<i32> {
    match cmd {
        SnapshotsCmd::List { store: url } => {
            let store = open(g, &url).await?;
            let mut list = snapshots::list(&*store).await?;
            // Oldest first, the newest last (where the eye lands); no time last.
            list.sort_by(|a, b| {
                let key = |s| snapshots::when(s).unwrap_or(i64::MAX);
                key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
            });
            if g.json {
                print_json(&json!(list));
                return Ok(exit::OK);
            }
            if list.is_empty() {
                crate::out!("no snapshots in {}", store.describe());
            } else {
                crate::out!(
                    "{:32} {:10} {:24} {:>5} {:>10} {:>10}  VERIFIED",
                    "SNAPSHOT",
                    "STATE",
                    "FINISHED",
                    "NODES",
                    "DATA",
                    "STORED"
                );
            }
            for s in list {
                let state = if s.complete {
                    "complete"
                } else if !s.held_for.is_empty() {
                    "held"
                } else {
                    "INCOMPLETE"
                };
                let verified = match &s.verified {
                    None => "never verified".to_string(),
                    Some(v) => {
                        format!("{} {} {}", v.mode, if v.ok { "ok" } else { "FAILED" }, v.at)
                    }
                };
                crate::out!(
                    "{:32} {:10} {:24} {:>5} {:>10} {:>10}  {verified}{}{}",
                    s.name,
                    state,
                    s.finished_at.as_deref().unwrap_or("-"),
                    s.nodes.map_or("-".to_string(), |n| n.to_string()),
                    s.bytes.map_or("-".to_string(), human),
                    human(s.stored_bytes),
                    s.lock
                        .map(|l| format!("  (locked by {} on {})", l.owner, l.host))
                        .unwrap_or_default(),
                    s.problem.map(|p| format!("  ({p})")).unwrap_or_default()
                );
            }
            Ok(exit::OK)
        }
        SnapshotsCmd::Verify {
            name,
            store: url,
            read_data,
            sample,
            break_lock,
            keys,
        } => {
            let keys = keys.keys()?;
            let mode = match (read_data, sample) {
                (_, Some(p)) if !(p > 0.0 && p <= 100.0) => {
                    return Err(usage("--sample takes a percentage in (0, 100]"));
                }
                (_, Some(p)) => VerifyMode::Sample(p),
                (true, None) => VerifyMode::ReadData,
                (false, None) => VerifyMode::Metadata,
            };
            let store = open(g, &url).await?;
            let cancel = tokio_util::sync::CancellationToken::new();
            cancel_on_signals(cancel.clone());
            let report = locked(
                &store,
                &name,
                Mode::Shared,
                "verify",
                break_lock,
                snapshots::verify(
                    &*store,
                    &name,
                    mode,
                    keys.as_ref(),
                    progress(g.quiet || g.json),
                    &cancel,
                ),
            )
            .await?;
            let ok = report.problems.is_empty();
            if g.json {
                print_json(&json!({"ok": ok, "report": report}));
            } else if ok {
                crate::out!(
                    "snapshot {name}: OK ({}: {} objects present, {} read back, {} files, {} checked)",
                    report.mode,
                    report.objects,
                    report.objects_read,
                    report.files,
                    human(report.bytes)
                );
                if let Some(note) = &report.note {
                    crate::out!("  {note}");
                }
            } else {
                crate::out!("snapshot {name}: {} problem(s)", report.problems.len());
                for p in &report.problems {
                    crate::out!("  - {p}");
                }
            }
            Ok(if ok { exit::OK } else { exit::FAILED })
        }
        SnapshotsCmd::Copy {
            name,
            from,
            to,
            break_lock,
        } => {
            crate::spec::check_snapshot_name(&name).map_err(usage)?;
            let source = open(g, &from).await?;
            let dest = g.open_store(&to, None).await?;
            // One store inside the other would make the copy part of the source
            // (a delete or prune there would take it): compared resolved.
            let (a, b) = (resolved_url(&source.url()), resolved_url(&dest.url()));
            let within = |x: &str, y: &str| x == y || x.starts_with(&format!("{y}/"));
            if within(&a, &b) || within(&b, &a) {
                return Err(usage(format!(
                    "--from ({}) and --to ({}) are the same store or one is inside the other",
                    source.describe(),
                    dest.describe()
                )));
            }
            let cancel = tokio_util::sync::CancellationToken::new();
            cancel_on_signals(cancel.clone());
            let quiet = g.quiet || g.json;
            let show = move |key: &str, size: u64| {
                if !quiet {
                    crate::out!("  copied and verified {key} ({})", human(size));
                }
            };
            let report = locked(
                &source,
                &name,
                Mode::Shared,
                "copy",
                break_lock,
                locked(
                    &dest,
                    &name,
                    Mode::Exclusive,
                    "copy",
                    break_lock,
                    snapshots::copy(&source, &dest, &name, &show, &cancel),
                ),
            )
            .await?;
            if g.json {
                print_json(&json!(report));
            } else {
                crate::out!(
                    "copied snapshot {name} ({} objects, {}) from {} to {}",
                    report.objects.len(),
                    human(report.bytes),
                    report.from,
                    report.to
                );
            }
            Ok(exit::OK)
        }
        SnapshotsCmd::Diff {
            a,
            b,
            store: url,
            keys,
        } => {
            for n in [&a, &b] {
                crate::spec::check_snapshot_name(n).map_err(usage)?;
            }
            let keys = keys.keys()?;
            let store = open(g, &url).await?;
            let ma = crate::checks::read_manifest(&*store, &a)
                .await?
                .open(keys.as_ref())?;
            let mb = crate::checks::read_manifest(&*store, &b)
                .await?
                .open(keys.as_ref())?;
            let nodes = snapshots::diff(&ma, &mb);
            if g.json {
                print_json(&json!({"a": a, "b": b, "nodes": nodes}));
                return Ok(exit::OK);
            }
            for d in &nodes {
                crate::out!(
                    "node {}: {} added, {} removed, {} changed, {} unchanged",
                    d.node,
                    d.added.len(),
                    d.removed.len(),
                    d.changed.len(),
                    d.unchanged
                );
                for (p, size) in &d.added {
                    crate::out!("  + {p} ({})", human(*size));
                }
                for (p, size) in &d.removed {
                    crate::out!("  - {p} ({})", human(*size));
                }
                for (p, x, y) in &d.changed {
                    crate::out!("  ~ {p} ({} -> {})", human(*x), human(*y));
                }
            }
            Ok(exit::OK)
        }
        SnapshotsCmd::Show {
            name,
            path,
            store: url,
            keys,
        } => {
            crate::spec::check_snapshot_name(&name).map_err(usage)?;
            // The same plain relative paths PATHS takes.
            let path = match &path {
                Some(p) => Some(
                    crate::cluster::Selection::parse("")
                        .with_paths(p)?
                        .paths
                        .into_iter()
                        .next()
                        .ok_or_else(|| usage(format!("PATH {p:?} names nothing")))?,
                ),
                None => None,
            };
            let keys = keys.keys()?;
            let store = open(g, &url).await?;
            let m = crate::checks::read_manifest(&*store, &name)
                .await?
                .open(keys.as_ref())?;
            let wanted = |p: &str| {
                path.as_deref()
                    .is_none_or(|w| crate::cluster::under(p, w.trim_end_matches('/')))
            };
            let mut nodes = Vec::new();
            for n in &m.cluster.nodes {
                let object = m.object(&n.object);
                let files: Vec<_> = n
                    .files
                    .iter()
                    .filter(|f| wanted(&f.path))
                    .map(|f| {
                        json!({
                            "path": f.path,
                            "size": f.size,
                            "sha256": f.sha256,
                            // A differential's unchanged file: in an earlier
                            // snapshot's object (from the store's root).
                            "object": f.object.clone().unwrap_or_else(|| n.object.clone()),
                            "held_by_parent": f.object.is_some(),
                            "offset": f.entry.map(|e| e.offset),
                        })
                    })
                    .collect();
                nodes.push(json!({
                    "index": n.index,
                    "object": n.object,
                    "stored_bytes": object.map(|o| o.size),
                    "seekable": object.is_some_and(|o| o.index.is_some()),
                    "files": files,
                }));
            }
            if g.json {
                print_json(&json!({
                    "snapshot": m.snapshot,
                    "format_version": m.format_version,
                    "parent": m.parent,
                    "nodes": nodes,
                }));
                return Ok(exit::OK);
            }
            crate::out!(
                "snapshot {} (format {}, {} of data, finished {})",
                m.snapshot,
                m.format_version,
                human(m.total_bytes()),
                m.finished_at
            );
            if let Some(p) = &m.parent {
                crate::out!(
                    "differential of {p}: unchanged files are read from {} earlier object(s)",
                    m.references.len()
                );
            }
            let mut shown = 0usize;
            for n in &m.cluster.nodes {
                let object = m.object(&n.object);
                let files: Vec<_> = n.files.iter().filter(|f| wanted(&f.path)).collect();
                if path.is_some() && files.is_empty() {
                    continue;
                }
                crate::out!(
                    "node {}: {} ({} stored, {}), {} file(s)",
                    n.index,
                    n.object,
                    object.map_or("-".to_string(), |o| human(o.size)),
                    if object.is_some_and(|o| o.index.is_some()) {
                        "one file is read without the rest"
                    } else {
                        "read whole"
                    },
                    files.len()
                );
                for f in files {
                    shown += 1;
                    let at = match (&f.object, f.entry) {
                        (Some(o), Some(e)) => format!("  in {o} at {}", e.offset),
                        (None, Some(e)) => format!("  at {}", e.offset),
                        _ => String::new(),
                    };
                    crate::out!("  {:>10}  {}{at}", human(f.size), f.path);
                }
            }
            let in_tree = m
                .cluster
                .nodes
                .iter()
                .any(|n| n.tree.iter().any(|t| wanted(&t.path)));
            if let (Some(p), 0, false) = (&path, shown, in_tree) {
                return Err(Error::NotFound(format!(
                    "snapshot {name} holds nothing at {p:?}"
                )));
            }
            Ok(exit::OK)
        }
        SnapshotsCmd::Delete {
            name,
            store: url,
            break_lock,
        } => {
            let store = open(g, &url).await?;
            let done = locked(
                &store,
                &name,
                Mode::Exclusive,
                "delete",
                break_lock,
                crate::repo::delete(&*store, &name),
            )
            .await?;
            if g.json {
                print_json(&json!({
                    "deleted": name,
                    "objects": done.deleted,
                    "kept": done.kept.iter().map(|(k, by)| json!({"object": k, "for": by})).collect::<Vec<_>>(),
                    "finished": done.finished,
                    "deferred_for": done.deferred,
                }));
            } else {
                for f in &done.finished {
                    crate::out!("finished the delete of {f} that an interrupted run left");
                }
                crate::out!("deleted snapshot {name} ({} objects)", done.deleted);
                if let Some(b) = &done.deferred {
                    crate::out!(
                        "the backup of {b} is running: the rest of {name}'s objects are swept by the next delete or prune"
                    );
                }
                if !done.kept.is_empty() {
                    let mut by: Vec<&str> = done
                        .kept
                        .iter()
                        .flat_map(|(_, b)| b.iter().map(String::as_str))
                        .collect();
                    by.sort_unstable();
                    by.dedup();
                    crate::out!(
                        "kept {} object(s) that later differential snapshots reference: {} (they go when those are deleted)",
                        done.kept.len(),
                        by.join(", ")
                    );
                    for (k, b) in &done.kept {
                        crate::out!("  {k}  for {}", b.join(", "));
                    }
                }
            }
            Ok(exit::OK)
        }
        SnapshotsCmd::Prune {
            store: url,
            policy,
            keep_last,
            grace,
            dry_run,
            break_lock,
            now,
            tag,
            keep_tag,
            cluster,
        } => {
            let mut policy = Policy::parse(&policy, keep_last, &grace)?;
            policy.scope = retention::Scope {
                tag,
                keep_tags: keep_tag,
                cluster,
            };
            let now = now_or(now)?;
            let store = open(g, &url).await?;
            let report = retention::prune(store.clone(), &policy, now, dry_run, break_lock).await?;
            if g.json {
                print_json(&json!(report));
            } else {
                for d in &report.decisions {
                    let verb = match (d.keep, dry_run) {
                        (true, _) => "keep  ",
                        (false, true) => "would delete",
                        (false, false) if report.deleted.contains(&d.snapshot) => "delete",
                        (false, false) => "LEFT  ",
                    };
                    crate::out!("{verb} {:32} {}", d.snapshot, d.reason);
                }
                for (name, why) in &report.skipped {
                    crate::out!("not deleted: {name}: {why}");
                }
                for f in &report.finished {
                    crate::out!("finished the delete of {f} that an interrupted run left");
                }
                for (name, n, by) in &report.kept {
                    crate::out!(
                        "kept {n} object(s) of {name} that {} reference (they go when those are deleted)",
                        by.join(", ")
                    );
                }
                let gone = report.decisions.iter().filter(|d| !d.keep).count();
                crate::out!(
                    "{}: {} kept, {} {}{}",
                    store.describe(),
                    report.decisions.len() - gone,
                    if dry_run { gone } else { report.deleted.len() },
                    if dry_run {
                        "would be deleted (dry run: nothing deleted)"
                    } else {
                        "deleted"
                    },
                    if report.skipped.is_empty() {
                        String::new()
                    } else {
                        format!(", {} left in place", report.skipped.len())
                    }
                );
            }
            Ok(if report.skipped.is_empty() {
                exit::OK
            } else {
                exit::FAILED
            })
        }
        SnapshotsCmd::Last {
            store: url,
            max_age,
            now,
        } => {
            let max_age = max_age
                .map(|m| {
                    humantime::parse_duration(&m)
                        .map_err(|e| usage(format!("--max-age {m:?}: {e}")))
                })
                .transpose()?;
            let now = now_or(now)?;
            let store = open(g, &url).await?;
            let list = snapshots::list(&*store).await?;
            let Some((s, t)) = retention::newest_complete(&list) else {
                return Err(Error::NotFound(format!(
                    "a complete snapshot in {}",
                    store.describe()
                )));
            };
            let old = now - t;
            let stale = max_age.is_some_and(|m| old.to_std().is_ok_and(|o| o > m));
            if g.json {
                print_json(&json!({
                    "snapshot": s.name, "finished_at": s.finished_at, "age_secs": old.num_seconds(),
                    "max_age_secs": max_age.map(|m| m.as_secs()), "stale": stale,
                    "verified": s.verified,
                }));
            } else {
                crate::out!(
                    "{} finished {} ({} ago){}",
                    s.name,
                    s.finished_at.as_deref().unwrap_or("-"),
                    age(old),
                    if stale {
                        "  STALE: older than --max-age"
                    } else {
                        ""
                    }
                );
            }
            Ok(if stale { exit::STALE } else { exit::OK })
        }
    }
}
