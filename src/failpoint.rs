//! Fail points for the fault-matrix tests: compiled in only with the `failpoints`
//! feature (the `fail` crate), configured through the `FAILPOINTS` environment
//! variable, e.g. `FAILPOINTS='after:stage/stage-node/node-1=return(kill)'`.
//!
//! `return` fails the step with a non-transient error; `return(kill)` aborts the
//! process on the spot, as a SIGKILL would (no destructors, no clean-up).

use crate::Result;

/// Evaluate the fail point `name`.
pub fn hit(name: &str) -> Result<()> {
    #[cfg(feature = "failpoints")]
    {
        let injected = fail::eval(name, |arg| {
            if arg.as_deref() == Some("kill") {
                std::process::abort();
            }
            crate::Error::State(format!("fail point {name} injected an error"))
        });
        if let Some(e) = injected {
            return Err(e);
        }
    }
    let _ = name;
    Ok(())
}

/// Configure the fail points from `FAILPOINTS` (once, at start-up).
pub fn setup() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}
