//! What travels between a caller and a service: the [`Request`] a handler
//! receives and the [`Reply`] it answers with. Shared by the two sides,
//! [`crate::worker`] (which serves requests) and [`crate::rpc`] (which
//! sends them and awaits replies), so that neither depends on the other.

use bytes::Bytes;

use crate::amqp::wire;

/// A request as a handler receives it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The service it was sent to.
    pub service: String,
    /// The caller's payload, untouched.
    pub payload: Bytes,
    /// The payload's content type as the caller set it.
    pub content_type: String,
    /// The call id (`correlation_id`), when the caller set one.
    pub correlation_id: Option<String>,
    /// The idempotency key (`message_id`).
    pub message_id: Option<String>,
    /// W3C trace context of the caller, when sent.
    pub traceparent: Option<String>,
    /// Whether the broker delivered this request before.
    pub redelivered: bool,
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP-style status; 400 and above is an error.
    pub status: u16,
    /// Content type of `body`.
    pub content_type: String,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// A 200 reply.
    pub fn ok(content_type: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            status: 200,
            content_type: content_type.into(),
            body: body.into(),
        }
    }

    /// A 200 JSON reply.
    pub fn json(value: &serde_json::Value) -> Self {
        Self::ok(
            wire::CONTENT_JSON,
            serde_json::to_vec(value).unwrap_or_default(),
        )
    }

    /// Whether the status is an error (400 and above).
    pub fn is_error(&self) -> bool {
        self.status >= 400
    }

    /// The body as text (lossy), for printing.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A problem+json (RFC 9457) reply with `status`, `title` and `detail`.
    pub fn problem(status: u16, title: &str, detail: Option<&str>) -> Self {
        Self {
            status,
            content_type: wire::CONTENT_PROBLEM.into(),
            body: wire::problem_body(status, title, detail).into(),
        }
    }
}
