//! The run spec: a plan, its parameters and the cluster compiled into one typed,
//! validated, serialisable description of a run (ripgrep's raw → validated args).
//!
//! Every parameter is parsed and checked here, before a run is recorded; the engine
//! and the actions read the spec and never look a parameter up by name. The spec is
//! what the state store keeps for a run, and what `plan resume` continues: a resume
//! whose parameters would compile to a different spec is refused (only the tunables —
//! strategy, concurrency, bandwidth — may change). Secrets never enter the spec; the
//! store options that hold them are rebuilt from the parameters at each start.

use crate::cluster::{Cluster, RESERVED_PREFIX, Selection, split_list};
use crate::config::{Config, StoreArg};
use crate::plan::params::{Params, Source};
use crate::plan::{Action, On, Plan, STORE_PARAM, Strategy};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Version of the serialised spec; bumped when its meaning changes.
pub const SPEC_VERSION: u32 = 1;

/// What a run does to its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    Backup,
    Restore,
    Other,
}

/// A restore's `RESTORE_MANAGER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreManager {
    /// Leave the manager alone (`false`, the default).
    #[default]
    No,
    /// Restore onto a clean manager only (`true`).
    Clean,
    /// Restore over a manager that is not clean, keeping a pre-restore copy (`force`).
    Force,
}

impl RestoreManager {
    pub fn parse(text: &str) -> std::result::Result<RestoreManager, String> {
        match text.trim() {
            "" | "false" => Ok(RestoreManager::No),
            "true" => Ok(RestoreManager::Clean),
            "force" => Ok(RestoreManager::Force),
            other => Err(format!(
                "RESTORE_MANAGER {:?} is none of true, false, force",
                crate::plan::params::shorten(other)
            )),
        }
    }
}

/// One concrete step of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRef {
    pub id: String,
    pub phase: String,
    pub action: Action,
    pub node: Option<u32>,
}

/// A phase with its strategy resolved for this run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseSpec {
    pub name: String,
    pub strategy: Strategy,
}

/// The whole run, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub version: u32,
    pub plan: String,
    pub kind: RunKind,
    /// The store URL as opened (a directory store's path made absolute).
    pub store: String,
    pub snapshot: String,
    pub selection: Selection,
    /// A restore's `NODES`: only these node indexes (`None`: every node).
    pub nodes: Option<BTreeSet<u32>>,
    /// A restore's `RESTORE_DIR`: node `i` goes to `<dir>/node-<i>`.
    pub restore_dir: Option<PathBuf>,
    pub restore_manager: RestoreManager,
    /// A backup's `MANAGER_CREDENTIALS`.
    pub manager_credentials: bool,
    /// A restore's `RESTORE_SCHEMA`: load the snapshot's artifacts before any data
    /// is moved in.
    #[serde(default)]
    pub restore_schema: bool,
    /// A restore's `TABLE_MAPPING=by-name`: a table of the snapshot goes into the
    /// target's empty table dir of the same name (another id), in a keyspace that
    /// exists (its schema was recreated).
    #[serde(default)]
    pub table_by_name: bool,
    /// How a backup compresses its node archives (`COMPRESSION`).
    #[serde(default)]
    pub compression: crate::archive::Codec,
    /// A backup's `MODE=differential`: files unchanged since the newest fitting
    /// snapshot of the store are referenced, not archived again.
    #[serde(default)]
    pub differential: bool,
    /// `FULL_EVERY`: a full backup after this many differentials (0: never forced).
    #[serde(default)]
    pub full_every: u32,
    /// `REHASH` (`plan start --rehash`): a differential tells changes by SHA-256.
    #[serde(default)]
    pub rehash: bool,
    /// A backup's tags, written into its manifest.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Bytes per second for the whole run (tunable on resume).
    pub bandwidth: Option<u64>,
    /// Phases with their strategies (tunable on resume).
    pub phases: Vec<PhaseSpec>,
    pub steps: Vec<StepRef>,
    /// Random identity of this run, unique across hosts and state homes: it names
    /// staging dirs so two restores never touch each other's.
    pub token: String,
    /// Where each parameter's value came from (shown by `plan status`).
    pub param_sources: BTreeMap<String, Source>,
    /// Client-side encryption of a backup (`ENCRYPT_TO`, `ENCRYPT_PASSPHRASE`):
    /// how, without any secret.
    #[serde(default)]
    pub encryption: Option<crate::crypt::Scheme>,
    /// What a backup encrypts to (a passphrase is secret: rebuilt, never stored).
    #[serde(skip)]
    pub encrypt_to: Option<crate::crypt::EncryptTo>,
    /// What opens an encrypted snapshot (`AGE_IDENTITY`, `AGE_PASSPHRASE`): secret.
    #[serde(skip)]
    pub keys: Option<crate::crypt::Keys>,
    /// The `cairn.toml` whose store profile placed the store (read again by a
    /// resume that names none).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Backend options with secrets: rebuilt from the parameters, never stored.
    #[serde(skip)]
    pub store_options: BTreeMap<String, String>,
}

