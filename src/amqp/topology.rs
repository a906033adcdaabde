//! Idempotent declaration of DESIGN.md's topology. Every option that decides
//! a delivery guarantee is written out with its reason.
//!
//! Public for what an application declares itself: a service's queues
//! ([`declare_service`], [`declare_services`]), a reply queue, and the
//! [`Mismatch`]es of [`crate::Error::Topology`]; the rest is the crate's.
//!
//! What is declared (exchanges, queues, their options and arguments) is
//! defined here once: the declarations use it, and so does the AsyncAPI
//! description ([`crate::asyncapi`]). Declaring what exists with other
//! arguments is a [`Mismatch`] naming the queue, the argument and the way
//! out.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_lapin::lapin::{
    self, Channel, Connection, ExchangeKind,
    options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable},
};

use super::Broker;
use super::wire::Names;
use crate::error::{Error, Result};
use crate::settings::{QueueType, ServiceSettings};

/// Durable, not auto-deleted: the exchanges outlive every process.
pub(crate) fn durable_exchange() -> ExchangeDeclareOptions {
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
pub(crate) fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: false,
        durable: true,
        exclusive: false,
        auto_delete: false,
        nowait: false,
    }
}

/// The exchanges every deployment shares: `<p>.requests` (direct, routing
/// key = service), `<p>.dead` (direct, routing key = service) and
/// `<p>.events` (fanout).
pub(crate) fn shared_exchanges(names: &Names) -> [(String, ExchangeKind); 3] {
    [
        (names.requests_exchange(), ExchangeKind::Direct),
        (names.dead_exchange(), ExchangeKind::Direct),
        (names.events_exchange(), ExchangeKind::Fanout),
    ]
}

/// Declares [`shared_exchanges`], durable.
pub(crate) async fn declare_shared(ch: &Channel, names: &Names) -> Result<()> {
    for (name, kind) in shared_exchanges(names) {
        declare_durable_exchange(ch, &name, kind).await?;
    }
    Ok(())
}

/// Declares exchange `name` of `kind`, durable; one declared before with
/// other properties is a [`mismatch`].
async fn declare_durable_exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<()> {
    ch.exchange_declare(name.into(), kind, durable_exchange(), FieldTable::default())
        .await
        .map_err(|e| mismatch(Entity::Exchange, name, e))
}

