//! The gateway under test of `bench http`, `bench sse` and `bench notify`,
//! and the HTTP client side that drives it.
//!
//! [`Rig`]: [`gateway::start`] in this process on 127.0.0.1:0, under the
//! run's prefix and an instance id of its own, with its workers and an
//! SQLite call store in a directory of the run's own (removed at the end);
//! no tokens (anonymous callers on loopback), as a local `serve` would be.
//!
//! The clients run on a thread of their own ([`on_client_thread`]), with
//! keep-alive connections ([`http_client`]), so that they do not take the
//! thread of the gateway's actors (RPC client, event hub) as a second
//! process would not; their CPU shows as `bench-client` in `cpu_by_thread`.

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use switchboard::amqp::Broker;
use switchboard::gateway::{self, RunningGateway};
use switchboard::settings::{ServiceSettings, Settings};
use switchboard::worker::{Handler, Worker, WorkerHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::env::Env;
use crate::error::{BenchError, Result};

/// A service the rig serves with an in-process worker.
pub(crate) struct Served {
    pub name: String,
    pub settings: ServiceSettings,
    pub handler: Arc<dyn Handler>,
}

/// A gateway running in this process, with its workers.
pub(crate) struct Rig {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The settings the gateway runs with.
    pub settings: Settings,
    /// The gateway's broker handle (its instance id names its reply queue).
    pub broker: Broker,
    gateway: RunningGateway,
    workers: Vec<WorkerHandle>,
    /// The store's directory, removed by [`Rig::stop`].
    dir: PathBuf,
}

impl Rig {
    /// Starts the workers of `services` and the gateway; `tweak` adjusts
    /// the gateway's settings first (stream bounds, callbacks...). What it
    /// declares is remembered by `env` for clean-up.
    pub async fn start(
        env: &mut Env,
        services: Vec<Served>,
        tweak: impl FnOnce(&mut Settings),
    ) -> Result<Self> {
        let mut settings = env.settings.clone();
        settings.amqp = env.amqp.clone();
        settings.amqp.instance_id = env.instance("gateway");
        let dir = std::env::temp_dir().join(format!("{}-store", settings.amqp.instance_id));
        std::fs::create_dir_all(&dir).map_err(BenchError::io("store directory"))?;
        settings.gateway.store_url = format!("sqlite://{}/calls.db?mode=rwc", dir.display());
        // Anonymous callers: the gateway faces loopback only.
        settings.gateway.tokens.clear();
        // Every client of a bench is the one anonymous caller: its stream
        // and long-poll limits (gateway.limits) would bound the bench, not
        // the gateway. Its rate (off by default) and pending calls (a
        // store count per POST) stay as configured.
        settings.gateway.limits.max_streams = 0;
        settings.gateway.limits.max_long_polls = 0;
        settings.services = services
            .iter()
            .map(|s| (s.name.clone(), s.settings.clone()))
            .collect();
        tweak(&mut settings);
        let broker = Broker::connect(&settings.amqp).await?;
        env.queues
            .push(broker.names().deadwatch_queue(&settings.amqp.instance_id));
        let mut workers = Vec::new();
        for s in services {
            env.services.push(s.name.clone());
            match Worker::start(&broker, &s.name, &s.settings, s.handler).await {
                Ok(w) => workers.push(w),
                Err(e) => {
                    stop_workers(workers).await;
                    broker.close().await;
                    return Err(e.into());
                }
            }
        }
        let started = async {
            let listener =
                TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("gateway listener"))?;
            let cancel = CancellationToken::new();
            Ok::<_, BenchError>(gateway::start(&settings, &broker, listener, cancel).await?)
        }
        .await;
        let gateway = match started {
            Ok(g) => g,
            Err(e) => {
                stop_workers(workers).await;
                broker.close().await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Self {
            base: format!("http://{}", gateway.addr),
            settings,
            broker,
            gateway,
            workers,
            dir,
        })
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the gateway, then the workers; closes the broker handle and
    /// removes the store.
    pub async fn stop(self) {
        self.gateway.stop().await;
        stop_workers(self.workers).await;
        self.broker.close().await;
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            debug!(dir = %self.dir.display(), error = %e, "store not removed");
        }
    }
}

async fn stop_workers(workers: Vec<WorkerHandle>) {
    for w in workers {
        w.drain(Duration::from_secs(5)).await;
    }
}

/// An HTTP/1.1 client that keeps its connections open: with N requests in
/// flight it holds N connections and reuses them, as a load generator
/// should.
pub(crate) fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(300))
        .build()
        .map_err(BenchError::HttpClient)
}

/// Runs the future `make` builds on a thread of its own (`bench-client`,
/// an actix system of its own, so [`crate::load::drive`] works there) and
/// returns its output.
pub(crate) async fn on_client_thread<T, F, Fut>(make: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            let out = actix_rt::System::new().block_on(async move { make().await });
            let _ = tx.send(out);
        })
        .map_err(BenchError::io("client thread"))?;
    rx.await.map_err(|_| {
        warn!("the bench client thread ended without an answer");
        BenchError::ThreadLost("bench-client")
    })
}

/// A small actix-web server of the bench's own on 127.0.0.1:0 (the `bare`
/// reference, the callback receiver).
pub(crate) struct LocalServer {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    handle: actix_web::dev::ServerHandle,
}

impl LocalServer {
    /// Serves the routes `configure` mounts with `workers` threads (0: one
    /// per core); `what` names it in errors.
    pub fn start<F>(what: &'static str, workers: usize, configure: F) -> Result<Self>
    where
        F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(BenchError::io(what))?;
        let addr = listener.local_addr().map_err(BenchError::io(what))?;
        let mut server =
            HttpServer::new(move || App::new().configure(configure.clone())).disable_signals();
        if workers > 0 {
            server = server.workers(workers);
        }
        let server = server.listen(listener).map_err(BenchError::io(what))?.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Ok(Self {
            base: format!("http://{addr}"),
            handle,
        })
    }

    /// Stops it, letting requests in flight finish.
    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}
