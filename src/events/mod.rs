//! Broadcast: CloudEvents 1.0 (structured JSON mode) on the events fanout
//! exchange. Every subscriber binds a queue of its own: a temporary one
//! (exclusive, deleted when it disconnects) or a named, durable one that keeps
//! events while its subscriber is away.
//!
//! # Layout
//! - this file: [`CloudEvent`], [`publish`], [`Subscription`].
//! - [`hub`]: [`hub::EventHub`], the actor relaying the fanout to SSE and
//!   WebSocket sessions.
//! - `log`: the events log `<prefix>.events.log`, the stream whose offsets
//!   are the positions of those sessions on every instance.

pub mod hub;
pub(crate) mod log;
pub(crate) mod metrics;

pub(crate) use log::declare_log;

use std::collections::BTreeMap;

use deadpool_lapin::lapin::{Connection, types::FieldTable};
use serde::{Deserialize, Serialize};

use crate::amqp::consumer::{Consuming, Declare, settle};
use crate::amqp::{Broker, ConsumerSpec, InFlight, Outgoing, Supervisor, topology, wire};
use crate::error::{Error, Result};

/// A CloudEvent in structured JSON mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always "1.0".
    pub specversion: String,
    /// Unique per source.
    pub id: String,
    /// Who emitted it (a URI reference).
    pub source: String,
    /// The event type, e.g. `switchboard.call.completed`.
    #[serde(rename = "type")]
    pub ty: String,
    /// What it is about (a call id for lifecycle events).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// When it happened (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub time: Option<chrono::DateTime<chrono::Utc>>,
    /// Content type of `data`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub datacontenttype: Option<String>,
    /// The payload.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub data: Option<serde_json::Value>,
    /// Extension attributes (e.g. `traceparent`).
    #[serde(flatten)]
    pub extensions: BTreeMap<String, serde_json::Value>,
}

impl CloudEvent {
    /// A new event of type `ty` from `source`, with a fresh id and the time now.
    pub fn new(ty: impl Into<String>, source: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            specversion: "1.0".into(),
            id: uuid::Uuid::now_v7().to_string(),
            source: source.into(),
            ty: ty.into(),
            subject: None,
            time: Some(chrono::Utc::now()),
            datacontenttype: Some(wire::CONTENT_JSON.into()),
            data: Some(data),
            extensions: BTreeMap::new(),
        }
    }

    /// Sets the subject.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
}

/// The CloudEvent id of call `call_id`'s lifecycle event of type `ty`
/// (`switchboard.call.accepted`, `.completed`, `.cancelled`: each happens
/// once per call): a UUID (version 8) made of the first 16 bytes of a
/// SHA-256 of both, the same wherever and however often it is made. An
/// event published again (at least once: see RELIABILITY.md) carries the
/// id of the first, so that a consumer drops the copy by its id; a
/// callback's `webhook-id` is the id of its call's end event.
pub fn lifecycle_event_id(call_id: &str, ty: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"switchboard lifecycle event\0");
    h.update(call_id.as_bytes());
    h.update(b"\0");
    h.update(ty.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Publishes an event to the events fanout, persistent and confirmed
/// (sent again if not, as [`Broker::publish`] does), with its type as
/// routing key ([`wire::event_routing_key`]), always on the same shared
/// publishing channel: the broker spends less per event delivered when a
/// fanout's messages come over one channel than spread over several.
pub async fn publish(broker: &Broker, event: &CloudEvent) -> Result<()> {
    let body = serde_json::to_vec(event).map_err(|source| Error::Encode {
        what: "an event",
        source,
    })?;
    let mut props = deadpool_lapin::lapin::BasicProperties::default()
        .with_content_type(wire::CONTENT_CLOUDEVENTS.into())
        .with_message_id(event.id.as_str().into())
        .with_type(event.ty.as_str().into())
        .with_app_id(wire::APP_ID.into())
        .with_timestamp(wire::now_ms() / 1000)
        .with_delivery_mode(wire::PERSISTENT);
    if let Some(tp) = event.extensions.get("traceparent").and_then(|v| v.as_str()) {
        let mut h = FieldTable::default();
        h.insert(
            wire::HEADER_TRACEPARENT.into(),
            deadpool_lapin::lapin::types::AMQPValue::LongString(tp.into()),
        );
        props = props.with_headers(h);
    }
    broker
        .publish_pinned(Outgoing {
            exchange: &broker.names().events_exchange(),
            // The type: ignored by the fanout, routed on by `<p>.events.types`.
            routing_key: wire::event_routing_key(&event.ty),
            payload: &body,
            properties: props,
            // A fanout with no subscriber drops events by design: not an error.
            mandatory: false,
        })
        .await
}

/// A subscriber's queue bound to the events fanout, declared on every
/// (re-)open of its consumer ([`topology::declare_subscription`]): durable
/// under a name, or temporary (server-named, a new one each time).
pub(crate) struct FanoutQueue {
    /// The durable subscription's name; `None`: temporary.
    pub(crate) durable_name: Option<String>,
}

#[async_trait::async_trait]
impl Declare for FanoutQueue {
    async fn declare(&self, broker: &Broker, conn: &Connection) -> Result<String> {
        let ch = conn.create_channel().await?;
        let queue =
            topology::declare_subscription(&ch, broker.names(), self.durable_name.as_deref())
                .await?;
        crate::amqp::close_channel(&ch, "declared").await;
        Ok(queue)
    }
}

/// How to subscribe.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// A durable subscription under this name (`<p>.sub.<name>`): events
    /// published while the subscriber is away wait for it. `None`: a
    /// temporary queue, deleted when the subscriber disconnects.
    pub durable_name: Option<String>,
    /// Only events whose type starts with this.
    pub type_prefix: Option<String>,
}

