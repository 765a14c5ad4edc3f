//! Prometheus metrics (OpenMetrics text): what `cairn serve` exposes at
//! `/metrics` and what `--metrics-file` writes for the node exporter's textfile
//! collector after a CLI run.

use crate::engine::Summary;
use crate::spec::RunKind;
use crate::state::{RunRecord, StateStore, Status};
use crate::{Error, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlanLabel {
    plan: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    plan: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlanStore {
    plan: String,
    store: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// A label value as the text format needs it: `\`, `"` and line feeds escaped
/// (the encoder writes values as given, and a store path may hold any of them).
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            // Other line breaks and control characters have no escape in the
            // format, and some readers split lines on them: replaced.
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The counters and gauges a process keeps while it runs.
#[derive(Default, Clone)]
pub struct Metrics {
    runs: Family<OutcomeLabels, Counter>,
    retries: Family<PlanLabel, Counter>,
    uploaded: Family<PlanLabel, Counter>,
    downloaded: Family<PlanLabel, Counter>,
    data_bytes: Family<PlanLabel, Gauge>,
    stored_bytes: Family<PlanLabel, Gauge>,
    duration: Family<PlanLabel, FGauge>,
    active: Gauge,
}

impl Metrics {
    pub fn active(&self, delta: i64) {
        self.active.inc_by(delta);
    }

    pub fn retry(&self, plan: &str) {
        self.retries
            .get_or_create(&PlanLabel { plan: label(plan) })
            .inc();
    }

    /// A run ended with `outcome`; a complete one moved what `summary` says.
    pub fn run_ended(
        &self,
        plan: &str,
        _store: &str,
        outcome: &str,
        kind: Option<RunKind>,
        summary: Option<&Summary>,
    ) {
        self.runs
            .get_or_create(&OutcomeLabels {
                plan: label(plan),
                outcome: label(outcome),
            })
            .inc();
        let Some(s) = summary else {
            return;
        };
        let l = PlanLabel { plan: label(plan) };
        match kind {
            Some(RunKind::Backup) => {
                self.uploaded.get_or_create(&l).inc_by(s.stored_bytes);
            }
            Some(RunKind::Restore) => {
                self.downloaded.get_or_create(&l).inc_by(s.stored_bytes);
            }
            _ => {}
        }
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.data_bytes.get_or_create(&l).set(clamp(s.bytes));
        self.stored_bytes
            .get_or_create(&l)
            .set(clamp(s.stored_bytes));
        self.duration.get_or_create(&l).set(s.duration_secs);
    }

    /// The metrics as OpenMetrics text, with the newest success of each plan and
    /// store read from the run state (so they survive restarts).
    pub fn render(&self, state: &StateStore) -> Result<String> {
        let mut reg = Registry::with_prefix("cairn");
        reg.register(
            "runs",
            "Runs ended by this process, by plan and outcome",
            self.runs.clone(),
        );
        reg.register(
            "retries",
            "Step attempts retried after a transient error",
            self.retries.clone(),
        );
        reg.register(
            "uploaded_bytes",
            "Bytes written to stores by complete backups",
            self.uploaded.clone(),
        );
        reg.register(
            "downloaded_bytes",
            "Bytes read from stores by complete restores",
            self.downloaded.clone(),
        );
        reg.register(
            "last_run_data_bytes",
            "Data bytes (uncompressed) of the plan's last complete run",
            self.data_bytes.clone(),
        );
        reg.register(
            "last_run_stored_bytes",
            "Bytes in the store of the plan's last complete run",
            self.stored_bytes.clone(),
        );
        reg.register(
            "last_run_duration_seconds",
            "Duration of the plan's last complete run",
            self.duration.clone(),
        );
        reg.register("runs_active", "Runs in progress", self.active.clone());
        let last: Family<PlanStore, FGauge> = Family::default();
        for r in last_successes(state)? {
            if let Some(t) = r.finished_at.as_deref().and_then(unix_secs) {
                last.get_or_create(&PlanStore {
                    plan: label(&r.plan),
                    store: label(&crate::redact::redact(&r.store)),
                })
                .set(t);
            }
        }
        reg.register(
            "last_success_timestamp_seconds",
            "When the newest complete run of the plan into (or from) the store finished",
            last,
        );
        let mut out = String::new();
        encode(&mut out, &reg).map_err(|e| Error::State(format!("metrics: {e}")))?;
        Ok(out)
    }
}

/// The newest COMPLETE run of each plan and store.
pub fn last_successes(state: &StateStore) -> Result<Vec<RunRecord>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for r in state.runs(10_000)? {
        if r.status == Status::Complete && seen.insert((r.plan.clone(), r.store.clone())) {
            out.push(r);
        }
    }
    Ok(out)
}

fn unix_secs(t: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
}

/// Write the metrics for the node exporter's textfile collector: to a temporary
/// file beside `path`, then renamed over it (the collector never reads half).
pub fn write_file(path: &std::path::Path, text: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    // The textfile collector reads the Prometheus text format: no `# EOF`.
    let body: String = text
        .lines()
        .filter(|l| *l != "# EOF")
        .map(|l| format!("{l}\n"))
        .collect();
    let mut tmp = tempfile::Builder::new()
        .prefix(".cairn-metrics-")
        .tempfile_in(dir)
        .map_err(|e| Error::io("create a metrics file in", dir, e))?;
    std::io::Write::write_all(&mut tmp, body.as_bytes())
        .map_err(|e| Error::io("write", tmp.path(), e))?;
    let f = tmp.as_file();
    f.sync_all().map_err(|e| Error::io("sync", path, e))?;
    // Readable by the collector (tempfile makes it 0600).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io("chmod", tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| Error::io("rename the metrics file to", path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(super::label("plain/path-1"), "plain/path-1");
        assert_eq!(
            super::label("a\rb\tc\u{2028}d\u{85}e\u{1b}"),
            "a\u{fffd}b\u{fffd}c\u{fffd}d\u{fffd}e\u{fffd}"
        );
    }
}
