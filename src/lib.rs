//! cairn — a backup/restore plan engine for stateful services.
//!
//! # Layout
//!
//! * [`error`]    — the one library error type, its exit code and whether a retry can help.
//! * [`redact`]   — the process-wide list of secret values and the filter every output passes.
//! * [`plan`]     — plan files: raw serde structs, the validated [`plan::Plan`], parameters.
//! * [`spec`]     — plan + parameters + cluster compiled into the typed [`spec::RunSpec`] a run executes.
//! * [`fsx`]      — path operations that resolve (openat, no symlink following) instead of trusting text.
//! * [`failpoint`] — fail points for the fault-matrix tests (feature `failpoints`).
//! * [`cluster`]  — the cluster description (nodes, data dirs, hooks) and keyspace discovery.
//! * [`store`]    — the object store trait, its backends (local, memory) and the part writer.
//! * [`archive`]  — tar.gz streaming of a node (pack) and safe, verifying extraction (unpack).
//! * [`manifest`] — the versioned `manifest.json` that marks a snapshot complete.
//! * [`lock`]     — locks in the store (owner, host, heartbeat) so runs and prunes never collide.
//! * [`manager`]  — manager snapshots (`manager.zip`): create, verify, migrate, restore, catalog.
//! * [`checks`]   — pre-flight checks run before anything is written or destroyed.
//! * [`state`]    — the embedded run-state store (SQLite).
//! * [`engine`]   — runs a plan: phases, strategies, step lifecycle, retries, actions.
//! * [`progress`] — progress events; the terminal rendering lives in the CLI.
//! * [`snapshots`] — list, verify and delete snapshots in a store.
//! * [`recover`]  — choose the snapshot `cairn recover` rebuilds a manager from.
//! * [`retention`] — tiered retention decisions and the prune that applies them.
//! * [`service`]  — start, status, stop and resume as a library API; `cairn serve` (HTTP, events, metrics, status page).
//! * [`cli`]      — the command line, one file per subcommand; local, or a client of a server (`--server`).

/// `eprintln!` that never panics: with stderr closed (a terminal gone, an SSH
/// session broken) the line is dropped instead of killing the thread that printed.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that never panics: with stdout closed (`cairn … | head`) the rest of
/// the output is dropped and the command still finishes its work.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod archive;
pub mod checks;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod crypt;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod fsx;
pub mod lock;
pub mod manager;
pub mod manifest;
pub mod node;
pub mod plan;
pub mod progress;
pub mod recover;
pub mod redact;
pub mod repo;
pub mod retention;
pub mod service;
pub mod snapshots;
pub mod spec;
pub mod state;
pub mod store;

pub use error::{Error, Result};

/// The version recorded in manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
