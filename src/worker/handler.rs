//! What a service's code sees: a [`Request`], and the [`Reply`] or
//! [`HandlerError`] it answers with.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

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
}

/// A handler's failure. A `transient` one leaves the request to be
/// delivered again (up to the service's delivery limit, then it is
/// dead-lettered); any other is answered with a problem+json reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {title}")]
pub struct HandlerError {
    /// HTTP-style status of the error reply.
    pub status: u16,
    /// Short summary (problem+json `title`).
    pub title: String,
    /// Explanation for this occurrence (problem+json `detail`).
    pub detail: Option<String>,
    /// Whether to retry by redelivery instead of replying.
    pub transient: bool,
}

impl HandlerError {
    /// An error answered with `status` and `title`.
    pub fn new(status: u16, title: impl Into<String>) -> Self {
        Self {
            status,
            title: title.into(),
            detail: None,
            transient: false,
        }
    }

    /// Adds a detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// A failure worth retrying: the request is delivered again.
    pub fn transient(title: impl Into<String>) -> Self {
        Self {
            status: 503,
            title: title.into(),
            detail: None,
            transient: true,
        }
    }

    /// The problem+json reply for this error.
    pub fn to_reply(&self) -> Reply {
        Reply {
            status: self.status,
            content_type: wire::CONTENT_PROBLEM.into(),
            body: wire::problem_body(self.status, &self.title, self.detail.as_deref()).into(),
        }
    }
}

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;

/// A service's code: an async function from a request to a reply.
/// Any `Fn(Request) -> impl Future<Output = Result<Reply, HandlerError>>`
/// is one.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, request: Request) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
{
    fn handle(&self, request: Request) -> HandlerFuture {
        Box::pin(self(request))
    }
}

/// The built-in `echo`: replies with the request's body and content type,
/// after `delay` when it is not zero.
pub fn echo(delay: Duration) -> Arc<dyn Handler> {
    Arc::new(move |req: Request| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(Reply {
            status: 200,
            content_type: req.content_type,
            body: req.payload,
        })
    })
}
