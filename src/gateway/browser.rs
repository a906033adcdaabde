//! What a web page may make a browser do to the gateway.
//!
//! A browser sends requests for any page it shows, with whatever the page
//! asks for, to any address, loopback included; only what the page can
//! *read* back is limited (CORS). So:
//! - [`guard`] refuses, with a 403, a WebSocket upgrade or a state-changing
//!   request (any method but `GET` and `HEAD`, CORS preflights included)
//!   that carries an `Origin` not in `gateway.allowed_origins`. Requests
//!   without `Origin` are not from a page (servers, curl) and pass.
//! - [`cors`] answers CORS for the allowed origins only (preflights, and
//!   the headers that let their pages read the answers).
//! - [`guard`] also makes an anonymous gateway (no tokens, loopback only)
//!   answer only requests addressed to a loopback name: a page whose own
//!   host name is rebound to 127.0.0.1 (DNS rebinding) makes same-origin
//!   `GET`s without `Origin`, but they carry its host name.

use actix_cors::Cors;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, header};
use actix_web::middleware::Next;
use actix_web::{ResponseError, web};

use super::AppState;
use super::error::ApiError;

/// How long a browser may cache a preflight's answer, s.
const PREFLIGHT_MAX_AGE_S: usize = 600;

/// The request headers a page may send: those the gateway honours.
const ALLOWED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "prefer",
    "idempotency-key",
    "callback-url",
    "traceparent",
    "last-event-id",
];

/// The answer headers a page may read besides the CORS-safelisted ones.
const EXPOSED_HEADERS: &[&str] = &[
    "location",
    "retry-after",
    "call-id",
    "preference-applied",
    "www-authenticate",
];

/// CORS for `origins` (`gateway.allowed_origins`, validated as a browser
/// writes them): `GET`, `POST` and `DELETE` (cancel) with the headers the
/// gateway honours, no credentials (bearer tokens are sent explicitly,
/// never by the browser on its own). Another origin gets no CORS headers, so its page cannot read
/// an answer; [`guard`] has already refused what it could change.
pub(super) fn cors(origins: &[String]) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods([Method::GET, Method::POST, Method::DELETE])
        .allowed_headers(ALLOWED_HEADERS.iter().copied())
        .expose_headers(EXPOSED_HEADERS.iter().copied())
        .max_age(PREFLIGHT_MAX_AGE_S);
    for origin in origins {
        cors = cors.allowed_origin(origin);
    }
    cors
}

/// The `from_fn` middleware of the module doc: refuses with a 403
/// problem+json what a page of another origin may not do, and, on an
/// anonymous gateway, requests for a host name that is not loopback.
pub(super) async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static>>, actix_web::Error> {
    if let Some(st) = req.app_data::<web::Data<AppState>>()
        && let Err(refused) = check(&req, &st.gateway.allowed_origins, st.auth.is_anonymous())
    {
        let res = refused.error_response();
        return Ok(req.into_response(res).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// The checks of [`guard`].
fn check(req: &ServiceRequest, allowed: &[String], anonymous: bool) -> Result<(), ApiError> {
    if anonymous && !host_is_loopback(req) {
        return Err(ApiError::Forbidden(
            "a gateway without tokens answers requests for localhost or a loopback address only (Host): set gateway.tokens to serve other names".into(),
        ));
    }
    let mut origins = req.headers().get_all(header::ORIGIN);
    let Some(origin) = origins.next() else {
        return Ok(());
    };
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD);
    let upgrade = req.headers().contains_key(header::UPGRADE);
    if !(changes_state || upgrade) {
        return Ok(());
    }
    let one = origins.next().is_none();
    if one && allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) {
        return Ok(());
    }
    Err(ApiError::Forbidden(
        "this Origin is not in gateway.allowed_origins: a browser page of it may not start calls or open WebSockets here".into(),
    ))
}

/// Whether the request is addressed to `localhost` or a loopback IP (the
/// `Host` header; the request target's authority without one). A request
/// naming no host at all is no browser's, and passes.
fn host_is_loopback(req: &ServiceRequest) -> bool {
    let host = match req.headers().get(header::HOST) {
        Some(h) => match h.to_str() {
            Ok(h) => h.to_owned(),
            Err(_) => return false,
        },
        None => match req.uri().authority() {
            Some(a) => a.as_str().to_owned(),
            None => return true,
        },
    };
    is_loopback_host(&host)
}

/// `localhost` or a loopback IP literal, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(is_port) => {
                v6
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// 1 to 5 digits.
fn is_port(s: &str) -> bool {
    (1..=5).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_localhost_and_loopback_literals() {
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.",
            "localhost.evil.example",
            "app.localhost",
            "127.0.0.1.nip.io:8080",
            "10.0.0.1:8080",
            "[::2]:80",
            "[::1]x",
            "[::1]:",
            "localhost:80x",
            "localhost:",
            "::1",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
