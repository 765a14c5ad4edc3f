//! The embedded run-state store: SQLite in WAL mode under `$CAIRN_HOME` (default
//! the per-user state dir, see [`StateStore::default_home`]), so `plan status` in one terminal reads what a run in another writes,
//! and every transition is durable (synchronous=FULL) before the engine moves on.
//!
//! Nothing secret is stored: parameters are kept redacted, errors pass the redaction
//! filter before they are written.

use crate::plan::params::RedactedParams;
use crate::redact::redact;
use crate::{Error, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Running,
    Complete,
    Failed,
    Skipped,
    Cancelled,
    /// A run whose process died without recording an end (shown, never stored).
    Interrupted,
    /// A run whose pre-flight checks refused it: nothing was done; not resumable.
    Refused,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Running => "RUNNING",
            Status::Complete => "COMPLETE",
            Status::Failed => "FAILED",
            Status::Skipped => "SKIPPED",
            Status::Cancelled => "CANCELLED",
            Status::Interrupted => "INTERRUPTED",
            Status::Refused => "REFUSED",
        }
    }
    fn parse(s: &str) -> Result<Status> {
        Ok(match s {
            "PENDING" => Status::Pending,
            "RUNNING" => Status::Running,
            "COMPLETE" => Status::Complete,
            "FAILED" => Status::Failed,
            "SKIPPED" => Status::Skipped,
            "CANCELLED" => Status::Cancelled,
            "INTERRUPTED" => Status::Interrupted,
            "REFUSED" => Status::Refused,
            other => return Err(Error::State(format!("unknown status {other:?}"))),
        })
    }
    pub fn is_done(self) -> bool {
        matches!(self, Status::Complete | Status::Skipped)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: i64,
    pub plan: String,
    pub status: Status,
    pub params: RedactedParams,
    pub store: String,
    pub snapshot: String,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub pid: Option<i64>,
    /// The host the run's process runs on.
    pub host: Option<String>,
    pub stop_requested: bool,
    /// The compiled run spec (JSON); `None` for runs recorded before specs existed.
    #[serde(skip)]
    pub spec_json: Option<String>,
    #[serde(skip)]
    pub plan_source: String,
    #[serde(skip)]
    pub cluster_json: String,
}

impl RunRecord {
    /// Whether the process that ran it is gone (same host, pid no longer alive).
    pub fn process_gone(&self) -> bool {
        let same_host = self
            .host
            .as_deref()
            .is_none_or(|h| h == crate::lock::hostname());
        same_host
            && self
                .pid
                .is_none_or(|p| p != std::process::id() as i64 && !crate::engine::process_alive(p))
    }
}

/// One step as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub seq: i64,
    pub id: String,
    pub phase: String,
    pub action: String,
    /// `node-<i>` or `once`.
    pub target: String,
    pub status: Status,
    pub attempts: i64,
    pub error: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    #[serde(skip)]
    pub output: Option<String>,
    /// What a step needs to clean up after a crash (e.g. a multipart upload id).
    #[serde(skip)]
    pub scratch: Option<String>,
}

/// What a new run is created with.
pub struct NewRun<'a> {
    pub plan: &'a str,
    pub plan_source: &'a str,
    pub params: &'a RedactedParams,
    pub cluster_json: &'a str,
    pub store: &'a str,
    pub snapshot: &'a str,
    pub spec_json: &'a str,
    /// (id, phase, action, target) in execution order.
    pub steps: Vec<(String, String, String, String)>,
}

#[derive(Clone)]
pub struct StateStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

/// Bring a database to the newest schema, one transaction per migration. A
/// database newer than this cairn is refused rather than misread.
fn migrate(conn: &mut Connection) -> Result<()> {
    let have: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db_err)?;
    let newest = MIGRATIONS.len() as i64;
    if have > newest {
        return Err(Error::State(format!(
            "state database schema version {have} is newer than this cairn understands ({newest}); use a newer cairn"
        )));
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(have).unwrap_or(0))
    {
        let tx = conn.transaction().map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
    Ok(())
}

/// The schema version this cairn writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::State(e.to_string())
}

