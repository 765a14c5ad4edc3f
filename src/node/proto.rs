//! The agent protocol: JSON lines over the agent's stdin and stdout.
//!
//! ```text
//! agent → {"hello":{"protocol":2,"version":"0.1.0"}}
//! coord → {"hello":{"protocol":2,"version":"0.1.0"}}
//! coord → {"op":"backup", …}                       one request, secrets inside
//! agent → "beat" | {"event":{…}} …                 while it works (a beat every 2 s)
//! agent → {"done":…} | {"failed":{…}}              then it exits
//! ```
//!
//! Each side checks the other's protocol number and refuses a mismatch before any
//! work. Closing the agent's stdin cancels its work (the coordinator went away).

use super::restore::{CheckStagedJob, FsOp, StageJob};
use super::{BackupJob, NodeEvent, StoreTarget};
use crate::cluster::{Node, Selection};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Bumped whenever a message changes shape.
pub const PROTOCOL: u32 = 3;

/// The longest line either side accepts.
pub const MAX_LINE: usize = 64 << 20;

/// How often the agent says it is alive while it works.
pub const BEAT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    pub version: String,
}

impl Hello {
    pub fn ours() -> Hello {
        Hello {
            protocol: PROTOCOL,
            version: crate::VERSION.to_string(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Greeting {
    Hello(Hello),
}

/// What the coordinator asks of an agent (one per agent process).
#[derive(Serialize, Deserialize)]
pub struct Request {
    /// Secret values the agent must never print (it registers them for redaction).
    pub secrets: Vec<String>,
    pub store: StoreTarget,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    InspectBackup {
        node: Node,
        selection: Selection,
        #[serde(default)]
        capture: crate::cluster::Capture,
    },
    Backup {
        job: BackupJob,
    },
    /// A restore's filesystem work (`{"op":"fs","fs":{"fs":"probe",…}}`).
    Fs {
        fs: FsOp,
    },
    Stage {
        job: StageJob,
    },
    CheckStaged {
        job: CheckStagedJob,
    },
    HashObject {
        key: String,
    },
}

/// What an agent says while and after it works.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Beat,
    Event(NodeEvent),
    Done(serde_json::Value),
    Failed(WireError),
}

/// An error crossing the wire: its text (redacted on the node), its exit code and
/// whether a retry may help, so a remote failure is judged as a local one is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    pub message: String,
    pub exit_code: i32,
    pub transient: bool,
    /// Pre-flight problems, one per line (merged with the other nodes').
    #[serde(default)]
    pub problems: Option<Vec<String>>,
    #[serde(default)]
    pub cancelled: bool,
}

impl WireError {
    pub fn from_error(e: &Error) -> WireError {
        let root = e.root();
        WireError {
            message: crate::redact::redact(&e.to_string()),
            exit_code: e.exit_code(),
            transient: e.is_transient(),
            problems: match root {
                Error::Checks(p) => Some(p.iter().map(|l| crate::redact::redact(l)).collect()),
                _ => None,
            },
            cancelled: matches!(root, Error::Cancelled),
        }
    }

    /// The error on this side. Pre-flight problems stay problems only for a
    /// pre-flight request (elsewhere they are the node's failure); an exit code is
    /// taken only when it is one cairn documents for a failure, never 0; only the
    /// `cancelled` flag makes a cancellation.
    pub fn into_error(self, node: u32, preflight: bool) -> Error {
        use crate::error::exit;
        if self.cancelled {
            return Error::Cancelled;
        }
        if preflight && let Some(p) = self.problems {
            return Error::Checks(p.into_iter().map(|l| clip(&l)).collect());
        }
        let exit_code = match self.exit_code {
            c @ (exit::FAILED
            | exit::USAGE
            | exit::CHECK_REFUSED
            | exit::LOCKED
            | exit::NOT_FOUND) => c,
            _ => exit::FAILED,
        };
        Error::Remote {
            node,
            message: clip(&crate::redact::redact(&self.message)),
            exit_code,
            transient: self.transient,
        }
    }
}

/// A message from a node, cut to a readable length.
fn clip(s: &str) -> String {
    const MAX: usize = 2000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &s[..end], s.len() - end)
}

/// One JSON line, with its newline.
pub fn line<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out = serde_json::to_vec(v).map_err(|e| Error::State(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}
