//! [`ApiError`]: the one error type of the HTTP face. It answers
//! `application/problem+json` (RFC 9457) with the status of DESIGN.md, logs
//! internal details and never sends them. [`shape_bare_error`] gives the
//! same form to the errors actix-web answers by itself (a WebSocket route
//! without an upgrade, a CORS preflight it refuses...).

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::{StatusCode, header};
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Error;

/// A problem document (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Problem {
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
pub(crate) enum ApiError {
    /// 400: a malformed header, query or body.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token or an unknown one.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// 403: a browser page of an origin that may not use the gateway, or a
    /// host name an anonymous gateway does not answer. (A service a token
    /// may not call is a 404, as one that does not exist.)
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such service or call (or another caller's call).
    #[error("{0}")]
    NotFound(String),
    /// 408: the declared body did not arrive within `gateway.body_timeout_ms`;
    /// the connection is closed.
    #[error("the request body did not arrive within {0} ms")]
    RequestTimeout(u64),
    /// 409: the request conflicts with the state of the call (cancelling a
    /// call that has ended; retrying a callback that is not dead).
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is over the limit.
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(usize),
    /// 422: an invalid callback URL, or an idempotency key reused with
    /// another request.
    #[error("{0}")]
    Unprocessable(String),
    /// 429: the caller is over one of its own limits (`gateway.limits`,
    /// [`super::limits`]); retry after `retry_after` seconds.
    #[error("{detail}")]
    TooManyRequests {
        /// Which limit.
        detail: String,
        /// Seconds after which to retry.
        retry_after: u64,
    },
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
    pub(crate) fn unavailable(detail: impl Into<String>) -> Self {
        ApiError::Unavailable {
            detail: detail.into(),
            retry_after: 1,
        }
    }

    /// 500, logging `what` (never sent to the client).
    pub(crate) fn internal(what: impl std::fmt::Display) -> Self {
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
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let ApiError::Internal(what) = self {
            tracing::error!(error = %what, "internal error answering a request");
        }
        let mut res = problem_builder(status);
        match self {
            ApiError::Unauthorized => {
                res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::Unavailable { retry_after, .. }
            | ApiError::TooManyRequests { retry_after, .. } => {
                res.insert_header((header::RETRY_AFTER, retry_after.to_string()));
            }
            // The rest of the body may still be on its way: the connection
            // cannot serve another request, and its slot is freed.
            ApiError::RequestTimeout(_) => {
                res.force_close();
            }
            _ => {}
        }
        res.body(problem_json(status, &self.to_string()))
    }
}

/// A response of `status` with the problem+json content type.
fn problem_builder(status: StatusCode) -> actix_web::HttpResponseBuilder {
    let mut res = HttpResponse::build(status);
    res.insert_header((header::CONTENT_TYPE, crate::amqp::wire::CONTENT_PROBLEM));
    res
}

/// The problem document of `status` with `detail`.
fn problem_json(status: StatusCode, detail: &str) -> Vec<u8> {
    let body = Problem {
        kind: "about:blank".into(),
        title: status.canonical_reason().unwrap_or("Error").into(),
        status: status.as_u16(),
        detail: Some(detail.to_owned()),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The default handler of the gateway's `ErrorHandlers`: an error answer
/// (4xx, 5xx) that is not problem+json yet becomes one, with its status and
/// headers (`Allow`, `Vary`...). Left as they are: problem documents, and a
/// service's own reply passed through (it carries `Call-Id`: its status,
/// content type and body are the service's). A client error's detail is
/// actix-web's message (it says what was wrong with the request); a server
/// error's is only its status, the cause is logged.
pub(super) fn shape_bare_error<B: MessageBody>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let shaped = res.headers().get(header::CONTENT_TYPE).is_some_and(|ct| {
        ct.as_bytes()
            .starts_with(crate::amqp::wire::CONTENT_PROBLEM.as_bytes())
    });
    if shaped || res.headers().contains_key("call-id") {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let reason = status.canonical_reason().unwrap_or("Error");
    let detail = match res.response().error() {
        Some(e) if status.is_client_error() => e.to_string(),
        Some(e) => {
            tracing::error!(error = %e, %status, "error answering a request");
            reason.to_owned()
        }
        None => reason.to_owned(),
    };
    let detail = if detail.trim().is_empty() {
        reason.to_owned()
    } else {
        detail
    };
    let (req, old) = res.into_parts();
    let mut new = problem_builder(status);
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.append_header((name.clone(), value.clone()));
        }
    }
    let new = new.body(problem_json(status, &detail));
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, new).map_into_right_body(),
    ))
}
