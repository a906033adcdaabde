//! The RPC client: synchronous request/response emulated over asynchronous
//! messaging, with correlation ids and a reply queue.
//!
//! [`RpcClient::send_with_progress`] also hands the caller the progress
//! reports its call's worker publishes ([`crate::worker::Request::progress`]).
//!
//! [`RpcClient::send`] registers the call in the client's `PendingCalls`
//! (bounded by `rpc.max_pending`; the [`ReplyRouter`] actor routes replies
//! to them), publishes
//! the request with a publisher confirm and returns a [`PendingReply`];
//! awaiting it gives the reply or a timeout at the call's deadline. Replies
//! come back on the instance's durable reply queue or by RabbitMQ direct
//! reply-to: by default (`rpc.reply_mode = "auto"`) a call whose caller
//! waits in memory ([`RpcClient::call`], [`RpcClient::send_waiting`]) by
//! direct reply-to, on a consumer and connection of its own (`rpc-direct`),
//! and every other through the queue.
//!
//! # Layout
//! - `router`: the [`ReplyRouter`] actor: pending calls, deadlines, reply dispatch.
//! - this file: [`RpcClient`], [`Call`], [`PendingReply`].

pub(crate) mod metrics;
mod router;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use deadpool_lapin::lapin::Connection;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub(crate) use router::to_reply;
pub use router::{OrphanSink, PROGRESS_BUFFER, ProgressSink, ReplyRouter, Routed, RpcStats};

use crate::amqp::consumer::{ConsumerStatus, Declare, Keeper};
use crate::amqp::{
    Broker, ConsumerSpec, Outgoing, Supervisor, broker::publish_once_on, topology, wire,
};
use crate::error::{Error, Result, Unreachable};
use crate::message::Progress;
use crate::message::Reply;
use crate::settings::{ReplyMode, RpcSettings};
use router::{Forget, PendingCalls};

/// One call to make.
#[derive(Debug, Clone)]
pub struct Call {
    /// The service to call.
    pub service: String,
    /// The payload, passed through untouched.
    pub payload: Bytes,
    /// Its content type.
    pub content_type: String,
    /// The call id; a new UUID when `None`.
    pub call_id: Option<String>,
    /// Idempotency key sent as `message_id`; the call id when `None`.
    pub message_id: Option<String>,
    /// Deadline; the client's default when `None`.
    pub timeout: Option<Duration>,
    /// W3C trace context to pass on; when `None`, that of the current span
    /// if spans are exported (`[otel]`), else a new trace.
    pub traceparent: Option<String>,
}

impl Call {
    /// A call of `service` with a JSON payload.
    pub fn new(service: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            service: service.into(),
            payload: payload.into(),
            content_type: wire::CONTENT_JSON.into(),
            call_id: None,
            message_id: None,
            timeout: None,
            traceparent: None,
        }
    }

    /// Sets the content type.
    pub fn content_type(mut self, ct: impl Into<String>) -> Self {
        self.content_type = ct.into();
        self
    }

    /// Sets the deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the call id.
    pub fn call_id(mut self, id: impl Into<String>) -> Self {
        self.call_id = Some(id.into());
        self
    }

    /// Sets the idempotency key.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sets the trace context.
    pub fn traceparent(mut self, tp: impl Into<String>) -> Self {
        self.traceparent = Some(tp.into());
        self
    }
}

/// Options of an [`RpcClient`] beyond the settings.
#[derive(Clone)]
pub struct RpcOptions {
    /// Reply queue or direct reply-to.
    pub reply_mode: ReplyMode,
    /// Bound on pending calls.
    pub max_pending: usize,
    /// Deadline of calls that name none.
    pub default_timeout: Duration,
    /// Persistent requests (`safe`, the default) or transient (`fast`).
    pub persistent: bool,
    /// Where replies for unknown calls go (the gateway's store); dropped
    /// and counted when `None`.
    pub orphans: Option<OrphanSink>,
    /// Where progress reports of calls not followed here go (the
    /// gateway's store); dropped and counted when `None`.
    pub progress: Option<ProgressSink>,
}

