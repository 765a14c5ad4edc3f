//! A dry run (`plan start --dry-run`, `-p DRY_RUN=true`): every pre-flight check
//! of a backup or restore, on every node's host, and what the run would read or
//! write where — with nothing written anywhere and no run recorded.

use super::{node_exec, open_store};
use crate::checks::Disk;
use crate::cluster::{Cluster, Node};
use crate::node::restore::{RestoreProbe, probe_nodes};
use crate::plan::Plan;
use crate::plan::params::{CliParam, Env};
use crate::spec::{self, RunKind};
use crate::{Error, Result, checks};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Serialize)]
pub struct Preview {
    pub plan: String,
    pub kind: RunKind,
    pub snapshot: String,
    pub store: String,
    pub nodes: Vec<NodePreview>,
    /// Files and bytes a restore writes (unknown for a backup until it reads).
    pub files: Option<u64>,
    pub bytes: Option<u64>,
    /// The manager snapshot is restored too.
    pub manager: bool,
    /// A backup: `differential of <parent>`, or `full (<why>)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct NodePreview {
    pub node: u32,
    /// How the node is reached: `local`, or its exec prefix.
    pub via: String,
    pub data_dir: PathBuf,
    pub keyspaces: Vec<String>,
    pub files: Option<u64>,
    pub bytes: Option<u64>,
    /// Directories a restore would make (the data dir and missing parents).
    pub creates: Vec<PathBuf>,
}

fn via(n: &Node) -> String {
    if n.is_remote() {
        n.exec.join(" ")
    } else {
        "local".into()
    }
}

/// Check a run as `start` would and say what it would do; refused as `start`
/// would refuse it (the same problems, the same exit codes). No state home is
/// opened: a dry run leaves no record either.
pub async fn preview(
    plan: Plan,
    cli: &[CliParam],
    env: &dyn Env,
    cluster: Cluster,
    disk: Arc<dyn Disk>,
    config: &crate::config::Config,
) -> Result<Preview> {
    let params = plan.resolve_params(cli, &[], env)?;
    let (mut spec, run_cluster) = spec::compile(&plan, &params, &cluster, String::new(), config)?;
    let store = open_store(&mut spec).await?;
    let exec = |n: &Node| node_exec(n, &store, &spec, &params, &disk);
    let mut preview = Preview {
        plan: plan.name.clone(),
        kind: spec.kind,
        snapshot: spec.snapshot.clone(),
        store: spec.store.clone(),
        nodes: Vec::new(),
        files: None,
        bytes: None,
        manager: false,
        mode: None,
    };
    match spec.kind {
        RunKind::Restore => {
            let m = checks::restore_manifest(&*store, &spec.snapshot, spec.keys.as_ref()).await?;
            let (probes, mut problems) = probe_nodes(
                &run_cluster,
                &spec.selection,
                spec.restore_dir.is_some(),
                spec.table_by_name,
                Some(&m),
                exec,
            )
            .await;
            for n in &run_cluster.nodes {
                if let Some(p) = probes.get(&n.index) {
                    problems.extend(p.unfit.iter().cloned());
                }
            }
            if !problems.is_empty() {
                return Err(Error::Checks(problems));
            }
            checks::restore(
                &run_cluster,
                &spec.selection,
                &*store,
                &spec.snapshot,
                &m,
                &probes,
            )
            .await?;
            if spec.restore_manager != spec::RestoreManager::No {
                if m.manager.is_none() {
                    return Err(Error::Checks(vec![format!(
                        "RESTORE_MANAGER is set but snapshot {:?} holds no manager snapshot",
                        m.snapshot
                    )]));
                }
                preview.manager = true;
            }
            let (mut files, mut bytes) = (0u64, 0u64);
            for n in &run_cluster.nodes {
                let Some(info) = m.node(n.index) else {
                    continue;
                };
                let chosen: Vec<_> = info
                    .files
                    .iter()
                    .filter(|f| spec.selection.restores_file(&f.path))
                    .collect();
                let b = chosen.iter().fold(0u64, |a, f| a.saturating_add(f.size));
                files += chosen.len() as u64;
                bytes = bytes.saturating_add(b);
                preview.nodes.push(NodePreview {
                    node: n.index,
                    via: via(n),
                    data_dir: n.data_dir.clone(),
                    keyspaces: info
                        .keyspaces
                        .iter()
                        .filter(|k| spec.selection.includes_restored(k))
                        .cloned()
                        .collect(),
                    files: Some(chosen.len() as u64),
                    bytes: Some(b),
                    creates: probes
                        .get(&n.index)
                        .map(|p: &RestoreProbe| {
                            let mut d = p.missing_dirs.clone();
                            d.reverse();
                            d
                        })
                        .unwrap_or_default(),
                });
            }
            preview.files = Some(files);
            preview.bytes = Some(bytes);
        }
        RunKind::Backup => {
            let looks = futures::future::join_all(run_cluster.nodes.iter().map(|n| {
                let e = exec(n);
                let sel = spec.selection.clone();
                let capture = run_cluster.capture.clone();
                async move { (n, e.inspect_backup(n, &sel, &capture).await) }
            }))
            .await;
            let mut problems = Vec::new();
            let mut found = BTreeSet::new();
            for (n, look) in looks {
                match look {
                    Ok(facts) => {
                        problems.extend(facts.problems);
                        found.extend(facts.keyspaces.iter().cloned());
                        preview.nodes.push(NodePreview {
                            node: n.index,
                            via: via(n),
                            data_dir: n.data_dir.clone(),
                            keyspaces: facts
                                .keyspaces
                                .into_iter()
                                .filter(|k| spec.selection.includes(k))
                                .collect(),
                            files: None,
                            bytes: None,
                            creates: Vec::new(),
                        });
                    }
                    Err(e) => problems.extend(crate::node::problems_of(n.index, e)),
                }
            }
            checks::backup(
                problems,
                &found,
                &spec.selection,
                &*store,
                &spec.snapshot,
                None,
            )
            .await?;
            preview.mode = Some(
                match crate::repo::backup_base(
                    &*store,
                    &run_cluster.name,
                    &spec.snapshot,
                    spec.differential,
                    spec.encryption.is_some(),
                    spec.full_every,
                )
                .await?
                {
                    Ok(m) => format!(
                        "differential of {}: files unchanged since it are referenced there",
                        m.snapshot
                    ),
                    Err(why) => format!("full ({why})"),
                },
            );
        }
        RunKind::Other => {
            return Err(Error::Usage(format!(
                "plan {} neither backs up nor restores: a dry run previews backups and restores",
                plan.name
            )));
        }
    }
    Ok(preview)
}
