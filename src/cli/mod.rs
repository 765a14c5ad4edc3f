//! The command line. Flags are parsed by clap into the raw structs below, then each
//! subcommand's `run` validates them and calls the library. Only [`run`]'s caller
//! (main.rs) prints errors and picks the exit code.

pub mod manager;
pub mod output;
pub mod plan;
pub mod remote;
pub mod serve;
pub mod snapshots;

use crate::plan::params::CliParam;
use crate::state::StateStore;
use crate::{Error, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "cairn",
    version,
    about = "Backup/restore plan engine for stateful services"
)]
pub struct Cli {
    /// Directory of the run-state store.
    #[arg(long, global = true, env = "CAIRN_HOME")]
    pub home: Option<PathBuf>,
    /// The config file with named stores (default: cairn.toml next to the cluster
    /// description, else in the user's config dir).
    #[arg(long, global = true, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Extra plans directory (its plans override the shipped ones of the same name).
    #[arg(long, global = true, env = "CAIRN_PLANS")]
    pub plans_dir: Option<PathBuf>,
    /// Machine-readable output on stdout (one JSON document or line).
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress output.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More log output (-v info, -vv debug).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Run `plan` commands on a cairn server (`cairn serve`) instead of in this
    /// process: http://127.0.0.1:8080, or https://… off loopback.
    #[arg(long, global = true, env = "CAIRN_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// A file holding the bearer token: sent to --server, or required of every
    /// request by `cairn serve`.
    #[arg(long, global = true, env = "CAIRN_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A PEM file of the certificate authority that signed --server's TLS
    /// certificate (else the usual public roots).
    #[arg(long, global = true, env = "CAIRN_SERVER_CA", value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Plans and their runs.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Snapshots in a store.
    #[command(subcommand)]
    Snapshots(SnapshotsCmd),
    /// Manager snapshots: the control plane's state as one manager.zip.
    #[command(subcommand, name = "manager-snapshot")]
    ManagerSnapshot(ManagerCmd),
    /// Rebuild a fallen manager (and with --nodes the nodes) from the newest
    /// complete snapshot; prints what it will do and needs --force to do it.
    Recover(RecoverArgs),
    /// Serve the plans HTTP API (`/v1/plans`, `/v1/runs`, server-sent events),
    /// `/metrics` and a live status page at `/`; runs execute in this process.
    Serve(ServeArgs),
    /// A node's side of a run: started by a coordinator through the node's `exec`
    /// prefix (ssh, kubectl exec), it reads one request on stdin and answers on
    /// stdout. Not for interactive use.
    Agent,
    /// Print a shell completion script: `cairn completions bash >
    /// /etc/bash_completion.d/cairn` (also zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `cairn man > /usr/local/share/man/man1/cairn.1`.
    Man,
}

/// `cairn serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address and port to listen on. Anything but loopback needs --token-file,
    /// --tls-cert and --tls-key. Port 0 picks a free port (printed).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    pub listen: String,
    /// The cluster description (TOML) the server's runs are for.
    #[arg(long, env = "CAIRN_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// The TLS certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A store whose snapshots the status page lists and `/v1/snapshots` reads by
    /// default (a URL, a directory or a profile; repeatable).
    #[arg(long = "store", value_name = "STORE")]
    pub stores: Vec<String>,
}

/// What opens an encrypted snapshot (client-side age encryption).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// An age identity file (AGE-SECRET-KEY-1… lines, as age-keygen writes them)
    /// that opens an encrypted snapshot.
    #[arg(long, value_name = "FILE", env = "CAIRN_AGE_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// A file holding the passphrase an encrypted snapshot was made with.
    #[arg(long, value_name = "FILE", conflicts_with = "identity")]
    pub passphrase_file: Option<PathBuf>,
}

