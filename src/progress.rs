//! Progress events. The library reports; the CLI renders (bars on a terminal, plain
//! lines otherwise, nothing with `--quiet`).

use crate::state::Status;

#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A run started or resumed.
    RunStarted {
        run: i64,
        plan: &'a str,
        snapshot: &'a str,
    },
    /// A step started; `total` is the number of bytes it expects to move, if known.
    StepStarted { step: &'a str, total: Option<u64> },
    /// Bytes moved so far by a step.
    Bytes { step: &'a str, done: u64 },
    /// A step reached a final state.
    StepFinished {
        step: &'a str,
        status: Status,
        error: Option<&'a str>,
    },
    /// The run ended (whatever its outcome): nothing more is drawn for it.
    RunFinished,
    /// A step is retried after a transient error.
    Retry {
        step: &'a str,
        attempt: u32,
        error: &'a str,
    },
}

pub trait Progress: Send + Sync {
    fn event(&self, event: Event<'_>);
}

/// Reports nothing.
pub struct Silent;
impl Progress for Silent {
    fn event(&self, _: Event<'_>) {}
}
