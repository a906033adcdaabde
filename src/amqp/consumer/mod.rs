//! Supervised consumers: the one way switchboard consumes a queue (public:
//! an application consumes queues of its own the same way). Every
//! long-lived consumer (each service's worker, the RPC reply router, the
//! event hub, the gateway's dead-letter watch, event subscriptions) is a
//! [`Supervisor`] that opens [`Link`]s.
//!
//! A link is one consumer on a connection of its own
//! (`switchboard/<instance>/<name>`): its topology declared first (every
//! open: the broker may have lost it), then the channel's prefetch (manual
//! acks) or no acks (direct reply-to), then `basic.consume`. Its
//! [`Deliveries`] stream yields each delivery as lapin hands it over (no
//! task, lock or channel hop of ours per delivery) and ends with one
//! [`Event::Lost`] saying why it stopped:
//! - the consumer stream erred or ended (connection or channel closed, the
//!   consumer cancelled by the broker because its queue was deleted);
//! - its watchdog found the connection closed, or a round trip to the broker
//!   on the link's channel (a passive declare of its queue, every
//!   `amqp.consumer_check_ms`) failed or got no answer within the same time:
//!   a connection whose I/O thread died still says "connected" and its
//!   stream never ends, and only a round trip tells.
//!
//! Whoever holds the link then drops it ([`Link::lost`]: the connection is
//! closed in the background, so deliveries of its channel can never be acked
//! on a new one) and asks the supervisor for a new one
//! ([`Supervisor::reopen`]: 100 ms, doubling up to 5 s, each attempt bounded).
//!
//! Liveness: a link holds its consumer's [`ConsumerStatus`] up; whatever
//! drops it (lost, stopped, or the task or actor holding it panicked or
//! stopped) marks it down, with the time and the reason, unless it was
//! stopped on purpose. `/readyz` and the metrics read the statuses.
//!
//! # Layout
//! - this file: [`Supervisor`], [`ConsumerSpec`], [`Declare`], [`Link`],
//!   [`Deliveries`], [`Event`], [`Lost`]; [`Supervisor::quarantine`] for
//!   poison messages.
//! - `status`: [`ConsumerStatus`] and [`Consumers`], for readiness and metrics.
//! - `pull`: [`Consuming`], the consumer of a tokio task (dead-letter
//!   watch, subscriptions): `next()` reconnects by itself.
//! - `actor`: [`ActorConsumer`] and [`Keeper`], the consumer of an actix
//!   actor (worker, reply router, event hub), and the keeper that starts a
//!   new actor when one stops or panics.

mod actor;
pub(crate) mod metrics;
mod pull;
mod status;

pub use actor::{ActorConsumer, Consumes, Keeper};
pub use pull::Consuming;
pub use status::{ConsumerStatus, Consumers, Down};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool_lapin::lapin::{
    self, BasicProperties, Channel, Connection,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
};
use futures_util::Stream;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{Broker, InFlight, Outgoing, topology, wire};
use crate::error::{Error, Result};

/// The longest one attempt to (re-)establish a consumer may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause between two attempts to re-establish a consumer.
pub const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);
/// How often a link's watchdog looks at its connection's status (a local
/// read); the round trip to the broker is every `amqp.consumer_check_ms`.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What a supervised consumer is.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Its connection's role (`switchboard/<instance>/<name>`), its name in
    /// readiness answers and its `consumer` metrics label: `worker/<service>`,
    /// `rpc`, `hub`, `deadwatch`, `subscriber`. Bounded: a role or a
    /// configured service.
    pub name: String,
    /// What its consumer tag says after the instance
    /// (`switchboard/<instance>/<tag>/<uuid>`, DESIGN.md).
    pub tag: String,
    /// `Some(n)`: manual acks, at most `n` deliveries unacked at once (the
    /// bound on what a consumer holds in memory); `None`: no acks (direct
    /// reply-to requires it).
    pub prefetch: Option<u16>,
    /// Puts the channel in confirm mode: the worker publishes its replies
    /// on the channel its requests came on, the direct-mode RPC client its
    /// requests on the channel that consumes their replies.
    pub confirm: bool,
}

