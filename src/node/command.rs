//! A service command run on a node's host (a schema dump or load): an argv, no
//! shell, its input given on stdin and, as `{file}`, in a private temporary file.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;

/// Most bytes a command may print (a schema is kilobytes; hex-encoded it must
/// fit in one line of the agent protocol).
pub const MAX_OUTPUT: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandJob {
    pub node: u32,
    /// What it is, for messages (`schema dump`).
    pub what: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Given on stdin and as `{file}`; hex.
    #[serde(default)]
    pub input_hex: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandOut {
    /// stdout, hex.
    pub stdout_hex: String,
}

/// Run it (blocking). A failure names the command, its exit and the last lines of
/// its output, redacted.
pub fn run(job: &CommandJob) -> Result<CommandOut> {
    let fail = |message: String| Error::Hook {
        hook: "service command",
        node: job.node,
        message: crate::redact::redact(&message),
    };
    let input = match &job.input_hex {
        Some(h) => Some(hex::decode(h).map_err(|e| fail(format!("bad input: {e}")))?),
        None => None,
    };
    // `{file}`: a private copy of the input, gone when the command is.
    let tmp = match &input {
        Some(bytes) => {
            let mut f = tempfile::Builder::new()
                .prefix("cairn-artifact-")
                .tempfile()
                .map_err(|e| fail(format!("cannot make a temporary file: {e}")))?;
            f.write_all(bytes)
                .and_then(|()| f.flush())
                .map_err(|e| fail(format!("cannot write a temporary file: {e}")))?;
            Some(f)
        }
        None => None,
    };
    let argv: Vec<String> = job
        .argv
        .iter()
        .map(|a| match &tmp {
            Some(f) => a.replace("{file}", &f.path().to_string_lossy()),
            None => a.clone(),
        })
        .collect();
    let Some((program, args)) = argv.split_first() else {
        return Err(fail(format!("the {} command is empty", job.what)));
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .env("CAIRN_NODE_INDEX", job.node.to_string())
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    tracing::info!(node = job.node, program = %program, "running the {} command", job.what);
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start {program}: {e}")))?;
    // stdin on its own thread: a command that prints before reading never blocks
    // on a full pipe.
    let feeder = match (child.stdin.take(), input) {
        (Some(mut stdin), Some(bytes)) => Some(std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        })),
        _ => None,
    };
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("{program}: {e}")))?;
    if let Some(t) = feeder {
        let _ = t.join();
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        tracing::info!(
            node = job.node,
            "{}: {}",
            job.what,
            crate::redact::redact(line)
        );
    }
    if !out.status.success() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = stderr.lines().chain(stdout.lines()).rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(fail(format!(
            "the {} command {program} exited with {}: {}",
            job.what,
            out.status,
            tail.join(" | ")
        )));
    }
    if out.stdout.len() > MAX_OUTPUT {
        return Err(fail(format!(
            "the {} command {program} printed more than {} MiB",
            job.what,
            MAX_OUTPUT >> 20
        )));
    }
    Ok(CommandOut {
        stdout_hex: hex::encode(&out.stdout),
    })
}