impl std::fmt::Debug for RpcOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcOptions")
            .field("reply_mode", &self.reply_mode)
            .field("max_pending", &self.max_pending)
            .field("default_timeout", &self.default_timeout)
            .field("persistent", &self.persistent)
            .field("orphans", &self.orphans.is_some())
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl From<&RpcSettings> for RpcOptions {
    fn from(s: &RpcSettings) -> Self {
        Self {
            reply_mode: s.reply_mode,
            max_pending: s.max_pending,
            default_timeout: s.default_timeout(),
            persistent: true,
            orphans: None,
            progress: None,
        }
    }
}

/// The RPC client. Cheap to clone; all clones share one router.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Broker,
    /// Where replies come back: the client's mode (the reply queue, or
    /// direct reply-to).
    main: ReplyPath,
    /// `auto` mode: the direct reply-to path of the calls whose caller
    /// waits in memory (the others come back by `main`, the reply queue).
    waiting: Option<ReplyPath>,
    options: RpcOptions,
    stats: Arc<RpcStats>,
}

/// A reply consumer (a connection of its own), its router and its calls.
struct ReplyPath {
    /// The router actor (a new one if it stopped or panicked).
    router: Keeper<ReplyRouter>,
    /// The reply consumer's status.
    consumer: Arc<ConsumerStatus>,
    /// The `reply_to` of its requests.
    reply_to: String,
    /// Direct reply-to only: requests must be published on the channel that
    /// consumes `amq.rabbitmq.reply-to`, or the broker refuses them. The
    /// router puts the current one here (a new one after a reconnect).
    /// `None` for the reply queue (requests go through the pool).
    direct: Option<router::ChannelSlot>,
    pending: Arc<PendingCalls>,
}

impl ReplyPath {
    /// Starts a reply router of `mode` (queue or direct) on a supervised
    /// consumer of its own named `name`, counting into `stats`, handing
    /// what no caller of its takes to `orphans` and `progress`.
    async fn start(
        broker: &Broker,
        name: &str,
        mode: ReplyMode,
        max_pending: usize,
        stats: &Arc<RpcStats>,
        orphans: Option<OrphanSink>,
        progress: Option<ProgressSink>,
    ) -> Result<Self> {
        let direct = mode == ReplyMode::Direct;
        let supervisor = Supervisor::new(
            broker,
            ConsumerSpec {
                name: name.into(),
                tag: if direct { "direct-replies" } else { "replies" }.into(),
                // Direct reply-to requires no-ack consumption; the queue's
                // bound is on the replies in this process's memory that
                // are not yet acked.
                prefetch: if direct { None } else { Some(4096) },
                // Direct mode publishes its requests on the consuming channel.
                confirm: direct,
            },
            ReplyQueue { mode },
        );
        let link = match supervisor.open().await {
            Ok(link) => link,
            Err(e) => {
                supervisor.status().set_stopped();
                return Err(e);
            }
        };
        let slot = router::ChannelSlot::default();
        if direct {
            // Before the first call, not once the actor has started.
            slot.set(Some(link.shared_channel().clone()));
        }
        let pending = Arc::new(PendingCalls::new(max_pending, stats.clone()));
        let consumer = supervisor.status().clone();
        let router = {
            let (slot, pending, stats) = (slot.clone(), pending.clone(), stats.clone());
            Keeper::start(supervisor, link, move |consumer| {
                ReplyRouter::new(
                    mode,
                    consumer,
                    slot.clone(),
                    pending.clone(),
                    stats.clone(),
                    orphans.clone(),
                    progress.clone(),
                )
                .start()
            })
        };
        Ok(Self {
            router,
            consumer,
            reply_to: if direct {
                wire::DIRECT_REPLY_TO.to_owned()
            } else {
                broker.names().reply_queue(broker.instance_id())
            },
            direct: direct.then_some(slot),
            pending,
        })
    }

    /// Stops its router for good (its consumer and connection).
    async fn close(&self) {
        self.router.stop_restarting();
        let _ = self.router.addr().send(router::Close).await;
    }
}

/// The reply consumer's queue, declared on every (re-)open: the instance's
/// durable reply queue (with `x-expires`, see
/// [`topology::declare_instance_queue`]), or nothing for direct reply-to.
struct ReplyQueue {
    mode: ReplyMode,
}

