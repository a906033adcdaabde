//! Idempotent declaration of DESIGN.md's topology. Every option that decides
//! a delivery guarantee is written out with its reason.

use std::time::Duration;

use deadpool_lapin::lapin::{
    self, Channel, Connection, ExchangeKind,
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

/// `<p>.reply.<instance>` without `x-expires`, on `ch`: for tools that
/// consume a reply queue of their own (the benchmark's hand-written client).
/// switchboard's reply router declares its queue with
/// [`declare_instance_queue`], which sets the expiry.
pub async fn declare_reply_queue(ch: &Channel, names: &Names, instance: &str) -> Result<String> {
    let queue = names.reply_queue(instance);
    ch.queue_declare(
        queue.as_str().into(),
        durable_queue(),
        instance_queue_arguments(None),
    )
    .await
    .map_err(|e| mismatch(&queue, e))?;
    Ok(queue)
}

/// The arguments of a per-instance queue: classic (replies and dead-letter
/// copies are short-lived and on the hot path: no replication), and
/// `x-expires` when set, so that an instance that never comes back leaves
/// nothing behind. Always the same AMQP type for the expiry (a long long):
/// RabbitMQ compares argument types too when it checks a redeclaration.
pub fn instance_queue_arguments(expires: Option<Duration>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    if let Some(expires) = expires {
        let ms = i64::try_from(expires.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

/// How a per-instance queue was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// With the arguments asked for.
    AsAsked,
    /// It existed with other arguments (declared by an earlier version
    /// without `x-expires`, or with another `amqp.instance_queue_expires_s`)
    /// and is used as it is: any expiry, or none, serves it equally well.
    AsFound,
}

/// Declares the durable per-instance queue `queue` (see
/// [`instance_queue_arguments`]) on channels of its own on `conn`. A queue
/// that exists with other arguments is kept as it is ([`Declared::AsFound`]):
/// a user upgrading from a version without `x-expires` must not lose the
/// replies waiting in it, nor be stopped at start-up.
pub async fn declare_instance_queue(
    conn: &Connection,
    queue: &str,
    expires: Option<Duration>,
) -> Result<Declared> {
    let ch = conn.create_channel().await?;
    let declared = ch
        .queue_declare(
            queue.into(),
            durable_queue(),
            instance_queue_arguments(expires),
        )
        .await;
    match declared {
        Ok(_) => {
            super::close_channel(&ch, "declared").await;
            Ok(Declared::AsAsked)
        }
        Err(e) if is_precondition_failed(&e) => {
            // The 406 closed that channel: look at the queue on another.
            let ch = conn.create_channel().await?;
            ch.queue_declare(queue.into(), passive(), FieldTable::default())
                .await?;
            super::close_channel(&ch, "declared").await;
            Ok(Declared::AsFound)
        }
        Err(e) => Err(e.into()),
    }
}

/// The gateway's dead-letter watch (`<p>.deadwatch.<instance>`, see
/// [`declare_instance_queue`]), bound to the dead exchange for each of
/// `services`, beside each service's own dead-letter queue. Returns the
/// queue's name and how it was declared.
pub async fn declare_deadwatch(
    conn: &Connection,
    names: &Names,
    instance: &str,
    services: &[String],
    expires: Option<Duration>,
) -> Result<(String, Declared)> {
    let queue = names.deadwatch_queue(instance);
    let declared = declare_instance_queue(conn, &queue, expires).await?;
    let ch = conn.create_channel().await?;
    for s in services {
        ch.queue_bind(
            queue.as_str().into(),
            names.dead_exchange().into(),
            s.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    super::close_channel(&ch, "declared").await;
    Ok((queue, declared))
}

/// A subscriber's queue bound to the events fanout, on `ch`:
/// `<p>.sub.<name>` (durable, shared, not auto-deleted: it keeps events
/// while its subscriber is away) when `durable_name` is given, else a
/// server-named one (exclusive to this connection and auto-deleted: nothing
/// piles up once its consumer is gone). Returns the queue's name.
pub async fn declare_subscription(
    ch: &Channel,
    names: &Names,
    durable_name: Option<&str>,
) -> Result<String> {
    let (name, options) = match durable_name {
        Some(n) => (names.subscriber_queue(n), durable_queue()),
        None => (
            String::new(),
            QueueDeclareOptions {
                passive: false,
                durable: false,
                exclusive: true,
                auto_delete: true,
                nowait: false,
            },
        ),
    };
    let queue = ch
        .queue_declare(name.as_str().into(), options, FieldTable::default())
        .await
        .map_err(|e| mismatch(&name, e))?;
    let queue = queue.name().as_str().to_owned();
    ch.queue_bind(
        queue.as_str().into(),
        names.events_exchange().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(queue)
}

/// Messages kept in `<p>.poison` at most; past it the oldest go
/// (`x-overflow` drop-head, RabbitMQ's default): a peer that floods
/// switchboard's queues with garbage cannot fill the broker's disk through it.
pub const POISON_MAX_LENGTH: i64 = 10_000;

/// `<p>.poison` ([`Names::poison_queue`]): durable, classic, bounded by
/// [`POISON_MAX_LENGTH`], never expiring (operators decide what becomes of
/// its messages).
pub async fn declare_poison(ch: &Channel, names: &Names) -> Result<String> {
    let queue = names.poison_queue();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(POISON_MAX_LENGTH),
    );
    ch.queue_declare(queue.as_str().into(), durable_queue(), args)
        .await
        .map_err(|e| mismatch(&queue, e))?;
    Ok(queue)
}

/// Only looks: fails (404) when the queue does not exist.
pub(crate) fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
    }
}

/// Whether the broker refused an operation with 406 PRECONDITION_FAILED
/// (a declaration whose arguments differ from the existing queue's).
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406)
}

fn mismatch(queue: &str, e: lapin::Error) -> Error {
    if is_precondition_failed(&e) {
        Error::Malformed(format!(
            "queue {queue} already exists with other arguments ({e}); delete it or change the settings to match"
        ))
    } else {
        Error::Amqp(e)
    }
}
