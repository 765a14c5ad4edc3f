//! Plans: declarative files in `plans/` loaded in two stages — [`raw`] mirrors the
//! file, [`Plan::from_raw`] validates it into the model the engine runs.
//!
//! Plans are TOML: the same format as `Cargo.toml` and the cluster description,
//! comments allowed, and the `toml` crate reports the line and column of any error.

pub mod params;
pub mod raw;

use crate::{Error, Result};
use params::{ParamSpec, Params};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What a step does. Each action knows which targets it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Pre-flight of a backup: data dirs, snapshot name, store access.
    CheckBackup,
    /// Stream one node's keyspaces to `<snapshot>/node-<i>.tar.gz`.
    BackupNode,
    /// Write `<snapshot>/manifest.json` (last; marks the snapshot complete).
    WriteManifest,
    /// Pre-flight of a restore: manifest, objects, node count, disk, keyspaces.
    CheckRestore,
    /// Download, extract into a staging dir and verify one node.
    StageNode,
    /// Move every node's staged keyspaces into place.
    CommitRestore,
    /// Remove staging dirs (used on failure).
    DiscardStaging,
    /// Stream the manager's state to `<snapshot>/manager.zip`.
    BackupManager,
    /// With `RESTORE_MANAGER=true|force`: verify and swap in `<snapshot>/manager.zip`.
    RestoreManager,
    /// Take one node's point-in-time snapshot (every node of the phase at once).
    SnapshotNode,
    /// Remove the run's snapshots from every node (used on failure).
    DropSnapshots,
    /// Dump the cluster's artifacts (the schema) into the snapshot.
    BackupSchema,
    /// With `RESTORE_SCHEMA=true`: load the artifacts before any data is moved in.
    RestoreSchema,
    /// Run each node's `post_restore` per restored table (e.g. `nodetool import`).
    LoadTables,
}

impl Action {
    pub const ALL: [Action; 14] = [
        Action::CheckBackup,
        Action::BackupNode,
        Action::WriteManifest,
        Action::CheckRestore,
        Action::StageNode,
        Action::CommitRestore,
        Action::DiscardStaging,
        Action::BackupManager,
        Action::RestoreManager,
        Action::SnapshotNode,
        Action::DropSnapshots,
        Action::BackupSchema,
        Action::RestoreSchema,
        Action::LoadTables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::CheckBackup => "check-backup",
            Action::BackupNode => "backup-node",
            Action::WriteManifest => "write-manifest",
            Action::CheckRestore => "check-restore",
            Action::StageNode => "stage-node",
            Action::CommitRestore => "commit-restore",
            Action::DiscardStaging => "discard-staging",
            Action::BackupManager => "backup-manager",
            Action::RestoreManager => "restore-manager",
            Action::SnapshotNode => "snapshot-node",
            Action::DropSnapshots => "drop-snapshots",
            Action::BackupSchema => "backup-schema",
            Action::RestoreSchema => "restore-schema",
            Action::LoadTables => "load-tables",
        }
    }

    fn allowed_on(self) -> On {
        match self {
            Action::BackupNode | Action::StageNode | Action::SnapshotNode => On::EachNode,
            _ => On::Once,
        }
    }
}

/// What a step applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum On {
    Once,
    EachNode,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepSpec {
    pub action: Action,
    pub on: On,
}

/// A phase's strategy, resolved for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Strategy {
    Serial,
    Parallel { max_concurrency: usize },
}

#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    strategy: String,
    max_concurrency: Option<String>,
    pub steps: Vec<StepSpec>,
}

impl Phase {
    /// The strategy for a run with these parameters.
    pub fn strategy(&self, params: &Params) -> Result<Strategy> {
        let s = params.expand(&self.strategy);
        let limit = match &self.max_concurrency {
            None => None,
            Some(t) => {
                let v = params.expand(t);
                if v.is_empty() {
                    None
                } else {
                    Some(v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        Error::Params(vec![format!(
                            "phase {}: max_concurrency {:?} is not a positive integer",
                            self.name, v
                        )])
                    })?)
                }
            }
        };
        match s.as_str() {
            "serial" => Ok(Strategy::Serial),
            "parallel" => Ok(Strategy::Parallel {
                max_concurrency: limit.unwrap_or(usize::MAX),
            }),
            other => Err(Error::Params(vec![format!(
                "phase {}: strategy {other:?} is neither serial nor parallel",
                self.name
            )])),
        }
    }

    pub fn strategy_template(&self) -> (&str, Option<&str>) {
        (&self.strategy, self.max_concurrency.as_deref())
    }
}

