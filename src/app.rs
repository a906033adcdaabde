//! `serve`: declares the topology of every configured service, runs a worker
//! for each one that has a built-in handler, the gateway when enabled (else a
//! metrics-only endpoint), until the shutdown future resolves. `declare`:
//! the declarations alone.

use std::future::Future;
use std::time::Duration;

use tracing::{info, warn};

use crate::amqp::{Broker, topology};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::gateway;
use crate::gateway::ops::MetricsServer;
use crate::settings::{BuiltinHandler, Settings};
use crate::worker::{self, Worker, WorkerHandle};

/// Starts a worker for every configured service with a built-in handler.
/// Each consumes on a connection of its own and comes back by itself after
/// the connection is lost.
pub(crate) async fn start_workers(
    broker: &Broker,
    settings: &Settings,
) -> Result<Vec<WorkerHandle>> {
    let mut handles = Vec::new();
    for (name, svc) in &settings.services {
        let Some(builtin) = svc.handler else {
            continue;
        };
        let handler = match builtin {
            BuiltinHandler::Echo => worker::echo(Duration::from_millis(svc.delay_ms)),
        };
        handles.push(Worker::start(broker, name, svc, handler).await?);
        info!(service = %name, queue = %broker.names().service_queue(name), concurrency = svc.concurrency, "worker started");
    }
    Ok(handles)
}

/// Declares the shared exchanges and the queues of every configured
/// service, handler or not, so that calls of a service served elsewhere
/// are routed from the start. Idempotent; a queue that exists with other
/// arguments is [`crate::Error::Topology`], naming it and the argument.
pub async fn declare_services(broker: &Broker, settings: &Settings) -> Result<()> {
    topology::declare_services(broker, &settings.services).await?;
    declare_events_log(broker, settings).await?;
    for (name, svc) in &settings.services {
        let served_by = match svc.handler {
            Some(BuiltinHandler::Echo) => "echo handler",
            None => "served elsewhere",
        };
        info!(service = %name, queue = %broker.names().service_queue(name), served_by, "declared");
    }
    Ok(())
}

/// The events log (`<prefix>.events.log`), shared by every instance: declared
/// with the shared exchanges, so that events are kept from the start even
/// before a gateway runs.
async fn declare_events_log(broker: &Broker, settings: &Settings) -> Result<()> {
    crate::events::declare_log(broker, &settings.amqp.events_log()).await?;
    Ok(())
}

/// `switchboard declare`: connects, declares as [`declare_services`] does,
/// and closes.
pub async fn declare(settings: &Settings) -> Result<()> {
    let broker = Broker::connect(&settings.amqp).await?;
    let mut declared = topology::declare_services(&broker, &settings.services).await;
    if declared.is_ok() {
        declared = declare_events_log(&broker, settings).await;
    }
    broker.close().await;
    declared
}

/// Connects, declares every service's topology, starts the workers and the
/// gateway (when enabled) and runs until `shutdown` resolves.
pub async fn serve(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    let broker = Broker::connect(&settings.amqp).await?;
    info!(url = %broker.url_redacted(), instance = %broker.instance_id(), prefix = %broker.names().prefix(), "connected");
    declare_services(&broker, &settings).await?;
    let workers = start_workers(&broker, &settings).await?;
    let cancel = CancellationToken::new();
    let gateway = if settings.gateway.enabled {
        let listener = std::net::TcpListener::bind(&settings.gateway.bind).map_err(|source| {
            Error::Listen {
                what: "gateway.bind",
                addr: settings.gateway.bind.clone(),
                source,
            }
        })?;
        Some(gateway::start(&settings, &broker, listener, cancel.clone()).await?)
    } else {
        None
    };
    // Without the gateway, the workers' metrics get an endpoint of their own.
    let metrics = if gateway.is_none() && !settings.metrics.bind.is_empty() {
        let listener = std::net::TcpListener::bind(&settings.metrics.bind).map_err(|source| {
            Error::Listen {
                what: "metrics.bind",
                addr: settings.metrics.bind.clone(),
                source,
            }
        })?;
        Some(MetricsServer::start(&broker, listener)?)
    } else {
        None
    };
    info!(
        workers = workers.len(),
        gateway = gateway.as_ref().map(|g| g.addr.to_string()),
        metrics = metrics.as_ref().map(|m| m.addr.to_string()),
        "serving; Ctrl-C or SIGTERM stops"
    );
    shutdown.await;
    let grace = Duration::from_millis(settings.shutdown.grace_ms);
    info!(
        ?grace,
        "shutting down: no new requests; in-flight work finishes (a second signal exits at once)"
    );
    actix::spawn(async {
        shutdown_signal().await;
        warn!("second signal: exiting at once; unfinished requests are redelivered");
        std::process::exit(130);
    });
    let stop_gateway = async {
        if let Some(g) = gateway {
            g.stop().await;
        }
    };
    let drain_workers = futures_util::future::join_all(workers.iter().map(|w| w.drain(grace)));
    tokio::join!(stop_gateway, drain_workers);
    if let Some(m) = metrics {
        m.stop().await;
    }
    cancel.cancel();
    broker.close().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM: the one shutdown signal of the process.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
