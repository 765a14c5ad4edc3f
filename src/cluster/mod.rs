//! The cluster being protected: its nodes (index, data dir, optional host and hooks).
//!
//! A cluster description is a TOML file given with `--cluster` or `CAIRN_CLUSTER`.
//! Relative data dirs are resolved against the directory of that file, so a nightly
//! job gives the same result whatever its working directory.

pub mod hooks;

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Keyspaces left out unless asked for by name.
pub const SYSTEM_KEYSPACES: &[&str] = &[
    "system",
    "system_schema",
    "system_auth",
    "system_distributed",
    "system_traces",
    "system_views",
    "system_virtual_schema",
];

/// Names that cairn itself creates inside a data dir (staging); never keyspaces.
pub use crate::repo::RESERVED_PREFIX;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    #[serde(default)]
    hook_secrets: Vec<String>,
    /// The cairn binary on the nodes reached with `exec` (default `cairn`, found
    /// on the node's PATH).
    agent_path: Option<String>,
    /// How long an agent may say nothing before its node is given up as hung.
    agent_timeout: Option<String>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    manager: Option<RawManager>,
    /// How a node's files are captured: `hardlink` (default), `service`, `none`.
    snapshot: Option<String>,
    /// Patterns left out of every backup, added to [`DEFAULT_EXCLUDE`].
    #[serde(default)]
    exclude: Vec<String>,
    /// `false`: only `exclude`, without the default patterns.
    default_exclude: Option<bool>,
    /// The service's own snapshot (`snapshot = "service"`).
    service_snapshot: Option<RawServiceSnapshot>,
    /// Owner of restored files, `user:group` (names or numbers).
    owner: Option<String>,
    /// Run on each node after a restore, per restored table (every node's
    /// default; a node's own `post_restore` wins).
    #[serde(default)]
    post_restore: Vec<String>,
    /// Service artifacts: commands whose output is stored beside the node archives.
    #[serde(default)]
    artifacts: std::collections::BTreeMap<String, RawArtifact>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceSnapshot {
    create: Vec<String>,
    #[serde(default)]
    cleanup: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArtifact {
    #[serde(default)]
    dump: Vec<String>,
    #[serde(default)]
    load: Vec<String>,
    file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManager {
    state_dir: PathBuf,
    version: Option<String>,
    version_file: Option<PathBuf>,
    credentials: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    index: u32,
    data_dir: PathBuf,
    host: Option<String>,
    #[serde(default)]
    pre_hook: Vec<String>,
    #[serde(default)]
    post_hook: Vec<String>,
    #[serde(default)]
    exec: Vec<String>,
    agent_path: Option<String>,
    post_restore: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    pub nodes: Vec<Node>,
    /// The control plane, when the description has a `[manager]` section.
    #[serde(default)]
    pub manager: Option<ManagerConfig>,
    /// The file it was loaded from.
    #[serde(default)]
    pub source: Option<PathBuf>,
    /// Only some of the nodes take part (a restore's `NODES`).
    #[serde(default)]
    pub partial: bool,
    /// Secret parameters the hooks need in their environment (others are withheld).
    #[serde(default)]
    pub hook_secrets: Vec<String>,
    /// How a node's files are captured for a backup.
    #[serde(default)]
    pub capture: Capture,
    /// Owner of restored files (`user:group`), instead of the snapshot's.
    #[serde(default)]
    pub owner: Option<String>,
    /// Service artifacts (e.g. the schema), dumped once per backup.
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

/// What a backup reads a node from.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// cairn hard-links every selected file into `<data_dir>/.cairn-snap-<run>/`
    /// on every node before any upload, and reads from there.
    #[default]
    Hardlink,
    /// A hook makes the service's own snapshot (`nodetool snapshot`): cairn reads
    /// `<ks>/<table>/snapshots/<name>/` as `<ks>/<table>/`.
    Service,
    /// The live data dir: only for a stopped service.
    None,
}

impl SnapshotMode {
    pub fn name(self) -> &'static str {
        match self {
            SnapshotMode::Hardlink => "hardlink",
            SnapshotMode::Service => "service",
            SnapshotMode::None => "none",
        }
    }
}

/// Files never immutable under a running Cassandra (commit logs, logs, files being
/// written), and its own snapshots and incremental backups inside table dirs.
/// A pattern without `/` matches an entry's name at any depth; with `/`, its path
/// from the keyspace on (`*` stays inside one path component).
pub const DEFAULT_EXCLUDE: &[&str] = &[
    "commitlog",
    "*.log",
    "*-tmp-*",
    "*/*/snapshots",
    "*/*/backups",
];

/// How a node's files are captured: the snapshot mode and what is left out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Capture {
    pub mode: SnapshotMode,
    /// Every pattern left out (the defaults included when they apply).
    pub exclude: Vec<String>,
    /// `snapshot = "service"`: argv making the service's snapshot (`{snapshot}` is
    /// the snapshot's name) and argv removing it.
    #[serde(default)]
    pub service_create: Vec<String>,
    #[serde(default)]
    pub service_cleanup: Vec<String>,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            mode: SnapshotMode::Hardlink,
            exclude: DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect(),
            service_create: Vec::new(),
            service_cleanup: Vec::new(),
        }
    }
}

