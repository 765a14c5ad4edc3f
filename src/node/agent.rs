//! `cairn agent`: a node's side of the protocol in [`super::proto`].
//!
//! Started by the coordinator through the node's `exec` prefix, it says hello,
//! reads one request, does it with [`super::Local`] on this host — the store is
//! opened here, so the node's data goes straight between its disk and the store —
//! reports progress and a beat every [`proto::BEAT`], answers once and exits. When
//! its stdin closes (the coordinator was stopped or died, the SSH session broke) its
//! work is cancelled: an upload in flight is aborted, not left behind.

use super::proto::{self, Greeting, Hello, Op, Reply, Request, WireError};
use super::{Events, Local, NodeEvent, NodeExec};
use crate::{Error, Result};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Read one line of at most `max` bytes; `None` at the end of the input.
pub async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(max as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a protocol line is longer than {max} bytes"),
        ));
    }
    Ok(Some(buf))
}

/// Events to the coordinator; byte counts at most ten a second.
struct Sender {
    tx: mpsc::UnboundedSender<Reply>,
    last_bytes: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Events for Sender {
    fn event(&self, e: NodeEvent) {
        if let NodeEvent::Bytes { .. } = e
            && let Ok(mut last) = self.last_bytes.lock()
        {
            let now = std::time::Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_millis(100)) {
                return;
            }
            *last = Some(now);
        }
        let _ = self.tx.send(Reply::Event(e));
    }
}

/// Serve one request on stdin/stdout; returns the process exit code.
pub async fn serve() -> i32 {
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        if let Ok(l) = proto::line(&Greeting::Hello(Hello::ours()))
            && (out.write_all(&l).await.is_err() || out.flush().await.is_err())
        {
            return;
        }
        while let Some(reply) = rx.recv().await {
            let Ok(l) = proto::line(&reply) else { continue };
            if out.write_all(&l).await.is_err() || out.flush().await.is_err() {
                return;
            }
        }
    });
    let code = match run(&tx).await {
        Ok(value) => {
            let _ = tx.send(Reply::Done(value));
            crate::error::exit::OK
        }
        Err(e) => {
            let code = e.exit_code();
            let _ = tx.send(Reply::Failed(WireError::from_error(&e)));
            code
        }
    };
    drop(tx);
    let _ = writer.await;
    code
}

async fn run(tx: &mpsc::UnboundedSender<Reply>) -> Result<serde_json::Value> {
    let mut stdin = BufReader::new(tokio::io::stdin());
    let bad = |what: String| Error::Usage(format!("agent: {what}"));
    let hello = read_line(&mut stdin, 4096)
        .await
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no hello on stdin (it is started by a coordinator)".into()))?;
    let Ok(Greeting::Hello(theirs)) = serde_json::from_slice::<Greeting>(&hello) else {
        return Err(bad("the first line is no hello".into()));
    };
    if theirs.protocol != proto::PROTOCOL {
        return Err(Error::Checks(vec![format!(
            "the coordinator (cairn {}) speaks agent protocol {}, this agent (cairn {}) speaks {}: install the same cairn release on the coordinator and the nodes",
            theirs.version,
            theirs.protocol,
            crate::VERSION,
            proto::PROTOCOL
        )]));
    }
    let line = read_line(&mut stdin, proto::MAX_LINE)
        .await
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no request".into()))?;
    let req: Request =
        serde_json::from_slice(&line).map_err(|e| bad(format!("a request it cannot read: {e}")))?;
    for s in &req.secrets {
        crate::redact::register(s);
    }
    // The coordinator going away (stdin closed) cancels the work.
    let cancel = CancellationToken::new();
    let watch = cancel.clone();
    tokio::spawn(async move {
        let mut rest = stdin;
        let mut sink = [0u8; 512];
        loop {
            match rest.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        watch.cancel();
        tracing::warn!("the coordinator went away: cancelling");
    });
    // A signal (Ctrl-C in a terminal shared with the coordinator, a stopped pod)
    // cancels too: an upload in flight is aborted, not left open.
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("stopped by a signal: cancelling");
        on_signal.cancel();
    });
    let beat = tx.clone();
    let beats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(proto::BEAT).await;
            if beat.send(Reply::Beat).is_err() {
                return;
            }
        }
    });
    let result = async {
        let store = req.store.open().await?;
        let local = Local {
            store: store.clone(),
            disk: Arc::new(crate::checks::RealDisk),
        };
        let events = || {
            Arc::new(Sender {
                tx: tx.clone(),
                last_bytes: std::sync::Mutex::new(None),
            })
        };
        match req.op {
            Op::InspectBackup {
                node,
                selection,
                capture,
            } => {
                let mut facts = local.inspect_backup(&node, &selection, &capture).await?;
                if let Err(e) = store.check().await {
                    facts.problems.push(format!(
                        "node {}: cannot reach the store from the node: {e}",
                        node.index
                    ));
                }
                to_value(&facts)
            }
            Op::Backup { job } => to_value(&local.backup(&job, events(), &cancel).await?),
            Op::Fs {
                fs: super::restore::FsOp::Probe(req),
            } => {
                let node = req.node;
                let v = local.fs(super::restore::FsOp::Probe(req)).await?;
                let mut probe: super::restore::RestoreProbe =
                    serde_json::from_value(v).map_err(|e| Error::State(e.to_string()))?;
                if let Err(e) = store.check().await {
                    probe.problems.push(format!(
                        "node {node}: cannot reach the store from the node: {e}"
                    ));
                }
                to_value(&probe)
            }
            Op::Fs { fs } => local.fs_until(fs, &cancel).await,
            Op::Stage { job } => to_value(&local.stage(&job, events(), &cancel).await?),
            Op::CheckStaged { job } => to_value(&local.check_staged(&job).await?),
            Op::HashObject { key } => to_value(&local.hash_object(&key, &cancel).await?),
        }
    }
    .await;
    beats.abort();
    result
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::State(e.to_string()))
}