/// Refuse snapshot names that would nest, escape or collide with cairn's own
/// objects: `/`, `\`, `.`/`..`, control characters, the reserved `.cairn*` names.
pub fn check_snapshot_name(name: &str) -> std::result::Result<(), String> {
    let shown = crate::plan::params::shorten(name);
    if name.is_empty() {
        return Err("the snapshot name is empty".into());
    }
    if name.len() > 200 {
        return Err(format!("snapshot name {shown:?} is longer than 200 bytes"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(format!(
            "snapshot name {shown:?} contains a path separator; a snapshot is one folder of the store"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("snapshot name {shown:?} is not a folder name"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "snapshot name {shown:?} contains a control character"
        ));
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "snapshot name {shown:?} is reserved: names starting with {RESERVED_PREFIX} hold cairn's own objects"
        ));
    }
    Ok(())
}

/// A fresh run token: 16 hex digits from the host, the state home, the process, the
/// clock and the OS's random source.
pub fn new_token(home: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(crate::lock::hostname().as_bytes());
    h.update(home.as_os_str().as_encoded_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(
        chrono::Utc::now()
            .timestamp_nanos_opt()
            .unwrap_or_default()
            .to_le_bytes(),
    );
    let mut random = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut random);
    }
    h.update(random);
    hex::encode(&h.finalize()[..8])
}