/// The arguments of a service queue: queue type, dead-letter wiring and, for
/// quorum queues, the delivery limit that ends redelivery loops.
pub(crate) fn service_queue_arguments(
    names: &Names,
    service: &str,
    svc: &ServiceSettings,
) -> FieldTable {
    let mut args = of_type(svc.queue_type);
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

/// The arguments of a service's dead-letter queue, where dead letters wait
/// for an operator: of the service queue's type (`services.<name>.queue_type`).
/// A quorum service's dead letters are replicated like its requests, and a
/// worker that declares its queues again after losing a node never meets a
/// classic queue whose node is down (RabbitMQ answers 404 until it is back).
pub(crate) fn dead_queue_arguments(kind: QueueType) -> FieldTable {
    of_type(kind)
}

/// Queue arguments holding only `x-queue-type` for `kind`.
fn of_type(kind: QueueType) -> FieldTable {
    let kind = match kind {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    args
}

/// A service's queue bound to the requests exchange, its dead-letter queue
/// bound to the dead exchange. Declaring an existing queue with other
/// arguments is [`Error::Topology`]: a [`Mismatch`] naming the queue, the
/// argument and the setting that decides it.
pub async fn declare_service(
    ch: &Channel,
    names: &Names,
    service: &str,
    svc: &ServiceSettings,
) -> Result<()> {
    let queue = names.service_queue(service);
    let dead = names.dead_queue(service);
    let none = FieldTable::default();
    let for_service = |e: Error| match e {
        Error::Topology(mut found) => {
            for m in &mut found {
                m.setting = m.setting.take().or_else(|| setting_of(m, service));
            }
            Error::Topology(found)
        }
        other => other,
    };
    ch.queue_declare(
        queue.as_str().into(),
        durable_queue(),
        service_queue_arguments(names, service, svc),
    )
    .await
    .map_err(|e| for_service(mismatch(Entity::Queue, &queue, e)))?;
    ch.queue_bind(
        queue.as_str().into(),
        names.requests_exchange().into(),
        service.into(),
        QueueBindOptions::default(),
        none.clone(),
    )
    .await?;
    ch.queue_declare(
        dead.as_str().into(),
        durable_queue(),
        dead_queue_arguments(svc.queue_type),
    )
    .await
    // No setting to name: `queue_type` decides the service queue too, so
    // the way out is to drain and delete the dead-letter queue.
    .map_err(|e| mismatch(Entity::Queue, &dead, e))?;
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

/// Declares the shared exchanges and every service's queues, each service
/// on a channel of its own (a refused declaration closes its channel), so
/// that every mismatch is found in one pass. All of them, if any, are one
/// [`Error::Topology`].
pub async fn declare_services(
    broker: &Broker,
    services: &BTreeMap<String, ServiceSettings>,
) -> Result<()> {
    let names = broker.names();
    let mut found = Vec::new();
    let mut keep = |result: Result<()>| match result {
        Err(Error::Topology(m)) => {
            found.extend(m);
            Ok(())
        }
        other => other,
    };
    let ch = broker.channel().await?;
    let shared = declare_shared(&ch, names).await;
    super::close_channel(&ch, "declared").await;
    keep(shared)?;
    for (service, svc) in services {
        let ch = broker.channel().await?;
        let declared = declare_service(&ch, names, service, svc).await;
        super::close_channel(&ch, "declared").await;
        keep(declared)?;
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(Error::Topology(found))
    }
}

/// `<p>.reply.<instance>` without `x-expires`, on `ch`: for tools that
/// consume a reply queue of their own (the benchmark's hand-written client).
/// switchboard's reply router declares its queue with
/// `declare_instance_queue`, which sets the expiry.
pub async fn declare_reply_queue(ch: &Channel, names: &Names, instance: &str) -> Result<String> {
    let queue = names.reply_queue(instance);
    ch.queue_declare(
        queue.as_str().into(),
        durable_queue(),
        instance_queue_arguments(None, QueueType::Classic),
    )
    .await
    .map_err(|e| mismatch(Entity::Queue, &queue, e))?;
    Ok(queue)
}

/// The arguments of a per-instance queue: classic by default (replies and
/// dead-letter copies are short-lived and on the hot path: no replication),
/// quorum when `amqp.instance_queue_type` asks (on a cluster, so that they
/// outlive a node), and
/// `x-expires` when set, so that an instance that never comes back leaves
/// nothing behind. Always the same AMQP type for the expiry (a long long):
/// RabbitMQ compares argument types too when it checks a redeclaration.
pub(crate) fn instance_queue_arguments(expires: Option<Duration>, kind: QueueType) -> FieldTable {
    let mut args = of_type(kind);
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
pub(crate) enum Declared {
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
pub(crate) async fn declare_instance_queue(
    conn: &Connection,
    queue: &str,
    expires: Option<Duration>,
    kind: QueueType,
) -> Result<Declared> {
    let ch = conn.create_channel().await?;
    let declared = ch
        .queue_declare(
            queue.into(),
            durable_queue(),
            instance_queue_arguments(expires, kind),
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
pub(crate) async fn declare_deadwatch(
    conn: &Connection,
    names: &Names,
    instance: &str,
    services: &[String],
    expires: Option<Duration>,
    kind: QueueType,
) -> Result<(String, Declared)> {
    let queue = names.deadwatch_queue(instance);
    let declared = declare_instance_queue(conn, &queue, expires, kind).await?;
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
pub(crate) async fn declare_subscription(
    ch: &Channel,
    names: &Names,
    durable_name: Option<&str>,
) -> Result<String> {
    let (name, options) = match durable_name {
        Some(n) => (names.subscriber_queue(n), durable_queue()),
        None => (String::new(), temporary_queue()),
    };
    let queue = ch
        .queue_declare(name.as_str().into(), options, FieldTable::default())
        .await
        .map_err(|e| mismatch(Entity::Queue, &name, e))?;
    let queue = queue.name().as_str().to_owned();
    bind_to_events(ch, names, &queue).await?;
    Ok(queue)
}

/// Server-named, exclusive to its connection and auto-deleted: a temporary
/// subscription's queue.
fn temporary_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: false,
        durable: false,
        exclusive: true,
        auto_delete: true,
        nowait: false,
    }
}

/// `<p>.events.types` ([`Names::events_types_exchange`]): direct, routing
/// key = the CloudEvent type.
pub(crate) fn events_types_exchange(names: &Names) -> (String, ExchangeKind) {
    (names.events_types_exchange(), ExchangeKind::Direct)
}

/// Declares `<p>.events.types` (durable) and binds it to the events fanout
/// (an exchange-to-exchange binding): the fanout ignores the binding's key
/// and passes every event on with its own routing key, its type
/// ([`wire::event_routing_key`](super::wire::event_routing_key)), on which
/// the direct exchange routes. Nothing changes for the fanout's other
/// bindings. Needs `configure` and `write` on `<p>.events.types` and `read`
/// on `<p>.events`.
pub(crate) async fn declare_events_types(ch: &Channel, names: &Names) -> Result<()> {
    let (name, kind) = events_types_exchange(names);
    declare_durable_exchange(ch, &name, kind).await?;
    ch.exchange_bind(
        name.as_str().into(),
        names.events_exchange().into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// A temporary queue on `ch` (server-named, exclusive, auto-deleted) that
/// receives only the events of `types`: bound to `<p>.events.types` (declared
/// first, [`declare_events_types`]) with each type as key, and with the
/// empty key, for the events published without their type as key (by other
/// clients, by a switchboard older than this binding, or of a type longer
/// than a routing key may be): whoever reads it still checks the type.
/// Returns the queue's name.
pub(crate) async fn declare_typed_subscription(
    ch: &Channel,
    names: &Names,
    types: &[&str],
) -> Result<String> {
    declare_events_types(ch, names).await?;
    let queue = ch
        .queue_declare("".into(), temporary_queue(), FieldTable::default())
        .await?;
    let queue = queue.name().as_str().to_owned();
    let exchange = names.events_types_exchange();
    for key in types.iter().copied().chain([""]) {
        ch.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(queue)
}

/// Whether the broker refused an operation with 403 ACCESS_REFUSED (the
/// user's permissions do not cover a name), by lapin's error kind.
pub(crate) fn is_access_refused(e: &Error) -> bool {
    matches!(
        e,
        Error::Amqp(e) if matches!(
            e.kind(),
            lapin::ErrorKind::ProtocolError(amqp)
                if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
        )
    )
}

/// The retention of the events log (`<p>.events.log`, a stream queue):
/// RabbitMQ drops its oldest segments once they are older than `max_age` or
/// the log is larger than `max_bytes`. Only whole segments go, so a segment
/// is a fraction of `max_bytes` ([`EventsLog::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsLog {
    /// `x-max-age`: RabbitMQ's duration (`7D`, `12h`, `30m`, `90s`; units
    /// Y, M, D, h, m, s).
    pub max_age: String,
    /// `x-max-length-bytes`.
    pub max_bytes: u64,
    /// `x-stream-max-segment-size-bytes`.
    pub segment_bytes: u64,
}

/// RabbitMQ's default (and largest useful) stream segment, bytes.
pub const STREAM_SEGMENT_MAX: u64 = 500_000_000;

impl EventsLog {
    /// A retention of `max_age` and `max_bytes`, in segments of a quarter of
    /// `max_bytes` (at most [`STREAM_SEGMENT_MAX`]): the log holds between
    /// three quarters of `max_bytes` and `max_bytes` plus a segment once full.
    pub fn new(max_age: impl Into<String>, max_bytes: u64) -> Self {
        Self {
            max_age: max_age.into(),
            max_bytes,
            segment_bytes: (max_bytes / 4).clamp(1, STREAM_SEGMENT_MAX),
        }
    }

    /// Whether `age` is a duration RabbitMQ takes as `x-max-age`: a
    /// positive number followed by one of its units.
    pub fn valid_age(age: &str) -> bool {
        let Some(unit) = age.chars().last() else {
            return false;
        };
        let digits = &age[..age.len() - unit.len_utf8()];
        matches!(unit, 'Y' | 'M' | 'D' | 'h' | 'm' | 's')
            && !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.parse::<u64>().is_ok_and(|n| n > 0)
    }
}

/// The arguments of the events log: a stream queue (an append-only log that
/// consumers read from any offset without removing anything), with its
/// retention.
pub fn events_log_arguments(log: &EventsLog) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    args.insert(
        "x-max-age".into(),
        AMQPValue::LongString(log.max_age.as_str().into()),
    );
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(log.max_bytes).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(log.segment_bytes).unwrap_or(i64::MAX)),
    );
    args
}

/// The events log `<p>.events.log` ([`Names::events_log`]): a durable stream
/// queue bound to the events fanout, on channels of its own.
/// Streams are durable, shared and never auto-deleted (RabbitMQ refuses
/// anything else). One that exists with another retention is used as it is
/// ([`Declared::AsFound`]): retention is a property of the deployment's log,
/// which an instance started with other settings must not stop (a policy
/// changes it in place, RELIABILITY.md).
pub(crate) async fn declare_events_log(
    broker: &Broker,
    log: &EventsLog,
) -> Result<(String, Declared)> {
    let names = broker.names();
    let queue = names.events_log();
    let ch = broker.channel().await?;
    let declared = match ch
        .queue_declare(
            queue.as_str().into(),
            durable_queue(),
            events_log_arguments(log),
        )
        .await
    {
        Ok(_) => {
            super::close_channel(&ch, "declared").await;
            Declared::AsAsked
        }
        Err(e) if is_precondition_failed(&e) => {
            // The 406 closed that channel: look at the queue on another.
            let ch = broker.channel().await?;
            ch.queue_declare(queue.as_str().into(), passive(), FieldTable::default())
                .await?;
            super::close_channel(&ch, "declared").await;
            Declared::AsFound
        }
        Err(e) => return Err(e.into()),
    };
    let ch = broker.channel().await?;
    bind_to_events(&ch, names, &queue).await?;
    super::close_channel(&ch, "declared").await;
    Ok((queue, declared))
}

/// Messages kept in `<p>.poison` at most; past it the oldest go
/// (`x-overflow` drop-head, RabbitMQ's default): a peer that floods
/// switchboard's queues with garbage cannot fill the broker's disk through it.
pub(crate) const POISON_MAX_LENGTH: i64 = 10_000;

/// `<p>.poison` ([`Names::poison_queue`]): durable, classic, bounded by
/// [`POISON_MAX_LENGTH`], never expiring (operators decide what becomes of
/// its messages).
pub(crate) async fn declare_poison(ch: &Channel, names: &Names) -> Result<String> {
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
        .map_err(|e| mismatch(Entity::Queue, &queue, e))?;
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
/// (a declaration whose arguments differ from the existing queue's), by
/// lapin's error kind (the reply code), never by the reply text.
pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

/// What a [`Mismatch`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    /// A queue.
    Queue,
    /// An exchange.
    Exchange,
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Entity::Queue => "queue",
            Entity::Exchange => "exchange",
        })
    }
}

/// An exchange or queue that exists on the broker with other properties or
/// arguments than switchboard declares: RabbitMQ refused the declaration
/// (406 PRECONDITION_FAILED). Nothing is changed on the broker; the message
/// says which argument differs and how to resolve it.
#[derive(Debug, thiserror::Error)]
pub struct Mismatch {
    /// Queue or exchange.
    pub entity: Entity,
    /// Its name.
    pub name: String,
    /// The argument or property that differs (`x-delivery-limit`,
    /// `durable`...), when RabbitMQ's reply names it.
    pub argument: Option<String>,
    /// The value switchboard declared (`absent` when it sent none).
    pub declared: Option<String>,
    /// The value of the existing one (`absent` when it has none).
    pub existing: Option<String>,
    /// The setting that decides the argument, when one does
    /// (`services.invoice.delivery_limit`).
    pub setting: Option<String>,
    /// The vhost, when RabbitMQ's reply names it.
    pub vhost: Option<String>,
    /// RabbitMQ's refusal.
    #[source]
    pub cause: lapin::Error,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            entity,
            name,
            argument,
            declared,
            existing,
            setting,
            vhost,
            cause,
        } = self;
        match (argument, declared, existing) {
            (Some(arg), Some(declared), Some(existing)) => write!(
                f,
                "{entity} {name} exists with {arg} = {existing}, and switchboard declares {arg} = {declared}"
            )?,
            _ => write!(
                f,
                "{entity} {name} exists with other arguments than switchboard declares ({cause})"
            )?,
        }
        if let Some(setting) = setting {
            write!(f, " (setting {setting})")?;
        }
        write!(f, ". To resolve: ")?;
        if let (Some(setting), Some(existing)) = (setting, existing) {
            write!(f, "set {setting} to {existing} to match the {entity}; or ")?;
        }
        let delete = match entity {
            Entity::Queue => "delete_queue",
            Entity::Exchange => "delete_exchange",
        };
        let vhost = match vhost.as_deref() {
            Some(v) if v != "/" => format!(" -p {v}"),
            _ => String::new(),
        };
        write!(
            f,
            "delete the {entity} so that switchboard declares it anew (`rabbitmqctl{vhost} {delete} {name}`; a queue's messages go with it: let it drain, or move them, first); or give this deployment names of its own with amqp.prefix"
        )
    }
}