/// Declares what a consumer needs, on every (re-)open, on channels of its
/// own on the link's connection (a 406 or 404 closes the channel it happens
/// on), and returns the queue to consume (a server-named one changes with
/// each connection).
#[async_trait::async_trait]
pub trait Declare: Send + Sync + 'static {
    /// Declares and returns the queue's name.
    async fn declare(&self, broker: &Broker, conn: &Connection) -> Result<String>;

    /// The arguments of `basic.consume` on this open (a stream consumer's
    /// `x-stream-offset`, which moves on as it reads); none by default.
    fn consume_arguments(&self) -> FieldTable {
        FieldTable::default()
    }
}

/// Opens links for one consumer and keeps its status. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Broker,
    spec: ConsumerSpec,
    declare: Box<dyn Declare>,
    status: Arc<ConsumerStatus>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("spec", &self.inner.spec)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A consumer of `broker`, registered with its [`Consumers`] (down,
    /// "starting", until its first link opens).
    pub fn new(broker: &Broker, spec: ConsumerSpec, declare: impl Declare) -> Self {
        let status = broker.consumers().register(&spec.name);
        Self {
            inner: Arc::new(Inner {
                broker: broker.clone(),
                spec,
                declare: Box::new(declare),
                status,
            }),
        }
    }

    /// Its status.
    pub fn status(&self) -> &Arc<ConsumerStatus> {
        &self.inner.status
    }

    /// Its name ([`ConsumerSpec::name`]).
    pub fn name(&self) -> &str {
        &self.inner.spec.name
    }

    /// The broker it consumes from.
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// One attempt to open a link: connection, declarations, channel,
    /// prefetch, consumer, watchdog. The status is up once it returns.
    pub async fn open(&self) -> Result<Link> {
        let broker = &self.inner.broker;
        let spec = &self.inner.spec;
        let conn = broker.dedicated_connection(&spec.name).await?;
        let queue = self.inner.declare.declare(broker, &conn).await?;
        let channel = conn.create_channel().await?;
        if spec.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        if let Some(prefetch) = spec.prefetch {
            channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await?;
        }
        let tag = wire::consumer_tag(broker.instance_id(), &spec.tag);
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions {
                    no_local: false,
                    no_ack: spec.prefetch.is_none(),
                    // Several processes may consume one service queue, and a
                    // consumer coming back must not be refused by its own
                    // stale one.
                    exclusive: false,
                    nowait: false,
                },
                self.inner.declare.consume_arguments(),
            )
            .await?;
        let (alarm, alarmed) = oneshot::channel();
        let watchdog = tokio::spawn(watch(
            conn.status().clone(),
            channel.clone(),
            queue.clone(),
            broker.consumer_check(),
            alarm,
        ));
        self.inner.status.set_up(&queue);
        Ok(Link {
            conn: Some(conn),
            channel: Arc::new(channel),
            queue,
            tag,
            deliveries: Some(Deliveries {
                consumer,
                alarm: alarmed,
                ended: false,
            }),
            watchdog: watchdog.abort_handle(),
            status: self.inner.status.clone(),
            settled: false,
        })
    }

    /// Opens a link, trying again until it succeeds: 100 ms, then twice as
    /// long each time up to [`MAX_RECONNECT_PAUSE`]; each attempt bounded by
    /// [`OPEN_TIMEOUT`] (a broker that accepts the connection but never
    /// answers must not stall the recovery).
    pub async fn reopen(&self) -> Link {
        let mut pause = Duration::from_millis(100);
        loop {
            let attempt = tokio::time::timeout(OPEN_TIMEOUT, self.open()).await;
            match attempt.unwrap_or_else(|_| {
                Err(Error::BrokerUnavailable {
                    url: self.inner.broker.url_redacted(),
                    reason: crate::error::Unreachable::NoAnswer {
                        what: "answer",
                        after: OPEN_TIMEOUT,
                    },
                })
            }) {
                Ok(link) => {
                    info!(consumer = %self.name(), queue = %link.queue, "consumer re-established");
                    return link;
                }
                Err(e) => {
                    self.inner.status.set_down("not re-established yet");
                    warn!(consumer = %self.name(), error = %e, retry_in = ?pause, "consumer not re-established yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RECONNECT_PAUSE);
                }
            }
        }
    }

    /// Settles a message that this consumer cannot decode or handle, so that
    /// it never comes back to it: a copy (body and properties, plus headers
    /// naming the queue, the reason and this instance) is published,
    /// confirmed, to `<prefix>.poison` ([`wire::Names::poison_queue`],
    /// declared on first use), then the original is acked; counted
    /// (`switchboard_consumer_poison_total`) and logged once with its queue
    /// and message id. If the copy cannot be published, the original is
    /// handed back to be tried again: nothing is dropped.
    pub async fn quarantine(&self, inflight: InFlight, reason: &str) {
        let broker = &self.inner.broker;
        let d = inflight.delivery();
        let queue = self.inner.status.queue();
        let props = poison_properties(&d.properties, &queue, reason, broker.instance_id());
        let poison = broker.names().poison_queue();
        let msg = || Outgoing {
            exchange: "",
            routing_key: &poison,
            payload: &d.data,
            properties: props.clone(),
            // Unroutable means "not declared yet": declare it and try again.
            mandatory: true,
        };
        let mut published = broker.publish(msg()).await;
        if let Err(Error::NoRoute { .. }) = published {
            published = match declare_poison(broker).await {
                Ok(()) => broker.publish(msg()).await,
                Err(e) => Err(e),
            };
        }
        let message_id = d.properties.message_id().as_ref().map(|m| m.to_string());
        let correlation_id = d
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string());
        match published {
            Ok(()) => {
                self.inner.status.count_poison();
                warn!(consumer = %self.name(), %queue, ?message_id, ?correlation_id, reason, to = %poison, "poison message moved out of the queue");
                settle(inflight.ack().await);
            }
            Err(e) => {
                warn!(consumer = %self.name(), %queue, ?message_id, error = %e, "poison message could not be moved; handed back");
                settle(inflight.hand_back().await);
            }
        }
    }
}

