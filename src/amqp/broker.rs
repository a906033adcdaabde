//! [`Broker`]: the one handle to RabbitMQ that every part holds.
//!
//! It owns the pool of publishing connections (deadpool, named
//! `switchboard/<instance>/publish`), a small set of confirm-mode channels
//! shared round-robin by every publisher (confirms pipeline on each channel,
//! so concurrent publishers never wait for each other's confirms), and opens
//! dedicated connections for consumers (`switchboard/<instance>/<role>`), so
//! that the pool never recycles a connection that carries consumers. Both
//! open through one [`Connector`] (TLS for `amqps://`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{PoolConfig, PoolError};
use deadpool_lapin::lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::sync::Mutex;

use super::connector::{Connector, Pool, PoolManager};
use super::consumer::Consumers;
use super::topology;
use super::wire::{self, Names};
use crate::error::{Error, Result, Unreachable};
use crate::metrics::Metrics;
use crate::settings::{AmqpSettings, QueueType};

/// A message to publish. `mandatory` makes an unroutable message an error
/// ([`Error::NoRoute`]) instead of a silent drop.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Exchange; `""` is the default exchange.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body, untouched.
    pub payload: &'a [u8],
    /// Properties (see [`wire`]).
    pub properties: BasicProperties,
    /// Whether an unroutable message is an error.
    pub mandatory: bool,
}

/// The handle to the broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    /// Publishing connections.
    pool: Pool,
    /// How every connection is opened (plain, or TLS for `amqps://`).
    connector: Arc<Connector>,
    /// Where the broker is, for connections and error messages.
    url: String,
    /// This process's name on the broker.
    instance: String,
    /// Names under the configured prefix.
    names: Names,
    /// Handshake timeout: a broker that does not answer is an error, not a hang.
    connect_timeout: Duration,
    /// How long a publish waits for its confirm before it is sent again.
    confirm_timeout: Duration,
    /// Confirm-mode publishing channels, re-opened when closed.
    channels: Vec<PublishSlot>,
    /// Round-robin cursor over `channels`.
    next: AtomicUsize,
    /// The process's metrics: every part holds the broker, so they find it here.
    metrics: Arc<Metrics>,
    /// Every supervised consumer on this broker, for readiness and metrics.
    consumers: Arc<Consumers>,
    /// `amqp.consumer_check_ms`: the period (and timeout) of each consumer's
    /// round trip to the broker.
    consumer_check: Duration,
    /// `amqp.instance_queue_expires_s`: `x-expires` of the per-instance
    /// queues; `None`: never.
    instance_queue_expires: Option<Duration>,
    /// `amqp.instance_queue_type`: classic or quorum per-instance queues.
    instance_queue_type: QueueType,
    /// The last reachability probe (when, and whether the broker answered),
    /// reused for a while so that readiness checks and scrapes do not make
    /// the broker open a channel each; locked across a probe, so that
    /// requests arriving meanwhile wait for its answer instead of probing.
    last_probe: tokio::sync::Mutex<Option<(std::time::Instant, bool)>>,
    /// Parts shared by everything on this handle, one per type, held
    /// weakly: a part lives while someone uses it ([`Broker::shared_part`]).
    parts: Mutex<SharedParts>,
}

