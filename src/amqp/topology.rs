//! Idempotent declaration of DESIGN.md's topology. Every option that decides
//! a delivery guarantee is written out with its reason.

use deadpool_lapin::lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use super::wire::Names;
use crate::error::{Error, Result};
use crate::settings::{QueueType, ServiceSettings};

/// Durable, not auto-deleted: the exchanges outlive every process.
fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        passive: false,
        durable: true,
        auto_delete: false,
        internal: false,
        nowait: false,
    }
}

/// Durable, shared, not auto-deleted: requests and replies survive restarts
/// of the broker and of every consumer.
fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: false,
        durable: true,
        exclusive: false,
        auto_delete: false,
        nowait: false,
    }
}

/// `<p>.requests` (direct), `<p>.dead` (direct) and `<p>.events` (fanout).
pub async fn declare_shared(ch: &Channel, names: &Names) -> Result<()> {
    let opts = durable_exchange();
    let none = FieldTable::default();
    ch.exchange_declare(
        names.requests_exchange().into(),
        ExchangeKind::Direct,
        opts,
        none.clone(),
    )
    .await?;
    ch.exchange_declare(
        names.dead_exchange().into(),
        ExchangeKind::Direct,
        opts,
        none.clone(),
    )
    .await?;
    ch.exchange_declare(
        names.events_exchange().into(),
        ExchangeKind::Fanout,
        opts,
        none,
    )
    .await?;
    Ok(())
}

/// The arguments of a service queue: queue type, dead-letter wiring and, for
/// quorum queues, the delivery limit that ends redelivery loops.
pub fn service_queue_arguments(names: &Names, service: &str, svc: &ServiceSettings) -> FieldTable {
    let mut args = FieldTable::default();
    let kind = match svc.queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.dead_exchange().into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(service.into()),
    );
    if svc.queue_type == QueueType::Quorum {
        // A request returned this many times is dead-lettered, never looped.
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(svc.delivery_limit as i32),
        );
    }
    args
}

/// A service's queue bound to the requests exchange, its dead-letter queue
/// bound to the dead exchange. Declaring an existing queue with other
/// arguments is an error that names the queue.
pub async fn declare_service(
    ch: &Channel,
    names: &Names,
    service: &str,
    svc: &ServiceSettings,
) -> Result<()> {
    let queue = names.service_queue(service);
    let dead = names.dead_queue(service);
    let none = FieldTable::default();
    ch.queue_declare(
        queue.as_str().into(),
        durable_queue(),
        service_queue_arguments(names, service, svc),
    )
    .await
    .map_err(|e| mismatch(&queue, e))?;
    ch.queue_bind(
        queue.as_str().into(),
        names.requests_exchange().into(),
        service.into(),
        QueueBindOptions::default(),
        none.clone(),
    )
    .await?;
    let mut dead_args = FieldTable::default();
    dead_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    ch.queue_declare(dead.as_str().into(), durable_queue(), dead_args)
        .await
        .map_err(|e| mismatch(&dead, e))?;
    ch.queue_bind(
        dead.as_str().into(),
        names.dead_exchange().into(),
        service.into(),
        QueueBindOptions::default(),
        none,
    )
    .await?;
    Ok(())
}

/// `<p>.reply.<instance>`: durable, so replies that arrive while this
/// instance is down wait for it.
pub async fn declare_reply_queue(ch: &Channel, names: &Names, instance: &str) -> Result<String> {
    let queue = names.reply_queue(instance);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    ch.queue_declare(queue.as_str().into(), durable_queue(), args)
        .await
        .map_err(|e| mismatch(&queue, e))?;
    Ok(queue)
}

fn mismatch(queue: &str, e: deadpool_lapin::lapin::Error) -> Error {
    let text = e.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("406") {
        Error::Malformed(format!(
            "queue {queue} already exists with other arguments ({text}); delete it or change the settings to match"
        ))
    } else {
        Error::Amqp(e)
    }
}