impl KeyArgs {
    /// The keys named, read (bounded) and registered as secrets.
    pub fn keys(&self) -> Result<Option<crate::crypt::Keys>> {
        use crate::plan::params::read_file_value;
        let read = |what: &str, p: &PathBuf| -> Result<String> {
            let v = read_file_value(what, p).map_err(Error::Usage)?;
            crate::redact::register(&v);
            Ok(v)
        };
        if let Some(p) = &self.identity {
            let text = read("--identity", p)?;
            return crate::crypt::Keys::identities(&text)
                .map(Some)
                .map_err(|e| Error::Usage(e.replace("AGE_IDENTITY", "--identity")));
        }
        if let Some(p) = &self.passphrase_file {
            let text = read("--passphrase-file", p)?;
            if text.is_empty() {
                return Err(Error::Usage("--passphrase-file: the file is empty".into()));
            }
            return Ok(Some(crate::crypt::Keys::Passphrase(text)));
        }
        Ok(None)
    }
}

/// Where a manager-snapshot command works.
#[derive(Debug, clap::Args)]
pub struct At {
    /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix, az://container/prefix.
    #[arg(long, env = "CAIRN_STORE")]
    pub store: Option<String>,
    /// The cluster description; without one (or without its [manager]) the manager
    /// is cairn's own state in --home.
    #[arg(long, env = "CAIRN_CLUSTER")]
    pub cluster: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ManagerCmd {
    /// Snapshot the manager into the store (credentials left out unless asked).
    Create {
        /// Snapshot id (default: manager-<UTC time>).
        id: Option<String>,
        /// Include the files under the manager's credentials sub-path.
        #[arg(long)]
        include_credentials: bool,
        #[command(flatten)]
        at: At,
    },
    /// List manager snapshots: id, created, version, size, credentials, status.
    List {
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: Option<String>,
    },
    /// Save a manager snapshot to a local file (checksum verified).
    Download {
        /// The manager snapshot's id (as `manager-snapshot list` shows it).
        id: String,
        /// The file to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: Option<String>,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Check a local manager.zip entry by entry, then upload it.
    Upload {
        /// A manager.zip made by `manager-snapshot download` (or another cairn).
        file: PathBuf,
        /// Id in the store (default: the id in its metadata).
        #[arg(long)]
        id: Option<String>,
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: Option<String>,
    },
    /// Restore a manager snapshot: only onto a clean manager unless --force.
    Restore {
        /// The manager snapshot's id (as `manager-snapshot list` shows it).
        id: String,
        /// Restore over a manager that is not clean; its state is kept as a
        /// pre-restore copy that `rollback` swaps back.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        at: At,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Swap the newest pre-restore copy back in.
    Rollback {
        /// The cluster description whose manager it is (default: cairn's own state).
        #[arg(long, env = "CAIRN_CLUSTER")]
        cluster: Option<PathBuf>,
    },
    /// Delete a manager snapshot from the store.
    Delete {
        /// The manager snapshot's id (as `manager-snapshot list` shows it).
        id: String,
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: Option<String>,
    },
    /// The manager: where its state is, its version, whether it is clean.
    Status {
        /// The cluster description whose manager it is (default: cairn's own state).
        #[arg(long, env = "CAIRN_CLUSTER")]
        cluster: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// Do it (without: print what would be done and exit 2).
    #[arg(long, short)]
    pub force: bool,
    /// A snapshot name, or `latest` (default): the newest complete snapshot whose
    /// objects are all present.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
    #[arg(long, env = "CAIRN_STORE")]
    pub store: Option<String>,
    /// The cluster description (TOML) whose manager (and with --nodes, nodes)
    /// are rebuilt.
    #[arg(long, env = "CAIRN_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// Also restore every data node of the cluster description.
    #[arg(long)]
    pub nodes: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Subcommand)]
pub enum PlanCmd {
    /// List the available plans.
    List,
    /// Show a plan: parameters, phases, steps.
    Show {
        /// The plan's name (`cairn plan list`).
        plan: String,
    },
    /// Start a run of a plan.
    Start {
        /// The plan's name (`cairn plan list`); `cairn plan show PLAN` lists its
        /// parameters.
        plan: String,
        /// Remove a stale lock on the snapshot (left by a run that died) first.
        #[arg(long)]
        break_lock: bool,
        /// Run every pre-flight check and say what would be written where; change
        /// nothing and record no run (also `-p DRY_RUN=true`).
        #[arg(long)]
        dry_run: bool,
        /// A differential backup tells a changed file by its SHA-256 (each file
        /// of the same size read again), not by its size, time and inode (also
        /// `-p REHASH=true`).
        #[arg(long)]
        rehash: bool,
        /// A parameter: KEY=VALUE, or KEY=@FILE to read the value from a file.
        #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
        params: Vec<CliParam>,
        /// The cluster description (TOML).
        #[arg(long, env = "CAIRN_CLUSTER")]
        cluster: Option<PathBuf>,
        /// After the run, write its metrics (Prometheus text) to FILE, for the
        /// node exporter's textfile collector.
        #[arg(long, env = "CAIRN_METRICS_FILE", value_name = "FILE")]
        metrics_file: Option<PathBuf>,
    },
    /// Status of a run (default: the latest).
    Status {
        /// The run's number (`cairn plan history`).
        run: Option<i64>,
    },
    /// Past runs, newest first.
    History {
        /// How many runs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Ask a running run to stop; its state is kept for `resume`.
    Stop {
        /// The run's number (`cairn plan history`).
        run: i64,
    },
    /// Resume a failed, stopped or killed run; finished steps are not redone.
    Resume {
        /// The run's number (`cairn plan history`).
        run: i64,
        /// Parameters to give again (secrets are never stored) or to override.
        #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
        params: Vec<CliParam>,
        /// Remove a stale lock on the snapshot (left by the run that died) first.
        #[arg(long)]
        break_lock: bool,
        /// After the run, write its metrics (Prometheus text) to FILE, for the
        /// node exporter's textfile collector.
        #[arg(long, env = "CAIRN_METRICS_FILE", value_name = "FILE")]
        metrics_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotsCmd {
    /// List snapshots (complete or not) in a store.
    List {
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: String,
    },
    /// Check a snapshot: the manifest and every object's presence and size;
    /// with --read-data (or --sample) download and check every checksum. The result
    /// is recorded in the store (`snapshots list` shows it).
    Verify {
        /// The snapshot's name (SNAPSHOT_NAME of its backup).
        name: String,
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: String,
        /// Download every object and check every file's SHA-256.
        #[arg(long)]
        read_data: bool,
        /// Download a random PERCENT of the node objects (at least one).
        #[arg(long, value_name = "PERCENT", conflicts_with = "read_data")]
        sample: Option<f64>,
        /// Remove a stale lock on the snapshot first.
        #[arg(long)]
        break_lock: bool,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// The files of a complete snapshot: per node, each file's size and where it is
    /// stored (object and offset of its entry); with PATH, only what is at or under
    /// it.
    Show {
        /// The snapshot's name (SNAPSHOT_NAME of its backup).
        name: String,
        /// A path inside a node (keyspace, keyspace/table or a file).
        path: Option<String>,
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: String,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Copy a snapshot and every object it names to another store (S3, Azure, a
    /// directory: for a cloud migration or an offsite copy), streaming; each object
    /// is checked on the way and read back at the destination, the manifest last.
    Copy {
        /// The snapshot's name.
        name: String,
        /// The store to copy from (a URL, a directory or a profile).
        #[arg(long, value_name = "STORE")]
        from: String,
        /// The store to copy to (created if it is a missing directory).
        #[arg(long, value_name = "STORE")]
        to: String,
        /// Remove a stale lock on the snapshot (in either store) first.
        #[arg(long)]
        break_lock: bool,
    },
    /// How the files of snapshot B differ from those of snapshot A, per node:
    /// added, removed, changed (size or content), and how many are unchanged.
    Diff {
        /// The earlier snapshot.
        a: String,
        /// The snapshot compared with it.
        b: String,
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: String,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Delete a snapshot (manifest first).
    Delete {
        /// The snapshot's name (SNAPSHOT_NAME of its backup).
        name: String,
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: String,
        /// Remove a stale lock on the snapshot first.
        #[arg(long)]
        break_lock: bool,
    },
    /// Apply a retention policy: keep what it names, delete the rest.
    Prune {
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: String,
        /// WITHIN[,EVERY:UNTIL]…: keep all younger than WITHIN, then one per EVERY
        /// up to UNTIL per tier, drop older (`default` = 24h,12h:7d,24h:15d).
        #[arg(long, default_value = "default")]
        policy: String,
        /// Always keep the N newest complete snapshots.
        #[arg(long, default_value_t = 1)]
        keep_last: usize,
        /// Delete incomplete snapshots only once untouched this long.
        #[arg(long, default_value = "24h")]
        grace: String,
        /// Print what would be deleted and why; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Remove stale locks of snapshots being deleted.
        #[arg(long)]
        break_lock: bool,
        /// The time to judge ages against (RFC 3339; for tests and what-ifs).
        #[arg(long, hide = true)]
        now: Option<String>,
        /// Apply the policy to the snapshots with this tag (`-p TAGS=…` at backup
        /// time); without it, tagged snapshots are kept and only untagged ones are
        /// pruned.
        #[arg(long)]
        tag: Option<String>,
        /// Always keep snapshots with this tag (repeatable).
        #[arg(long)]
        keep_tag: Vec<String>,
        /// Only this cluster's snapshots (by the name in its description); each
        /// cluster is pruned on its own in any case.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// The newest complete snapshot and its age; with --max-age, exit 6 when it is
    /// older (monitoring of the recovery point).
    Last {
        /// The store: a profile of cairn.toml, file:///path, s3://bucket/prefix or az://container/prefix.
        #[arg(long, env = "CAIRN_STORE")]
        store: String,
        /// e.g. 26h.
        #[arg(long)]
        max_age: Option<String>,
        #[arg(long, hide = true)]
        now: Option<String>,
    },
}

/// Shared settings of one invocation.
pub struct Globals {
    pub home: PathBuf,
    pub plans_dir: Option<PathBuf>,
    /// `--config`: the file of store profiles, when named.
    pub config: Option<PathBuf>,
    pub json: bool,
    pub quiet: bool,
    /// `--server`: plan commands go to this cairn server.
    pub server: Option<String>,
    pub token_file: Option<PathBuf>,
    pub server_ca: Option<PathBuf>,
}

impl Globals {
    /// The store profiles: `--config`, else `cairn.toml` next to `cluster`, else
    /// the user's config dir.
    pub fn config(&self, cluster: Option<&std::path::Path>) -> Result<crate::config::Config> {
        crate::config::Config::discover(self.config.as_deref(), cluster)
    }

    /// Open the store a `--store` argument names: a store profile (a bare word
    /// defined in `cairn.toml`), a URL or a directory. URLs and paths take their
    /// backend options from the environment; a profile brings its own.
    pub async fn open_store(
        &self,
        arg: &str,
        cluster: Option<&std::path::Path>,
    ) -> Result<std::sync::Arc<dyn crate::store::Store>> {
        Ok(self.open_store_with_options(arg, cluster).await?.0)
    }

    /// [`Globals::open_store`], and the backend options it was opened with (for
    /// node agents, which open it again on their hosts).
    pub async fn open_store_with_options(
        &self,
        arg: &str,
        cluster: Option<&std::path::Path>,
    ) -> Result<(
        std::sync::Arc<dyn crate::store::Store>,
        std::collections::BTreeMap<String, String>,
    )> {
        use crate::config::{StoreArg, is_profile_name};
        let placed = if is_profile_name(arg) {
            self.config(cluster)?.store_arg(arg)?
        } else {
            StoreArg::Url(arg.to_string())
        };
        let (url, options) = match placed {
            StoreArg::Profile(p) => (p.url.clone(), p.options()?),
            StoreArg::Url(u) => (u, store_options_from_env()),
        };
        Ok((crate::store::open(&url, &options).await?, options))
    }

    pub fn state(&self) -> Result<StateStore> {
        let new = !self.home.join("state.db").exists();
        let s = StateStore::open(&self.home)?;
        if new {
            // Never a silent new home: a run started elsewhere is not in it.
            crate::say!(
                "cairn: new state home {} (--home or CAIRN_HOME chooses another)",
                std::path::absolute(&self.home)
                    .unwrap_or_else(|_| self.home.clone())
                    .display()
            );
        }
        Ok(s)
    }
}

/// Run a parsed command line; returns the exit code of a successful command
/// (non-zero when, e.g., `verify` found problems).
pub async fn run(cli: Cli) -> Result<i32> {
    let g = Globals {
        home: cli.home.unwrap_or_else(StateStore::default_home),
        plans_dir: cli.plans_dir,
        config: cli.config.filter(|c| !c.as_os_str().is_empty()),
        json: cli.json,
        quiet: cli.quiet,
        server: cli.server.filter(|s| !s.is_empty()),
        token_file: cli.token_file.filter(|c| !c.as_os_str().is_empty()),
        server_ca: cli.server_ca.filter(|c| !c.as_os_str().is_empty()),
    };
    // `--server` on the command line of another command is a mistake worth
    // naming; CAIRN_SERVER in the environment is for plan commands and leaves
    // the others (snapshots, manager-snapshot, serve…) running here.
    let named = std::env::args().any(|a| a == "--server" || a.starts_with("--server="));
    if named && g.server.is_some() && !matches!(cli.command, Command::Plan(_)) {
        return Err(usage(
            "--server applies to `cairn plan` commands; run this one without it",
        ));
    }
    match cli.command {
        Command::Plan(cmd) if g.server.is_some() => remote::plan(&g, cmd).await,
        Command::Plan(cmd) => plan::run(&g, cmd).await,
        Command::Serve(args) => serve::run(&g, args).await,
        Command::Snapshots(cmd) => snapshots::run(&g, cmd).await,
        Command::ManagerSnapshot(cmd) => manager::run(&g, cmd).await,
        Command::Recover(args) => manager::recover(&g, args).await,
        Command::Agent => Ok(crate::node::agent::serve().await),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "cairn", &mut out);
            crate::out!("{}", String::from_utf8_lossy(&out).trim_end());
            Ok(crate::error::exit::OK)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| Error::State(format!("cannot render the manual page: {e}")))?;
            crate::out!("{}", String::from_utf8_lossy(&out).trim_end());
            Ok(crate::error::exit::OK)
        }
    }
}

/// Cancel `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signals(token: tokio_util::sync::CancellationToken) {
    cancel_on_signals_saying(
        token,
        "cairn: stopping; the run's state is saved and `cairn plan resume` continues it",
    );
}

/// Cancel `token` on Ctrl-C or SIGTERM, saying `message` on stderr.
pub fn cancel_on_signals_saying(token: tokio_util::sync::CancellationToken, message: &'static str) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        crate::say!("{message}");
        token.cancel();
    });
}

pub use crate::store::options_from_env as store_options_from_env;

pub(crate) fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

#[cfg(test)]
mod help_tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command and every argument says what it is: no empty line in any
    /// `--help`.
    #[test]
    fn every_command_and_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, holes: &mut Vec<String>) {
            let here = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && !path.is_empty() {
                holes.push(format!("{here}: no description"));
            }
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    holes.push(format!("{here} <{id}>: no description"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &here, holes);
                }
            }
        }
        let mut holes = Vec::new();
        walk(&Cli::command(), "", &mut holes);
        assert!(holes.is_empty(), "{}", holes.join("\n"));
    }
}
