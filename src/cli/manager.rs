//! `cairn manager-snapshot …` and `cairn recover`.

use super::output::{print_json, progress};
use super::{Globals, ManagerCmd, RecoverArgs, cancel_on_signals, usage};
use crate::checks::{RealDisk, human};
use crate::cluster::{Cluster, Selection};
use crate::engine::Engine;
use crate::error::exit;
use crate::manager::{Manager, catalog};
use crate::plan::Plan;
use crate::plan::params::{CliParam, ProcessEnv};
use crate::store::Store;
use crate::{Error, Result};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn manager(g: &Globals, cluster: Option<&Path>) -> Result<Manager> {
    let c = cluster.map(Cluster::load).transpose()?;
    Manager::resolve(c.as_ref(), cluster, &g.home)
}

async fn open(g: &Globals, url: Option<String>, cluster: Option<&Path>) -> Result<Arc<dyn Store>> {
    let url = url.ok_or_else(|| usage("no store: pass --store URL or set CAIRN_STORE"))?;
    g.open_store(&url, cluster).await
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

pub async fn run(g: &Globals, cmd: ManagerCmd) -> Result<i32> {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    match cmd {
        ManagerCmd::Create {
            id,
            include_credentials,
            at,
        } => {
            let m = manager(g, at.cluster.as_deref())?;
            let store = open(g, at.store, at.cluster.as_deref()).await?;
            let id = id.unwrap_or_else(catalog::default_id);
            let s = catalog::create(
                &*store,
                &m,
                &id,
                include_credentials,
                progress(g.quiet || g.json),
                &cancel,
            )
            .await?;
            if g.json {
                print_json(&json!(s));
            } else {
                crate::out!(
                    "manager snapshot {} created in {}: {}, manager version {}, credentials {}",
                    s.id,
                    store.describe(),
                    human(s.size.unwrap_or(0)),
                    s.manager_version.as_deref().unwrap_or("-"),
                    yes_no(s.credentials)
                );
            }
            Ok(exit::OK)
        }
        ManagerCmd::List { store } => {
            let store = open(g, store, None).await?;
            let list = catalog::list(&*store).await?;
            if g.json {
                print_json(&json!(list));
                return Ok(exit::OK);
            }
            if list.is_empty() {
                crate::out!("no manager snapshots in {}", store.describe());
                return Ok(exit::OK);
            }
            crate::out!(
                "{:32} {:26} {:10} {:>10} {:11} {:9} FORMAT",
                "ID",
                "CREATED",
                "VERSION",
                "SIZE",
                "CREDENTIALS",
                "STATUS"
            );
            for s in list {
                crate::out!(
                    "{:32} {:26} {:10} {:>10} {:11} {:9} {}{}{}",
                    s.id,
                    s.created_at.as_deref().unwrap_or("-"),
                    s.manager_version.as_deref().unwrap_or("-"),
                    s.size.map_or("-".into(), human),
                    yes_no(s.credentials),
                    s.status,
                    s.format.map_or("-".into(), |f| format!("v{f}")),
                    s.snapshot
                        .as_ref()
                        .map(|n| format!("  (in snapshot {n})"))
                        .unwrap_or_default(),
                    s.error.map(|e| format!("  ({e})")).unwrap_or_default()
                );
            }
            Ok(exit::OK)
        }
        ManagerCmd::Download {
            id,
            output,
            store,
            keys,
        } => {
            let keys = keys.keys()?;
            let store = open(g, store, None).await?;
            let s = catalog::download(&*store, &id, &output, keys.as_ref(), &cancel).await?;
            if g.json {
                print_json(&json!({"id": id, "file": output, "size": s.size}));
            } else {
                crate::out!(
                    "manager snapshot {id} saved to {} ({}, checksum verified)",
                    output.display(),
                    human(s.size.unwrap_or(0))
                );
                if keys.is_none() && crate::crypt::is_age_file(&output) {
                    crate::out!(
                        "  it is encrypted, saved as stored (an age file): `age -d -i key.txt` opens it, or download again with --identity"
                    );
                }
            }
            Ok(exit::OK)
        }
        ManagerCmd::Upload { file, id, store } => {
            let store = open(g, store, None).await?;
            let s = catalog::upload(&*store, &file, id.as_deref(), &cancel).await?;
            if g.json {
                print_json(&json!(s));
            } else {
                crate::out!(
                    "uploaded {} as manager snapshot {} to {} (every entry verified)",
                    file.display(),
                    s.id,
                    store.describe()
                );
            }
            Ok(exit::OK)
        }
        ManagerCmd::Restore {
            id,
            force,
            at,
            keys,
        } => {
            let keys = keys.keys()?;
            let m = manager(g, at.cluster.as_deref())?;
            let store = open(g, at.store, at.cluster.as_deref()).await?;
            let r = catalog::restore(
                &*store,
                &id,
                &m,
                force,
                Arc::new(RealDisk),
                keys.as_ref(),
                &cancel,
            )
            .await?;
            if g.json {
                print_json(&json!(r));
            } else {
                crate::out!(
                    "manager snapshot {id} restored into {}: {} files, {} (format v{}{}, manager version {}, credentials {})",
                    r.state_dir.display(),
                    r.files,
                    human(r.bytes),
                    r.written_format,
                    if r.written_format == crate::manager::format::CURRENT {
                        String::new()
                    } else {
                        format!(" migrated to v{}", crate::manager::format::CURRENT)
                    },
                    r.manager_version,
                    if r.credentials { "restored" } else { "kept" }
                );
                if let Some(p) = &r.pre_restore {
                    crate::out!(
                        "the previous state is kept at {}; `cairn manager-snapshot rollback` swaps it back",
                        p.display()
                    );
                }
            }
            Ok(exit::OK)
        }
        ManagerCmd::Rollback { cluster } => {
            let m = manager(g, cluster.as_deref())?;
            let (from, replaced) = crate::manager::restore::rollback(&m)?;
            if g.json {
                print_json(&json!({"restored": from, "replaced_kept_at": replaced}));
            } else {
                crate::out!(
                    "{} is back from {}{}",
                    m.state_dir.display(),
                    from.display(),
                    replaced
                        .map(|p| format!("; the replaced state is kept at {}", p.display()))
                        .unwrap_or_default()
                );
            }
            Ok(exit::OK)
        }
        ManagerCmd::Delete { id, store } => {
            let store = open(g, store, None).await?;
            catalog::delete(&*store, &id).await?;
            if g.json {
                print_json(&json!({"deleted": id}));
            } else {
                crate::out!("deleted manager snapshot {id}");
            }
            Ok(exit::OK)
        }
        ManagerCmd::Status { cluster } => {
            let m = manager(g, cluster.as_deref())?;
            let s = catalog::status(&m)?;
            if g.json {
                print_json(&json!(s));
            } else {
                crate::out!(
                    "manager: {} ({})",
                    s.state_dir.display(),
                    match s.kind {
                        crate::manager::Kind::Declared => "[manager] of the cluster description",
                        crate::manager::Kind::Own => "cairn's own state",
                    }
                );
                crate::out!("version: {}", s.version);
                crate::out!("credentials: {}/", s.credentials);
                if s.clean {
                    crate::out!("clean: yes (a snapshot can be restored without --force)");
                } else {
                    crate::out!("clean: no");
                    for r in &s.not_clean {
                        crate::out!("  - {r}");
                    }
                }
                for p in &s.pre_restore_copies {
                    crate::out!("pre-restore copy: {}", p.display());
                }
            }
            Ok(exit::OK)
        }
    }
}

pub async fn recover(g: &Globals, a: RecoverArgs) -> Result<i32> {
    let keys = a.keys.keys()?;
    let url = a
        .store
        .ok_or_else(|| usage("no store: pass --store URL or set CAIRN_STORE"))?;
    let (store, options) = g
        .open_store_with_options(&url, a.cluster.as_deref())
        .await?;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let cluster = a.cluster.as_deref().map(Cluster::load).transpose()?;
    if a.nodes && cluster.is_none() {
        return Err(usage(
            "--nodes needs the cluster description: pass --cluster FILE or set CAIRN_CLUSTER",
        ));
    }
    let m = Manager::resolve(cluster.as_ref(), a.cluster.as_deref(), &g.home)?;
    let choice = crate::recover::choose(&*store, a.snapshot.as_deref(), a.nodes).await?;
    let out = |line: String| {
        if g.json {
            crate::say!("{line}");
        } else {
            crate::out!("{line}");
        }
    };
    out(format!(
        "recover from snapshot {} (finished {}, manager version {}) in {}",
        choice.snapshot,
        choice.finished_at,
        choice.manager_version,
        store.describe()
    ));
    for (name, why) in &choice.skipped {
        out(format!("  passed over newer snapshot {name}: {why}"));
    }
    out(format!(
        "  manager: replace {} with the snapshot's state (manager version here: {}); the current state, if any, is kept as a pre-restore copy",
        m.state_dir.display(),
        m.version
    ));
    if let Some(c) = cluster.as_ref().filter(|_| a.nodes) {
        for n in &c.nodes {
            out(format!(
                "  node {}: restore into {}",
                n.index,
                n.data_dir.display()
            ));
        }
    }
    if !a.force {
        return Err(usage(
            "recover replaces state, so it needs --force; nothing was changed",
        ));
    }
    if let Some(c) = cluster.as_ref().filter(|_| a.nodes) {
        // Every node check passes before the manager is touched.
        let sel = Selection::default();
        let m = crate::checks::restore_manifest(&*store, &choice.snapshot, keys.as_ref()).await?;
        let (probes, mut problems) =
            crate::node::restore::probe_nodes(c, &sel, false, false, Some(&m), |n| {
                if n.is_remote() {
                    Box::new(crate::node::Remote {
                        node: n.clone(),
                        store: store.clone(),
                        target: crate::node::StoreTarget {
                            url: store.url(),
                            options: options.clone(),
                            bandwidth: None,
                        },
                        secrets: options
                            .iter()
                            .filter(|(k, _)| crate::store::SECRET_OPTIONS.contains(&k.as_str()))
                            .map(|(_, v)| v.clone())
                            .collect(),
                    })
                } else {
                    Box::new(crate::node::Local {
                        store: store.clone(),
                        disk: Arc::new(RealDisk),
                    })
                }
            })
            .await;
        problems.extend(probes.values().flat_map(|p| p.unfit.iter().cloned()));
        if !problems.is_empty() {
            return Err(crate::Error::Checks(problems));
        }
        crate::checks::restore(c, &sel, &*store, &choice.snapshot, &m, &probes).await?;
    }
    let loc = catalog::locate(&*store, &choice.snapshot).await?;
    crate::manager::restore::check_version(&m, &choice.manager_version)?;
    let report = catalog::restore_key(
        &*store,
        &loc.key,
        &loc.status,
        &m,
        true,
        Arc::new(RealDisk),
        keys.as_ref(),
        &cancel,
    )
    .await?;
    out(format!(
        "manager restored into {} ({} files)",
        report.state_dir.display(),
        report.files
    ));
    let mut run = None;
    if let Some(c) = cluster.filter(|_| a.nodes) {
        let plan = Plan::find("recover-nodes", None)?;
        let mut engine = Engine::new(g.state()?, progress(g.quiet || g.json));
        engine.cancel = cancel.clone();
        engine.config = g.config(a.cluster.as_deref())?;
        engine.config_given = g.config.is_some();
        let mut params = vec![
            CliParam {
                key: "STORE".into(),
                value: url.clone(),
                literal: true,
            },
            CliParam {
                key: "SNAPSHOT_NAME".into(),
                value: choice.snapshot.clone(),
                literal: true,
            },
        ];
        match &keys {
            Some(crate::crypt::Keys::Identities(text)) => params.push(CliParam {
                key: "AGE_IDENTITY".into(),
                value: text.clone(),
                literal: true,
            }),
            Some(crate::crypt::Keys::Passphrase(text)) => params.push(CliParam {
                key: "AGE_PASSPHRASE".into(),
                value: text.clone(),
                literal: true,
            }),
            None => {}
        }
        let outcome = engine.start(plan, &params, &ProcessEnv, c).await?;
        let id = outcome.run_id;
        if let Some(e) = outcome.error {
            return Err(Error::Step {
                step: format!("run {id} (recover-nodes)"),
                source: Box::new(e),
            });
        }
        out(format!("nodes restored (run {id})"));
        run = Some(id);
    }
    if g.json {
        print_json(&json!({"snapshot": choice.snapshot, "manager": report, "nodes_run": run}));
    }
    Ok(exit::OK)
}