/// Templates that say where and what a run reads or writes.
#[derive(Debug, Clone)]
pub struct TargetTemplate {
    pub store: String,
    pub snapshot: String,
    pub keyspaces: String,
    pub bandwidth: String,
    pub paths: String,
    pub nodes: String,
    pub restore_dir: String,
    pub restore_manager: String,
    pub manager_credentials: String,
    pub restore_schema: String,
    pub table_mapping: String,
    pub tags: String,
    pub compression: String,
    pub mode: String,
    pub full_every: String,
    pub rehash: String,
    pub encrypt_to: String,
    pub encrypt_passphrase: String,
    pub age_identity: String,
    pub age_passphrase: String,
    pub store_options: std::collections::BTreeMap<String, String>,
}

/// A validated plan: the only form the engine accepts.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub description: String,
    pub params: Vec<ParamSpec>,
    pub target: TargetTemplate,
    pub phases: Vec<Phase>,
    pub on_failure: Vec<StepSpec>,
    /// The file text, kept so a resumed run uses the plan it started with.
    pub source: String,
    /// Parameters that only say where the store is and how to reach it (bucket,
    /// region, credentials…): a store profile (`-p STORE=NAME`) replaces them.
    pub store_params: std::collections::BTreeSet<String>,
    /// Whether `STORE` is cairn's (a profile name for any plan) rather than
    /// declared by the plan itself (`recover-nodes`: a URL or a profile name).
    pub implicit_store: bool,
}

/// The parameter that names a store profile, in every plan.
pub const STORE_PARAM: &str = "STORE";

/// Plans compiled into the binary, so `cairn` works from any directory.
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "backup-local",
        include_str!("../../plans/backup-local.toml"),
    ),
    (
        "restore-local",
        include_str!("../../plans/restore-local.toml"),
    ),
    ("backup-s3", include_str!("../../plans/backup-s3.toml")),
    ("restore-s3", include_str!("../../plans/restore-s3.toml")),
    (
        "backup-azure",
        include_str!("../../plans/backup-azure.toml"),
    ),
    (
        "restore-azure",
        include_str!("../../plans/restore-azure.toml"),
    ),
    (
        "recover-nodes",
        include_str!("../../plans/recover-nodes.toml"),
    ),
];

impl Plan {
    /// Whether any phase has a step with this action.
    pub fn has_action(&self, a: Action) -> bool {
        self.phases
            .iter()
            .any(|p| p.steps.iter().any(|s| s.action == a))
    }

