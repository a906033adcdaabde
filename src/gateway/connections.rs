//! What one client connection may hold, whatever the handlers do.
//!
//! - **A connection with no request in progress is closed after
//!   `gateway.header_timeout_ms`.** actix-web times only the head of a
//!   connection's first request; on a kept-alive connection, a next request
//!   whose head arrives a byte now and then would hold it for ever. A
//!   watchdog per connection ([`on_connect`]) shuts the socket once no
//!   request has been in progress for that long (a request is in progress
//!   from its complete head until its answer's body is sent: long-polls and
//!   event streams are not idle). An upgraded connection (WebSocket) is left
//!   to its handler.
//! - **A request body nobody reads ends its connection.** When a handler
//!   answers without reading the whole body (a 401, 403, 413, 408, a route
//!   that takes none), actix-web would keep the connection and read the rest
//!   of a chunked body to throw it away, for as long as the client keeps
//!   sending. [`guard`] keeps the body stream alive in the answer's body
//!   until the answer is sent, so actix-web closes the connection instead.
//!   A body read to its end, or none, changes nothing.

use std::any::Any;
use std::cell::RefCell;
use std::net::Shutdown;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::HttpMessage;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Extensions, Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::{StatusCode, header};
use actix_web::middleware::Next;
use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::oneshot;

/// What the requests of one connection share with its watchdog.
struct ConnState {
    /// When the connection was accepted: the base of `idle_since_ms`.
    accepted: Instant,
    /// Requests in progress (more than one only when pipelined).
    in_flight: AtomicU32,
    /// When the last request ended, ms after `accepted`.
    idle_since_ms: AtomicU64,
    /// Upgraded (WebSocket): no longer HTTP, the watchdog stops.
    upgraded: AtomicBool,
}

impl ConnState {
    fn idle_for(&self) -> Duration {
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        self.accepted.elapsed().saturating_sub(since)
    }
}

/// The connection data [`on_connect`] leaves for [`guard`]. Dropped with
/// the connection, which ends its watchdog at once.
struct ConnWatch {
    state: Arc<ConnState>,
    _closed: oneshot::Sender<()>,
}

/// The `HttpServer::on_connect` callback: starts a connection's watchdog,
/// which shuts its socket after `limit` with no request in progress.
pub(super) fn on_connect(
    limit: Duration,
) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync + 'static {
    move |io, extensions| {
        let Some(stream) = io.downcast_ref::<actix_web::rt::net::TcpStream>() else {
            return;
        };
        let Ok(socket) = second_handle(stream) else {
            return;
        };
        let state = Arc::new(ConnState {
            accepted: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
        });
        let (closed_tx, closed_rx) = oneshot::channel();
        let weak = Arc::downgrade(&state);
        extensions.insert(ConnWatch {
            state,
            _closed: closed_tx,
        });
        actix_web::rt::spawn(watch(weak, closed_rx, socket, limit));
    }
}

/// A second handle on the socket, to shut it down from the watchdog (a
/// shutdown ends the connection for every handle).
#[cfg(unix)]
fn second_handle(stream: &actix_web::rt::net::TcpStream) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::AsFd;
    Ok(stream.as_fd().try_clone_to_owned()?.into())
}

#[cfg(windows)]
fn second_handle(stream: &actix_web::rt::net::TcpStream) -> std::io::Result<std::net::TcpStream> {
    use std::os::windows::io::AsSocket;
    Ok(stream.as_socket().try_clone_to_owned()?.into())
}

/// The watchdog of one connection: wakes when the connection could first
/// have been idle for `limit`, and shuts it if it was.
async fn watch(
    state: Weak<ConnState>,
    mut closed: oneshot::Receiver<()>,
    socket: std::net::TcpStream,
    limit: Duration,
) {
    let mut wait = limit;
    loop {
        tokio::select! {
            // The connection ended: drop the second handle now.
            _ = &mut closed => return,
            () = tokio::time::sleep(wait) => {}
        }
        let Some(state) = state.upgrade() else {
            return;
        };
        if state.upgraded.load(Ordering::Relaxed) {
            return;
        }
        if state.in_flight.load(Ordering::Relaxed) > 0 {
            wait = limit;
            continue;
        }
        let idle = state.idle_for();
        if idle >= limit {
            tracing::debug!(
                ?idle,
                "closing a connection idle past gateway.header_timeout_ms"
            );
            let _ = socket.shutdown(Shutdown::Both);
            return;
        }
        wait = limit - idle;
    }
}

/// A request in progress on its connection, from its head until its
/// answer's body is dropped (sent, or the connection gone).
struct InProgress(Arc<ConnState>);

impl InProgress {
    fn start(state: &Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let now = self.0.accepted.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(now, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `from_fn` middleware of the module doc: counts the request in
/// progress until its answer is sent, and keeps an unread body alive until
/// then.
pub(super) async fn guard(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<Holding>, actix_web::Error> {
    let in_progress = req
        .conn_data::<ConnWatch>()
        .map(|w| InProgress::start(&w.state));
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req.headers().contains_key(header::CONTENT_LENGTH);
    // An upgraded connection's stream is the handler's to keep.
    let request_body = (has_body && !upgrade).then(|| {
        let shared = Shared(Rc::new(RefCell::new(req.take_payload())));
        req.set_payload(Payload::Stream {
            payload: Box::pin(shared.clone()),
        });
        shared
    });
    let res = next.call(req).await?;
    if res.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(p) = &in_progress
    {
        p.0.upgraded.store(true, Ordering::Relaxed);
    }
    Ok(res.map_body(|_, body| Holding {
        body: BoxBody::new(body),
        _request_body: request_body,
        _in_progress: in_progress,
    }))
}

/// The request's body stream, shared by the handler (which reads it) and
/// the answer (which keeps it alive).
#[derive(Clone)]
struct Shared(Rc<RefCell<Payload>>);

impl Stream for Shared {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_next(cx)
    }
}

/// An answer's body, with what must live until it is sent: the request's
/// body stream and the request's place in its connection's count.
pub(super) struct Holding {
    body: BoxBody,
    _request_body: Option<Shared>,
    _in_progress: Option<InProgress>,
}

impl MessageBody for Holding {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}