/// Declares `<prefix>.poison` on a pooled channel.
async fn declare_poison(broker: &Broker) -> Result<()> {
    let ch = broker.channel().await?;
    let declared = topology::declare_poison(&ch, broker.names()).await;
    super::close_channel(&ch, "declared").await;
    declared.map(|_| ())
}

/// The properties of a poison message's copy: the original's, but
/// persistent, without `expiration` (a copy kept for operators must not
/// expire on its way there) and without `user_id` (RabbitMQ refuses a
/// publish whose `user_id` is not the publisher's), with headers saying
/// where it came from and why it is here.
fn poison_properties(
    original: &BasicProperties,
    queue: &str,
    reason: &str,
    instance: &str,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let mut put = |name: &str, value: &str| {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    };
    put(wire::HEADER_POISON_QUEUE, queue);
    put(wire::HEADER_POISON_REASON, reason);
    put(wire::HEADER_POISON_INSTANCE, instance);
    let mut props = BasicProperties::default()
        .with_delivery_mode(wire::PERSISTENT)
        .with_headers(headers);
    let o = original;
    if let Some(v) = o.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = o.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = o.priority() {
        props = props.with_priority(*v);
    }
    if let Some(v) = o.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = o.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = o.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = o.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = o.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = o.app_id() {
        props = props.with_app_id(v.clone());
    }
    props
}

