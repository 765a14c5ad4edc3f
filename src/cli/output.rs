//! Rendering: progress bars on a terminal, plain lines otherwise, JSON on request.

use crate::checks::human;
use crate::progress::{Event, Progress};
use crate::redact::redact;
use crate::state::Status;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The progress renderer for this invocation.
pub fn progress(quiet: bool) -> Arc<dyn Progress> {
    if quiet {
        Arc::new(crate::progress::Silent)
    } else if std::io::stderr().is_terminal() {
        Arc::new(Bars::default())
    } else {
        Arc::new(Lines::default())
    }
}

#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress for Bars {
    fn event(&self, event: Event<'_>) {
        let mut bars = match self.bars.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        match event {
            Event::RunStarted {
                run,
                plan,
                snapshot,
            } => {
                let _ = self
                    .multi
                    .println(format!("run {run}: {plan} snapshot {snapshot}"));
            }
            Event::StepStarted { step, total } => {
                // A retried step keeps its one bar, started again.
                if let Some(old) = bars.remove(step) {
                    old.finish_and_clear();
                    self.multi.remove(&old);
                }
                let bar = self.multi.add(ProgressBar::new(total.unwrap_or(0)));
                let style = ProgressStyle::with_template(
                    "{prefix:28} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(step.to_string());
                bars.insert(step.to_string(), bar);
            }
            Event::Bytes { step, done } => {
                if let Some(b) = bars.get(step) {
                    b.set_position(done);
                }
            }
            Event::StepFinished {
                step,
                status,
                error,
            } => {
                if let Some(b) = bars.remove(step) {
                    b.finish_and_clear();
                    self.multi.remove(&b);
                }
                let line = match error {
                    Some(e) => format!("{step}: {status}: {}", redact(e)),
                    None => format!("{step}: {status}"),
                };
                let _ = self.multi.println(line);
            }
            Event::RunFinished => {
                // No bar outlives its run (a step that ended without a final
                // state: cancelled, or its run stopped).
                for (_, b) in bars.drain() {
                    b.finish_and_clear();
                    self.multi.remove(&b);
                }
                let _ = self.multi.clear();
            }
            Event::Retry {
                step,
                attempt,
                error,
            } => {
                let _ = self.multi.println(format!(
                    "{step}: attempt {attempt} failed, retrying: {}",
                    redact(error)
                ));
            }
        }
    }
}

/// Per step: started at, last line printed at, expected total.
type LineState = (Instant, Instant, Option<u64>);

#[derive(Default)]
struct Lines {
    steps: Mutex<HashMap<String, LineState>>,
}

impl Progress for Lines {
    fn event(&self, event: Event<'_>) {
        let mut steps = match self.steps.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match event {
            Event::RunStarted {
                run,
                plan,
                snapshot,
            } => {
                crate::say!("run {run}: {plan} snapshot {snapshot}");
            }
            Event::StepStarted { step, total } => {
                let now = Instant::now();
                steps.insert(step.to_string(), (now, now, total));
                match total {
                    Some(t) => crate::say!("{step}: started ({})", human(t)),
                    None => crate::say!("{step}: started"),
                }
            }
            Event::Bytes { step, done } => {
                if let Some((start, last, total)) = steps.get_mut(step)
                    && last.elapsed() >= Duration::from_secs(5)
                {
                    *last = Instant::now();
                    let secs = start.elapsed().as_secs_f64().max(0.001);
                    let rate = done as f64 / secs;
                    match total {
                        Some(t) if *t > 0 => {
                            let eta = (t.saturating_sub(done)) as f64 / rate.max(1.0);
                            crate::say!(
                                "{step}: {:.0}% {}/{} {}/s eta {:.0}s",
                                done as f64 * 100.0 / *t as f64,
                                human(done),
                                human(*t),
                                human(rate as u64),
                                eta
                            );
                        }
                        _ => crate::say!("{step}: {} {}/s", human(done), human(rate as u64)),
                    }
                }
            }
            Event::StepFinished {
                step,
                status,
                error,
            } => {
                steps.remove(step);
                match error {
                    Some(e) => crate::say!("{step}: {status}: {}", redact(e)),
                    None => crate::say!("{step}: {status}"),
                }
            }
            Event::RunFinished => steps.clear(),
            Event::Retry {
                step,
                attempt,
                error,
            } => {
                crate::say!(
                    "{step}: attempt {attempt} failed, retrying: {}",
                    redact(error)
                );
            }
        }
    }
}

/// Print a JSON value on one line of stdout, redacted.
pub fn print_json(value: &serde_json::Value) {
    crate::out!("{}", crate::redact::redact_json(value));
}

pub fn status_word(s: Status) -> &'static str {
    s.as_str()
}
