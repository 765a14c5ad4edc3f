//! A node reached through an argv prefix: `<exec…> <agent_path> agent`.
//!
//! One agent process per request. Secrets go only into its stdin: the prefix's
//! argv holds none, and variables of this process's environment whose value is a
//! secret are removed from the child's. A hello exchange refuses an agent of another
//! protocol before any work; a silent agent (no beat for the cluster's
//! `agent_timeout`, 30 s by default) is given up;
//! cancelling kills the prefix process, which closes the agent's stdin and cancels
//! it on the node.

use super::agent::read_line;
use super::proto::{self, Greeting, Hello, Op, Reply, Request};
use super::restore::{CheckStagedJob, FsOp, StageJob, StageOutput};
use super::{Backed, BackupFacts, BackupJob, Events, NodeEvent, NodeExec, StoreTarget};
use crate::cluster::{Capture, Node, Selection};
use crate::store::Store;
use crate::{Error, Result};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// How long reaching the node and starting the agent may take.
pub const CONNECT: Duration = Duration::from_secs(60);

/// How long a cancelled agent has to clean up and answer before it is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(20);

pub struct Remote {
    pub node: Node,
    /// The run's store as the coordinator opened it: to abort an upload a dead
    /// agent left open.
    pub store: Arc<dyn Store>,
    pub target: StoreTarget,
    /// Secret values: sent to the agent for its redaction, kept out of the
    /// environment of the prefix.
    pub secrets: Vec<String>,
}

impl Remote {
    fn describe(&self) -> String {
        self.node.exec.join(" ")
    }

    fn failed(&self, message: String) -> Error {
        Error::Remote {
            node: self.node.index,
            message: crate::redact::redact(&message),
            exit_code: crate::error::exit::FAILED,
            transient: false,
        }
    }

    /// Send one request and wait for its answer, passing events on.
    async fn call(
        &self,
        op: Op,
        events: Option<&dyn Events>,
        cancel: &CancellationToken,
    ) -> Result<serde_json::Value> {
        let Some((program, args)) = self.node.exec.split_first() else {
            return Err(self.failed("no exec prefix".into()));
        };
        let preflight = matches!(op, Op::InspectBackup { .. } | Op::Fs { fs: FsOp::Probe(_) });
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .arg(&self.node.agent_path)
            .arg("agent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in std::env::vars_os() {
            let v = v.to_string_lossy();
            if self
                .secrets
                .iter()
                .any(|s| !s.is_empty() && (v.contains(s.as_str()) || v.trim() == s.trim()))
            {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| self.failed(format!("cannot run {}: {e}", self.describe())))?;
        let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(self.failed("the agent's pipes are missing".into()));
        };
        // The agent's stderr (its log), kept for the error message: the last 4 KiB.
        let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
        let keep = tail.clone();
        let log = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Ok(mut t) = keep.lock() {
                    t.extend_from_slice(&buf[..n]);
                    let extra = t.len().saturating_sub(4096);
                    t.drain(..extra);
                }
            }
        });
        let last_words = |tail: &Arc<Mutex<Vec<u8>>>| {
            let text = tail
                .lock()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let from = lines.len().saturating_sub(3);
            lines[from..].join(" / ")
        };
        let mut stdout = BufReader::new(stdout);
        let silence = Duration::from_secs(self.node.agent_timeout_secs);
        let handshake = async {
            // Hello first, both ways.
            let line = tokio::time::timeout(CONNECT, read_line(&mut stdout, 4096))
                .await
                .map_err(|_| {
                    format!(
                        "no answer from the agent within {}s ({})",
                        CONNECT.as_secs(),
                        self.describe()
                    )
                })?
                .map_err(|e| e.to_string())?;
            let Some(line) = line else {
                return Err(format!(
                    "could not start the agent ({} {} agent)",
                    self.describe(),
                    self.node.agent_path
                ));
            };
            let theirs = match serde_json::from_slice::<Greeting>(&line) {
                Ok(Greeting::Hello(h)) => h,
                Err(_) => {
                    return Err(format!(
                        "{} agent did not answer as a cairn agent (is {} a cairn binary on the node?)",
                        self.node.agent_path, self.node.agent_path
                    ));
                }
            };
            let ours = Hello::ours();
            if theirs.protocol != ours.protocol {
                // An answer, not a breakdown: refused before any work.
                return Ok(Some(Error::Checks(vec![format!(
                    "node {}: the agent (cairn {}) speaks agent protocol {}, this cairn ({}) speaks {}: install the same cairn release on the coordinator and the nodes",
                    self.node.index, theirs.version, theirs.protocol, ours.version, ours.protocol
                )])));
            }
            let req = Request {
                secrets: self.secrets.clone(),
                store: self.target.clone(),
                op,
            };
            let mut out = proto::line(&Greeting::Hello(ours)).map_err(|e| e.to_string())?;
            out.extend(proto::line(&req).map_err(|e| e.to_string())?);
            stdin
                .write_all(&out)
                .await
                .and(stdin.flush().await)
                .map_err(|e| format!("cannot talk to the agent: {e}"))?;
            Ok(None)
        };
        // A refusal before any work (another protocol) is the answer itself.
        let early = tokio::select! {
            r = handshake => r,
            () = cancel.cancelled() => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(Error::Cancelled);
            }
        };
        let replies = async {
            loop {
                let line = tokio::time::timeout(silence, read_line(&mut stdout, proto::MAX_LINE))
                    .await
                    .map_err(|_| {
                        format!(
                            "the agent said nothing for {}s: the node or its connection hangs (agent_timeout)",
                            silence.as_secs()
                        )
                    })?
                    .map_err(|e| e.to_string())?;
                let Some(line) = line else {
                    return Err("the agent ended without an answer".to_string());
                };
                let reply: Reply = serde_json::from_slice(&line)
                    .map_err(|e| format!("the agent sent what this cairn cannot read: {e}"))?;
                match reply {
                    Reply::Beat => {}
                    Reply::Event(e) => {
                        if let Some(ev) = events {
                            ev.event(e);
                        }
                    }
                    Reply::Done(v) => return Ok(Ok(v)),
                    Reply::Failed(w) => {
                        return Ok(Err(w.into_error(self.node.index, preflight)));
                    }
                }
            }
        };
        let result = match early {
            Ok(Some(refused)) => Ok(Err(refused)),
            Err(message) => Err(message),
            Ok(None) => {
                tokio::pin!(replies);
                tokio::select! {
                    r = &mut replies => r,
                    () = cancel.cancelled() => {
                        // Closing its stdin tells the agent its coordinator went:
                        // it stops, cleans up (aborts its upload, moves back what
                        // a commit moved) and answers. Only one that does not is
                        // killed — and a kill of `ssh` alone would leave the
                        // agent on the node working while a resume starts.
                        drop(stdin);
                        let _ = tokio::time::timeout(CANCEL_GRACE, &mut replies).await;
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        log.abort();
                        return Err(Error::Cancelled);
                    }
                }
            }
        };
        match result {
            Ok(answer) => {
                drop(stdin);
                let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                log.abort();
                answer
            }
            Err(message) => {
                // Dead or hung: make sure it is gone, then say what it said last.
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                let _ = tokio::time::timeout(Duration::from_secs(2), log).await;
                let said = last_words(&tail);
                let mut text = message;
                if let Some(code) = status.and_then(|s| s.code()) {
                    text.push_str(&format!(" (exit status {code})"));
                } else if let Some(sig) = status.and_then(|s| {
                    use std::os::unix::process::ExitStatusExt;
                    s.signal()
                }) {
                    text.push_str(&format!(" (killed by signal {sig})"));
                }
                if !said.is_empty() {
                    text.push_str(&format!(": {said}"));
                }
                Err(self.failed(text))
            }
        }
    }
}

