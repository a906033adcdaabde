//! The HTTP gateway: every interaction style of DESIGN.md over the same AMQP
//! mechanism. Each call it brokers is an RPC over the instance's durable
//! reply queue, so a reply can outlive the HTTP request that made the call.
//!
//! # Layout
//! - `calls`: start a call, poll and long-poll it, cancel it, fetch its
//!   result.
//! - the life of calls that outlive their request (store, lifecycle events,
//!   long-poll wake-ups, callbacks, deadlines, dead letters) is not HTTP:
//!   it is `crate::calls::tracker`, which this gateway drives.
//! - `auth`, `headers`, `error`: who calls, what the headers say,
//!   problem+json answers (also for the errors actix-web answers itself).
//! - `limits`: what one caller may use (rate, pending calls, streams,
//!   long-polls), so that no caller starves the others.
//! - `browser`: what a web page may make a browser do (`Origin` checks,
//!   CORS, DNS rebinding); `connections`: what one connection may hold
//!   (idle time, unread bodies).
//! - `event_routes`, [`streams`]: the event stream routes and the SSE and
//!   WebSocket relays of the event hub.
//! - `ops`, `openapi`: health, readiness, metrics, the API description
//!   (and the AMQP side's, [`crate::asyncapi`]); the metrics-only server of
//!   `serve` without the gateway.

mod auth;
mod browser;
mod calls;
mod connections;
mod error;
mod event_routes;
mod headers;
mod limits;
pub(crate) mod metrics;
pub(crate) mod openapi;
pub(crate) mod ops;
pub mod streams;

pub use ops::MetricsServer;

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::middleware::{Condition, ErrorHandlers, from_fn};
use actix_web::{App, HttpServer, web};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::Broker;
use crate::callbacks::{Dispatcher, DispatcherHandle};
use crate::calls::CallStore;
use crate::calls::metrics::CallMetrics;
use crate::calls::tracker::Tracker;
use crate::error::{Error, Result};
use crate::events::hub::{EventHub, HubEvent, HubHandle, HubOptions};
use crate::rpc::{RpcClient, RpcOptions};
use crate::settings::{GatewaySettings, ReplyMode, ServiceSettings, Settings};
use auth::Auth;
use error::ApiError;

/// What every request handler shares.
pub(crate) struct AppState {
    /// `[gateway]` settings.
    pub gateway: GatewaySettings,
    /// The services the gateway exposes.
    pub services: BTreeMap<String, ServiceSettings>,
    /// Token checks.
    pub auth: Auth,
    /// Each caller's limits and what it holds.
    pub limits: limits::Limits,
    /// The RPC client (durable reply queue).
    pub rpc: RpcClient,
    /// The call lifecycle and the store.
    pub tracker: Tracker,
    /// The broker, for readiness.
    pub broker: Broker,
    /// Whether a callback secret is set.
    pub callbacks_enabled: bool,
    /// Whether callbacks may target private addresses.
    pub allow_private_callbacks: bool,
    /// Relays the events exchange to SSE and WebSocket sessions.
    pub hub: HubHandle,
    /// Callback delivery, when a secret is set.
    pub callbacks: Option<DispatcherHandle>,
    /// Call counters per service, made once so counting takes no lock.
    pub(crate) call_metrics: HashMap<String, Arc<CallMetrics>>,
    /// The AsyncAPI document of these settings, made once at start.
    pub asyncapi: bytes::Bytes,
}

impl AppState {
    /// The caller of `req` (401 without a known token), once it is within
    /// its rate (else 429): every route that serves a caller starts here.
    pub(crate) fn caller(&self, req: &actix_web::HttpRequest) -> Result<auth::Caller, ApiError> {
        let caller = self.auth.caller(req)?;
        self.limits.request(&caller)?;
        Ok(caller)
    }
}

/// A running gateway.
pub struct RunningGateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The shared state of its routes.
    pub(crate) state: web::Data<AppState>,
    handle: ServerHandle,
    cancel: CancellationToken,
    /// The instance's liveness task ([`crate::calls::adopt`]): awaited on
    /// stop, so that it marks the instance gone before the store closes.
    liveness: tokio::task::JoinHandle<()>,
}