/// Events buffered unacked for one subscriber: bounds what a slow
/// subscriber holds in memory.
const SUBSCRIPTION_PREFETCH: u16 = 256;

/// A subscription: events in the order the exchange routed them. Its
/// consumer is supervised ([`crate::amqp::consumer`]): a lost connection is
/// re-established by [`Subscription::recv`] itself. A durable subscription
/// loses nothing meanwhile (its queue keeps the events); a temporary one
/// gets a new queue, and events published in between are not seen.
pub struct Subscription {
    consuming: Consuming,
    type_prefix: Option<String>,
    /// Durable subscriptions ack an event when the next one is asked for, so
    /// an event is acked only after its subscriber has handled it.
    unacked: Option<InFlight>,
    durable: bool,
    /// Deliveries taken from the queue, of any type.
    delivered: u64,
    /// The queue's name (server-named for temporary subscriptions: the
    /// first one's).
    pub queue: String,
}

impl Subscription {
    /// Subscribes on a connection of its own (`switchboard/<instance>/subscriber`).
    pub async fn start(broker: &Broker, opts: SubscribeOptions) -> Result<Self> {
        let durable = opts.durable_name.is_some();
        let queue = FanoutQueue {
            durable_name: opts.durable_name,
        };
        Self::start_on(broker, queue, durable, opts.type_prefix).await
    }

    /// [`Subscription::start`] on a queue that `queue` declares (on each
    /// (re-)open of the consumer) and binds as it sees fit: the worker's
    /// cancellation watch binds by type.
    pub(crate) async fn start_on(
        broker: &Broker,
        queue: impl Declare,
        durable: bool,
        type_prefix: Option<String>,
    ) -> Result<Self> {
        let supervisor = Supervisor::new(
            broker,
            ConsumerSpec {
                name: "subscriber".into(),
                tag: "events".into(),
                // Manual acks, so that the prefetch bounds what is in flight.
                prefetch: Some(SUBSCRIPTION_PREFETCH),
                confirm: false,
            },
            queue,
        );
        let consuming = Consuming::start(supervisor).await?;
        let queue = consuming.queue().unwrap_or_default().to_owned();
        Ok(Self {
            consuming,
            type_prefix,
            unacked: None,
            durable,
            delivered: 0,
            queue,
        })
    }

    /// Deliveries taken from the queue since the start, of any type (those
    /// skipped as not wanted, or not CloudEvents, included).
    pub(crate) fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The next event; `None` never (a lost consumer is re-established
    /// here), kept for callers that loop `while let Some(..)`. Events that
    /// are not valid CloudEvents are poison on a durable subscription (moved
    /// once to `<prefix>.poison`, see
    /// [`Supervisor::quarantine`](crate::amqp::Supervisor::quarantine)) and
    /// skipped on a temporary one; events of other types are acked and
    /// skipped.
    pub async fn recv(&mut self) -> Option<Result<CloudEvent>> {
        self.next_event().await
    }

    /// Stops consuming and closes the subscription's connection (a
    /// temporary queue goes with it), once the acks of the events handled
    /// are written (bounded); an event taken but not yet acked (the last
    /// one `recv` returned) goes back to a durable queue.
    pub async fn stop(mut self) {
        self.unacked = None;
        self.consuming.stop("unsubscribed").await;
    }

    /// Acks are handed to lapin without waiting for them to be written
    /// ([`Consuming::ack`]): the next event is not held up by a round trip
    /// to the connection's I/O thread, and a timer per event. Nothing is
    /// weakened: an ack only ever goes out after its event was handled
    /// (durable: when the next one is asked for); stopping or dropping the
    /// subscription waits for the acks handed over to be written before
    /// closing its connection; and one lost with its connection brings the
    /// event back to a durable queue either way (a temporary queue goes
    /// with its connection).
    async fn next_event(&mut self) -> Option<Result<CloudEvent>> {
        if let Some(previous) = self.unacked.take() {
            settle(self.consuming.ack(previous));
        }
        loop {
            let delivery = self.consuming.next().await;
            self.delivered += 1;
            let inflight = InFlight::new(delivery);
            let Ok(event) = serde_json::from_slice::<CloudEvent>(&inflight.delivery().data) else {
                if self.durable {
                    self.consuming
                        .supervisor()
                        .quarantine(inflight, "an event that is not a CloudEvent")
                        .await;
                } else {
                    settle(self.consuming.ack(inflight));
                }
                continue;
            };
            let wanted = self
                .type_prefix
                .as_deref()
                .is_none_or(|p| event.ty.starts_with(p));
            if !wanted {
                settle(self.consuming.ack(inflight));
                continue;
            }
            if self.durable {
                self.unacked = Some(inflight);
            } else {
                settle(self.consuming.ack(inflight));
            }
            return Some(Ok(event));
        }
    }
}
