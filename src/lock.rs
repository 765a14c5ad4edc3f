//! Locks in the store, so two runs writing the same snapshot, or a prune and a
//! restore of the same snapshot, never collide — also from different machines.
//!
//! A holder writes its own object `.cairn-locks/<snapshot>/<token>.json` (owner,
//! host, pid, purpose, heartbeat) and refreshes the heartbeat while it works.
//! Exclusive locks (backup, delete, prune) conflict with every other lock; shared
//! ones (restore, verify) only with exclusive ones. Taking a lock: look, write ours,
//! look again — if a conflicting live lock appeared meanwhile, ours is withdrawn.
//! Two racing takers can both withdraw; they never both win (the stores give
//! read-after-write consistent listings). A lock whose heartbeat is older than the
//! stale limit belongs to a process that died: it is reported, and removed only
//! when the caller passes `--break-lock`.

use crate::store::{Store, get_bytes};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use crate::repo::LOCKS as PREFIX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Exclusive,
    Shared,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    pub token: String,
    pub snapshot: String,
    pub mode: Mode,
    /// backup, restore, verify, delete, prune…
    pub purpose: String,
    /// Who holds it, e.g. `plan backup-local`.
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub created_at: String,
    /// Unix seconds of the last heartbeat.
    pub heartbeat: i64,
    /// The run holding it (`host:state-db#run`), so a resumed run takes over the
    /// lock its killed predecessor left.
    #[serde(default)]
    pub run: Option<String>,
}

/// Heartbeat interval and stale limit: 15 s and 120 s, or
/// `CAIRN_LOCK_HEARTBEAT_SECS` / `CAIRN_LOCK_STALE_SECS`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub heartbeat: Duration,
    pub stale_after: Duration,
}

impl Settings {
    pub fn from_env() -> Settings {
        let secs = |var: &str, default: u64| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        Settings {
            heartbeat: Duration::from_secs(secs("CAIRN_LOCK_HEARTBEAT_SECS", 15)),
            stale_after: Duration::from_secs(secs("CAIRN_LOCK_STALE_SECS", 120)),
        }
    }
}

/// What a caller asks for.
pub struct Request<'a> {
    pub snapshot: &'a str,
    pub mode: Mode,
    pub purpose: &'a str,
    pub owner: &'a str,
    /// Remove stale conflicting locks (`--break-lock`).
    pub break_stale: bool,
    /// The run taking the lock: a lock left by the same run (killed, now resumed)
    /// is taken over.
    pub run: Option<&'a str>,
}