/// What a running gateway is built on, for an application that runs more
/// beside it (and for the tests): its call store, its event hub, its RPC
/// client, and how many calls are followed now.
impl RunningGateway {
    /// The call store the gateway keeps its calls in.
    pub fn store(&self) -> &CallStore {
        self.state.tracker.store()
    }

    /// The event hub relaying the events exchange to its streams.
    pub fn hub(&self) -> &HubHandle {
        &self.state.hub
    }

    /// The RPC client the gateway publishes calls with.
    pub fn rpc(&self) -> &RpcClient {
        &self.state.rpc
    }

    /// Calls followed now for a waiting request (long polls, the call
    /// streams): each holds a watch until its call ends or its request goes.
    pub fn call_watchers(&self) -> usize {
        self.state.tracker.watchers()
    }

    /// Stops accepting, lets requests in flight finish (bounded), stops the
    /// background tasks and closes the reply consumer and the store.
    pub async fn stop(self) {
        // End the streams first: they would hold the graceful stop open.
        self.state.hub.stop().await;
        self.handle.stop(true).await;
        self.cancel.cancel();
        if let Some(cb) = &self.state.callbacks {
            // Deliveries in flight are recorded before the store closes.
            cb.stopped().await;
        }
        self.state.rpc.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.liveness).await;
        self.state.tracker.store().close().await;
    }
}

/// Mounts every route on an actix-web app.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::PathConfig::default().error_handler(|e, _| ApiError::BadRequest(e.to_string()).into()),
    )
    .app_data(
        web::QueryConfig::default()
            .error_handler(|e, _| ApiError::BadRequest(e.to_string()).into()),
    )
    .route(
        "/v1/services/{service}/calls",
        web::post().to(calls::start_call),
    )
    .route("/v1/calls/{id}", web::get().to(calls::get_call))
    .route("/v1/calls/{id}", web::delete().to(calls::cancel_call))
    .route("/v1/calls/{id}/result", web::get().to(calls::get_result))
    .route(
        "/v1/calls/{id}/callback/retry",
        web::post().to(calls::retry_callback),
    )
    .route(
        "/v1/calls/{id}/events",
        web::get().to(event_routes::call_events),
    )
    .route("/v1/events", web::get().to(event_routes::events_sse))
    .route("/v1/events/ws", web::get().to(event_routes::events_ws))
    .route("/healthz", web::get().to(ops::healthz))
    .route("/readyz", web::get().to(ops::readyz))
    .route("/metrics", web::get().to(ops::metrics))
    .route("/openapi.json", web::get().to(ops::openapi))
    .route("/asyncapi.json", web::get().to(ops::asyncapi));
}

