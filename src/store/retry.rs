//! Request-level retries with jittered exponential backoff, for remote backends.
//!
//! The backends disable their SDK's own retries and wrap each request in
//! [`with_retries`], so retrying happens exactly once, here. An error still transient
//! after the last attempt is returned as *not* transient, so the engine does not
//! retry the whole step on top of it: the run fails with a clear message and
//! `plan resume` continues it.

use crate::{Error, Result};
use backon::{BackoffBuilder, ExponentialBuilder};
use std::future::Future;
use std::time::Duration;

/// Retry settings of a backend. Defaults: 6 attempts, 200 ms doubling to 10 s, jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    pub max_attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 6,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// Run `op` until it succeeds, fails with a non-transient error, or the attempts run out.
pub async fn with_retries<T, F, Fut>(cfg: RetryConfig, what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(cfg.min_delay)
        .with_max_delay(cfg.max_delay)
        .with_max_times(cfg.max_attempts.saturating_sub(1))
        .with_jitter()
        .build();
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => match delays.next() {
                Some(d) => {
                    tracing::warn!(attempt, "{what}: transient error, retrying in {d:?}: {e}");
                    tokio::time::sleep(d).await;
                    attempt += 1;
                }
                None => return Err(exhausted(e, attempt)),
            },
            Err(e) => return Err(e),
        }
    }
}

fn exhausted(e: Error, attempts: usize) -> Error {
    match e {
        Error::Store {
            op, key, message, ..
        } => Error::Store {
            op,
            key,
            message: format!("{message} (gave up after {attempts} attempts)"),
            transient: false,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn transient() -> Error {
        Error::Store {
            op: "get",
            key: "k".into(),
            message: "503 SlowDown".into(),
            transient: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_then_gives_up_as_permanent() {
        let calls = AtomicUsize::new(0);
        let cfg = RetryConfig::default();
        let r: Result<()> = with_retries(cfg, "get", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(transient())
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), cfg.max_attempts);
        let e = r.expect_err("fails");
        assert!(!e.is_transient(), "not retried again by the engine");
        assert!(e.to_string().contains("gave up after 6 attempts"));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried_and_success_stops() {
        let calls = AtomicUsize::new(0);
        let r: Result<()> = with_retries(RetryConfig::default(), "put", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::store("put", "k", "403 AccessDenied"))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let calls = AtomicUsize::new(0);
        let r = with_retries(RetryConfig::default(), "put", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(transient())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.expect("third attempt succeeds"), 7);
    }
}