/// A lock held; release it with [`Held::release`] (dropping it stops the heartbeat
/// and lets the lock go stale).
pub struct Held {
    store: Arc<dyn Store>,
    key: String,
    info: Arc<std::sync::Mutex<LockInfo>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Held {
    /// Record the run that holds the lock (known once the run is created).
    pub async fn set_run(&self, run: &str) -> Result<()> {
        let body = {
            let mut i = match self.info.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            i.run = Some(run.to_string());
            serde_json::to_vec(&*i).map_err(|e| Error::State(e.to_string()))?
        };
        self.store.put(&self.key, body.into()).await
    }

    pub async fn release(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!(key = %self.key, "could not remove the lock: {e}");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn dir(snapshot: &str) -> String {
    crate::repo::lock_dir(snapshot)
}

/// A lock object that does not read: an exclusive lock of an unknown owner.
fn unreadable(key: &str, snapshot: &str, heartbeat: i64) -> LockInfo {
    LockInfo {
        token: key.to_string(),
        snapshot: snapshot.to_string(),
        mode: Mode::Exclusive,
        purpose: "unknown".into(),
        owner: "an unreadable lock".into(),
        host: "?".into(),
        pid: 0,
        created_at: String::new(),
        heartbeat,
        run: None,
    }
}

/// Every lock on `snapshot` (unreadable lock objects count as exclusive locks of an
/// unknown owner, heartbeat from the listing).
pub async fn locks_on(store: &dyn Store, snapshot: &str) -> Result<Vec<(String, LockInfo)>> {
    let mut out = Vec::new();
    for o in store.list(&dir(snapshot)).await? {
        let info = match get_bytes(store, &o.key, 64 << 10).await {
            Ok(b) => serde_json::from_slice::<LockInfo>(&b).ok(),
            Err(Error::NotFound(_)) => continue,
            Err(_) => None,
        };
        let info = info.unwrap_or_else(|| unreadable(&o.key, snapshot, o.modified.unwrap_or(0)));
        out.push((o.key, info));
    }
    Ok(out)
}

/// The backups running now (their locks' heartbeats fresh), on any snapshot.
pub async fn live_backups(store: &dyn Store, s: Settings) -> Result<Vec<LockInfo>> {
    let now = now_unix();
    let stale_secs = i64::try_from(s.stale_after.as_secs()).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    for o in store.list(&format!("{PREFIX}/")).await? {
        let info = match get_bytes(store, &o.key, 64 << 10).await {
            Ok(b) => serde_json::from_slice::<LockInfo>(&b).ok(),
            Err(Error::NotFound(_)) => continue,
            Err(_) => None,
        };
        match info {
            Some(l) if l.purpose == "backup" && now - l.heartbeat <= stale_secs => out.push(l),
            Some(_) => {}
            // A lock that does not read may be a backup's: counted as one while
            // it is young (its listing's time), as `locks_on` counts it.
            None if o.modified.is_none_or(|m| now - m <= stale_secs) => {
                out.push(unreadable(&o.key, &o.key, o.modified.unwrap_or(now)))
            }
            None => {}
        }
    }
    Ok(out)
}

/// Whether any lock (live or stale) names `snapshot`.
pub async fn is_locked(store: &dyn Store, snapshot: &str) -> Result<Option<LockInfo>> {
    Ok(locks_on(store, snapshot)
        .await?
        .into_iter()
        .next()
        .map(|l| l.1))
}

fn describe(l: &LockInfo, now: i64) -> String {
    format!(
        "{} ({}) on {} pid {}, heartbeat {}s ago",
        l.owner,
        l.purpose,
        l.host,
        l.pid,
        (now - l.heartbeat).max(0)
    )
}

fn conflicts(mine: Mode, theirs: Mode) -> bool {
    mine == Mode::Exclusive || theirs == Mode::Exclusive
}

/// Take a lock on `req.snapshot`.
pub async fn acquire(store: Arc<dyn Store>, req: &Request<'_>, s: Settings) -> Result<Held> {
    let now = now_unix();
    let stale_secs = i64::try_from(s.stale_after.as_secs()).unwrap_or(i64::MAX);
    for (key, l) in locks_on(&*store, req.snapshot).await? {
        // The run being resumed takes over what its killed predecessor left,
        // shared locks included (else they would stay behind forever).
        if req.run.is_some() && l.run.as_deref() == req.run {
            tracing::info!("taking over the lock of the run being resumed");
            store.delete(&key).await?;
            continue;
        }
        if !conflicts(req.mode, l.mode) {
            continue;
        }
        // A holder on this host whose process is gone is dead now, not in two
        // minutes (a pid can be reused, so a dead holder may look alive; never
        // the reverse). Removing its lock still takes --break-lock.
        let gone = l.host == hostname() && !crate::engine::process_alive(i64::from(l.pid));
        if gone && !req.break_stale {
            return Err(Error::Locked(format!(
                "snapshot {:?} has the lock of a process that is gone: {}; run again with --break-lock",
                req.snapshot,
                describe(&l, now)
            )));
        }
        if !gone && now - l.heartbeat <= stale_secs {
            return Err(Error::Locked(format!(
                "snapshot {:?} is locked by {}; try again when it has finished",
                req.snapshot,
                describe(&l, now)
            )));
        }
        if !req.break_stale {
            return Err(Error::Locked(format!(
                "snapshot {:?} has a stale lock: {} (older than {}s); if that process is gone, run again with --break-lock",
                req.snapshot,
                describe(&l, now),
                stale_secs
            )));
        }
        tracing::warn!("breaking the stale lock of {}", describe(&l, now));
        crate::say!(
            "cairn: breaking the stale lock on {:?}: {}",
            req.snapshot,
            describe(&l, now)
        );
        store.delete(&key).await?;
    }
    let pid = std::process::id();
    let token = format!(
        "{}-{pid}-{}",
        hostname()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(now)
    );
    let key = format!("{}{token}.json", dir(req.snapshot));
    let info = LockInfo {
        token: token.clone(),
        snapshot: req.snapshot.to_string(),
        mode: req.mode,
        purpose: req.purpose.to_string(),
        owner: req.owner.to_string(),
        host: hostname(),
        pid,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        heartbeat: now,
        run: req.run.map(str::to_string),
    };
    let body = |i: &LockInfo| serde_json::to_vec(i).map_err(|e| Error::State(e.to_string()));
    store.put(&key, body(&info)?.into()).await?;
    // Look again: a conflicting lock taken meanwhile wins over ours.
    for (other, l) in locks_on(&*store, req.snapshot).await? {
        if other != key && conflicts(req.mode, l.mode) && now_unix() - l.heartbeat <= stale_secs {
            let _ = store.delete(&key).await;
            return Err(Error::Locked(format!(
                "snapshot {:?} was locked at the same moment by {}",
                req.snapshot,
                describe(&l, now_unix())
            )));
        }
    }
    let info = Arc::new(std::sync::Mutex::new(info));
    let stop = CancellationToken::new();
    let task = {
        let (store, key, stop, info) = (store.clone(), key.clone(), stop.clone(), info.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(s.heartbeat) => {}
                }
                let body = {
                    let mut i = match info.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    i.heartbeat = now_unix();
                    serde_json::to_vec(&*i)
                };
                match body {
                    Ok(b) => {
                        if let Err(e) = store.put(&key, b.into()).await {
                            tracing::warn!("lock heartbeat failed: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("lock heartbeat failed: {e}"),
                }
            }
        })
    };
    Ok(Held {
        store,
        key,
        info,
        stop,
        task: Some(task),
    })
}
