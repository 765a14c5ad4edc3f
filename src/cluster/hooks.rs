//! Node hooks: argv arrays run without a shell. Parameters reach them as environment
//! variables, never spliced into the command line; their output is logged redacted.

use super::Node;
use crate::redact::redact;
use crate::{Error, Result};
use tokio_util::sync::CancellationToken;

/// Which hook of a node.
#[derive(Debug, Clone, Copy)]
pub enum Which {
    Pre,
    Post,
}

/// Run a node's hook if it has one. `phase` is the plan phase (e.g. `backup`).
pub async fn run(
    which: Which,
    node: &Node,
    phase: &str,
    snapshot: &str,
    params: &[(String, String)],
    cancel: &CancellationToken,
) -> Result<()> {
    let (argv, name) = match which {
        Which::Pre => (&node.pre_hook, "pre"),
        Which::Post => (&node.post_hook, "post"),
    };
    let Some((program, args)) = argv.split_first() else {
        return Ok(());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in params {
        cmd.env(k, v);
    }
    cmd.env("CAIRN_NODE_INDEX", node.index.to_string())
        .env("CAIRN_DATA_DIR", &node.data_dir)
        .env("CAIRN_PHASE", phase)
        .env("CAIRN_HOOK", name)
        .env("CAIRN_SNAPSHOT", snapshot);
    tracing::info!(node = node.index, hook = name, program = %program, "running hook");
    let child = cmd.output();
    let out = tokio::select! {
        r = child => r.map_err(|e| Error::Hook { hook: hook_name(which), node: node.index, message: format!("cannot start {program}: {e}") })?,
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines().chain(stderr.lines()) {
        tracing::info!(node = node.index, hook = name, "{}", redact(line));
    }
    if out.status.success() {
        Ok(())
    } else {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(Error::Hook {
            hook: hook_name(which),
            node: node.index,
            message: redact(&format!(
                "{program} exited with {}: {}",
                out.status,
                tail.join(" | ")
            )),
        })
    }
}

fn hook_name(which: Which) -> &'static str {
    match which {
        Which::Pre => "pre",
        Which::Post => "post",
    }
}
