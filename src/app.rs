//! `serve`: runs a worker for every configured service that has a built-in
//! handler, until the shutdown future resolves.

use std::future::Future;
use std::time::Duration;

use tracing::info;

use crate::amqp::Broker;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::gateway;
use crate::settings::{BuiltinHandler, Settings, SettingsError};
use crate::worker::{self, Worker, WorkerHandle};

/// The workers of one process and the connection they consume on.
pub struct RunningWorkers {
    /// One handle per service served.
    pub handles: Vec<WorkerHandle>,
    /// `switchboard/<instance>/worker`, kept open while the workers run.
    pub connection: deadpool_lapin::lapin::Connection,
}

/// Starts the workers of `settings` on `broker`.
pub async fn start_workers(broker: &Broker, settings: &Settings) -> Result<RunningWorkers> {
    let conn = broker.dedicated_connection("worker").await?;
    let mut handles = Vec::new();
    for (name, svc) in &settings.services {
        let Some(builtin) = svc.handler else {
            continue;
        };
        let handler = match builtin {
            BuiltinHandler::Echo => worker::echo(Duration::from_millis(svc.delay_ms)),
        };
        handles.push(Worker::start(broker, &conn, name, svc, handler).await?);
        info!(service = %name, queue = %broker.names().service_queue(name), concurrency = svc.concurrency, "worker started");
    }
    Ok(RunningWorkers {
        handles,
        connection: conn,
    })
}

/// Connects, starts the workers and the gateway (when enabled) and runs
/// until `shutdown` resolves.
pub async fn serve(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    let broker = Broker::connect(&settings.amqp).await?;
    info!(url = %broker.url_redacted(), instance = %broker.instance_id(), prefix = %broker.names().prefix(), "connected");
    let workers = start_workers(&broker, &settings).await?;
    let cancel = CancellationToken::new();
    let gateway = if settings.gateway.enabled {
        let listener = std::net::TcpListener::bind(&settings.gateway.bind).map_err(|e| {
            Error::Settings(SettingsError(format!(
                "gateway.bind: cannot listen on {}: {e}",
                settings.gateway.bind
            )))
        })?;
        Some(gateway::start(&settings, &broker, listener, cancel.clone()).await?)
    } else {
        None
    };
    info!(
        workers = workers.handles.len(),
        gateway = gateway.as_ref().map(|g| g.addr.to_string()),
        "serving; Ctrl-C or SIGTERM stops"
    );
    shutdown.await;
    info!("shutting down");
    if let Some(g) = gateway {
        g.stop().await;
    }
    cancel.cancel();
    let _ = workers.connection.close(200, "shutdown".into()).await;
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
