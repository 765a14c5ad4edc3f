//! Retention: which snapshots a tiered policy keeps, and the prune that deletes the
//! others.
//!
//! A policy reads `24h,12h:7d,24h:15d` (seed 002's): keep every snapshot younger
//! than 24 h; between 24 h and 7 d one per 12 h window; between 7 d and 15 d one per
//! 24 h window; drop the older ones. Windows are fixed in time (multiples of the
//! window length since the Unix epoch, UTC), so a snapshot kept for its window stays
//! kept on the next run as long as it is the one chosen for that window: the newest
//! snapshot of the window whose data was verified good, else the newest.
//!
//! Whatever the policy says, the newest complete snapshot is never deleted, nor the
//! `--keep-last` newest, nor one that is locked (a run is writing or reading it),
//! nor one whose manifest cannot be read. Incomplete snapshots (no manifest) are
//! deleted once their newest object is older than the grace period (a failed run
//! may still be resumed before that). Deleting removes the manifest first, so a
//! prune killed midway leaves an incomplete snapshot the next prune removes.

use crate::lock::{self, Mode, Request, Settings};
use crate::snapshots::{self, SnapshotSummary};
use crate::store::Store;
use crate::{Error, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// The seed's tiered policy.
pub const DEFAULT_POLICY: &str = "24h,12h:7d,24h:15d";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// One snapshot per window of this length…
    pub every: Duration,
    /// …for snapshots younger than this.
    pub until: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Keep everything younger than this.
    pub keep_within: Duration,
    /// By increasing `until`.
    pub tiers: Vec<Tier>,
    /// Always keep the N newest complete snapshots (the newest one always).
    pub keep_last: usize,
    /// Incomplete snapshots older than this are deleted.
    pub grace: Duration,
    /// Which snapshots the policy applies to (each cluster on its own).
    pub scope: Scope,
}

/// The snapshots a prune applies its policy to; every other one is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Only snapshots with this tag (without: only untagged snapshots).
    pub tag: Option<String>,
    /// Snapshots with any of these tags are always kept.
    pub keep_tags: Vec<String>,
    /// Only this cluster's snapshots.
    pub cluster: Option<String>,
}

impl Scope {
    fn narrowed(&self) -> bool {
        self.tag.is_some() || self.cluster.is_some()
    }

    /// Why a complete snapshot is outside the scope, if it is.
    fn outside(&self, s: &SnapshotSummary) -> Option<String> {
        if let Some(c) = &self.cluster
            && s.cluster.as_deref() != Some(c.as_str())
        {
            return Some(format!(
                "of cluster {}, not {c} (--cluster)",
                s.cluster.as_deref().unwrap_or("?")
            ));
        }
        if let Some(t) = s.tags.iter().find(|t| self.keep_tags.contains(t)) {
            return Some(format!("tagged {t} (--keep-tag)"));
        }
        match &self.tag {
            None if !s.tags.is_empty() => Some(format!(
                "tagged {}: a tagged snapshot is pruned only by `snapshots prune --tag {}`",
                s.tags.join(", "),
                s.tags[0]
            )),
            Some(t) if !s.tags.contains(t) => Some(format!("not tagged {t} (--tag)")),
            _ => None,
        }
    }
}

fn duration(text: &str) -> Result<Duration> {
    humantime::parse_duration(text.trim())
        .map_err(|e| Error::Usage(format!("{text:?} is not a duration (e.g. 12h, 7d): {e}")))
}

