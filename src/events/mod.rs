//! Broadcast: CloudEvents 1.0 (structured JSON mode) on the events fanout
//! exchange. Every subscriber binds a queue of its own: a temporary one
//! (exclusive, deleted when it disconnects) or a named, durable one that keeps
//! events while its subscriber is away.
//!
//! # Layout
//! - this file: [`CloudEvent`], [`publish`], [`Subscription`].
//! - [`hub`]: [`hub::EventHub`], the actor relaying the fanout to SSE and
//!   WebSocket sessions.

pub mod hub;

use std::collections::BTreeMap;

use deadpool_lapin::lapin::{
    Channel, Connection, Consumer,
    options::{BasicAckOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::amqp::{Broker, Outgoing, wire};
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

/// Publishes an event to the events fanout, persistent and confirmed.
pub async fn publish(broker: &Broker, event: &CloudEvent) -> Result<()> {
    let body = serde_json::to_vec(event).map_err(|e| Error::Malformed(e.to_string()))?;
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
        .publish(Outgoing {
            exchange: &broker.names().events_exchange(),
            routing_key: "",
            payload: &body,
            properties: props,
            // A fanout with no subscriber drops events by design: not an error.
            mandatory: false,
        })
        .await
}

/// Server-named, this connection's only, deleted with it: nothing piles up
/// while its consumer is gone.
pub(crate) fn temporary_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: false,
        durable: false,
        exclusive: true,
        auto_delete: true,
        nowait: false,
    }
}

/// Declares the queue `name` (`""`: server-named) with `qopts`, binds it to
/// the events fanout and consumes it with manual acks, at most `prefetch`
/// unacked at once. Returns the queue's name and the consumer (tagged
/// `what`).
pub(crate) async fn consume_fanout(
    broker: &Broker,
    channel: &Channel,
    name: &str,
    qopts: QueueDeclareOptions,
    prefetch: u16,
    what: &str,
) -> Result<(String, Consumer)> {
    let queue = channel
        .queue_declare(name.into(), qopts, FieldTable::default())
        .await?;
    let queue = queue.name().as_str().to_owned();
    channel
        .queue_bind(
            queue.as_str().into(),
            broker.names().events_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Manual acks, so that the prefetch bounds what is in flight.
    let consumer = crate::amqp::consume(broker, channel, &queue, what, Some(prefetch)).await?;
    Ok((queue, consumer))
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

/// A subscription: events in the order the exchange routed them.
pub struct Subscription {
    consumer: Consumer,
    type_prefix: Option<String>,
    /// Durable subscriptions ack an event when the next one is asked for, so
    /// an event is acked only after its subscriber has handled it.
    unacked: Option<deadpool_lapin::lapin::Acker>,
    durable: bool,
    /// The queue's name (server-named for temporary subscriptions).
    pub queue: String,
    _channel: Channel,
    _conn: Connection,
}

impl Subscription {
    /// Subscribes on a dedicated connection (`switchboard/<instance>/subscriber`).
    pub async fn start(broker: &Broker, opts: SubscribeOptions) -> Result<Self> {
        let conn = broker.dedicated_connection("subscriber").await?;
        let channel = conn.create_channel().await?;
        let durable = opts.durable_name.is_some();
        let (name, qopts) = match &opts.durable_name {
            Some(n) => (
                broker.names().subscriber_queue(n),
                // Survives restarts and absences of its subscriber.
                QueueDeclareOptions {
                    passive: false,
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                },
            ),
            None => (String::new(), temporary_queue()),
        };
        // Bounds the events buffered in memory for a slow subscriber.
        let (queue, consumer) =
            consume_fanout(broker, &channel, &name, qopts, 256, "events").await?;
        Ok(Self {
            consumer,
            type_prefix: opts.type_prefix,
            unacked: None,
            durable,
            queue,
            _channel: channel,
            _conn: conn,
        })
    }

    /// The next event; `None` when the subscription ended. Events that are
    /// not valid CloudEvents are skipped and acked.
    pub async fn recv(&mut self) -> Option<Result<CloudEvent>> {
        if let Some(acker) = self.unacked.take() {
            let _ = acker.ack(BasicAckOptions { multiple: false }).await;
        }
        loop {
            let delivery = match self.consumer.next().await? {
                Ok(d) => d,
                Err(e) => return Some(Err(e.into())),
            };
            let event: Option<CloudEvent> = serde_json::from_slice(&delivery.data).ok();
            let wanted = event.as_ref().is_some_and(|e| {
                self.type_prefix
                    .as_deref()
                    .is_none_or(|p| e.ty.starts_with(p))
            });
            if wanted && self.durable {
                self.unacked = Some(delivery.acker);
            } else {
                let _ = delivery
                    .acker
                    .ack(BasicAckOptions { multiple: false })
                    .await;
            }
            if wanted {
                return event.map(Ok);
            }
        }
    }
}
