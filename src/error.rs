//! Error policy.
//!
//! Every library error is one [`Error`] variant carrying the context an operator needs
//! (the path, the object key, the node, the parameter names). Three questions are
//! answered for each error in one place:
//!
//! * what the user sees — the `Display` text, which never contains a secret value
//!   (the CLI passes it through [`crate::redact`] before printing, as a second fence);
//! * which exit code it maps to ([`Error::exit_code`], documented in README.md);
//! * whether retrying the same step can help ([`Error::is_transient`]), which drives
//!   the engine's backoff.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit codes, stable and documented in README.md.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const CHECK_REFUSED: i32 = 3;
    pub const LOCKED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    /// `snapshots last --max-age`: the newest complete snapshot is too old.
    pub const STALE: i32 = 6;
    pub const CANCELLED: i32 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command-line input that is not about plan parameters.
    #[error("{0}")]
    Usage(String),

    /// A plan file that does not parse or validate.
    #[error("plan {file}: {message}")]
    Plan { file: String, message: String },

    /// A cluster description that does not parse or validate.
    #[error("cluster description {file}: {message}")]
    Cluster { file: String, message: String },

    /// Unknown, missing or malformed parameters; one line per problem.
    #[error("invalid parameters:\n  - {}", .0.join("\n  - "))]
    Params(Vec<String>),

    /// Pre-flight checks refused the run; one line per problem.
    #[error("pre-flight checks refused the run ({} problem(s)):\n  - {}", .0.len(), .0.join("\n  - "))]
    Checks(Vec<String>),

    /// Refused after pre-flight (a resume, a commit): what was checked no longer
    /// holds; nothing was moved into place.
    #[error("refused ({} problem(s)):\n  - {}", .0.len(), .0.join("\n  - "))]
    Refused(Vec<String>),

    /// A local operation failed and was not undone (a rollback that could not
    /// finish); the message says what is left where.
    #[error("{0}")]
    Unfinished(String),

    /// A store operation failed.
    #[error("store {op}{}: {message}", if key.is_empty() { String::new() } else { format!(" {key}") })]
    Store {
        op: &'static str,
        key: String,
        message: String,
        transient: bool,
    },

    /// A lock in the store is held by another run or command (or is stale and was
    /// not broken).
    #[error("{0}")]
    Locked(String),

    /// An object that should exist does not.
    #[error("not found: {0}")]
    NotFound(String),

    /// An archive that is corrupt, hostile or does not match its manifest.
    #[error("archive {object}: {message}")]
    Archive { object: String, message: String },

    /// A local file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A node hook exited non-zero or could not start.
    #[error("{hook} hook of node {node}: {message}")]
    Hook {
        hook: &'static str,
        node: u32,
        message: String,
    },

    /// The embedded state store failed.
    #[error("state store: {0}")]
    State(String),

    /// The run, or this step, was cancelled (Ctrl-C, SIGTERM, `plan stop`).
    #[error("cancelled")]
    Cancelled,

    /// A node's agent failed (or could not be reached); it keeps the exit code and
    /// the retry judgement of the error on the node.
    #[error("node {node}: {message}")]
    Remote {
        node: u32,
        message: String,
        exit_code: i32,
        transient: bool,
    },

    /// A cairn server answered with an error (or a run it ran ended with one):
    /// its message, outcome word and exit code, as the CLI would have given them.
    #[error("{message}")]
    Server {
        message: String,
        outcome: String,
        exit_code: i32,
    },

    /// A step failed; carries the step id for context.
    #[error("step {step} failed: {source}")]
    Step {
        step: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub fn archive(object: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Archive {
            object: object.into(),
            message: message.into(),
        }
    }

    pub fn store(op: &'static str, key: impl Into<String>, message: impl ToString) -> Self {
        Error::Store {
            op,
            key: key.into(),
            message: message.to_string(),
            transient: false,
        }
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store { transient, .. } => *transient,
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ),
            Error::Step { source, .. } => source.is_transient(),
            Error::Remote { transient, .. } => *transient,
            _ => false,
        }
    }

    /// The process exit code this error maps to (see README.md, "Exit codes").
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Plan { .. } | Error::Cluster { .. } | Error::Params(_) => {
                exit::USAGE
            }
            Error::Checks(_) | Error::Refused(_) => exit::CHECK_REFUSED,
            Error::NotFound(_) => exit::NOT_FOUND,
            Error::Locked(_) => exit::LOCKED,
            Error::Cancelled => exit::CANCELLED,
            Error::Step { source, .. } => source.exit_code(),
            Error::Remote { exit_code, .. } | Error::Server { exit_code, .. } => *exit_code,
            _ => exit::FAILED,
        }
    }

    /// The innermost error, owned, skipping step context.
    pub fn root_owned(self) -> Error {
        match self {
            Error::Step { source, .. } => source.root_owned(),
            e => e,
        }
    }

    /// The innermost error, skipping step context.
    pub fn root(&self) -> &Error {
        match self {
            Error::Step { source, .. } => source.root(),
            e => e,
        }
    }
}

/// The innermost cause of an error, in one line ("Connection refused (os error
/// 111)", "failed to lookup address information: …"): what a user can act on,
/// without the layers of client internals above it.
pub fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut at = e;
    while let Some(next) = at.source() {
        at = next;
    }
    let text = at.to_string();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() { e.to_string() } else { text }
}
