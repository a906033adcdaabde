//! What a service's code sees: a [`Request`], and the [`Reply`] or
//! [`HandlerError`] it answers with. `Request` and `Reply` are the
//! crate's (`crate::message`, which rpc uses too), re-exported here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use crate::message::Reporter;
pub use crate::message::{CallControl, Progress, Reply, Request};

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
        Reply::problem(self.status, &self.title, self.detail.as_deref())
    }
}

/// The future a handler returns.
pub(super) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;

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

/// Steps of the built-in `echo`'s wait: it reports progress after each but
/// the last.
const ECHO_STEPS: u32 = 5;
/// The shortest `delay` of `echo` that reports progress: shorter ones
/// (benchmarks of notifications) are not worth a report.
const ECHO_PROGRESS_FROM: Duration = Duration::from_secs(1);

/// The built-in `echo`: replies with the request's body and content type,
/// after `delay` when it is not zero. While it waits it reports progress in
/// `ECHO_STEPS` steps when `delay` is `ECHO_PROGRESS_FROM` or more (a
/// demo of long-running calls: the `slow` service of
/// `config/default.toml`), and a cancelled call stops at once, unanswered.
pub fn echo(delay: Duration) -> Arc<dyn Handler> {
    Arc::new(move |req: Request| async move {
        if !delay.is_zero() {
            let step = delay / ECHO_STEPS;
            for done in 0..ECHO_STEPS {
                if done > 0 && delay >= ECHO_PROGRESS_FROM {
                    let fraction = f64::from(done) / f64::from(ECHO_STEPS);
                    let note = format!("step {done} of {ECHO_STEPS}");
                    if let Err(e) = req.progress(fraction, note).await {
                        tracing::debug!(error = %e, "progress not reported");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(step) => {}
                    _ = req.cancelled() => {
                        return Err(HandlerError::new(409, "Cancelled")
                            .with_detail("the caller cancelled the call"));
                    }
                }
            }
        }
        Ok(Reply {
            status: 200,
            content_type: req.content_type,
            body: req.payload,
        })
    })
}