/// A refused declaration of `name` as a [`Mismatch`] when RabbitMQ says
/// PRECONDITION_FAILED (recognised by its reply code), else as it came.
fn mismatch(entity: Entity, name: &str, e: lapin::Error) -> Error {
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return Error::Amqp(e);
    };
    if !is_precondition_failed(&e) {
        return Error::Amqp(e);
    }
    let text = amqp.get_message().as_str();
    let (argument, declared, existing) = match parse_inequivalent(text) {
        Some((a, d, x)) => (Some(a), Some(d), Some(x)),
        None => (None, None, None),
    };
    let vhost = text
        .split_once(" in vhost '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(v, _)| v.to_owned());
    Error::Topology(vec![Mismatch {
        entity,
        name: name.to_owned(),
        argument,
        declared,
        existing,
        setting: None,
        vhost,
        cause: e,
    }])
}

/// The argument, the value declared and the existing one from RabbitMQ's
/// reply text: `PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit'
/// for queue 'sb.svc.invoice' in vhost '/': received the value '3' of type
/// 'signedint' but current is the value '5' of type 'signedint'` (3.x and
/// 4.x alike). `None` when the text says something else.
pub(crate) fn parse_inequivalent(text: &str) -> Option<(String, String, String)> {
    let rest = &text[text.find("inequivalent arg '")? + "inequivalent arg '".len()..];
    let (argument, rest) = rest.split_once('\'')?;
    let rest = &rest[rest.find(": received ")? + ": received ".len()..];
    let (declared, existing) = rest.split_once(" but current is ")?;
    Some((
        argument.to_owned(),
        shown_value(declared),
        shown_value(existing),
    ))
}