impl Remote {
    /// An agent's answer is checked against what was asked and what the store
    /// holds before it is recorded: the run never claims an object that is not
    /// there as the agent described it.
    async fn check_backed(&self, job: &BackupJob, b: &Backed) -> Result<()> {
        let object = crate::repo::node_object(job.node.index, job.compression);
        let mut wrong = Vec::new();
        if b.node.index != job.node.index {
            wrong.push(format!("it answered for node {}", b.node.index));
        }
        if b.node.object != object || b.object.key != object {
            wrong.push(format!(
                "it names object {:?}/{:?}, not {object}",
                b.node.object, b.object.key
            ));
        }
        if let Some(k) = b.node.keyspaces.iter().find(|k| {
            k.is_empty()
                || *k == "."
                || *k == ".."
                || k.starts_with(crate::cluster::RESERVED_PREFIX)
                || k.contains(['/', '\\', '\0'])
        }) {
            wrong.push(format!("keyspace {k:?} is no directory name"));
        }
        if let Some(k) = b.node.keyspaces.iter().find(|k| !job.selection.includes(k)) {
            wrong.push(format!("keyspace {k:?} was not selected"));
        }
        if b.object.sha256.len() != 64 || !b.object.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
            wrong.push("its SHA-256 is malformed".into());
        }
        if b.node.compressed_bytes != b.object.size {
            wrong.push(format!(
                "it says {} compressed bytes and an object of {}",
                b.node.compressed_bytes, b.object.size
            ));
        }
        // Its file list is what a restore will trust: plain relative paths, each
        // in a keyspace it names, once, with counts that add up.
        if b.node.file_count != b.node.files.len() as u64 {
            wrong.push(format!(
                "it counts {} files and lists {}",
                b.node.file_count,
                b.node.files.len()
            ));
        }
        match b
            .node
            .files
            .iter()
            .try_fold(0u64, |a, f| a.checked_add(f.size))
        {
            Some(sum) if sum == b.node.bytes => {}
            Some(sum) => wrong.push(format!(
                "its files add up to {sum} bytes, it says {}",
                b.node.bytes
            )),
            None => wrong.push("its file sizes overflow".into()),
        }
        let mut seen = std::collections::HashSet::new();
        for f in &b.node.files {
            let parts: Vec<&str> = f.path.split('/').collect();
            let plain = !f.path.is_empty()
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.contains(['\\', '\0']));
            if !plain || !b.node.keyspaces.iter().any(|k| k == parts[0]) {
                wrong.push(format!(
                    "file {:?} is no plain path in a keyspace it backed up",
                    f.path
                ));
                break;
            }
            if !seen.insert(f.path.as_str()) {
                wrong.push(format!("file {:?} is listed twice", f.path));
                break;
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
                wrong.push(format!("the SHA-256 of file {:?} is malformed", f.path));
                break;
            }
        }
        if wrong.is_empty() {
            let key = crate::repo::key(&job.snapshot, &object);
            match self.store.head(&key).await {
                Ok(Some(m)) if m.size == b.object.size => {}
                Ok(Some(m)) => wrong.push(format!(
                    "it wrote {} bytes but the store holds {} in {key}",
                    b.object.size, m.size
                )),
                Ok(None) => wrong.push(format!("the store holds no {key}")),
                Err(e) => return Err(e),
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(self.failed(format!(
                "the agent's answer does not hold: {}",
                wrong.join("; ")
            )))
        }
    }
}

