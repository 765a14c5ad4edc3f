//! A service command run on a node's host (a schema dump or load): an argv, no
//! shell, its input given on stdin and, as `{file}`, in a private temporary file.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use tokio_util::sync::CancellationToken;

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
pub fn run(job: &CommandJob, cancel: &CancellationToken) -> Result<CommandOut> {
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
        .env("CAIRN_NODE_INDEX", job.node.to_string());
    tracing::info!(node = job.node, program = %program, "running the {} command", job.what);
    let out = match output(cmd, input, cancel) {
        Ok(out) => out,
        Err(e) if cancel.is_cancelled() => {
            tracing::warn!(node = job.node, "the {} command was stopped: {e}", job.what);
            return Err(Error::Cancelled);
        }
        Err(e) => return Err(fail(format!("{program}: {e}"))),
    };
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

/// Run `cmd` in a process group of its own, `input` on its stdin, and collect its
/// output. When `cancel` fires (the run is stopped), or once the command has
/// exited, its whole group is killed: nothing it started outlives it.
pub fn output(
    mut cmd: std::process::Command,
    input: Option<Vec<u8>>,
    cancel: &CancellationToken,
) -> std::io::Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    cmd.process_group(0)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let group = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let end_group = || {
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    };
    // stdin, stdout and stderr on threads of their own: a command that prints
    // before it reads never blocks on a full pipe.
    let feeder = match (child.stdin.take(), input) {
        (Some(mut stdin), Some(bytes)) => Some(std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        })),
        _ => None,
    };
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                // One byte over the cap is enough to refuse it; the rest is
                // drained so the command never blocks on a full pipe.
                let _ = (&mut p).take(MAX_OUTPUT as u64 + 1).read_to_end(&mut buf);
                let _ = std::io::copy(&mut p, &mut std::io::sink());
            }
            buf
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    // Until it is reaped the command's pid (its group's id) cannot be reused, so
    // its group is ended while it is a zombie, then it is reaped.
    loop {
        use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(group), flags) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(std::io::Error::other(e)),
        }
        if cancel.is_cancelled() {
            end_group();
            let _ = child.wait();
            return Err(std::io::Error::other("stopped"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    end_group();
    let status = child.wait()?;
    if let Some(t) = feeder {
        let _ = t.join();
    }
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}
