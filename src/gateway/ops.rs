//! Operational routes: liveness, readiness, the API description.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::AppState;
use super::error::{ApiError, Problem};

/// Liveness and readiness answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
}

/// Liveness: the process answers HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Readiness: the broker and the call store answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Broker or store unavailable; Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(st: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if !st.broker.is_reachable().await {
        return Err(ApiError::unavailable("the message broker is unavailable"));
    }
    if !st.tracker.store().ping().await {
        return Err(ApiError::unavailable("the call store is unavailable"));
    }
    Ok(HttpResponse::Ok().json(Health { status: "ok" }))
}

/// This API's OpenAPI 3 description, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn openapi() -> HttpResponse {
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

/// Any route that does not exist: a problem+json 404.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}