/// Records the upload id the agent reports, so a dead agent's upload is aborted.
struct Watch<'a> {
    inner: &'a dyn Events,
    upload: Mutex<Option<String>>,
}

impl Events for Watch<'_> {
    fn event(&self, e: NodeEvent) {
        if let NodeEvent::UploadId { id } = &e
            && let Ok(mut u) = self.upload.lock()
        {
            *u = Some(id.clone());
        }
        self.inner.event(e);
    }
}

#[async_trait::async_trait]
impl NodeExec for Remote {
    async fn inspect_backup(
        &self,
        node: &Node,
        selection: &Selection,
        capture: &Capture,
    ) -> Result<BackupFacts> {
        let op = Op::InspectBackup {
            node: node.clone(),
            selection: selection.clone(),
            capture: capture.clone(),
        };
        let v = self.call(op, None, &CancellationToken::new()).await?;
        serde_json::from_value(v)
            .map_err(|e| self.failed(format!("the agent's answer cannot be read: {e}")))
    }

    async fn fs_until(&self, op: FsOp, cancel: &CancellationToken) -> Result<serde_json::Value> {
        self.call(Op::Fs { fs: op }, None, cancel).await
    }

    async fn stage(
        &self,
        job: &StageJob,
        events: Arc<dyn Events>,
        cancel: &CancellationToken,
    ) -> Result<StageOutput> {
        let v = self
            .call(Op::Stage { job: job.clone() }, Some(&*events), cancel)
            .await?;
        let out: StageOutput = serde_json::from_value(v)
            .map_err(|e| self.failed(format!("the agent's answer cannot be read: {e}")))?;
        // What is recorded names this node, this staging dir and this run, or
        // nothing is.
        if out.node != job.node || out.staging != job.staging || out.token != job.token {
            return Err(self.failed(
                "the agent's answer does not hold: it staged another node, dir or run".into(),
            ));
        }
        Ok(out)
    }

    async fn check_staged(&self, job: &CheckStagedJob) -> Result<Option<String>> {
        let v = self
            .call(
                Op::CheckStaged { job: job.clone() },
                None,
                &CancellationToken::new(),
            )
            .await?;
        serde_json::from_value(v)
            .map_err(|e| self.failed(format!("the agent's answer cannot be read: {e}")))
    }

    async fn hash_object(&self, key: &str, cancel: &CancellationToken) -> Result<String> {
        let v = self
            .call(
                Op::HashObject {
                    key: key.to_string(),
                },
                None,
                cancel,
            )
            .await?;
        serde_json::from_value(v)
            .map_err(|e| self.failed(format!("the agent's answer cannot be read: {e}")))
    }

    async fn backup(
        &self,
        job: &BackupJob,
        events: Arc<dyn Events>,
        cancel: &CancellationToken,
    ) -> Result<Backed> {
        let watch = Watch {
            inner: &*events,
            upload: Mutex::new(None),
        };
        let op = Op::Backup { job: job.clone() };
        let result = self.call(op, Some(&watch), cancel).await;
        let open = watch.upload.lock().ok().and_then(|u| u.clone());
        match result {
            Ok(v) => {
                let backed: Backed = serde_json::from_value(v)
                    .map_err(|e| self.failed(format!("the agent's answer cannot be read: {e}")))?;
                self.check_backed(job, &backed).await?;
                Ok(backed)
            }
            Err(e) => {
                // An agent that died (or was cut off) cannot abort its own upload.
                if let Some(id) = open
                    && matches!(e, Error::Remote { .. } | Error::Cancelled)
                {
                    let key = crate::repo::key(
                        &job.snapshot,
                        &crate::repo::node_object(job.node.index, job.compression),
                    );
                    if let Err(a) = self.store.abort_multipart(&key, &id).await {
                        tracing::debug!(key, "abort after the agent ended: {a}");
                    }
                }
                Err(e)
            }
        }
    }
}