/// See [`Broker::shared_part`].
type SharedParts =
    std::collections::HashMap<std::any::TypeId, Box<dyn std::any::Any + Send + Sync>>;

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &redact(&self.inner.url))
            .field("instance", &self.inner.instance)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// The part of type `T` that everything on this handle shares (the
    /// workers' watch of cancelled calls: one subscription per process, not
    /// per worker), made by `make` when nobody holds one now. Kept weakly:
    /// dropped by its last user, it is made again by the next.
    pub async fn shared_part<T, F, Fut>(&self, make: F) -> Result<Arc<T>>
    where
        T: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let key = std::any::TypeId::of::<T>();
        let mut parts = self.inner.parts.lock().await;
        if let Some(part) = parts
            .get(&key)
            .and_then(|p| p.downcast_ref::<std::sync::Weak<T>>())
            .and_then(std::sync::Weak::upgrade)
        {
            return Ok(part);
        }
        let part = Arc::new(make().await?);
        parts.insert(key, Box::new(Arc::downgrade(&part)));
        Ok(part)
    }

    /// Connects (one publishing connection is opened at once, so an absent
    /// broker, or a TLS problem, is reported here, naming the URL) and
    /// declares the shared exchanges. The `amqp.tls_*` files are read first:
    /// one that cannot be used is an error naming its setting.
    pub async fn connect(settings: &AmqpSettings) -> Result<Self> {
        let instance = settings.resolved_instance_id();
        let url = settings.url.clone();
        let connector = Arc::new(Connector::new(settings)?);
        let manager = PoolManager {
            connector: connector.clone(),
            name: wire::connection_name(&instance, "publish"),
            runtime: async_rs::TokioRuntime::tokio_current(),
        };
        let pool = Pool::builder(manager)
            .config(PoolConfig::new(settings.pool_size))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::BrokerUnavailable {
                url: redact(&url),
                reason: Unreachable::Pool(Box::new(e)),
            })?;
        let broker = Broker {
            inner: Arc::new(Inner {
                pool,
                connector,
                url,
                instance,
                names: Names::new(settings.prefix.clone()),
                connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
                confirm_timeout: Duration::from_millis(settings.confirm_timeout_ms),
                channels: (0..settings.publish_channels)
                    .map(|_| PublishSlot::default())
                    .collect(),
                next: AtomicUsize::new(0),
                metrics: Arc::new(Metrics::new()),
                consumers: Arc::new(Consumers::default()),
                consumer_check: Duration::from_millis(settings.consumer_check_ms),
                instance_queue_expires: (settings.instance_queue_expires_s > 0)
                    .then(|| Duration::from_secs(settings.instance_queue_expires_s)),
                instance_queue_type: settings.instance_queue_type,
                last_probe: tokio::sync::Mutex::new(None),
                parts: Mutex::new(SharedParts::new()),
            }),
        };
        broker
            .inner
            .metrics
            .register(broker.inner.consumers.clone());
        let channel = broker.channel().await?;
        topology::declare_shared(&channel, broker.names()).await?;
        crate::amqp::close_channel(&channel, "declared").await;
        Ok(broker)
    }

    /// Names under the configured prefix.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// The metrics of the parts that use this broker ([`crate::metrics`]).
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The metrics of every part on this broker as text, what `/metrics`
    /// serves: OpenMetrics when `openmetrics`, else the Prometheus text
    /// format. Returns the body and its `Content-Type`. For an application
    /// that serves its metrics itself (without the gateway, or
    /// [`crate::gateway::ops::MetricsServer`]).
    pub fn render_metrics(&self, openmetrics: bool) -> (String, &'static str) {
        self.inner.metrics.render(openmetrics)
    }

    /// Every supervised consumer on this broker ([`super::consumer`]):
    /// whether each consumes now, for readiness and metrics.
    pub fn consumers(&self) -> &Arc<Consumers> {
        &self.inner.consumers
    }

    /// How often (and how long) each consumer checks its connection with a
    /// round trip (`amqp.consumer_check_ms`).
    pub fn consumer_check(&self) -> Duration {
        self.inner.consumer_check
    }

    /// `x-expires` of the per-instance queues (`amqp.instance_queue_expires_s`);
    /// `None`: they never expire.
    pub fn instance_queue_expires(&self) -> Option<Duration> {
        self.inner.instance_queue_expires
    }

    /// The type of the per-instance queues (`amqp.instance_queue_type`).
    pub fn instance_queue_type(&self) -> QueueType {
        self.inner.instance_queue_type
    }

    /// This process's instance id.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance
    }

    /// The broker URL with its password hidden, for messages.
    pub fn url_redacted(&self) -> String {
        redact(&self.inner.url)
    }

    /// A fresh channel on a pooled connection (for declarations and short
    /// work; close it when done).
    pub async fn channel(&self) -> Result<Channel> {
        let conn = tokio::time::timeout(self.inner.connect_timeout, self.inner.pool.get())
            .await
            .map_err(|_| self.no_answer("answer", self.inner.connect_timeout))?
            .map_err(|e| match e {
                // Already names the URL (and says whether TLS failed).
                PoolError::Backend(e) => e,
                other => self.unavailable(Unreachable::Pool(Box::new(other))),
            })?;
        let channel = conn.create_channel().await?;
        self.inner.metrics.broker().channel_opened();
        Ok(channel)
    }

    /// A connection of its own for a long-lived consumer, named
    /// `switchboard/<instance>/<role>` (TLS for `amqps://`, as the pool's).
    pub async fn dedicated_connection(&self, role: &str) -> Result<Connection> {
        let props = ConnectionProperties::default()
            .with_connection_name(wire::connection_name(&self.inner.instance, role).into());
        tokio::time::timeout(
            self.inner.connect_timeout,
            self.inner.connector.connect(props),
        )
        .await
        .map_err(|_| self.no_answer("answer", self.inner.connect_timeout))?
    }

    /// Publishes and waits for the broker's confirm. A mandatory message
    /// that nothing takes is [`Error::NoRoute`]. A publish that is nacked,
    /// or whose confirm is lost (the connection dropped, or no confirm
    /// within `amqp.confirm_timeout_ms`), is sent again on a new channel,
    /// with the same properties and so the same `message_id`, up to
    /// `PUBLISH_ATTEMPTS` times (consumers deduplicate by `message_id`);
    /// nacked every time, it is [`Error::Nacked`].
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<()> {
        self.publish_via(msg, None).await
    }

    /// [`Broker::publish`], always on the first of the shared channels
    /// instead of the next one round-robin: for messages that a fanout
    /// copies to many queues (events), which cost the broker more when they
    /// come over several channels (each channel process confirms with every
    /// queue; docs/BENCHMARKS.md, "Events against the raw fanout").
    pub(crate) async fn publish_pinned(&self, msg: Outgoing<'_>) -> Result<()> {
        self.publish_via(msg, Some(0)).await
    }

    /// [`Broker::publish`] on the shared channel `slot` (`None`: the next).
    async fn publish_via(&self, msg: Outgoing<'_>, slot: Option<usize>) -> Result<()> {
        let mut attempt = 1;
        loop {
            let opened =
                tokio::time::timeout(self.inner.confirm_timeout, self.publish_channel(slot))
                    .await
                    .unwrap_or_else(|_| Err(self.no_answer("channel", self.inner.confirm_timeout)));
            let (slot, channel) = match opened {
                Ok(c) => c,
                Err(e) if attempt < PUBLISH_ATTEMPTS && e.is_recoverable() => {
                    attempt += 1;
                    tokio::time::sleep(retry_pause(attempt)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let sent =
                tokio::time::timeout(self.inner.confirm_timeout, publish_on(&channel, &msg)).await;
            let err = match sent {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e @ Error::NoRoute { .. })) => return Err(e),
                // A nack is sent again too, on a new channel: a channel keeps
                // per-queue state on the broker, and RabbitMQ 3.10 leaves a
                // channel that first published to a quorum queue while its
                // leader's node was going down refusing every later publish
                // to that queue (docs/RELIABILITY.md, the cluster node row of
                // "How it is kept").
                Ok(Err(e)) => e,
                Err(_) => self.no_answer("publisher confirm", self.inner.confirm_timeout),
            };
            // Whatever went wrong, this channel is not to be trusted again.
            self.forget_channel(slot, &channel).await;
            if attempt >= PUBLISH_ATTEMPTS {
                return Err(err);
            }
            tracing::debug!(attempt, error = %err, "publish not confirmed; sending again");
            attempt += 1;
            tokio::time::sleep(retry_pause(attempt)).await;
        }
    }

    /// One of the shared confirm-mode channels (and its slot), reopened if
    /// it was closed: `slot`, or the next one round-robin.
    async fn publish_channel(&self, slot: Option<usize>) -> Result<(usize, Channel)> {
        let i = slot.unwrap_or_else(|| self.inner.next.fetch_add(1, Ordering::Relaxed))
            % self.inner.channels.len();
        let slot = &self.inner.channels[i];
        // The common case: an open channel, under a lock held for a clone.
        if let Some(ch) = slot.open_channel() {
            return Ok((i, ch));
        }
        // One publisher reopens; the others wait for its channel.
        let _opening = slot.opening.lock().await;
        if let Some(ch) = slot.open_channel() {
            return Ok((i, ch));
        }
        let ch = self.channel().await?;
        // Confirms decide whether a publish is done: never publish without them.
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *slot.lock() = Some(ch.clone());
        Ok((i, ch))
    }

    /// Drops a publishing channel that failed, unless it was replaced already.
    async fn forget_channel(&self, i: usize, failed: &Channel) {
        let dropped = {
            let mut slot = self.inner.channels[i].lock();
            if slot.as_ref().is_some_and(|c| c.id() == failed.id()) {
                slot.take()
            } else {
                None
            }
        };
        // Closed outside the lock: other publishers never wait on a close.
        if let Some(ch) = dropped {
            super::close_channel(&ch, "replaced after a failed publish").await;
        }
    }

    /// How long a publish waits for its confirm (`amqp.confirm_timeout_ms`).
    pub fn confirm_timeout(&self) -> Duration {
        self.inner.confirm_timeout
    }

    /// [`Broker::is_reachable`], answered from the last probe when it is at
    /// most `max_age` old: however many ask, the broker sees at most one
    /// probe per `max_age`.
    pub async fn was_reachable_within(&self, max_age: Duration) -> bool {
        let mut last = self.inner.last_probe.lock().await;
        if let Some((at, up)) = *last
            && at.elapsed() <= max_age
        {
            return up;
        }
        let up = self.is_reachable().await;
        *last = Some((std::time::Instant::now(), up));
        up
    }

    /// Whether a publishing connection can be had now (opens and closes a
    /// channel on it: the broker sees the probe).
    pub async fn is_reachable(&self) -> bool {
        match self.channel().await {
            Ok(ch) => {
                crate::amqp::close_channel(&ch, "probe").await;
                true
            }
            Err(_) => false,
        }
    }

    fn unavailable(&self, reason: Unreachable) -> Error {
        Error::BrokerUnavailable {
            url: redact(&self.inner.url),
            reason,
        }
    }

    /// The broker unavailable: no `what` came within `after`.
    fn no_answer(&self, what: &'static str, after: Duration) -> Error {
        self.unavailable(Unreachable::NoAnswer { what, after })
    }

    /// Closes the publishing channels and the pool.
    pub async fn close(&self) {
        for slot in &self.inner.channels {
            let taken = slot.lock().take();
            if let Some(ch) = taken {
                crate::amqp::close_channel(&ch, "shutdown").await;
            }
        }
        self.inner.pool.close();
    }
}