#[async_trait::async_trait]
impl Declare for ReplyQueue {
    async fn declare(&self, broker: &Broker, conn: &Connection) -> Result<String> {
        match self.mode {
            ReplyMode::Queue | ReplyMode::Auto => {
                let queue = broker.names().reply_queue(broker.instance_id());
                let declared = topology::declare_instance_queue(
                    conn,
                    &queue,
                    broker.instance_queue_expires(),
                    broker.instance_queue_type(),
                )
                .await?;
                crate::amqp::consumer::note_declared(&queue, declared);
                Ok(queue)
            }
            ReplyMode::Direct => Ok(wire::DIRECT_REPLY_TO.to_owned()),
        }
    }
}

impl RpcClient {
    /// Starts the client: the reply consumer on a connection of its own
    /// (`switchboard/<instance>/rpc`) and the router actor, which
    /// re-establishes the consumer when it is lost.
    pub async fn start(broker: &Broker, options: RpcOptions) -> Result<Self> {
        let stats = Arc::new(RpcStats::default());
        // `auto`: the reply queue for calls that may outlive their caller,
        // and direct reply-to for the calls whose caller waits.
        let main_mode = match options.reply_mode {
            ReplyMode::Direct => ReplyMode::Direct,
            ReplyMode::Queue | ReplyMode::Auto => ReplyMode::Queue,
        };
        let main = ReplyPath::start(
            broker,
            "rpc",
            main_mode,
            options.max_pending,
            &stats,
            options.orphans.clone(),
            options.progress.clone(),
        )
        .await?;
        let waiting = if options.reply_mode == ReplyMode::Auto {
            // Waiting callers only: nothing of theirs is ever detached to a sink.
            let started = ReplyPath::start(
                broker,
                "rpc-direct",
                ReplyMode::Direct,
                options.max_pending,
                &stats,
                None,
                None,
            )
            .await;
            match started {
                Ok(path) => Some(path),
                Err(e) => {
                    main.close().await;
                    return Err(e);
                }
            }
        } else {
            None
        };
        broker.metrics().register(metrics::RpcSource(stats.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                broker: broker.clone(),
                main,
                waiting,
                options,
                stats,
            }),
        })
    }

    /// The reply consumer's status (whether it consumes now).
    pub fn consumer(&self) -> &Arc<ConsumerStatus> {
        &self.inner.main.consumer
    }

    /// `auto` mode: the status of the direct reply-to consumer that brings
    /// the replies of waiting callers.
    pub fn waiting_consumer(&self) -> Option<&Arc<ConsumerStatus>> {
        self.inner.waiting.as_ref().map(|w| &w.consumer)
    }

    /// Counters: pending, late, unknown, malformed replies.
    pub fn stats(&self) -> &RpcStats {
        &self.inner.stats
    }

    /// The `reply_to` this client puts on its requests.
    pub fn reply_to(&self) -> &str {
        &self.inner.main.reply_to
    }

    /// Stops consuming replies and closes the client's connection; replies
    /// still on the way stay in the durable reply queue for the next start.
    pub async fn close(&self) {
        self.inner.main.close().await;
        if let Some(w) = &self.inner.waiting {
            w.close().await;
        }
    }

    /// Calls and waits for the reply (or the deadline). The caller waits in
    /// memory, so the request says so ([`wire::HEADER_CALLER_WAITS`]): its
    /// worker replies transient and unconfirmed (docs/RELIABILITY.md, "What
    /// survives what").
    pub async fn call(&self, call: Call) -> Result<Reply> {
        self.send_waiting(call).await?.wait().await
    }

    /// Publishes the call (confirmed) and returns the reply to await. The
    /// reply is persistent and confirmed before its request is acked: the
    /// call may outlive this caller ([`PendingReply::detach`]).
    pub async fn send(&self, call: Call) -> Result<PendingReply> {
        self.publish(call, None, false).await
    }

    /// [`RpcClient::send`] for a caller that waits for the reply in memory
    /// and has no use for it once gone (the gateway's synchronous calls):
    /// the request carries [`wire::HEADER_CALLER_WAITS`], and its worker
    /// replies transient, without awaiting a confirm. Should the broker
    /// restart between the reply and its delivery, the reply is lost and
    /// the call times out.
    pub async fn send_waiting(&self, call: Call) -> Result<PendingReply> {
        self.publish(call, None, true).await
    }

    /// [`RpcClient::send`], and the call's progress reports as they come:
    /// the receiver ends when the call is no longer followed (its reply
    /// came, or its deadline passed), so a caller reads reports until it
    /// ends, then awaits the reply; or selects on both. At most
    /// [`PROGRESS_BUFFER`] reports wait unread; later ones are dropped
    /// until there is room (the reply never is).
    ///
    /// ```no_run
    /// # async fn demo(client: switchboard::rpc::RpcClient) -> switchboard::Result<()> {
    /// use switchboard::rpc::Call;
    /// let (reply, mut progress) = client
    ///     .send_with_progress(Call::new("slow", r#"{"n":1}"#))
    ///     .await?;
    /// while let Some(p) = progress.recv().await {
    ///     println!("{:.0}% {}", p.fraction * 100.0, p.note.unwrap_or_default());
    /// }
    /// let reply = reply.wait().await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_with_progress(
        &self,
        call: Call,
    ) -> Result<(PendingReply, tokio::sync::mpsc::Receiver<Progress>)> {
        let (tx, rx) = tokio::sync::mpsc::channel(PROGRESS_BUFFER);
        let pending = self.publish(call, Some(tx), false).await?;
        Ok((pending, rx))
    }

    async fn publish(
        &self,
        call: Call,
        progress: Option<tokio::sync::mpsc::Sender<Progress>>,
        caller_waits: bool,
    ) -> Result<PendingReply> {
        let inner = &self.inner;
        let call_id = call
            .call_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // These travel as AMQP short strings, on which lapin panics when
        // longer than 255 bytes: refuse them here instead.
        for (what, s) in [
            ("service name", call.service.as_str()),
            ("content type", &call.content_type),
            ("call id", &call_id),
            ("message id", call.message_id.as_deref().unwrap_or_default()),
        ] {
            if s.len() > wire::MAX_SHORT_STRING {
                return Err(Error::TooLong {
                    what,
                    limit: wire::MAX_SHORT_STRING,
                });
            }
        }
        let timeout = call.timeout.unwrap_or(inner.options.default_timeout);
        let deadline = Instant::now() + timeout;
        // Where its reply comes back: in `auto` mode a waiting caller's by
        // direct reply-to, every other by the client's own mode.
        let path = match &inner.waiting {
            Some(w) if caller_waits => w,
            _ => &inner.main,
        };
        let calls = &path.pending;
        let (tx, rx) = oneshot::channel();
        calls.register_with_progress(call_id.clone(), deadline, tx, progress)?;
        let pending = PendingReply {
            call_id,
            rx: Some(rx),
            deadline,
            timeout,
            calls: calls.clone(),
        };
        // None given: the caller's current span when it is exported (the
        // worker's span then joins the caller's trace), else a new trace.
        let traceparent = call.traceparent.clone().unwrap_or_else(|| {
            crate::telemetry::otlp::traceparent_of(&tracing::Span::current())
                .unwrap_or_else(crate::telemetry::new_traceparent)
        });
        let meta = wire::RequestMeta {
            service: &call.service,
            correlation_id: &pending.call_id,
            message_id: call.message_id.as_deref(),
            reply_to: Some(&path.reply_to),
            content_type: &call.content_type,
            timeout: Some(timeout),
            traceparent: Some(&traceparent),
            caller_waits,
        };
        let exchange = inner.broker.names().requests_exchange();
        let msg = Outgoing {
            exchange: &exchange,
            routing_key: &call.service,
            payload: &call.payload,
            properties: wire::request_properties(&meta, inner.options.persistent),
            mandatory: true,
        };
        let published = match &path.direct {
            Some(slot) => match slot.get() {
                Some(ch) => {
                    // Bounded: a wedged reply connection must not hold the
                    // caller (its watchdog replaces it meanwhile).
                    let confirm = inner.broker.confirm_timeout();
                    tokio::time::timeout(confirm, publish_once_on(&ch, msg))
                        .await
                        .map_err(|_| Error::BrokerUnavailable {
                            url: inner.broker.url_redacted(),
                            reason: Unreachable::NoAnswer {
                                what: "publisher confirm",
                                after: confirm,
                            },
                        })
                        .and_then(|r| r)
                }
                None => Err(Error::BrokerUnavailable {
                    url: inner.broker.url_redacted(),
                    reason: Unreachable::ReplyChannelDown,
                }),
            },
            None => inner.broker.publish(msg).await,
        };
        match published {
            Ok(()) => Ok(pending),
            Err(e) => {
                // Never sent (or not known to be): the caller gets the
                // error, not a timeout, and the call is not counted as one.
                pending.unsent();
                Err(e)
            }
        }
    }
}