fn fmt(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Policy {
    /// Parse `WITHIN[,EVERY:UNTIL]…` (or `default`).
    pub fn parse(text: &str, keep_last: usize, grace: &str) -> Result<Policy> {
        let text = if text.trim() == "default" {
            DEFAULT_POLICY
        } else {
            text
        };
        let mut parts = text.split(',').map(str::trim).filter(|p| !p.is_empty());
        let keep_within = duration(
            parts
                .next()
                .ok_or_else(|| Error::Usage(format!("empty policy; e.g. {DEFAULT_POLICY}")))?,
        )?;
        let mut tiers = Vec::new();
        let mut floor = keep_within;
        for p in parts {
            let (every, until) = p.split_once(':').ok_or_else(|| {
                Error::Usage(format!(
                    "policy tier {p:?} is not EVERY:UNTIL (e.g. 12h:7d); a policy reads like {DEFAULT_POLICY}"
                ))
            })?;
            let t = Tier {
                every: duration(every)?,
                until: duration(until)?,
            };
            if t.every.is_zero() || t.until <= floor {
                return Err(Error::Usage(format!(
                    "policy tier {p:?}: windows must be longer than 0 and each tier must reach further than the one before"
                )));
            }
            floor = t.until;
            tiers.push(t);
        }
        Ok(Policy {
            keep_within,
            tiers,
            keep_last,
            grace: duration(grace)?,
            scope: Scope::default(),
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub snapshot: String,
    pub keep: bool,
    pub reason: String,
}

fn keep(name: &str, reason: String) -> Decision {
    Decision {
        snapshot: name.to_string(),
        keep: true,
        reason,
    }
}

fn remove(name: &str, reason: String) -> Decision {
    Decision {
        snapshot: name.to_string(),
        keep: false,
        reason,
    }
}

/// Whether a lock still protects a snapshot: live, or stale but not left by a
/// prune or delete (a crashed backup's lock waits for `--break-lock`). Lock ages
/// are judged by the clock, not by the `now` a prune judges snapshot ages by.
fn protecting(l: &lock::LockInfo, now: i64, s: Settings) -> bool {
    let stale = now - l.heartbeat > i64::try_from(s.stale_after.as_secs()).unwrap_or(i64::MAX);
    !(stale && (l.purpose == "prune" || l.purpose == "delete"))
}

/// A complete snapshot and when it finished.
type Dated<'a> = (&'a SnapshotSummary, DateTime<Utc>);

/// What the policy does with each snapshot, sorted by name.
pub fn decide(
    snaps: &[SnapshotSummary],
    p: &Policy,
    now: DateTime<Utc>,
    locks: Settings,
) -> Vec<Decision> {
    let mut out = Vec::new();
    let mut complete: Vec<(&SnapshotSummary, DateTime<Utc>)> = Vec::new();
    for s in snaps {
        if let Some(l) = s
            .lock
            .as_ref()
            .filter(|l| protecting(l, lock::now_unix(), locks))
        {
            out.push(keep(
                &s.name,
                format!(
                    "in use: locked by {} ({}) on {}",
                    l.owner, l.purpose, l.host
                ),
            ));
            continue;
        }
        if let Some(problem) = &s.problem {
            out.push(keep(
                &s.name,
                format!("manifest unreadable, never pruned automatically ({problem})"),
            ));
            continue;
        }
        if !s.held_for.is_empty() {
            // Not a snapshot: a deleted one's objects, kept for those that
            // reference them, and swept with the last of them.
            continue;
        }
        if !s.complete && p.scope.narrowed() {
            // Whose it is cannot be told before its manifest is written.
            out.push(keep(
                &s.name,
                "incomplete, of an unknown cluster and tags; this prune is limited by --tag or --cluster".into(),
            ));
            continue;
        }
        if !s.complete {
            let age = s
                .modified
                .map(|m| Duration::from_secs(u64::try_from(now.timestamp() - m).unwrap_or(0)));
            out.push(match age {
                Some(a) if a > p.grace => remove(
                    &s.name,
                    format!(
                        "incomplete, last written {} ago (grace {})",
                        fmt(a),
                        fmt(p.grace)
                    ),
                ),
                Some(_) => keep(
                    &s.name,
                    format!("incomplete, within the {} grace period", fmt(p.grace)),
                ),
                None => keep(&s.name, "incomplete, age unknown".into()),
            });
            continue;
        }
        let finished = s
            .finished_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        if let Some(why) = p.scope.outside(s) {
            out.push(keep(&s.name, why));
            continue;
        }
        match finished {
            Some(t) => complete.push((s, t)),
            None => out.push(keep(&s.name, "finish time unreadable".into())),
        }
    }
    // Each cluster on its own: another cluster's snapshots never make one of
    // this cluster's redundant, and each keeps its newest.
    let mut clusters: std::collections::BTreeMap<String, Vec<Dated<'_>>> = Default::default();
    for d in complete {
        clusters
            .entry(d.0.cluster.clone().unwrap_or_default())
            .or_default()
            .push(d);
    }
    for (cluster, complete) in clusters {
        decide_cluster(&cluster, complete, p, now, &mut out);
    }
    out.sort_by(|a, b| a.snapshot.cmp(&b.snapshot));
    out
}

/// The policy over one cluster's complete snapshots in scope.
fn decide_cluster(
    cluster: &str,
    mut complete: Vec<Dated<'_>>,
    p: &Policy,
    now: DateTime<Utc>,
    out: &mut Vec<Decision>,
) {
    complete.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.name.cmp(&a.0.name)));
    // (tier, window) → candidates, newest first.
    let mut windows: std::collections::BTreeMap<(usize, i64), Vec<Dated<'_>>> = Default::default();
    for (i, (s, t)) in complete.iter().enumerate() {
        let age = (now - *t).to_std().unwrap_or(Duration::ZERO);
        if i == 0 {
            out.push(keep(
                &s.name,
                format!("the newest complete snapshot of cluster {cluster} (never pruned)"),
            ));
        } else if i < p.keep_last {
            out.push(keep(
                &s.name,
                format!("one of the {} newest (--keep-last)", p.keep_last),
            ));
        } else if age < p.keep_within {
            out.push(keep(
                &s.name,
                format!("younger than {}", fmt(p.keep_within)),
            ));
        } else if let Some((k, tier)) = p.tiers.iter().enumerate().find(|(_, tr)| age < tr.until) {
            let every = i64::try_from(tier.every.as_secs())
                .unwrap_or(i64::MAX)
                .max(1);
            windows
                .entry((k, t.timestamp().div_euclid(every)))
                .or_default()
                .push((s, *t));
        } else {
            let limit = p.tiers.last().map_or(p.keep_within, |t| t.until);
            out.push(remove(&s.name, format!("older than {}", fmt(limit))));
        }
    }
    for ((k, _), mut members) in windows {
        let tier = p.tiers[k];
        // Verified good first, then newest.
        members.sort_by(|a, b| {
            let va = a.0.verified.as_ref().is_some_and(|v| v.data_ok());
            let vb = b.0.verified.as_ref().is_some_and(|v| v.data_ok());
            vb.cmp(&va).then(b.1.cmp(&a.1))
        });
        let chosen = members[0].0;
        let verified = chosen.verified.as_ref().is_some_and(|v| v.data_ok());
        out.push(keep(
            &chosen.name,
            format!(
                "the {} snapshot of its {} window (one per {} up to {})",
                if verified { "verified" } else { "newest" },
                fmt(tier.every),
                fmt(tier.every),
                fmt(tier.until)
            ),
        ));
        for (s, _) in &members[1..] {
            out.push(remove(
                &s.name,
                format!(
                    "{} is kept for the same {} window",
                    chosen.name,
                    fmt(tier.every)
                ),
            ));
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub decisions: Vec<Decision>,
    pub deleted: Vec<String>,
    /// Decided to go but left in place, with why (locked meanwhile, store error).
    pub skipped: Vec<(String, String)>,
    /// Deleted snapshots whose objects other snapshots still reference: how many
    /// were kept, and for which snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<(String, usize, Vec<String>)>,
    /// Deletes an interrupted run left, finished first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finished: Vec<String>,
}

/// Decide, then (unless `dry_run`) delete, each snapshot under an exclusive lock.
pub async fn prune(
    store: Arc<dyn Store>,
    policy: &Policy,
    now: DateTime<Utc>,
    dry_run: bool,
    break_lock: bool,
) -> Result<PruneReport> {
    let settings = Settings::from_env();
    let list = snapshots::list(&*store).await?;
    let decisions = decide(&list, policy, now, settings);
    let mut report = PruneReport {
        dry_run,
        decisions: decisions.clone(),
        deleted: Vec::new(),
        skipped: Vec::new(),
        kept: Vec::new(),
        finished: Vec::new(),
    };
    if dry_run {
        return Ok(report);
    }
    report.finished = crate::repo::finish_pending(&*store).await?;
    for d in decisions.iter().filter(|d| !d.keep) {
        let was_prune = list
            .iter()
            .find(|s| s.name == d.snapshot)
            .and_then(|s| s.lock.as_ref())
            .is_some_and(|l| !protecting(l, lock::now_unix(), settings));
        let req = Request {
            snapshot: &d.snapshot,
            mode: Mode::Exclusive,
            purpose: "prune",
            owner: "snapshots prune",
            break_stale: break_lock || was_prune,
            run: None,
        };
        let held = match lock::acquire(store.clone(), &req, settings).await {
            Ok(h) => h,
            Err(e @ Error::Locked(_)) => {
                report.skipped.push((d.snapshot.clone(), e.to_string()));
                continue;
            }
            Err(e) => return Err(e),
        };
        let result = crate::repo::delete(&*store, &d.snapshot).await;
        held.release().await;
        match result {
            Ok(done) => {
                if !done.kept.is_empty() {
                    let mut by: Vec<String> =
                        done.kept.iter().flat_map(|(_, b)| b.clone()).collect();
                    by.sort();
                    by.dedup();
                    report.kept.push((d.snapshot.clone(), done.kept.len(), by));
                }
                report.finished.extend(done.finished);
                report.deleted.push(d.snapshot.clone());
            }
            Err(Error::NotFound(_)) => report.deleted.push(d.snapshot.clone()),
            Err(e) => report.skipped.push((d.snapshot.clone(), e.to_string())),
        }
    }
    // What is kept, and for whom, once the whole run is done (a later delete of
    // the same run may have swept or released it).
    if !report.kept.is_empty() {
        let catalog = crate::repo::Catalog::load(&*store).await?;
        let mut still = Vec::new();
        for (name, _, _) in std::mem::take(&mut report.kept) {
            let held = catalog.held_for(&name);
            if held.is_empty() {
                continue;
            }
            let mut by: Vec<String> = held.iter().flat_map(|(_, b)| b.clone()).collect();
            by.sort();
            by.dedup();
            still.push((name, held.len(), by));
        }
        report.kept = still;
    }
    Ok(report)
}

/// The newest complete snapshot, if any.
pub fn newest_complete(list: &[SnapshotSummary]) -> Option<(&SnapshotSummary, DateTime<Utc>)> {
    list.iter()
        .filter(|s| s.complete)
        .filter_map(|s| {
            let t = DateTime::parse_from_rfc3339(s.finished_at.as_deref()?).ok()?;
            Some((s, t.with_timezone(&Utc)))
        })
        .max_by(|a, b| a.1.cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_bad_ones_are_refused() {
        let p = Policy::parse("default", 0, "24h").expect("default");
        assert_eq!(p.keep_within, Duration::from_secs(24 * 3600));
        assert_eq!(p.tiers.len(), 2);
        assert_eq!(p.tiers[1].until, Duration::from_secs(15 * 24 * 3600));
        assert!(Policy::parse("24h,12h", 0, "1d").is_err());
        assert!(Policy::parse("24h,12h:7d,24h:3d", 0, "1d").is_err());
        assert!(Policy::parse("soon", 0, "1d").is_err());
    }
}