/// Says, once per queue and process, that a per-instance queue exists with
/// other arguments than the settings ask for and is used as it is
/// ([`topology::Declared::AsFound`]).
pub(crate) fn note_declared(queue: &str, declared: topology::Declared) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if declared == topology::Declared::AsAsked {
        return;
    }
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if warned.iter().any(|q| q == queue) || warned.len() >= 64 {
        return;
    }
    warned.push(queue.to_owned());
    warn!(
        %queue,
        "queue exists with other arguments than amqp.instance_queue_expires_s and amqp.instance_queue_type ask for (declared by an earlier version, or with other values): used as it is, so it keeps its type and expires as declared then (or never). To apply the settings, delete it while this instance is stopped and the queue is empty (rabbitmqctl delete_queue <name> --if-empty), or give the instance a new amqp.instance_id (docs/RELIABILITY.md, Upgrading)"
    );
}

/// Logs a settlement that failed: the channel is gone, and the broker
/// redelivers the message by itself.
pub(crate) fn settle(result: Result<()>) {
    if let Err(e) = result {
        warn!(error = %e, "could not settle a delivery");
    }
}

/// One consumer on a connection of its own. Dropped (or [`Link::lost`]),
/// its connection is closed in the background and its status goes down;
/// [`Link::stop`] closes it on purpose.
pub struct Link {
    /// Taken out by `Drop` to close it in the background.
    conn: Option<Connection>,
    /// Shared (an `Arc`): handed to each delivery for its ack, where a
    /// `Channel` clone costs a reference count per field.
    channel: Arc<Channel>,
    queue: String,
    tag: String,
    /// Until the holder takes them.
    deliveries: Option<Deliveries>,
    watchdog: tokio::task::AbortHandle,
    status: Arc<ConsumerStatus>,
    /// Whether the status was already set (lost or stopped).
    settled: bool,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("consumer", &self.status.name())
            .field("queue", &self.queue)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// The consuming channel (in confirm mode when the spec asks for it).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The consuming channel, shared: what a delivery keeps to be acked on
    /// ([`InFlight::on`]).
    pub fn shared_channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The deliveries, once: the holder polls them (an actor adds them as a
    /// stream).
    pub fn take_deliveries(&mut self) -> Option<Deliveries> {
        self.deliveries.take()
    }

    /// Asks the broker for no more deliveries (`basic.cancel`); those
    /// already sent still arrive, then the stream ends.
    pub async fn cancel(&self) {
        let cancelled = self.channel.basic_cancel(
            self.tag.as_str().into(),
            BasicCancelOptions { nowait: false },
        );
        let _ = tokio::time::timeout(super::CLOSE_TIMEOUT, cancelled).await;
    }

    /// The link failed (`why`, a short phrase readiness shows): the status
    /// goes down and the connection is closed in the background.
    pub fn lost(mut self, why: &str) {
        self.status.set_down(why);
        self.settled = true;
    }

    /// Stopped on purpose: the status says so (readiness no longer counts
    /// it) and the connection is closed cleanly (bounded); deliveries not
    /// acked by then go back to the queue.
    pub async fn stop(mut self, why: &str) {
        self.status.set_stopped();
        self.settled = true;
        self.watchdog.abort();
        if let Some(conn) = self.conn.take() {
            super::close_connection(&conn, why).await;
        }
    }

    /// Marks the status stopped without closing yet (the close follows when
    /// the link is dropped or [`Link::stop`]ped): a worker that drains is
    /// not "down".
    pub fn mark_stopped(&mut self) {
        self.status.set_stopped();
        self.settled = true;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.watchdog.abort();
        if !self.settled {
            // Dropped without a word: whatever held it is gone.
            let why = if std::thread::panicking() {
                "the task or actor holding it panicked"
            } else {
                "the task or actor holding it stopped"
            };
            self.status.set_down(why);
        }
        let Some(conn) = self.conn.take() else {
            return;
        };
        if conn.status().connected()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { super::close_connection(&conn, "replaced").await });
        }
    }
}

/// What a link's deliveries say.
// Not boxed: nearly every event is a delivery, and a box would cost an
// allocation per delivery to save space on the one `Lost` of each link.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    /// A message (to settle with [`InFlight`], unless consumed without acks).
    Delivery(Delivery),
    /// The link stopped delivering: the last event of its stream.
    Lost(Lost),
}

