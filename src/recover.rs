//! `cairn recover`: rebuild a fallen manager (and with `--nodes` the data nodes) at
//! the locations the cluster description names, from the newest snapshot that is
//! complete and whose objects are all present with their recorded sizes. Every
//! checksum is verified again while restoring.

use crate::manifest::{MANAGER_OBJECT, Manifest};
use crate::store::Store;
use crate::{Error, Result, checks, snapshots};

/// The snapshot `recover` will use, and the newer ones it passed over.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Choice {
    pub snapshot: String,
    pub finished_at: String,
    pub manager_version: String,
    pub nodes: Vec<u32>,
    /// Newer snapshots that were not usable, with the reason.
    pub skipped: Vec<(String, String)>,
    #[serde(skip)]
    pub manifest: Option<Manifest>,
}

async fn usable(store: &dyn Store, name: &str, nodes: bool) -> Result<Manifest> {
    let m = checks::read_manifest(store, name).await?;
    let Some(info) = &m.manager else {
        return Err(Error::Checks(vec![format!(
            "snapshot {name:?} holds no {MANAGER_OBJECT}"
        )]));
    };
    let _ = info;
    if nodes && m.cluster.nodes.is_empty() {
        return Err(Error::Checks(vec![format!(
            "snapshot {name:?} holds no node"
        )]));
    }
    let problems = checks::objects_present(store, name, &m).await;
    if !problems.is_empty() {
        return Err(Error::Checks(problems));
    }
    Ok(m)
}

/// Pick the snapshot: `wanted` by name, or (None / `latest`) the newest usable one.
pub async fn choose(store: &dyn Store, wanted: Option<&str>, nodes: bool) -> Result<Choice> {
    let choice = |name: &str, m: Manifest, skipped| Choice {
        snapshot: name.to_string(),
        finished_at: m.finished_at.clone(),
        manager_version: m
            .manager
            .as_ref()
            .map(|i| i.manager_version.clone())
            .unwrap_or_default(),
        nodes: m.cluster.nodes.iter().map(|n| n.index).collect(),
        skipped,
        manifest: Some(m),
    };
    if let Some(name) = wanted.filter(|w| *w != "latest") {
        let m = usable(store, name, nodes).await?;
        return Ok(choice(name, m, Vec::new()));
    }
    let mut complete: Vec<_> = snapshots::list(store)
        .await?
        .into_iter()
        .filter(|s| s.complete)
        .collect();
    complete.sort_by(|a, b| b.finished_at.cmp(&a.finished_at));
    let mut skipped = Vec::new();
    for s in complete {
        match usable(store, &s.name, nodes).await {
            Ok(m) => return Ok(choice(&s.name, m, skipped)),
            Err(e) => skipped.push((s.name.clone(), e.to_string())),
        }
    }
    Err(Error::NotFound(format!(
        "a complete snapshot with a manager snapshot in {}{}",
        store.describe(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(" ({} passed over)", skipped.len())
        }
    )))
}
