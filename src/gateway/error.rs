//! [`ApiError`]: the one error type of the HTTP face. It answers
//! `application/problem+json` (RFC 9457) with the status of DESIGN.md, logs
//! internal details and never sends them.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Error;

/// A problem document (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type; `about:blank` for plain HTTP statuses.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What can go wrong answering an HTTP request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: a malformed header, query or body.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token or an unknown one.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// 403: the token may not call this service.
    #[error("this token may not call service {0:?}")]
    Forbidden(String),
    /// 404: no such service or call (or another caller's call).
    #[error("{0}")]
    NotFound(String),
    /// 413: the body is over the limit.
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(usize),
    /// 422: an invalid callback URL, or an idempotency key reused with
    /// another request.
    #[error("{0}")]
    Unprocessable(String),
    /// 503: the broker is unavailable or a bound is reached; retry later.
    #[error("{detail}")]
    Unavailable {
        /// What is unavailable.
        detail: String,
        /// Seconds after which to retry.
        retry_after: u64,
    },
    /// 500: something failed inside; the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// 503 with a retry hint.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        ApiError::Unavailable {
            detail: detail.into(),
            retry_after: 1,
        }
    }

    /// 500, logging `what` (never sent to the client).
    pub fn internal(what: impl std::fmt::Display) -> Self {
        ApiError::Internal(what.to_string())
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Overloaded { .. } => {
                ApiError::unavailable("too many calls are pending; retry later")
            }
            Error::NoRoute { .. } => {
                ApiError::unavailable("the service has no queue on the broker yet; retry later")
            }
            // A TLS failure once running (a broker certificate changed) is
            // the broker being out of reach, for a caller.
            Error::BrokerUnavailable { .. }
            | Error::Tls { .. }
            | Error::Amqp(_)
            | Error::Nacked => {
                tracing::warn!(error = %e, "broker unavailable");
                ApiError::unavailable("the message broker is unavailable; retry later")
            }
            Error::Store(_) => {
                tracing::error!(error = %e, "call store failed");
                ApiError::unavailable("the call store is unavailable; retry later")
            }
            other => ApiError::internal(other),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let ApiError::Internal(what) = self {
            tracing::error!(error = %what, "internal error answering a request");
        }
        let body = Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: Some(self.to_string()),
        };
        let mut res = HttpResponse::build(status);
        res.insert_header((header::CONTENT_TYPE, crate::amqp::wire::CONTENT_PROBLEM));
        match self {
            ApiError::Unauthorized => {
                res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::Unavailable { retry_after, .. } => {
                res.insert_header((header::RETRY_AFTER, retry_after.to_string()));
            }
            _ => {}
        }
        res.body(serde_json::to_vec(&body).unwrap_or_default())
    }
}