    /// Parse and validate plan text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Plan> {
        let raw: raw::RawPlan = toml::from_str(text).map_err(|e| Error::Plan {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        Self::from_raw(file, raw, text)
    }

    pub fn load(path: &Path) -> Result<Plan> {
        let text = crate::fsx::read_small_text(path, crate::fsx::MAX_DESCRIPTION)
            .map_err(|e| Error::io("read plan", path, e))?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Find a plan by name: `dir/<name>.toml` when a plans dir is given and holds it,
    /// else the shipped plan of that name.
    pub fn find(name: &str, dir: Option<&Path>) -> Result<Plan> {
        if let Some(dir) = dir {
            let path = dir.join(format!("{name}.toml"));
            if path.exists() {
                return Self::load(&path);
            }
        }
        match SHIPPED.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => Self::parse(&format!("plans/{n}.toml"), text),
            None => Err(Error::Usage(format!(
                "no plan named {name:?}; `cairn plan list` shows the plans"
            ))),
        }
    }

    /// All plans: the shipped ones, overridden or extended by a plans dir.
    pub fn list(dir: Option<&Path>) -> Result<Vec<Plan>> {
        let mut plans: std::collections::BTreeMap<String, Plan> = Default::default();
        for (n, text) in SHIPPED {
            let p = Self::parse(&format!("plans/{n}.toml"), text)?;
            plans.insert(p.name.clone(), p);
        }
        if let Some(dir) = dir {
            let entries =
                std::fs::read_dir(dir).map_err(|e| Error::io("read plans dir", dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("read plans dir", dir, e))?;
                let path = entry.path();
                if path.extension().is_some_and(|x| x == "toml") {
                    let p = Self::load(&path)?;
                    plans.insert(p.name.clone(), p);
                }
            }
        }
        Ok(plans.into_values().collect())
    }

    fn from_raw(file: &str, raw: raw::RawPlan, source: &str) -> Result<Plan> {
        let mut problems = Vec::new();
        let name_re = Regex::new("^[a-z0-9][a-z0-9-]*$").map_err(|e| Error::Plan {
            file: file.into(),
            message: e.to_string(),
        })?;
        if !name_re.is_match(&raw.name) {
            problems.push(format!(
                "name {:?} must be lower-case letters, digits and -",
                raw.name
            ));
        }
        let param_re = Regex::new("^[A-Z][A-Z0-9_]*$").map_err(|e| Error::Plan {
            file: file.into(),
            message: e.to_string(),
        })?;
        let mut params = Vec::new();
        for (name, p) in raw.parameters {
            if !param_re.is_match(&name) {
                problems.push(format!("parameter {name:?} must be UPPER_SNAKE_CASE"));
            }
            if p.required && p.default.is_some() {
                problems.push(format!(
                    "parameter {name}: required and default are exclusive"
                ));
            }
            let pattern = match p.pattern.as_deref().map(Regex::new) {
                None => None,
                Some(Ok(re)) => Some(re),
                Some(Err(e)) => {
                    problems.push(format!("parameter {name}: bad pattern: {e}"));
                    None
                }
            };
            if let (Some(re), Some(d)) = (&pattern, &p.default)
                && !d.is_empty()
                && !re.is_match(d)
            {
                problems.push(format!(
                    "parameter {name}: default {d:?} does not match its pattern"
                ));
            }
            params.push(ParamSpec {
                name,
                description: p.description,
                required: p.required,
                default: p.default,
                pattern,
                secret: p.secret,
                env: p.env,
            });
        }
        let declared = |t: &str, what: &str, problems: &mut Vec<String>| {
            for r in params::references(t) {
                if !params.iter().any(|p| p.name == r) {
                    problems.push(format!("{what} refers to undeclared parameter ${{{r}}}"));
                }
            }
        };
        declared(&raw.target.store, "target.store", &mut problems);
        declared(&raw.target.snapshot, "target.snapshot", &mut problems);
        declared(&raw.target.keyspaces, "target.keyspaces", &mut problems);
        declared(&raw.target.bandwidth, "target.bandwidth", &mut problems);
        declared(&raw.target.paths, "target.paths", &mut problems);
        declared(&raw.target.nodes, "target.nodes", &mut problems);
        declared(&raw.target.restore_dir, "target.restore_dir", &mut problems);
        declared(
            &raw.target.restore_manager,
            "target.restore_manager",
            &mut problems,
        );
        declared(
            &raw.target.manager_credentials,
            "target.manager_credentials",
            &mut problems,
        );
        declared(
            &raw.target.restore_schema,
            "target.restore_schema",
            &mut problems,
        );
        declared(
            &raw.target.table_mapping,
            "target.table_mapping",
            &mut problems,
        );
        declared(&raw.target.tags, "target.tags", &mut problems);
        declared(&raw.target.compression, "target.compression", &mut problems);
        declared(&raw.target.mode, "target.mode", &mut problems);
        declared(&raw.target.full_every, "target.full_every", &mut problems);
        declared(&raw.target.rehash, "target.rehash", &mut problems);
        declared(&raw.target.encrypt_to, "target.encrypt_to", &mut problems);
        declared(
            &raw.target.encrypt_passphrase,
            "target.encrypt_passphrase",
            &mut problems,
        );
        declared(
            &raw.target.age_identity,
            "target.age_identity",
            &mut problems,
        );
        declared(
            &raw.target.age_passphrase,
            "target.age_passphrase",
            &mut problems,
        );
        for (k, v) in &raw.target.store_options {
            declared(v, &format!("target.store_options.{k}"), &mut problems);
        }
        let parse_steps = |steps: Vec<raw::RawStep>, ctx: &str, problems: &mut Vec<String>| {
            let mut out = Vec::new();
            for s in steps {
                let Some(action) = Action::ALL.iter().copied().find(|a| a.name() == s.action)
                else {
                    let names: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
                    problems.push(format!(
                        "{ctx}: unknown action {:?} (known: {})",
                        s.action,
                        names.join(", ")
                    ));
                    continue;
                };
                let on = match s.on.as_str() {
                    "once" => On::Once,
                    "each-node" => On::EachNode,
                    other => {
                        problems.push(format!("{ctx}: unknown target {other:?} (once, each-node)"));
                        continue;
                    }
                };
                if on != action.allowed_on() {
                    problems.push(format!(
                        "{ctx}: action {} runs on {:?}, not {:?}",
                        action.name(),
                        action.allowed_on(),
                        on
                    ));
                }
                out.push(StepSpec { action, on });
            }
            out
        };
        let mut phases = Vec::new();
        if raw.phases.is_empty() {
            problems.push("a plan needs at least one phase".to_string());
        }
        for ph in raw.phases {
            declared(
                &ph.strategy,
                &format!("phase {}: strategy", ph.name),
                &mut problems,
            );
            if params::references(&ph.strategy).is_empty()
                && !matches!(ph.strategy.as_str(), "serial" | "parallel")
            {
                problems.push(format!(
                    "phase {}: strategy {:?} is neither serial nor parallel",
                    ph.name, ph.strategy
                ));
            }
            if let Some(m) = &ph.max_concurrency {
                declared(
                    m,
                    &format!("phase {}: max_concurrency", ph.name),
                    &mut problems,
                );
            }
            if phases.iter().any(|p: &Phase| p.name == ph.name) {
                problems.push(format!("phase {} is declared twice", ph.name));
            }
            let steps = parse_steps(ph.steps, &format!("phase {}", ph.name), &mut problems);
            phases.push(Phase {
                name: ph.name,
                strategy: ph.strategy,
                max_concurrency: ph.max_concurrency,
                steps,
            });
        }
        let on_failure = parse_steps(raw.on_failure, "on_failure", &mut problems);
        // The parameters that only place the store: referenced by the store URL or
        // its options and nowhere else.
        let mut store_params: std::collections::BTreeSet<String> =
            params::references(&raw.target.store).into_iter().collect();
        for v in raw.target.store_options.values() {
            store_params.extend(params::references(v));
        }
        let elsewhere = [
            &raw.target.snapshot,
            &raw.target.keyspaces,
            &raw.target.bandwidth,
            &raw.target.paths,
            &raw.target.nodes,
            &raw.target.restore_dir,
            &raw.target.restore_manager,
            &raw.target.manager_credentials,
            &raw.target.restore_schema,
            &raw.target.table_mapping,
            &raw.target.tags,
            &raw.target.compression,
            &raw.target.mode,
            &raw.target.full_every,
            &raw.target.rehash,
            &raw.target.encrypt_to,
            &raw.target.encrypt_passphrase,
            &raw.target.age_identity,
            &raw.target.age_passphrase,
        ];
        for t in elsewhere {
            for r in params::references(t) {
                store_params.remove(&r);
            }
        }
        for ph in &phases {
            let (st, max) = ph.strategy_template();
            for r in params::references(st)
                .into_iter()
                .chain(max.map(params::references).unwrap_or_default())
            {
                store_params.remove(&r);
            }
        }
        let implicit_store = !params.iter().any(|p| p.name == STORE_PARAM);
        if implicit_store {
            store_params.remove(STORE_PARAM);
            let replaces: Vec<&str> = params
                .iter()
                .filter(|p| store_params.contains(&p.name))
                .map(|p| p.name.as_str())
                .collect();
            params.push(ParamSpec {
                name: STORE_PARAM.into(),
                description: if replaces.is_empty() {
                    "A named store from cairn.toml ([stores.NAME])".into()
                } else {
                    format!(
                        "A named store from cairn.toml ([stores.NAME]), instead of {}",
                        replaces.join(", ")
                    )
                },
                required: false,
                default: Some(String::new()),
                pattern: Regex::new(crate::config::PROFILE_PATTERN).ok(),
                secret: false,
                env: false,
            });
        }
        if !problems.is_empty() {
            return Err(Error::Plan {
                file: file.into(),
                message: problems.join("; "),
            });
        }
        Ok(Plan {
            name: raw.name,
            description: raw.description,
            params,
            target: TargetTemplate {
                store: raw.target.store,
                snapshot: raw.target.snapshot,
                keyspaces: raw.target.keyspaces,
                bandwidth: raw.target.bandwidth,
                paths: raw.target.paths,
                nodes: raw.target.nodes,
                restore_dir: raw.target.restore_dir,
                restore_manager: raw.target.restore_manager,
                manager_credentials: raw.target.manager_credentials,
                restore_schema: raw.target.restore_schema,
                table_mapping: raw.target.table_mapping,
                tags: raw.target.tags,
                compression: raw.target.compression,
                mode: raw.target.mode,
                full_every: raw.target.full_every,
                rehash: raw.target.rehash,
                encrypt_to: raw.target.encrypt_to,
                encrypt_passphrase: raw.target.encrypt_passphrase,
                age_identity: raw.target.age_identity,
                age_passphrase: raw.target.age_passphrase,
                store_options: raw.target.store_options,
            },
            phases,
            on_failure,
            source: source.to_string(),
            store_params,
            implicit_store,
        })
    }

    /// Resolve this plan's parameters (see [`Params::resolve_with`]). With a store
    /// profile (`-p STORE=NAME`, or kept from the run being resumed) the store's
    /// own parameters are not asked for, and giving one as well is refused: two
    /// answers to "where is the store" would each be half used.
    pub fn resolve_params(
        &self,
        cli: &[params::CliParam],
        stored: &[params::CliParam],
        env: &dyn params::Env,
    ) -> Result<Params> {
        let profile = cli
            .iter()
            .chain(stored)
            .find(|p| p.key == STORE_PARAM)
            .is_some_and(|p| !p.value.is_empty());
        if !(self.implicit_store && profile) {
            return Params::resolve_with(&self.params, cli, stored, env).map_err(|e| match e {
                // A missing bucket or directory: a store profile would do too.
                Error::Params(problems) if self.implicit_store => Error::Params(
                    problems
                        .into_iter()
                        .map(|p| {
                            let store_missing = p.starts_with("missing required")
                                && self.store_params.iter().any(|s| p.contains(s.as_str()));
                            if store_missing {
                                format!("{p} (or STORE=NAME, a store profile of cairn.toml)")
                            } else {
                                p
                            }
                        })
                        .collect(),
                ),
                e => e,
            });
        }
        let clash: Vec<&str> = cli
            .iter()
            .filter(|p| self.store_params.contains(&p.key))
            .map(|p| p.key.as_str())
            .collect();
        if !clash.is_empty() {
            return Err(Error::Params(vec![format!(
                "STORE names a store profile, which says where the store is and how to reach it; {} cannot be given with it (leave STORE out to use them)",
                clash.join(", ")
            )]));
        }
        let specs: Vec<ParamSpec> = self
            .params
            .iter()
            .filter(|s| !self.store_params.contains(&s.name))
            .cloned()
            .collect();
        Params::resolve_with(&specs, cli, stored, env)
    }

    /// Whether this plan writes a snapshot (true) or restores one (false).
    pub fn is_backup(&self) -> bool {
        self.phases
            .iter()
            .flat_map(|p| &p.steps)
            .any(|s| s.action == Action::BackupNode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_is_refused_with_line() {
        let text = "name = \"x\"\nbogus = 1\n[target]\nstore = \"file:///t\"\nsnapshot = \"s\"\n[[phases]]\nname = \"a\"\nsteps = []\n";
        let err = Plan::parse("x.toml", text).expect_err("refuse");
        let msg = err.to_string();
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn undeclared_reference_and_bad_action_are_refused() {
        let text = "name = \"x\"\n[target]\nstore = \"file://${NOPE}\"\nsnapshot = \"s\"\n[[phases]]\nname = \"a\"\nsteps = [{ action = \"frobnicate\" }]\n";
        let msg = Plan::parse("x.toml", text).expect_err("refuse").to_string();
        assert!(msg.contains("${NOPE}"), "{msg}");
        assert!(msg.contains("frobnicate"), "{msg}");
    }

    #[test]
    fn store_parameters_are_those_that_only_place_the_store() {
        let p = Plan::find("backup-s3", None).expect("plan");
        let got: Vec<&str> = p.store_params.iter().map(String::as_str).collect();
        assert_eq!(
            got,
            [
                "AWS_ACCESS_KEY_ID",
                "AWS_REGION",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "S3_BUCKET_NAME",
                "S3_ENDPOINT_URL",
                "S3_PREFIX",
                "SSE",
                "SSE_KMS_KEY_ID",
                "STORAGE_CLASS"
            ]
        );
        assert!(p.implicit_store);
        assert!(
            p.params
                .iter()
                .any(|s| s.name == STORE_PARAM && !s.required)
        );
        // With a profile, the bucket and region are not asked for; without, they are.
        let env = std::collections::BTreeMap::new();
        let cli = |kv: &[(&str, &str)]| -> Vec<params::CliParam> {
            kv.iter()
                .map(|(k, v)| params::CliParam {
                    key: k.to_string(),
                    value: v.to_string(),
                    literal: false,
                })
                .collect()
        };
        p.resolve_params(
            &cli(&[("SNAPSHOT_NAME", "s"), ("STORE", "prod")]),
            &[],
            &env,
        )
        .expect("a profile replaces the store parameters");
        let msg = p
            .resolve_params(&cli(&[("SNAPSHOT_NAME", "s")]), &[], &env)
            .expect_err("no store")
            .to_string();
        assert!(
            msg.contains("S3_BUCKET_NAME") && msg.contains("STORE=NAME"),
            "{msg}"
        );
        // recover-nodes declares STORE itself (a URL or a profile name).
        assert!(
            !Plan::find("recover-nodes", None)
                .expect("plan")
                .implicit_store
        );
    }
}
