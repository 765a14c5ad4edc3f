//! `cairn snapshots list | verify | delete` against a store URL.

use super::output::{print_json, progress};
use super::{Globals, SnapshotsCmd, cancel_on_signals};
use crate::Result;
use crate::checks::human;
use crate::error::exit;
use crate::snapshots;
use crate::store;
use serde_json::json;

pub async fn run(g: &Globals, cmd: SnapshotsCmd) -> Result<i32> {
    match cmd {
        SnapshotsCmd::List { store: url } => {
            let store = store::open(&url, &super::store_options_from_env()).await?;
            let list = snapshots::list(&*store).await?;
            if g.json {
                print_json(&json!(list));
                return Ok(exit::OK);
            }
            if list.is_empty() {
                println!("no snapshots in {}", store.describe());
            }
            for s in list {
                let state = if s.complete { "complete" } else { "INCOMPLETE" };
                println!(
                    "{:32} {:10} {:24} nodes {:>3} data {:>10} stored {:>10}{}",
                    s.name,
                    state,
                    s.finished_at.as_deref().unwrap_or("-"),
                    s.nodes.map_or("-".to_string(), |n| n.to_string()),
                    s.bytes.map_or("-".to_string(), human),
                    human(s.stored_bytes),
                    s.problem.map(|p| format!("  ({p})")).unwrap_or_default()
                );
            }
            Ok(exit::OK)
        }
        SnapshotsCmd::Verify { name, store: url } => {
            let store = store::open(&url, &super::store_options_from_env()).await?;
            let cancel = tokio_util::sync::CancellationToken::new();
            cancel_on_signals(cancel.clone());
            let report =
                snapshots::verify(&*store, &name, progress(g.quiet || g.json), &cancel).await?;
            let ok = report.problems.is_empty();
            if g.json {
                print_json(&json!({"ok": ok, "report": report}));
            } else if ok {
                println!(
                    "snapshot {name}: OK ({} objects, {} files, {} checked)",
                    report.objects,
                    report.files,
                    human(report.bytes)
                );
            } else {
                println!("snapshot {name}: {} problem(s)", report.problems.len());
                for p in &report.problems {
                    println!("  - {p}");
                }
            }
            Ok(if ok { exit::OK } else { exit::FAILED })
        }
        SnapshotsCmd::Delete { name, store: url } => {
            let store = store::open(&url, &super::store_options_from_env()).await?;
            let n = snapshots::delete(&*store, &name).await?;
            if g.json {
                print_json(&json!({"deleted": name, "objects": n}));
            } else {
                println!("deleted snapshot {name} ({n} objects)");
            }
            Ok(exit::OK)
        }
    }
}