/// Compile a plan, its resolved parameters and the cluster into a spec, and the
/// cluster the run works on (restricted by `NODES`, redirected by `RESTORE_DIR`).
/// Every problem is reported at once.
pub fn compile(
    plan: &Plan,
    params: &Params,
    cluster: &Cluster,
    token: String,
    config: &Config,
) -> Result<(RunSpec, Cluster)> {
    let mut problems = Vec::new();
    let t = &plan.target;
    let (store, store_options, config_used) = match place_store(plan, params, config) {
        Ok(placed) => placed,
        Err(e) => {
            problems.extend(e);
            Default::default()
        }
    };

    let snapshot = params.expand(&t.snapshot);
    if let Err(e) = check_snapshot_name(&snapshot) {
        problems.push(e);
    }

    let selection =
        match Selection::parse(&params.expand(&t.keyspaces)).with_paths(&params.expand(&t.paths)) {
            Ok(s) => s,
            Err(Error::Params(p)) => {
                problems.extend(p);
                Selection::default()
            }
            Err(e) => {
                problems.push(e.to_string());
                Selection::default()
            }
        };
    // A path in a keyspace KEYSPACES leaves out would restore nothing, quietly.
    if let Some(ks) = &selection.keyspaces {
        for p in &selection.paths {
            let top = p.split('/').next().unwrap_or("");
            if !ks.contains(top) {
                problems.push(format!(
                    "PATHS entry {p:?} is in keyspace {top:?}, which KEYSPACES ({}) leaves out: it would restore nothing",
                    ks.iter().cloned().collect::<Vec<_>>().join(",")
                ));
            }
        }
    }

    let nodes_text = params.expand(&t.nodes);
    let nodes = if nodes_text.trim().is_empty() {
        None
    } else {
        let mut wanted = BTreeSet::new();
        for n in split_list(&nodes_text) {
            match n.parse::<u32>() {
                Ok(i) if cluster.node(i).is_some() => {
                    wanted.insert(i);
                }
                Ok(i) => problems.push(format!("NODES: the cluster description has no node {i}")),
                Err(_) => problems.push(format!(
                    "NODES: {:?} is not a node index",
                    crate::plan::params::shorten(n)
                )),
            }
        }
        if wanted.is_empty() && split_list(&nodes_text).next().is_none() {
            problems.push("NODES is given but names no node".into());
        }
        Some(wanted)
    };

    let restore_dir = {
        let d = params.expand(&t.restore_dir);
        let d = d.trim();
        if d.is_empty() {
            None
        } else {
            match std::path::absolute(d) {
                Ok(p) => Some(p),
                Err(e) => {
                    problems.push(format!("RESTORE_DIR {d:?}: {e}"));
                    None
                }
            }
        }
    };

    let restore_manager = match RestoreManager::parse(&params.expand(&t.restore_manager)) {
        Ok(r) => r,
        Err(e) => {
            problems.push(e);
            RestoreManager::No
        }
    };
    let tags: Vec<String> = {
        let mut v: Vec<String> = split_list(&params.expand(&t.tags))
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    if let Some(bad) = tags.iter().find(|t| {
        t.len() > 64
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
    }) {
        problems.push(format!(
            "TAGS: {:?} is not a tag (up to 64 letters, digits, _ and -)",
            crate::plan::params::shorten(bad)
        ));
    }
    let compression_text = params.expand(&t.compression);
    let compression = match crate::archive::Codec::parse(&compression_text) {
        // A plan that names COMPRESSION and gets an empty value is not asking for
        // the default: refused like any other value that is neither.
        Some(_) if !t.compression.trim().is_empty() && compression_text.trim().is_empty() => {
            problems.push("COMPRESSION is empty: give gzip or zstd".into());
            crate::archive::Codec::Gzip
        }
        Some(c) => c,
        None => {
            problems.push(format!(
                "COMPRESSION: {:?} is not gzip or zstd",
                crate::plan::params::shorten(&params.expand(&t.compression))
            ));
            crate::archive::Codec::Gzip
        }
    };
    let differential = match params.expand(&t.mode).trim() {
        "" if t.mode.trim().is_empty() => false,
        "differential" => true,
        "full" => false,
        other => {
            problems.push(format!(
                "MODE: {:?} is not differential or full",
                crate::plan::params::shorten(other)
            ));
            false
        }
    };
    let full_every = match params.expand(&t.full_every).trim() {
        "" if t.full_every.trim().is_empty() => 0,
        text => text.parse::<u32>().unwrap_or_else(|_| {
            problems.push(format!(
                "FULL_EVERY: {:?} is not a number of backups",
                crate::plan::params::shorten(text)
            ));
            0
        }),
    };
    let rehash = match params.expand(&t.rehash).trim() {
        "" | "false" => false,
        "true" => true,
        other => {
            problems.push(format!(
                "REHASH {:?} is neither true nor false",
                crate::plan::params::shorten(other)
            ));
            false
        }
    };
    let restore_schema = match params.expand(&t.restore_schema).trim() {
        "" | "false" => false,
        "true" => true,
        other => {
            problems.push(format!(
                "RESTORE_SCHEMA {:?} is neither true nor false",
                crate::plan::params::shorten(other)
            ));
            false
        }
    };
    let table_by_name = match params.expand(&t.table_mapping).trim() {
        "" | "exact" => false,
        "by-name" => {
            if !selection.paths.is_empty() {
                problems.push(
                    "TABLE_MAPPING=by-name restores whole keyspaces and tables; it cannot be combined with PATHS".into(),
                );
            }
            true
        }
        other => {
            problems.push(format!(
                "TABLE_MAPPING {:?} is neither exact nor by-name",
                crate::plan::params::shorten(other)
            ));
            false
        }
    };
    let manager_credentials = match params.expand(&t.manager_credentials).trim() {
        "" | "false" => false,
        "true" => true,
        other => {
            problems.push(format!(
                "MANAGER_CREDENTIALS {:?} is neither true nor false",
                crate::plan::params::shorten(other)
            ));
            false
        }
    };

    let bandwidth = {
        let b = params.expand(&t.bandwidth);
        if b.trim().is_empty() {
            None
        } else {
            match crate::store::throttle::parse_rate(&b) {
                Ok(r) => Some(r),
                Err(Error::Params(p)) => {
                    problems.extend(p);
                    None
                }
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            }
        }
    };

    let mut phases = Vec::new();
    for ph in &plan.phases {
        match ph.strategy(params) {
            Ok(strategy) => phases.push(PhaseSpec {
                name: ph.name.clone(),
                strategy,
            }),
            Err(Error::Params(p)) => problems.extend(p),
            Err(e) => problems.push(e.to_string()),
        }
    }

    let kind = if plan.has_action(Action::BackupNode) {
        RunKind::Backup
    } else if plan.has_action(Action::StageNode) {
        RunKind::Restore
    } else {
        RunKind::Other
    };
    if kind != RunKind::Restore {
        if !selection.paths.is_empty() {
            problems.push("PATHS applies to restores only".into());
        }
        if nodes.is_some() {
            problems.push("NODES applies to restores only".into());
        }
        if restore_dir.is_some() {
            problems.push("RESTORE_DIR applies to restores only".into());
        }
    }

    // A key parameter given but empty (an empty @file) is refused: it would
    // otherwise mean "no encryption".
    for (name, template) in [
        ("ENCRYPT_TO", &t.encrypt_to),
        ("ENCRYPT_PASSPHRASE", &t.encrypt_passphrase),
        ("AGE_IDENTITY", &t.age_identity),
        ("AGE_PASSPHRASE", &t.age_passphrase),
    ] {
        let given = matches!(
            params.sources().get(name),
            Some(Source::Cli | Source::File | Source::Env)
        );
        if given
            && crate::plan::params::references(template)
                .iter()
                .any(|r| r == name)
            && params.expand(template).trim().is_empty()
        {
            problems.push(format!("{name} is given but empty"));
        }
    }
    let encrypt_to = one_of(
        ("ENCRYPT_TO", params.expand(&t.encrypt_to)),
        ("ENCRYPT_PASSPHRASE", params.expand(&t.encrypt_passphrase)),
        crate::crypt::EncryptTo::recipients,
        crate::crypt::EncryptTo::Passphrase,
        &mut problems,
    );
    let keys = one_of(
        ("AGE_IDENTITY", params.expand(&t.age_identity)),
        ("AGE_PASSPHRASE", params.expand(&t.age_passphrase)),
        crate::crypt::Keys::identities,
        crate::crypt::Keys::Passphrase,
        &mut problems,
    );

    if !problems.is_empty() {
        return Err(Error::Params(problems));
    }

    let mut run_cluster = cluster.clone();
    if let Some(wanted) = &nodes {
        run_cluster.nodes.retain(|n| wanted.contains(&n.index));
        run_cluster.partial = true;
    }
    if let Some(dir) = &restore_dir {
        for n in &mut run_cluster.nodes {
            n.data_dir = dir.join(format!("node-{}", n.index));
            n.pre_hook.clear();
            n.post_hook.clear();
            // RESTORE_DIR is a directory on each node's own host.
        }
    }
    let spec = RunSpec {
        version: SPEC_VERSION,
        plan: plan.name.clone(),
        kind,
        store,
        encryption: encrypt_to.as_ref().map(crate::crypt::EncryptTo::scheme),
        encrypt_to,
        keys,
        config: config_used,
        snapshot,
        selection,
        nodes,
        restore_dir,
        restore_manager,
        manager_credentials,
        restore_schema,
        table_by_name,
        tags,
        compression,
        differential,
        full_every,
        rehash,
        bandwidth,
        steps: expand_steps(plan, &run_cluster),
        phases,
        token,
        param_sources: params.sources().clone(),
        store_options,
    };
    Ok((spec, run_cluster))
}

/// Keys given one of two ways (recipients or a passphrase, an identity or a
/// passphrase), or neither; both is refused.
fn one_of<T>(
    (a_name, a): (&str, String),
    (b_name, b): (&str, String),
    parse_a: impl FnOnce(&str) -> std::result::Result<T, String>,
    make_b: impl FnOnce(String) -> T,
    problems: &mut Vec<String>,
) -> Option<T> {
    match (a.trim().is_empty(), b.is_empty()) {
        (true, true) => None,
        (false, false) => {
            problems.push(format!("give {a_name} or {b_name}, not both"));
            None
        }
        (false, true) => parse_a(&a).map_err(|e| problems.push(e)).ok(),
        (true, false) => Some(make_b(b)),
    }
}

/// Where a run's store is and how it is reached: a store profile (`STORE=NAME`),
/// else the plan's own templates. Also the config file whose profile was used.
type Placed = (String, BTreeMap<String, String>, Option<PathBuf>);

fn place_store(
    plan: &Plan,
    params: &Params,
    config: &Config,
) -> std::result::Result<Placed, Vec<String>> {
    let flat = |e: Error| match e {
        Error::Params(p) => p,
        e => vec![e.to_string()],
    };
    let named = params.get(STORE_PARAM);
    if plan.implicit_store && !named.is_empty() {
        let p = config.store(named).map_err(flat)?;
        let want = crate::config::scheme_of(&plan.target.store);
        if p.scheme() != want {
            let other = crate::plan::SHIPPED.iter().find_map(|(n, text)| {
                let o = Plan::parse(n, text).ok()?;
                (o.implicit_store
                    && o.is_backup() == plan.is_backup()
                    && crate::config::scheme_of(&o.target.store) == p.scheme())
                .then_some(o.name)
            });
            return Err(vec![format!(
                "STORE={named} is a {} store ({}), and plan {} works on {want} stores{}",
                p.scheme(),
                p.url,
                plan.name,
                other
                    .map(|o| format!(": use plan {o} with STORE={named}"))
                    .unwrap_or_default()
            )]);
        }
        return Ok((
            p.url.clone(),
            p.options().map_err(flat)?,
            config.path.clone(),
        ));
    }
    let text = params.expand(&plan.target.store);
    let options = plan
        .target
        .store_options
        .iter()
        .map(|(k, v)| (k.clone(), params.expand(v)))
        .collect();
    // A plan that takes the store itself (`STORE=URL`) takes a profile name too.
    if !plan.implicit_store && crate::config::is_profile_name(&text) {
        return match config.store_arg(&text).map_err(flat)? {
            StoreArg::Profile(p) => {
                // The profile says how to reach the store: the plan's own store
                // parameters given as well would be silently dropped.
                let given: Vec<&str> = plan
                    .store_params
                    .iter()
                    .filter(|k| k.as_str() != STORE_PARAM)
                    .filter(|k| {
                        matches!(
                            params.sources().get(k.as_str()),
                            Some(Source::Cli | Source::File)
                        )
                    })
                    .map(String::as_str)
                    .collect();
                if !given.is_empty() {
                    return Err(vec![format!(
                        "STORE={text} names a store profile, which says how to reach the store; {} cannot be given with it",
                        given.join(", ")
                    )]);
                }
                Ok((
                    p.url.clone(),
                    p.options().map_err(flat)?,
                    config.path.clone(),
                ))
            }
            StoreArg::Url(u) => Ok((u, options, None)),
        };
    }
    Ok((text, options, None))
}

/// The concrete steps of a plan for a cluster, in execution order.
pub fn expand_steps(plan: &Plan, cluster: &Cluster) -> Vec<StepRef> {
    let mut out = Vec::new();
    for phase in &plan.phases {
        for spec in &phase.steps {
            match spec.on {
                On::Once => out.push(StepRef {
                    id: format!("{}/{}", phase.name, spec.action.name()),
                    phase: phase.name.clone(),
                    action: spec.action,
                    node: None,
                }),
                On::EachNode => {
                    for n in &cluster.nodes {
                        out.push(StepRef {
                            id: format!("{}/{}/node-{}", phase.name, spec.action.name(), n.index),
                            phase: phase.name.clone(),
                            action: spec.action,
                            node: Some(n.index),
                        })
                    }
                }
            }
        }
    }
    out
}

impl RunSpec {
    /// The spec as stored: a secret a plan templated into any field (a store
    /// URL, a path) is masked, structurally.
    pub fn to_json(&self) -> Result<String> {
        let v = serde_json::to_value(self).map_err(|e| Error::State(format!("run spec: {e}")))?;
        serde_json::to_string(&crate::redact::redact_json(&v))
            .map_err(|e| Error::State(format!("run spec: {e}")))
    }

    pub fn from_json(text: &str) -> Result<RunSpec> {
        let spec: RunSpec =
            serde_json::from_str(text).map_err(|e| Error::State(format!("run spec: {e}")))?;
        if spec.version != SPEC_VERSION {
            return Err(Error::State(format!(
                "run spec version {} is not understood by this cairn (it reads {SPEC_VERSION})",
                spec.version
            )));
        }
        Ok(spec)
    }

    /// What a resume would change that it may not: one line per difference.
    pub fn fixed_differences(&self, other: &RunSpec) -> Vec<String> {
        let mut out = Vec::new();
        let mut diff = |what: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{what}: {a} → {b}"));
            }
        };
        diff("plan", self.plan.clone(), other.plan.clone());
        diff("store", self.store.clone(), other.store.clone());
        diff("snapshot", self.snapshot.clone(), other.snapshot.clone());
        diff(
            "keyspaces (KEYSPACES)",
            format!("{:?}", self.selection.keyspaces),
            format!("{:?}", other.selection.keyspaces),
        );
        diff(
            "paths (PATHS)",
            format!("{:?}", self.selection.paths),
            format!("{:?}", other.selection.paths),
        );
        diff(
            "nodes (NODES)",
            format!("{:?}", self.nodes),
            format!("{:?}", other.nodes),
        );
        diff(
            "restore dir (RESTORE_DIR)",
            format!("{:?}", self.restore_dir),
            format!("{:?}", other.restore_dir),
        );
        diff(
            "RESTORE_MANAGER",
            format!("{:?}", self.restore_manager),
            format!("{:?}", other.restore_manager),
        );
        diff(
            "MANAGER_CREDENTIALS",
            self.manager_credentials.to_string(),
            other.manager_credentials.to_string(),
        );
        diff("TAGS", self.tags.join(","), other.tags.join(","));
        diff(
            "COMPRESSION",
            self.compression.name().to_string(),
            other.compression.name().to_string(),
        );
        let mode = |d: bool| if d { "differential" } else { "full" }.to_string();
        diff("MODE", mode(self.differential), mode(other.differential));
        diff(
            "FULL_EVERY",
            self.full_every.to_string(),
            other.full_every.to_string(),
        );
        diff("REHASH", self.rehash.to_string(), other.rehash.to_string());
        let mapping = |by_name: bool| if by_name { "by-name" } else { "exact" }.to_string();
        diff(
            "TABLE_MAPPING",
            mapping(self.table_by_name),
            mapping(other.table_by_name),
        );
        diff(
            "RESTORE_SCHEMA",
            self.restore_schema.to_string(),
            other.restore_schema.to_string(),
        );
        let enc = |e: &Option<crate::crypt::Scheme>| {
            e.as_ref()
                .map_or_else(|| "none".to_string(), crate::crypt::Scheme::describe)
        };
        diff(
            "encryption (ENCRYPT_TO, ENCRYPT_PASSPHRASE: a passphrase is never stored, give it again)",
            enc(&self.encryption),
            enc(&other.encryption),
        );
        let ids = |s: &RunSpec| s.steps.iter().map(|x| x.id.clone()).collect::<Vec<_>>();
        if ids(self) != ids(other) {
            out.push("steps: the plan or the cluster's nodes changed".into());
        }
        out
    }

    /// `<data_dir>/.cairn-snap-<token>`: a backup's point-in-time snapshot.
    pub fn snap_name(&self) -> String {
        format!("{}{}", crate::cluster::SNAP_PREFIX, self.token)
    }

    /// `<data_dir>/.cairn-staging-<token>`.
    pub fn staging_name(&self) -> String {
        format!("{}{}", crate::cluster::STAGING_PREFIX, self.token)
    }

    pub fn phase(&self, name: &str) -> Option<&PhaseSpec> {
        self.phases.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_that_nest_or_collide_are_refused() {
        for bad in [
            "prod/nightly-1",
            "..",
            ".",
            ".cairn-manager",
            ".cairn-locks",
            "a\\b",
            "",
            "x\ny",
        ] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?}");
        }
        for good in ["nightly-2026-11-21", "a.b_c", "ünï"] {
            assert!(check_snapshot_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn restore_manager_is_an_enum() {
        assert_eq!(RestoreManager::parse("force"), Ok(RestoreManager::Force));
        assert_eq!(RestoreManager::parse(""), Ok(RestoreManager::No));
        assert!(RestoreManager::parse("yes").is_err());
    }
}
