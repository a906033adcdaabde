//! Operational routes: liveness, readiness, metrics, the API description;
//! and the metrics-only server that `serve` runs when the gateway is off.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::header;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::AppState;
use super::error::{ApiError, Problem};
use crate::amqp::Broker;
use crate::error::{Error, Result};

/// How long a reachability probe of the broker is reused by `/readyz` and
/// `/metrics` (`switchboard_broker_up`): however often they are asked, the
/// broker sees at most one channel opened and closed per this time.
pub(crate) const PROBE_REUSE: Duration = Duration::from_secs(1);

/// Liveness and readiness answers.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`.
    pub status: &'static str,
}

/// Liveness: the process answers HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Readiness: the broker answers (a probe at most [`PROBE_REUSE`] old),
/// every consumer of this process consumes (the workers, the reply router,
/// the event hub, the dead-letter watch: read now, every time), and the
/// call store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Broker or store unavailable, or a consumer down (named, with the time it went down); Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn readyz(st: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    broker_ready(&st.broker).await?;
    if !st.tracker.store().ping().await {
        return Err(ApiError::unavailable("the call store is unavailable"));
    }
    Ok(HttpResponse::Ok().json(Health { status: "ok" }))
}

/// The broker answers and no consumer of this process is down; else a 503
/// that names the consumers down and since when.
async fn broker_ready(broker: &Broker) -> Result<(), ApiError> {
    if !broker.was_reachable_within(PROBE_REUSE).await {
        return Err(ApiError::unavailable("the message broker is unavailable"));
    }
    let down = broker.consumers().down();
    if down.is_empty() {
        return Ok(());
    }
    let detail: Vec<String> = down.iter().map(ToString::to_string).collect();
    Err(ApiError::unavailable(detail.join("; ")))
}

/// Prometheus metrics of this process: its gateway, workers, RPC client,
/// event hub and callbacks ([`crate::metrics`]). OpenMetrics text when the
/// scraper asks for it (Prometheus does), else the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "The metrics (OpenMetrics or Prometheus text format, by `Accept`)", content_type = "text/plain")))]
pub(crate) async fn metrics(req: HttpRequest, st: web::Data<AppState>) -> HttpResponse {
    metrics_of(&req, &st.broker).await
}

/// Probes the broker (for `switchboard_broker_up`) and renders the metrics.
async fn metrics_of(req: &HttpRequest, broker: &Broker) -> HttpResponse {
    broker
        .metrics()
        .broker()
        .set_up(broker.was_reachable_within(PROBE_REUSE).await);
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, content_type) = broker.metrics().render(openmetrics);
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .body(body)
}

/// `GET /metrics` of the metrics-only server.
async fn metrics_only(req: HttpRequest, broker: web::Data<Broker>) -> HttpResponse {
    metrics_of(&req, &broker).await
}

/// `GET /readyz` of the metrics-only server: as the gateway's, without a
/// call store.
async fn readyz_only(broker: web::Data<Broker>) -> Result<HttpResponse, ApiError> {
    broker_ready(&broker).await?;
    Ok(HttpResponse::Ok().json(Health { status: "ok" }))
}

/// A running metrics-only server.
pub struct MetricsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    handle: ServerHandle,
}

impl MetricsServer {
    /// Starts `GET /metrics`, `GET /healthz` and `GET /readyz` on
    /// `listener`, for a process that serves workers without the gateway
    /// (`metrics.bind`).
    pub fn start(broker: &Broker, listener: TcpListener) -> Result<Self> {
        let addr = listener.local_addr().map_err(|source| Error::Listen {
            what: "metrics server",
            addr: "its listener".into(),
            source,
        })?;
        let data = web::Data::new(broker.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/metrics", web::get().to(metrics_only))
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(readyz_only))
                .default_service(web::to(not_found))
        })
        .disable_signals()
        // Scrapes are small: one thread is plenty.
        .workers(1)
        .listen(listener)
        .map_err(|source| Error::Listen {
            what: "metrics server",
            addr: addr.to_string(),
            source,
        })?
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Ok(Self { addr, handle })
    }

    /// Stops the server (scrapes in flight finish).
    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

/// This API's OpenAPI 3 description, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub(crate) async fn openapi() -> HttpResponse {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let body = DOC.get_or_init(|| {
        super::openapi::ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|_| "{}".into())
    });
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body.clone())
}

/// The AsyncAPI 3.0 description of the AMQP side for this gateway's
/// settings ([`crate::asyncapi`]): the contract of workers and callers in
/// other languages.
#[utoipa::path(get, path = "/asyncapi.json", tag = "operations",
    responses((status = 200, description = "The AsyncAPI document of the AMQP side: each service's queues, operations and messages, the replies, the events exchange", content_type = "application/json")))]
pub(crate) async fn asyncapi(st: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(st.asyncapi.clone())
}

/// Any route that does not exist: a problem+json 404.
pub(crate) async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}