impl Capture {
    /// The compiled exclusion patterns.
    pub fn excludes(&self) -> Result<Excludes> {
        Excludes::new(&self.exclude)
    }
}

/// Compiled exclusion patterns (see [`DEFAULT_EXCLUDE`]).
#[derive(Debug, Clone)]
pub struct Excludes {
    names: globset::GlobSet,
    paths: globset::GlobSet,
}

impl Default for Excludes {
    fn default() -> Self {
        Excludes {
            names: globset::GlobSet::empty(),
            paths: globset::GlobSet::empty(),
        }
    }
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut names = globset::GlobSetBuilder::new();
        let mut paths = globset::GlobSetBuilder::new();
        for p in patterns {
            if p.trim_end_matches('/').is_empty()
                || p.starts_with('/')
                || p.split('/').any(|c| c == ".." || c == ".")
            {
                return Err(Error::Usage(format!(
                    "exclude pattern {p:?}: a pattern is a name (`*.log`) or a path from the keyspace on (`*/*/snapshots`), never empty, absolute or with . or .."
                )));
            }
            let glob = globset::GlobBuilder::new(p.trim_end_matches('/'))
                .literal_separator(true)
                .build()
                .map_err(|e| Error::Usage(format!("exclude pattern {p:?}: {e}")))?;
            if p.trim_end_matches('/').contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        let build = |b: globset::GlobSetBuilder| {
            b.build()
                .map_err(|e| Error::Usage(format!("exclude patterns: {e}")))
        };
        Ok(Excludes {
            names: build(names)?,
            paths: build(paths)?,
        })
    }

    /// Whether the entry at `rel` (`/`-separated, from the keyspace on) is left out.
    pub fn excludes(&self, rel: &str) -> bool {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        self.names.is_match(name) || self.paths.is_match(rel)
    }
}

/// A service artifact: `dump` is run once per backup (on the first node's host)
/// and its output stored as `<snapshot>/<file>`; a restore with `RESTORE_SCHEMA`
/// runs `load` with `{file}` replaced by a local copy, before any data is moved in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Artifact {
    pub name: String,
    pub file: String,
    pub dump: Vec<String>,
    #[serde(default)]
    pub load: Vec<String>,
}