/// One shared publishing channel: the current one (read under a short,
/// never-awaited lock) and the lock a publisher holds while it reopens it.
#[derive(Default)]
struct PublishSlot {
    current: std::sync::Mutex<Option<Channel>>,
    opening: Mutex<()>,
}

impl PublishSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current channel, if it is open.
    fn open_channel(&self) -> Option<Channel> {
        self.lock()
            .as_ref()
            .filter(|ch| ch.status().connected())
            .cloned()
    }
}

/// Attempts of one publish before its error is returned.
pub(crate) const PUBLISH_ATTEMPTS: u32 = 3;

fn retry_pause(attempt: u32) -> Duration {
    Duration::from_millis(50 * u64::from(attempt * attempt))
}

/// Publishes `msg` on `channel` (which must be in confirm mode) and waits for
/// the confirm.
pub(crate) async fn publish_on(channel: &Channel, msg: &Outgoing<'_>) -> Result<()> {
    let confirm = channel
        .basic_publish(
            msg.exchange.into(),
            msg.routing_key.into(),
            BasicPublishOptions {
                mandatory: msg.mandatory,
                immediate: false,
            },
            msg.payload,
            msg.properties.clone(),
        )
        .await?
        .await?;
    confirmed(msg.exchange, msg.routing_key, confirm)
}

/// [`publish_on`] for a message sent once (no retry that would need its
/// properties again): they are moved into the frame instead of copied.
pub(crate) async fn publish_once_on(channel: &Channel, msg: Outgoing<'_>) -> Result<()> {
    let Outgoing {
        exchange,
        routing_key,
        payload,
        properties,
        mandatory,
    } = msg;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                immediate: false,
            },
            payload,
            properties,
        )
        .await?
        .await?;
    confirmed(exchange, routing_key, confirm)
}

/// What a publisher confirm says of a message to `exchange` and `routing_key`.
fn confirmed(exchange: &str, routing_key: &str, confirm: Confirmation) -> Result<()> {
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(Error::NoRoute {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Confirmation::Nack(_) => Err(Error::Nacked),
    }
}

/// `url` without its password, for logs and errors (the one redaction of
/// the crate, [`crate::settings::redact_url`]).
pub(crate) use crate::settings::redact_url as redact;
