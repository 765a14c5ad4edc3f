//! The plan file as written: serde structs that mirror the TOML and refuse unknown
//! fields. Nothing here is trusted; [`super::Plan::from_raw`] validates it.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, RawParam>,
    pub target: RawTarget,
    pub phases: Vec<RawPhase>,
    #[serde(default)]
    pub on_failure: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParam {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub required: bool,
    pub default: Option<String>,
    pub pattern: Option<String>,
    #[serde(default)]
    pub secret: bool,
    /// Take an unset value from the environment variable of the same name.
    #[serde(default)]
    pub env: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    /// Store URL template, e.g. `file://${BACKUP_DIR}`.
    pub store: String,
    /// Snapshot name template, e.g. `${SNAPSHOT_NAME}`.
    pub snapshot: String,
    /// Keyspace selection template (comma or space separated; empty = all).
    #[serde(default)]
    pub keyspaces: String,
    /// Bandwidth cap for the whole run, e.g. `${MAX_BANDWIDTH}` (empty: none).
    #[serde(default)]
    pub bandwidth: String,
    /// A restore's partial selection inside each node (`${PATHS}`).
    #[serde(default)]
    pub paths: String,
    /// A restore's node selection (`${NODES}`).
    #[serde(default)]
    pub nodes: String,
    /// A restore's alternative target directory (`${RESTORE_DIR}`).
    #[serde(default)]
    pub restore_dir: String,
    /// A restore's manager restore mode: true, false, force (`${RESTORE_MANAGER}`).
    #[serde(default)]
    pub restore_manager: String,
    /// A backup's "include the manager's credentials": true, false.
    #[serde(default)]
    pub manager_credentials: String,
    /// A restore's "load the service's schema first": true, false.
    #[serde(default)]
    pub restore_schema: String,
    /// A restore's table placement: exact, by-name (`${TABLE_MAPPING}`).
    #[serde(default)]
    pub table_mapping: String,
    /// A backup's tags (`${TAGS}`): names that keep a snapshot out of the default
    /// retention (see `snapshots prune --tag`).
    #[serde(default)]
    pub tags: String,
    /// A backup's compression (`${COMPRESSION}`): gzip, zstd.
    #[serde(default)]
    pub compression: String,
    /// A backup's mode (`${MODE}`): differential, full.
    #[serde(default)]
    pub mode: String,
    /// Differentials after which a full backup is made (`${FULL_EVERY}`).
    #[serde(default)]
    pub full_every: String,
    /// Tell a differential's changes by SHA-256 (`${REHASH}`): true, false.
    #[serde(default)]
    pub rehash: String,
    /// A backup's age recipients (`${ENCRYPT_TO}`: age1… lines).
    #[serde(default)]
    pub encrypt_to: String,
    /// A backup's passphrase to encrypt with instead (`${ENCRYPT_PASSPHRASE}`).
    #[serde(default)]
    pub encrypt_passphrase: String,
    /// A restore's age identity file text (`${AGE_IDENTITY}`).
    #[serde(default)]
    pub age_identity: String,
    /// A restore's passphrase (`${AGE_PASSPHRASE}`).
    #[serde(default)]
    pub age_passphrase: String,
    /// Backend options (endpoint, credentials…), each a template.
    #[serde(default)]
    pub store_options: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPhase {
    pub name: String,
    #[serde(default = "default_strategy")]
    pub strategy: String,
    pub max_concurrency: Option<String>,
    pub steps: Vec<RawStep>,
}

fn default_strategy() -> String {
    "serial".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub action: String,
    #[serde(default = "default_on")]
    pub on: String,
}

fn default_on() -> String {
    "once".to_string()
}