/// A published call whose reply is awaited. Dropping it unregisters the
/// call, so an abandoned call never leaks an entry.
pub struct PendingReply {
    call_id: String,
    rx: Option<oneshot::Receiver<Routed>>,
    deadline: Instant,
    timeout: Duration,
    calls: Arc<PendingCalls>,
}

impl PendingReply {
    /// The call id (the request's `correlation_id`).
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// When the call's deadline passes.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Waits for the reply until `until` or the call's deadline, whichever
    /// comes first; `None` when `until` came first and the call goes on.
    pub async fn wait_until(&mut self, until: Instant) -> Option<Result<Reply>> {
        self.wait_until_held(until)
            .await
            .map(|r| r.map(Routed::done))
    }

    /// [`PendingReply::wait_until`], the reply not settled yet: the caller
    /// settles it once it holds it for good ([`Routed::done`], or
    /// [`Routed::hand_back`]), so that a process killed in between leaves
    /// it in the reply queue (a synchronous call kept in the store: until
    /// its end is stored and its event published).
    pub async fn wait_until_held(&mut self, until: Instant) -> Option<Result<Routed>> {
        if until >= self.deadline {
            return Some(self.wait_held().await);
        }
        let rx = self.rx.as_mut()?;
        match tokio::time::timeout_at(until, rx).await {
            Ok(Ok(routed)) => {
                self.rx = None;
                Some(Ok(routed))
            }
            Ok(Err(_)) => {
                self.rx = None;
                Some(Err(self.dropped()))
            }
            Err(_) => None,
        }
    }