/// Why a link stopped delivering.
#[derive(Debug)]
pub enum Lost {
    /// The consumer stream erred (connection or channel closed).
    Failed(lapin::Error),
    /// The consumer ended: cancelled by the broker (its queue was deleted)
    /// or by us.
    Cancelled,
    /// The watchdog found the connection or channel closed.
    Closed,
    /// The watchdog's round trip failed (e.g. 404: the queue is gone).
    ProbeFailed(lapin::Error),
    /// The watchdog's round trip got no answer in time: the connection is
    /// wedged (its I/O thread died, or the network holds it).
    Wedged(Duration),
}

impl Lost {
    /// A short phrase for readiness answers (details go to the log).
    pub fn reason(&self) -> &'static str {
        match self {
            Lost::Failed(_) => "its connection or channel failed",
            Lost::Cancelled => "its consumer was cancelled (queue deleted?)",
            Lost::Closed => "its connection closed",
            Lost::ProbeFailed(_) => "the broker refused its check (queue deleted?)",
            Lost::Wedged(_) => "its connection stopped answering",
        }
    }
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Failed(e) => write!(f, "consumer error: {e}"),
            Lost::Cancelled => f.write_str("consumer cancelled"),
            Lost::Closed => f.write_str("connection or channel closed"),
            Lost::ProbeFailed(e) => write!(f, "check refused: {e}"),
            Lost::Wedged(t) => write!(f, "no answer to a check within {t:?}"),
        }
    }
}

/// The deliveries of one link, ending with one [`Event::Lost`]. Polls
/// lapin's consumer directly; the watchdog's alarm is looked at only when no
/// delivery is ready, so a delivery costs nothing more than lapin's own.
pub struct Deliveries {
    consumer: lapin::Consumer,
    alarm: oneshot::Receiver<Lost>,
    ended: bool,
}

impl fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliveries")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Stream for Deliveries {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let lost = match Pin::new(&mut self.consumer).poll_next(cx) {
            Poll::Ready(Some(Ok(d))) => return Poll::Ready(Some(Event::Delivery(d))),
            Poll::Ready(Some(Err(e))) => Lost::Failed(e),
            Poll::Ready(None) => Lost::Cancelled,
            Poll::Pending => match Pin::new(&mut self.alarm).poll(cx) {
                Poll::Ready(Ok(lost)) => lost,
                // The watchdog is gone (it never is before the link): as if
                // it had found the connection closed.
                Poll::Ready(Err(_)) => Lost::Closed,
                Poll::Pending => return Poll::Pending,
            },
        };
        self.ended = true;
        Poll::Ready(Some(Event::Lost(lost)))
    }
}

/// A link's watchdog: every [`STATUS_EVERY`] it looks at the connection's
/// and channel's status, every `check` it makes a round trip (a passive
/// declare of the consumed queue, which works for direct reply-to's
/// pseudo-queue too) bounded by `check`. The first failure raises `alarm`.
async fn watch(
    conn: lapin::ConnectionStatus,
    channel: Channel,
    queue: String,
    check: Duration,
    alarm: oneshot::Sender<Lost>,
) {
    let every = check.min(STATUS_EVERY);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = tokio::time::Instant::now();
    tick.tick().await;
    let lost = loop {
        tick.tick().await;
        if alarm.is_closed() {
            return;
        }
        if !conn.connected() || !channel.status().connected() {
            break Lost::Closed;
        }
        if last_check.elapsed() < check {
            continue;
        }
        last_check = tokio::time::Instant::now();
        let probe = channel.queue_declare(
            queue.as_str().into(),
            topology::passive(),
            FieldTable::default(),
        );
        match tokio::time::timeout(check, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Lost::ProbeFailed(e),
            Err(_) => break Lost::Wedged(check),
        }
    };
    let _ = alarm.send(lost);
}