/// `[manager]`: where the manager keeps its state and which version it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManagerConfig {
    pub state_dir: PathBuf,
    pub version: ManagerVersion,
    /// Sub-path of `state_dir` holding credentials (default `credentials`).
    pub credentials: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ManagerVersion {
    /// `version = "2.3.0"`
    Fixed(String),
    /// `version_file = "…"`: read when needed (an upgrade changes it).
    File(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Node {
    pub index: u32,
    pub data_dir: PathBuf,
    #[serde(default)]
    pub host: Option<String>,
    /// argv run before the node's work (e.g. flush and snapshot); no shell.
    #[serde(default)]
    pub pre_hook: Vec<String>,
    /// argv run after the node's work, also when it failed.
    #[serde(default)]
    pub post_hook: Vec<String>,
    /// How the node is reached: an argv prefix (`ssh … host --`, `kubectl exec …
    /// --`) before `<agent_path> agent`. Empty: the data dir is on this machine.
    #[serde(default)]
    pub exec: Vec<String>,
    /// The cairn binary on the node (with `exec`).
    #[serde(default = "default_agent_path")]
    pub agent_path: String,
    /// Seconds an agent may stay silent (it beats every 2 s) before it is given
    /// up as hung.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout_secs: u64,
    /// argv run on the node after a restore moved its data in, once per restored
    /// table: `{keyspace}`, `{table}` (the name without its id), `{dir}` (the
    /// table's dir) are replaced (e.g. `nodetool import {keyspace} {table} {dir}`).
    #[serde(default)]
    pub post_restore: Vec<String>,
}

fn default_agent_path() -> String {
    "cairn".into()
}

fn default_agent_timeout() -> u64 {
    30
}

impl Node {
    /// Whether the node's work runs on another host, through its `exec` prefix.
    pub fn is_remote(&self) -> bool {
        !self.exec.is_empty()
    }
}

impl Cluster {
    pub fn load(path: &Path) -> Result<Cluster> {
        // Bad input (exit 2), whether missing, not a file, too big or not text.
        let text = crate::fsx::read_small_text(path, crate::fsx::MAX_DESCRIPTION).map_err(|e| {
            Error::Cluster {
                file: path.display().to_string(),
                message: format!("cannot read it: {e}"),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        let base = std::path::absolute(base).map_err(|e| Error::io("resolve", base, e))?;
        let mut c = Self::parse(&path.display().to_string(), &text, &base)?;
        c.source = Some(std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))?);
        Ok(c)
    }

    pub fn parse(file: &str, text: &str, base: &Path) -> Result<Cluster> {
        let err = |message: String| Error::Cluster {
            file: file.to_string(),
            message,
        };
        let raw: RawCluster = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if raw.nodes.is_empty() {
            return Err(err("no [[nodes]]: a cluster needs at least one node".into()));
        }
        // Retention and listing group snapshots by this name: "src " and "src"
        // would be two clusters.
        if raw.name.trim().is_empty()
            || raw.name.trim() != raw.name
            || raw.name.chars().any(char::is_control)
        {
            return Err(err(format!(
                "name {:?} is empty or has spaces at an end or control characters; snapshots are grouped by it",
                crate::plan::params::shorten(&raw.name)
            )));
        }
        let agent_timeout_secs = match &raw.agent_timeout {
            None => default_agent_timeout(),
            Some(t) => match humantime::parse_duration(t) {
                Ok(d) if d.as_secs() >= 5 => d.as_secs(),
                _ => {
                    return Err(err(format!(
                        "agent_timeout {t:?} is not a duration of at least 5s (e.g. \"30s\", \"2m\"): agents beat every 2 s"
                    )));
                }
            },
        };
        let mut seen = BTreeSet::new();
        let mut nodes = Vec::new();
        for n in raw.nodes {
            if !seen.insert(n.index) {
                return Err(err(format!("node index {} appears twice", n.index)));
            }
            let post_restore = n
                .post_restore
                .clone()
                .unwrap_or_else(|| raw.post_restore.clone());
            for (what, argv) in [
                ("pre_hook", &n.pre_hook),
                ("post_hook", &n.post_hook),
                ("post_restore", &post_restore),
            ] {
                if argv.first().is_some_and(|a| a.is_empty()) {
                    return Err(err(format!(
                        "node {}: {what} has an empty program",
                        n.index
                    )));
                }
            }
            if n.exec.first().is_some_and(|a| a.is_empty()) {
                return Err(err(format!("node {}: exec has an empty program", n.index)));
            }
            let agent_path = n
                .agent_path
                .or_else(|| raw.agent_path.clone())
                .unwrap_or_else(default_agent_path);
            if agent_path.is_empty() {
                return Err(err(format!("node {}: agent_path is empty", n.index)));
            }
            // The path crosses `exec`, which may hand it to a shell on the node
            // (ssh joins its arguments): only characters no shell reads specially.
            if agent_path.starts_with('-')
                || !agent_path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._+@%:=,-".contains(c))
            {
                return Err(err(format!(
                    "node {}: agent_path {agent_path:?} may hold only letters, digits and / . _ + @ % : = , - (it is passed through the node's exec prefix, which may hand it to a shell); install cairn under such a path",
                    n.index
                )));
            }
            // A remote node's data dir is a path on its own host: never resolved
            // against this machine's directories.
            let data_dir = if n.data_dir.is_absolute() {
                n.data_dir
            } else if !n.exec.is_empty() {
                return Err(err(format!(
                    "node {}: data_dir {} must be an absolute path on the node's host (the node is reached with exec)",
                    n.index,
                    n.data_dir.display()
                )));
            } else {
                base.join(n.data_dir)
            };
            nodes.push(Node {
                index: n.index,
                data_dir,
                host: n.host,
                pre_hook: n.pre_hook,
                post_hook: n.post_hook,
                exec: n.exec,
                agent_path,
                agent_timeout_secs,
                post_restore,
            });
        }
        nodes.sort_by_key(|n| n.index);
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let manager = match raw.manager {
            None => None,
            Some(m) => {
                let version = match (m.version, m.version_file) {
                    (Some(v), None) => ManagerVersion::Fixed(v),
                    (None, Some(f)) => ManagerVersion::File(resolve(f)),
                    _ => {
                        return Err(err(
                            "[manager] needs exactly one of version or version_file".into(),
                        ));
                    }
                };
                let credentials = m.credentials.unwrap_or_else(|| "credentials".into());
                if crate::store::check_key(&credentials).is_err() {
                    return Err(err(format!(
                        "[manager] credentials {credentials:?} is not a relative path inside state_dir"
                    )));
                }
                Some(ManagerConfig {
                    state_dir: resolve(m.state_dir),
                    version,
                    credentials,
                })
            }
        };
        let mode = match raw.snapshot.as_deref() {
            None | Some("hardlink") => SnapshotMode::Hardlink,
            Some("service") => SnapshotMode::Service,
            Some("none") => SnapshotMode::None,
            Some(other) => {
                return Err(err(format!(
                    "snapshot {:?} is none of hardlink (the default), service, none",
                    crate::plan::params::shorten(other)
                )));
            }
        };
        let (service_create, service_cleanup) = match (mode, raw.service_snapshot) {
            (SnapshotMode::Service, Some(s)) => {
                if s.create.first().is_none_or(|a| a.is_empty())
                    || s.cleanup.first().is_some_and(|a| a.is_empty())
                {
                    return Err(err(
                        "[service_snapshot] create (and cleanup, when given) need a program".into(),
                    ));
                }
                (s.create, s.cleanup)
            }
            (SnapshotMode::Service, None) => {
                return Err(err(
                    "snapshot = \"service\" needs [service_snapshot] create = [\"nodetool\", \"snapshot\", \"-t\", \"{snapshot}\"] (and cleanup)".into(),
                ));
            }
            (_, Some(_)) => {
                return Err(err(
                    "[service_snapshot] is only read with snapshot = \"service\"".into(),
                ));
            }
            (_, None) => (Vec::new(), Vec::new()),
        };
        let mut exclude: Vec<String> = if raw.default_exclude.unwrap_or(true) {
            DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        };
        exclude.extend(raw.exclude);
        let capture = Capture {
            mode,
            exclude,
            service_create,
            service_cleanup,
        };
        capture.excludes().map_err(|e| err(e.to_string()))?;
        if let Some(o) = &raw.owner {
            parse_owner(o).map_err(err)?;
        }
        let mut artifacts = Vec::new();
        for (name, a) in raw.artifacts {
            let file = a.file.unwrap_or_else(|| {
                if name == "schema" {
                    "schema.cql".into()
                } else {
                    format!("{name}.out")
                }
            });
            let plain = |s: &str| {
                !s.is_empty()
                    && s.len() <= 64
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                    && !s.starts_with('.')
            };
            if !plain(&name) || !plain(&file) {
                return Err(err(format!(
                    "artifact {:?} (file {:?}): names are letters, digits, . _ - (not first .), at most 64",
                    crate::plan::params::shorten(&name),
                    crate::plan::params::shorten(&file)
                )));
            }
            if file == "manifest.json" || file.starts_with("node-") || file.starts_with("manager") {
                return Err(err(format!(
                    "artifact {name}: file {file:?} is a name cairn's own objects use"
                )));
            }
            if (a.dump.is_empty() && a.load.is_empty())
                || a.dump.first().is_some_and(|p| p.is_empty())
                || a.load.first().is_some_and(|p| p.is_empty())
            {
                return Err(err(format!(
                    "artifact {name}: dump (for backups) or load (for restores) needs a program"
                )));
            }
            if let Some(other) = artifacts.iter().find(|o: &&Artifact| o.file == file) {
                return Err(err(format!(
                    "artifacts {} and {name} would both be stored as {file}; give each its own file",
                    other.name
                )));
            }
            artifacts.push(Artifact {
                name,
                file,
                dump: a.dump,
                load: a.load,
            });
        }
        Ok(Cluster {
            name: raw.name,
            nodes,
            manager,
            source: None,
            partial: false,
            hook_secrets: raw.hook_secrets,
            capture,
            owner: raw.owner,
            artifacts,
        })
    }

    pub fn node(&self, index: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.index == index)
    }
}

/// What a run covers: keyspaces (`None`: all non-system keyspaces) and, for a
/// partial restore, paths inside a node (`keyspace`, `keyspace/table`, a file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    pub keyspaces: Option<BTreeSet<String>>,
    /// Empty: whole keyspaces.
    pub paths: Vec<String>,
}

impl Selection {
    /// Parse `a,b` or `"a b"` (the seed's form). Empty means all.
    pub fn parse(text: &str) -> Selection {
        let set: BTreeSet<String> = split_list(text).map(str::to_string).collect();
        Selection {
            keyspaces: if set.is_empty() { None } else { Some(set) },
            paths: Vec::new(),
        }
    }

    /// Add the paths of a partial restore (`PATHS`): plain relative paths, none
    /// inside another, none through cairn's reserved names. Every problem is named.
    pub fn with_paths(mut self, text: &str) -> Result<Selection> {
        let mut problems = Vec::new();
        for p in split_list(text) {
            let p = p.trim_end_matches('/');
            if crate::store::check_key(p).is_err()
                || p.split('/').any(|c| c.starts_with(RESERVED_PREFIX))
            {
                problems.push(format!(
                    "PATHS: {:?} is not a plain relative path inside a node (keyspace, keyspace/table or a file)",
                    crate::plan::params::shorten(p)
                ));
                continue;
            }
            if self.paths.iter().any(|q| q == p) {
                continue;
            }
            if let Some(q) = self.paths.iter().find(|q| under(p, q) || under(q, p)) {
                problems.push(format!(
                    "PATHS: {p:?} and {q:?} overlap; name each path once (the outer one covers the inner)"
                ));
                continue;
            }
            self.paths.push(p.to_string());
        }
        if split_list(text).next().is_none() && !text.trim().is_empty() {
            problems.push("PATHS is given but names no path".into());
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(Error::Params(problems))
        }
    }

    /// Whether a keyspace found on disk is included.
    pub fn includes(&self, keyspace: &str) -> bool {
        match &self.keyspaces {
            Some(set) => set.contains(keyspace),
            None => !SYSTEM_KEYSPACES.contains(&keyspace),
        }
    }

    /// Whether anything of a keyspace in a snapshot is restored (the snapshot already
    /// excluded system keyspaces unless they were asked for).
    pub fn includes_restored(&self, keyspace: &str) -> bool {
        let named = match &self.keyspaces {
            Some(set) => set.contains(keyspace),
            None => true,
        };
        named
            && (self.paths.is_empty()
                || self
                    .paths
                    .iter()
                    .any(|p| p.split('/').next() == Some(keyspace)))
    }

    /// Whether the file (or link) at `rel` in a snapshot is restored.
    pub fn restores_file(&self, rel: &str) -> bool {
        let keyspace = rel.split('/').next().unwrap_or("");
        self.includes_restored(keyspace)
            && (self.paths.is_empty() || self.paths.iter().any(|p| under(rel, p)))
    }

    /// Whether the directory at `rel` is restored or leads to something restored.
    pub fn restores_dir(&self, rel: &str) -> bool {
        let keyspace = rel.split('/').next().unwrap_or("");
        self.includes_restored(keyspace)
            && (self.paths.is_empty() || self.paths.iter().any(|p| under(rel, p) || under(p, rel)))
    }
}

/// `path` is `root` or inside it (`/`-separated relative paths).
pub fn under(path: &str, root: &str) -> bool {
    path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Items of a `a,b` or `a b` list.
pub fn split_list(text: &str) -> impl Iterator<Item = &str> {
    text.split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The name prefix of a restore's staging dir inside a data dir.
pub const STAGING_PREFIX: &str = ".cairn-staging-";

/// The name prefix of a backup's point-in-time snapshot inside a data dir.
pub const SNAP_PREFIX: &str = ".cairn-snap-";

/// `user:group` (or `user`), names or numbers; checked for form only (the names
/// are looked up on the node's host).
pub fn parse_owner(text: &str) -> std::result::Result<(String, Option<String>), String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    let (u, g) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    if !ok(u) || g.is_some_and(|g| !ok(g)) {
        return Err(format!(
            "owner {:?} is not user:group (names or numbers)",
            crate::plan::params::shorten(text)
        ));
    }
    Ok((u.to_string(), g.map(str::to_string)))
}

/// What the top of a data dir holds, each list sorted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DataDirTop {
    /// Directories (or links to directories): the keyspaces.
    pub keyspaces: Vec<String>,
    /// Anything else not reserved (plain files, links to files): no keyspace.
    pub loose: Vec<String>,
    /// Reserved `.cairn*` names cairn did not make (its staging dirs are its own).
    pub foreign_reserved: Vec<String>,
}

/// Read the top of a data dir once; a missing one holds nothing.
pub fn data_dir_top(data_dir: &Path) -> Result<DataDirTop> {
    let mut out = DataDirTop::default();
    let rd = match std::fs::read_dir(data_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("list keyspaces in", data_dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list keyspaces in", data_dir, e))?;
        let ft = entry
            .file_type()
            .map_err(|e| Error::io("stat", entry.path(), e))?;
        // A symlink to a directory is a keyspace too (kept on another disk): a
        // backup refuses it by name, a restore counts it as existing.
        let is_dir = ft.is_dir()
            || (ft.is_symlink() && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()));
        let lossy = entry.file_name().to_string_lossy().into_owned();
        if lossy.starts_with(RESERVED_PREFIX) {
            if !lossy.starts_with(STAGING_PREFIX) && !lossy.starts_with(SNAP_PREFIX) {
                out.foreign_reserved.push(lossy);
            }
            continue;
        }
        if !is_dir {
            out.loose.push(lossy);
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(Error::Usage(format!(
                "{}: a keyspace directory name is not UTF-8",
                entry.path().display()
            )));
        };
        out.keyspaces.push(name);
    }
    out.keyspaces.sort();
    out.loose.sort();
    out.foreign_reserved.sort();
    Ok(out)
}

/// All keyspaces of a data dir (top-level directories), sorted; cairn's own
/// `.cairn*` entries are never keyspaces.
pub fn keyspaces_on_disk(data_dir: &Path) -> Result<Vec<String>> {
    Ok(data_dir_top(data_dir)?.keyspaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_dirs_resolve_against_the_file_and_duplicates_refused() {
        let c = Cluster::parse(
            "c.toml",
            "name = \"x\"\n[[nodes]]\nindex = 1\ndata_dir = \"n1\"\n[[nodes]]\nindex = 0\ndata_dir = \"/abs\"\n",
            Path::new("/base"),
        )
        .expect("parse");
        assert_eq!(c.nodes[0].data_dir, PathBuf::from("/abs"));
        assert_eq!(c.nodes[1].data_dir, PathBuf::from("/base/n1"));
        let dup = Cluster::parse(
            "c.toml",
            "name = \"x\"\n[[nodes]]\nindex = 0\ndata_dir = \"a\"\n[[nodes]]\nindex = 0\ndata_dir = \"b\"\n",
            Path::new("/base"),
        );
        assert!(dup.expect_err("dup").to_string().contains("appears twice"));
    }

    #[test]
    fn selection_excludes_system_unless_named() {
        let all = Selection::parse("");
        assert!(all.includes("app") && !all.includes("system_auth"));
        let some = Selection::parse("\"app system_auth\"".trim_matches('"'));
        assert!(some.includes("system_auth") && !some.includes("other"));
        assert_eq!(Selection::parse("a, b").keyspaces.map(|s| s.len()), Some(2));
        let table = Selection::parse("").with_paths("app/users").expect("paths");
        assert!(table.restores_file("app/users/nb-1-Data.db"));
        assert!(!table.restores_file("app/users2/x") && !table.restores_file("metrics/a"));
        assert!(table.restores_dir("app") && !table.restores_dir("app/orders"));
        assert!(Selection::parse("").with_paths("../etc").is_err());
        assert!(Selection::parse("").with_paths("app,app/users").is_err());
        assert!(Selection::parse("").with_paths(" , ").is_err());
        assert!(
            Selection::parse("")
                .with_paths(".cairn-staging-1/x")
                .is_err()
        );
    }

    #[test]
    fn artifacts_sharing_a_file_and_odd_patterns_are_refused() {
        let base = "name = \"x\"\n";
        let nodes = "[[nodes]]\nindex = 0\ndata_dir = \"/d\"\n";
        let two = format!(
            "{base}[artifacts.a]\nfile = \"x.cql\"\ndump = [\"true\"]\n[artifacts.b]\nfile = \"x.cql\"\ndump = [\"true\"]\n{nodes}"
        );
        let e = Cluster::parse("c.toml", &two, Path::new("/")).expect_err("shared file");
        assert!(e.to_string().contains("both be stored as x.cql"), "{e}");
        for p in ["", "/app", "../*", "a/./b"] {
            let text = format!("{base}exclude = [{p:?}]\n{nodes}");
            assert!(
                Cluster::parse("c.toml", &text, Path::new("/")).is_err(),
                "{p:?}"
            );
        }
        let load_only =
            format!("{base}[artifacts.schema]\nload = [\"cqlsh\", \"-f\", \"{{file}}\"]\n{nodes}");
        Cluster::parse("c.toml", &load_only, Path::new("/")).expect("a target needs only load");
    }

    #[test]
    fn a_name_with_spaces_at_an_end_is_refused() {
        for name in ["src ", " src", "", "a\tb"] {
            let text = format!("name = {name:?}\n[[nodes]]\nindex = 0\ndata_dir = \"/d\"\n");
            let e = Cluster::parse("c.toml", &text, Path::new("/")).expect_err(name);
            assert!(e.to_string().contains("grouped"), "{name:?}: {e}");
        }
        let ok = "name = \"src\"\n[[nodes]]\nindex = 0\ndata_dir = \"/d\"\n";
        assert_eq!(
            Cluster::parse("c.toml", ok, Path::new("/"))
                .expect("ok")
                .name,
            "src"
        );
    }
}