/// Migrations, one per schema version, applied in order; `PRAGMA user_version` says
/// how many a database has had. Version 1 is the schema of the first releases (their
/// databases have `user_version` 0 and already hold its tables: it is idempotent).
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// Version 2: the compiled run spec and the host of the run's process.
const SCHEMA_V2: &str = "
ALTER TABLE runs ADD COLUMN spec TEXT;
ALTER TABLE runs ADD COLUMN host TEXT;
";

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plan TEXT NOT NULL,
    plan_source TEXT NOT NULL,
    params TEXT NOT NULL,
    cluster TEXT NOT NULL,
    store TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    finished_at TEXT,
    error TEXT,
    pid INTEGER,
    stop_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS steps (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    phase TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    started_at TEXT,
    finished_at TEXT,
    output TEXT,
    scratch TEXT,
    PRIMARY KEY (run_id, id)
);
";

impl StateStore {
    /// Open (creating) the store in `home`.
    pub fn open(home: &Path) -> Result<StateStore> {
        std::fs::create_dir_all(home).map_err(|e| Error::io("create state dir", home, e))?;
        let path = home.join("state.db");
        let mut conn = Connection::open(&path).map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        migrate(&mut conn)?;
        Ok(StateStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The default home: `$CAIRN_HOME`; else a `./.cairn` that already holds a
    /// state (the first releases' default, kept so their runs stay resumable);
    /// else the per-user state dir, `$XDG_STATE_HOME/cairn` or
    /// `~/.local/state/cairn`, so every working directory sees the same runs.
    pub fn default_home() -> PathBuf {
        if let Some(h) = std::env::var_os("CAIRN_HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(h);
        }
        let legacy = PathBuf::from(".cairn");
        if legacy.join("state.db").is_file() {
            return legacy;
        }
        let xdg = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        match (xdg, home) {
            (Some(x), _) => x.join("cairn"),
            (None, Some(h)) => h.join(".local/state/cairn"),
            (None, None) => legacy,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut guard = match self.conn.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard).map_err(db_err)
    }

    /// Run a blocking state operation off the async threads.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| Error::State(format!("worker thread failed: {e}")))?
    }

    pub fn create_run(&self, new: &NewRun<'_>) -> Result<i64> {
        let params_json =
            serde_json::to_string(new.params).map_err(|e| Error::State(e.to_string()))?;
        self.with(|c| {
            let tx = c.transaction()?;
            let t = now();
            tx.execute(
                "INSERT INTO runs (plan, plan_source, params, cluster, store, snapshot, status, created_at, updated_at, pid, spec, host)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'PENDING', ?7, ?7, ?8, ?9, ?10)",
                params![new.plan, new.plan_source, params_json, new.cluster_json, new.store, new.snapshot, t, std::process::id(), new.spec_json, crate::lock::hostname()],
            )?;
            let id = tx.last_insert_rowid();
            for (seq, (sid, phase, action, target)) in new.steps.iter().enumerate() {
                tx.execute(
                    "INSERT INTO steps (run_id, seq, id, phase, action, target, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'PENDING')",
                    params![id, seq as i64, sid, phase, action, target],
                )?;
            }
            tx.commit()?;
            Ok(id)
        })
    }

    /// Take a finished or dead run for this process, in one statement: only if it
    /// is still as `seen` was read (same pid, same last update), so of two
    /// processes resuming one run at the same moment exactly one gets it.
    pub fn claim_run(&self, seen: &RunRecord) -> Result<bool> {
        // INTERRUPTED is computed on read: stored, it is a RUNNING whose process died.
        let raw = match seen.status {
            Status::Interrupted => Status::Running,
            s => s,
        };
        self.with(|c| {
            let n = c.execute(
                "UPDATE runs SET status = 'RUNNING', updated_at = ?4, stop_requested = 0,
                 pid = ?5, host = ?6, finished_at = NULL
                 WHERE id = ?1 AND pid IS ?2 AND updated_at = ?3 AND status = ?7",
                params![
                    seen.id,
                    seen.pid,
                    seen.updated_at,
                    now(),
                    std::process::id(),
                    crate::lock::hostname(),
                    raw.as_str()
                ],
            )?;
            Ok(n == 1)
        })
    }

    pub fn set_run_status(&self, id: i64, status: Status, error: Option<&str>) -> Result<()> {
        let error = error.map(redact);
        let finished = matches!(
            status,
            Status::Complete | Status::Failed | Status::Cancelled | Status::Refused
        );
        self.with(|c| {
            let t = now();
            c.execute(
                "UPDATE runs SET status = ?2, error = ?3, updated_at = ?4,
                 finished_at = CASE WHEN ?5 THEN ?4 ELSE NULL END,
                 stop_requested = CASE WHEN ?2 = 'RUNNING' THEN 0 ELSE stop_requested END,
                 pid = CASE WHEN ?2 = 'RUNNING' THEN ?6 ELSE pid END,
                 host = CASE WHEN ?2 = 'RUNNING' THEN ?7 ELSE host END
                 WHERE id = ?1",
                params![
                    id,
                    status.as_str(),
                    error,
                    t,
                    finished,
                    std::process::id(),
                    crate::lock::hostname()
                ],
            )?;
            Ok(())
        })
    }

    pub fn request_stop(&self, id: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET stop_requested = 1, updated_at = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
            Ok(())
        })
    }

    pub fn stop_requested(&self, id: i64) -> Result<bool> {
        self.with(|c| {
            c.query_row(
                "SELECT stop_requested FROM runs WHERE id = ?1",
                params![id],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
        })
    }

    /// Record a step transition. `attempt` increments the attempt counter.
    pub fn set_step(
        &self,
        run: i64,
        step: &str,
        status: Status,
        error: Option<&str>,
        output: Option<&str>,
    ) -> Result<()> {
        let error = error.map(redact);
        self.with(|c| {
            let t = now();
            match status {
                Status::Running => c.execute(
                    "UPDATE steps SET status = 'RUNNING', attempts = attempts + 1, error = NULL, started_at = ?3, finished_at = NULL
                     WHERE run_id = ?1 AND id = ?2",
                    params![run, step, t],
                )?,
                Status::Pending => c.execute(
                    "UPDATE steps SET status = 'PENDING' WHERE run_id = ?1 AND id = ?2",
                    params![run, step],
                )?,
                // A finished step's clean-up note is spent.
                Status::Complete => c.execute(
                    "UPDATE steps SET status = 'COMPLETE', error = NULL, output = COALESCE(?3, output), finished_at = ?4, scratch = NULL
                     WHERE run_id = ?1 AND id = ?2",
                    params![run, step, output, t],
                )?,
                _ => c.execute(
                    "UPDATE steps SET status = ?3, error = ?4, output = COALESCE(?5, output), finished_at = ?6
                     WHERE run_id = ?1 AND id = ?2",
                    params![run, step, status.as_str(), error, output, t],
                )?,
            };
            c.execute("UPDATE runs SET updated_at = ?2 WHERE id = ?1", params![run, t])?;
            Ok(())
        })
    }

    /// Replace a run's spec (a resume may change its tunables).
    pub fn set_spec(&self, run: i64, spec_json: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET spec = ?2 WHERE id = ?1",
                params![run, spec_json],
            )?;
            Ok(())
        })
    }

    /// Mark steps to be redone, in one transaction: used before their effects are
    /// removed (a discarded staging dir, an undone manager restore), so the record
    /// never claims an effect the world no longer holds.
    pub fn set_pending(&self, run: i64, steps: &[String], why: &str) -> Result<()> {
        let why = redact(why);
        self.with(|c| {
            let tx = c.transaction()?;
            let t = now();
            for s in steps {
                tx.execute(
                    "UPDATE steps SET status = 'PENDING', error = ?3, output = NULL, finished_at = NULL
                     WHERE run_id = ?1 AND id = ?2",
                    params![run, s, why],
                )?;
            }
            tx.execute("UPDATE runs SET updated_at = ?2 WHERE id = ?1", params![run, t])?;
            tx.commit()
        })
    }

    /// Record (or clear) a step's cleanup note, durably, before the work it covers.
    pub fn set_scratch(&self, run: i64, step: &str, scratch: Option<&str>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE steps SET scratch = ?3 WHERE run_id = ?1 AND id = ?2",
                params![run, step, scratch],
            )?;
            Ok(())
        })
    }

    pub fn step(&self, run: i64, step: &str) -> Result<StepRecord> {
        self.steps(run)?
            .into_iter()
            .find(|s| s.id == step)
            .ok_or_else(|| Error::NotFound(format!("step {step} of run {run}")))
    }

    pub fn run(&self, id: i64) -> Result<RunRecord> {
        self.with(|c| {
            c.query_row(
                "SELECT id, plan, status, params, store, snapshot, created_at, updated_at, finished_at, error, pid, stop_requested, plan_source, cluster, spec, host FROM runs WHERE id = ?1",
                params![id],
                row_to_run,
            )
            .optional()
        })?
        .ok_or_else(|| Error::NotFound(format!("run {id}")))?
    }

    pub fn latest_run(&self) -> Result<Option<RunRecord>> {
        let id: Option<i64> =
            self.with(|c| c.query_row("SELECT MAX(id) FROM runs", [], |r| r.get(0)))?;
        id.map(|id| self.run(id)).transpose()
    }

    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        let rows = self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, plan, status, params, store, snapshot, created_at, updated_at, finished_at, error, pid, stop_requested, plan_source, cluster, spec, host FROM runs ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = st
                .query_map(params![limit as i64], row_to_run)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter().collect()
    }

    pub fn steps(&self, run: i64) -> Result<Vec<StepRecord>> {
        let rows = self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, id, phase, action, target, status, attempts, error, started_at, finished_at, output, scratch FROM steps WHERE run_id = ?1 ORDER BY seq",
            )?;
            let rows = st
                .query_map(params![run], |r| {
                    Ok((
                        StepRecord {
                            seq: r.get(0)?,
                            id: r.get(1)?,
                            phase: r.get(2)?,
                            action: r.get(3)?,
                            target: r.get(4)?,
                            status: Status::Pending,
                            attempts: r.get(6)?,
                            error: r.get(7)?,
                            started_at: r.get(8)?,
                            finished_at: r.get(9)?,
                            output: r.get(10)?,
                            scratch: r.get(11)?,
                        },
                        r.get::<_, String>(5)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(mut s, st)| {
                s.status = Status::parse(&st)?;
                Ok(s)
            })
            .collect()
    }
}

type RunRow = Result<RunRecord>;

fn row_to_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let status: String = r.get(2)?;
    let params: String = r.get(3)?;
    let rec = (|| -> Result<RunRecord> {
        Ok(RunRecord {
            id: r.get(0).map_err(db_err)?,
            plan: r.get(1).map_err(db_err)?,
            status: Status::parse(&status)?,
            params: serde_json::from_str(&params).map_err(|e| Error::State(e.to_string()))?,
            store: r.get(4).map_err(db_err)?,
            snapshot: r.get(5).map_err(db_err)?,
            created_at: r.get(6).map_err(db_err)?,
            updated_at: r.get(7).map_err(db_err)?,
            finished_at: r.get(8).map_err(db_err)?,
            error: r.get(9).map_err(db_err)?,
            pid: r.get(10).map_err(db_err)?,
            stop_requested: r.get::<_, i64>(11).map_err(db_err)? != 0,
            plan_source: r.get(12).map_err(db_err)?,
            cluster_json: r.get(13).map_err(db_err)?,
            spec_json: r.get(14).map_err(db_err)?,
            host: r.get(15).map_err(db_err)?,
        })
    })();
    // A run recorded as running whose process is gone was interrupted (killed, the
    // machine rebooted): say so instead of RUNNING forever.
    let rec = rec.map(|mut rec| {
        if matches!(rec.status, Status::Running | Status::Pending) && rec.process_gone() {
            rec.status = Status::Interrupted;
        }
        rec
    });
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn of_two_claims_on_one_seen_run_exactly_one_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateStore::open(dir.path()).expect("open");
        let params = crate::plan::params::RedactedParams::default();
        let id = state
            .create_run(&NewRun {
                plan: "p",
                plan_source: "",
                params: &params,
                cluster_json: "{}",
                store: "file:///s",
                snapshot: "s",
                spec_json: "{}",
                steps: Vec::new(),
            })
            .expect("create");
        state
            .set_run_status(id, Status::Failed, Some("boom"))
            .expect("status");
        let seen = state.run(id).expect("run");
        assert!(state.claim_run(&seen).expect("claim"), "the first claim");
        assert!(
            !state.claim_run(&seen).expect("claim"),
            "a second claim on the same sighting loses"
        );
        assert_eq!(state.run(id).expect("run").status, Status::Running);
    }
}