    /// Why the router let go of this call: its deadline (the sweep), or
    /// its reply channel was lost (direct reply-to after a reconnect).
    fn dropped(&self) -> Error {
        if Instant::now() >= self.deadline {
            Error::Timeout {
                call_id: self.call_id.clone(),
                timeout: self.timeout,
            }
        } else {
            Error::ReplyLost(self.call_id.clone())
        }
    }

    /// Stops waiting here: the reply goes to the client's orphan sink (the
    /// gateway's store) instead, and nothing is held for the call from now
    /// on. A reply that already arrived is returned: the caller must hand it
    /// on itself, then settle it ([`Routed::done`] once stored,
    /// [`Routed::hand_back`] if it could not be): until then it stays
    /// unacked, so a process that dies in between does not lose it.
    #[must_use = "a reply that already arrived is returned, not sent to the sink"]
    pub fn detach(mut self) -> Option<Routed> {
        let mut rx = self.rx.take()?;
        // Closed first, then read: a reply the router sends from now on
        // fails to arrive here and goes to the orphan sink instead, and one
        // sent before is read here. (Reading without closing left a window in
        // which a reply sent after the read was dropped with `rx`.)
        rx.close();
        let arrived = rx.try_recv().ok();
        if arrived.is_none() {
            self.calls.forget(&self.call_id, Forget::Detached);
        }
        arrived
    }

    /// The publish failed: forget the call without counting a timeout.
    fn unsent(mut self) {
        if self.rx.take().is_some() {
            self.calls.forget(&self.call_id, Forget::Unsent);
        }
    }

    /// Waits for the reply until the deadline.
    pub async fn wait(mut self) -> Result<Reply> {
        self.wait_inner().await
    }

    async fn wait_inner(&mut self) -> Result<Reply> {
        self.wait_held().await.map(Routed::done)
    }

    async fn wait_held(&mut self) -> Result<Routed> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(Error::RouterStopped);
        };
        match tokio::time::timeout_at(self.deadline, rx).await {
            Ok(Ok(routed)) => {
                self.rx = None;
                Ok(routed)
            }
            Ok(Err(_)) => {
                self.rx = None;
                Err(self.dropped())
            }
            Err(_) => Err(Error::Timeout {
                call_id: self.call_id.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            self.calls.forget(&self.call_id, Forget::GaveUp);
            // A reply that arrived for a caller that let go is done with.
            rx.close();
            if let Ok(routed) = rx.try_recv() {
                routed.done();
            }
        }
    }
}
