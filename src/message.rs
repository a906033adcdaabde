//! What travels between a caller and a service: the [`Request`] a handler
//! receives and the [`Reply`] it answers with. Shared by the two sides,
//! [`crate::worker`] (which serves requests) and [`crate::rpc`] (which
//! sends them and awaits replies), so that neither depends on the other.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::amqp::wire;
use crate::error::{Error, Result};

/// A progress report of a call: what a handler tells its caller while it
/// runs ([`Request::progress`]), and what a caller receives
/// ([`crate::rpc::RpcClient::send_with_progress`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The call id (`correlation_id`).
    pub call_id: String,
    /// The fraction of the work done, from 0 to 1.
    pub fraction: f64,
    /// What the handler is doing, when it said.
    pub note: Option<String>,
}

/// How a running handler reaches its caller besides the reply: progress
/// reports, and the caller's cancellation. The worker fills it in; the
/// default (a request made by hand, in a handler's unit test) reports to
/// nobody and is never cancelled.
#[derive(Clone, Default)]
pub struct CallControl {
    /// Where progress goes; `None`: nobody reads it.
    reporter: Option<Arc<dyn Reporter>>,
    /// Cancelled when the call's caller cancels it.
    cancel: CancellationToken,
}

impl std::fmt::Debug for CallControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallControl")
            .field("reports_progress", &self.reporter.is_some())
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

/// Sends a progress report to the caller (the worker publishes it on the
/// call's `reply_to`).
pub(crate) trait Reporter: Send + Sync + 'static {
    /// Publishes `fraction` and `note`, confirmed.
    fn report(
        &self,
        fraction: f64,
        note: &str,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;
}

impl CallControl {
    /// A control reporting through `reporter` (none: nobody reads progress)
    /// and cancelled with `cancel`.
    pub(crate) fn new(reporter: Option<Arc<dyn Reporter>>, cancel: CancellationToken) -> Self {
        Self { reporter, cancel }
    }
}

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
    /// Progress reports and cancellation ([`Request::progress`],
    /// [`Request::cancelled`]).
    pub control: CallControl,
}

impl Request {
    /// Tells the caller how far the work is: `fraction` from 0 to 1, and a
    /// `note` (empty: none; at most [`wire::MAX_PROGRESS_NOTE`] bytes are
    /// kept). Published on the call's `reply_to` with the header
    /// `x-sb-progress`, confirmed, before this returns: a report is never
    /// overtaken by the reply that follows it. A no-op when the caller
    /// does not read progress (no `reply_to`, or a plain AMQP client that
    /// did not say `x-sb-accepts-progress`). A report never ends the call.
    pub async fn progress(&self, fraction: f64, note: impl AsRef<str>) -> Result<()> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::ProgressOutOfRange { fraction });
        }
        match &self.control.reporter {
            Some(r) => r.report(fraction, note.as_ref()).await,
            None => Ok(()),
        }
    }

    /// Resolves when the caller cancels the call (`DELETE /v1/calls/{id}`):
    /// the handler should stop; its reply, if any, is not sent. Pending
    /// for ever when nobody cancels.
    pub async fn cancelled(&self) {
        self.control.cancel.cancelled().await
    }

    /// Whether the caller has cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.control.cancel.is_cancelled()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn progress_outside_zero_to_one_is_refused_as_such() {
        let req = Request {
            service: "echo".into(),
            payload: Bytes::new(),
            content_type: wire::CONTENT_JSON.into(),
            correlation_id: None,
            message_id: None,
            traceparent: None,
            redelivered: false,
            control: CallControl::default(),
        };
        for bad in [-0.1, 1.5, f64::NAN] {
            let e = req.progress(bad, "").await.expect_err("out of range");
            assert!(matches!(e, Error::ProgressOutOfRange { .. }), "{e:?}");
            assert!(!e.is_recoverable());
        }
        req.progress(0.5, "half")
            .await
            .expect("in range, nobody reads");
    }
}