/// Starts the gateway on `listener`: opens the store, resumes its pending
/// calls, starts the RPC client, the background tasks and the HTTP server.
pub async fn start(
    settings: &Settings,
    broker: &Broker,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<RunningGateway> {
    let g = settings.gateway.clone();
    // Calls are recorded as this instance's: their replies come to its
    // reply queue, which another gateway drains if this one dies.
    let store = CallStore::open(&g.store_url)
        .await?
        .for_instance(broker.instance_id());
    let callbacks_enabled = !settings.callbacks.secret.is_empty();
    // Deliveries live in the store, so they survive a restart of the gateway.
    let callbacks = callbacks_enabled.then(|| {
        Dispatcher::start(
            store.clone(),
            settings.callbacks.clone(),
            cancel.child_token(),
        )
    });
    let tracker = Tracker::new(store, broker.clone(), callbacks.clone(), &g);
    let mut options = RpcOptions::from(&settings.rpc);
    if options.reply_mode == ReplyMode::Direct {
        warn!(
            "the gateway always uses the durable reply queue, so replies outlive requests and restarts"
        );
    }
    // Its synchronous calls too (not `auto`): a reply on its way when the
    // gateway's connection drops still reaches its HTTP caller.
    options.reply_mode = ReplyMode::Queue;
    options.orphans = Some(tracker.orphan_sink());
    options.progress = Some(tracker.progress_sink());
    let rpc = RpcClient::start(broker, options).await?;
    let pending = tracker.resume().await?;
    tracker.spawn_sweeper(Duration::from_secs(g.retention_s), cancel.child_token());
    // Liveness in the store, and adoption of dead gateways' queues.
    let (_, liveness) = crate::calls::adopt::spawn(tracker.clone(), cancel.child_token());
    let services: Vec<String> = settings.services.keys().cloned().collect();
    tracker
        .start_dead_letter_watch(&services, cancel.child_token())
        .await?;
    // Calls ended by another gateway of the store wake their long-polls
    // here too (`Tracker::end_seen`).
    let ends = tracker.clone();
    let hub = EventHub::start_observed(
        broker,
        HubOptions {
            history: g.event_history,
            history_bytes: g.event_history_bytes,
            max_sessions: g.max_streams,
            session_buffer: g.stream_buffer,
            log: settings.amqp.events_log(),
        },
        Some(Arc::new(move |ev: &HubEvent| {
            ends.end_seen(&ev.ty, ev.subject.as_deref())
        })),
    )
    .await?;
    let metrics = broker.metrics();
    if let Some(cb) = &callbacks {
        metrics.register(cb.stats.clone());
    }
    let call_metrics = settings
        .services
        .keys()
        .map(|s| (s.clone(), metrics.calls().service(s)))
        .collect();
    let state = web::Data::new(AppState {
        gateway: g.clone(),
        services: settings.services.clone(),
        auth: Auth::new(&g.tokens),
        limits: limits::Limits::new(&g, metrics),
        rpc,
        tracker,
        broker: broker.clone(),
        callbacks_enabled,
        allow_private_callbacks: settings.callbacks.allow_private,
        hub,
        callbacks,
        call_metrics,
        asyncapi: serde_json::to_vec(&crate::asyncapi::document(settings))
            .unwrap_or_default()
            .into(),
    });
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        what: "gateway",
        addr: "its listener".into(),
        source,
    })?;
    let data = state.clone();
    let origins = g.allowed_origins.clone();
    let mut server = HttpServer::new(move || {
        // The last `wrap` is the outermost: every request is counted on its
        // connection, and a body left unread ends the connection, whatever
        // answered; errors are shaped after the browser checks, which run
        // before CORS and the routes.
        App::new()
            .app_data(data.clone())
            .configure(routes)
            .default_service(web::to(ops::not_found))
            // No allowed origin: no CORS headers on any answer.
            .wrap(Condition::new(!origins.is_empty(), browser::cors(&origins)))
            .wrap(from_fn(browser::guard))
            .wrap(ErrorHandlers::new().default_handler(error::shape_bare_error))
            .wrap(from_fn(connections::guard))
    })
    // Signals are the process's business (one shutdown path, app::serve).
    .disable_signals()
    // A first request's head must arrive in this time (else 408 and
    // closed); a later one's is bounded by the watchdog of `connections`;
    // a body has `gateway.body_timeout_ms` (calls::read_body).
    .client_request_timeout(Duration::from_millis(g.header_timeout_ms))
    .on_connect(connections::on_connect(Duration::from_millis(
        g.header_timeout_ms,
    )))
    // Requests in flight get the shutdown grace to finish.
    .shutdown_timeout(settings.shutdown.grace_ms.div_ceil(1000));
    if g.workers > 0 {
        server = server.workers(g.workers);
    }
    let server = server
        .listen(listener)
        .map_err(|source| Error::Listen {
            what: "gateway",
            addr: addr.to_string(),
            source,
        })?
        .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    if g.tokens.is_empty() {
        info!(%addr, "gateway listening without tokens: loopback only, every caller is `anonymous`");
    } else {
        info!(%addr, tokens = g.tokens.len(), "gateway listening");
    }
    info!(pending, "calls resumed from the store");
    Ok(RunningGateway {
        addr,
        state,
        handle,
        cancel,
        liveness,
    })
}