/// `the value '5' of type 'signedint'` -> `5`; `'true'` -> `true`;
/// `none` -> `absent`.
fn shown_value(v: &str) -> String {
    let v = v.trim();
    if v == "none" {
        return "absent".into();
    }
    let v = v.strip_prefix("the value ").unwrap_or(v);
    let v = v.split(" of type ").next().unwrap_or(v);
    v.trim_matches('\'').to_owned()
}

/// The setting of `service` that decides the argument of a mismatch on its
/// work queue, if one does.
fn setting_of(m: &Mismatch, service: &str) -> Option<String> {
    let key = match m.argument.as_deref()? {
        "x-queue-type" => "queue_type",
        "x-delivery-limit" => "delivery_limit",
        _ => return None,
    };
    Some(format!("services.{service}.{key}"))
}

/// Binds `queue` to the events fanout (a subscription's queue, the events
/// log).
async fn bind_to_events(ch: &Channel, names: &Names, queue: &str) -> Result<()> {
    ch.queue_bind(
        queue.into(),
        names.events_exchange().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_log_ages_are_rabbitmq_durations() {
        for ok in ["7D", "12h", "30m", "90s", "1Y", "6M"] {
            assert!(EventsLog::valid_age(ok), "{ok}");
        }
        for bad in ["", "7", "D", "0D", "7d", "7 D", "-1D", "7DD", "1.5h", "7é"] {
            assert!(!EventsLog::valid_age(bad), "{bad}");
        }
    }

    #[test]
    fn the_events_log_is_a_stream_in_segments_of_a_quarter_of_its_bytes() {
        let log = EventsLog::new("7D", 1 << 30);
        assert_eq!(log.segment_bytes, 1 << 28);
        assert_eq!(
            EventsLog::new("7D", 1 << 40).segment_bytes,
            STREAM_SEGMENT_MAX
        );
        let args = events_log_arguments(&log);
        let args = args.inner();
        assert_eq!(
            args.get("x-queue-type"),
            Some(&AMQPValue::LongString("stream".into()))
        );
        assert_eq!(
            args.get("x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(1 << 30))
        );
    }

    #[test]
    fn rabbitmq_replies_are_read_for_the_argument_and_both_values() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'sb.svc.invoice' in vhost '/': received the value '3' of type 'signedint' but current is the value '5' of type 'signedint'";
        assert_eq!(
            parse_inequivalent(text),
            Some(("x-delivery-limit".into(), "3".into(), "5".into()))
        );
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost 'v': received none but current is the value 'quorum' of type 'longstr'";
        assert_eq!(
            parse_inequivalent(text),
            Some(("x-queue-type".into(), "absent".into(), "quorum".into()))
        );
        let text = "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'";
        assert_eq!(
            parse_inequivalent(text),
            Some(("durable".into(), "true".into(), "false".into()))
        );
        assert_eq!(
            parse_inequivalent("PRECONDITION_FAILED - unknown delivery tag 1"),
            None
        );
        assert_eq!(parse_inequivalent("inequivalent arg '"), None);
    }

    fn refused(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn a_precondition_failure_is_told_by_its_reply_code_not_its_text() {
        let code = AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED);
        // No "406" nor PRECONDITION_FAILED in the text: the kind decides.
        assert!(is_precondition_failed(&refused(
            code.clone(),
            "inequivalent arg"
        )));
        let e = mismatch(Entity::Queue, "q", refused(code, "whatever"));
        assert!(
            matches!(e, Error::Topology(ref m) if m[0].name == "q"),
            "{e}"
        );
        // The text of one does not make another kind one.
        let other = AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND);
        let e = refused(other, "PRECONDITION_FAILED 406");
        assert!(!is_precondition_failed(&e));
        assert!(matches!(mismatch(Entity::Queue, "q", e), Error::Amqp(_)));
    }
}
