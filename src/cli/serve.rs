//! `cairn serve`: the service behind an HTTP API, until Ctrl-C or SIGTERM.

use super::{Globals, ServeArgs, usage};
use crate::error::exit;
use crate::service::http::{ServeOptions, serve};
use crate::service::{Service, ServiceConfig};
use crate::{Error, Result};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a stopping server waits for its runs to record their end.
const DRAIN: Duration = Duration::from_secs(60);

pub async fn run(g: &Globals, args: ServeArgs) -> Result<i32> {
    let listen: SocketAddr = args.listen.parse().map_err(|e| {
        usage(format!(
            "--listen {:?}: {e} (give ADDRESS:PORT, e.g. 127.0.0.1:8080)",
            args.listen
        ))
    })?;
    let token = match &g.token_file {
        None => None,
        Some(p) => {
            let t =
                crate::plan::params::read_file_value("--token-file", p).map_err(Error::Usage)?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                return Err(usage(
                    "--token-file: the token must be at least 16 characters",
                ));
            }
            crate::redact::register(&t);
            Some(t)
        }
    };
    let opts = ServeOptions {
        listen,
        token,
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
    };
    opts.check()?;
    if let Some(c) = &args.cluster {
        // A bad description is named now, not at the first request.
        crate::cluster::Cluster::load(c)?;
    }
    let svc = Service::new(ServiceConfig {
        home: g.home.clone(),
        plans_dir: g.plans_dir.clone(),
        config: g.config(args.cluster.as_deref())?,
        config_given: g.config.is_some(),
        cluster: args.cluster.clone(),
        stores: args.stores.clone(),
    })?;
    super::cancel_on_signals_saying(
        svc.stop_runs.clone(),
        "cairn serve: stopping; runs in progress are stopped and can be resumed",
    );
    // Runs first: each records its end and tells its event streams, and clients
    // following it have a moment to read that; then the server stops.
    let s = svc.clone();
    tokio::spawn(async move {
        s.stop_runs.cancelled().await;
        s.drain(DRAIN).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.shutdown.cancel();
    });
    let json = g.json;
    serve(svc.clone(), opts, |addr, tls| {
        let url = format!("{}://{addr}", if tls { "https" } else { "http" });
        if json {
            super::output::print_json(&serde_json::json!({"listening": url}));
        } else {
            crate::out!("cairn serve: listening on {url}");
        }
    })
    .await?;
    svc.drain(DRAIN).await;
    Ok(exit::OK)
}
