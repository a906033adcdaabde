//! The broker face: the connection pool and dedicated consumer connections,
//! topology declaration, publishing with publisher confirms, and the wire
//! conventions every other part uses.
//!
//! # Layout
//! - [`wire`]: names, headers, properties, status mapping (DESIGN.md's AMQP contract).
//! - [`broker`]: [`Broker`], the handle every part holds: pool, confirmed publishing.
//! - [`connector`]: how connections are opened: plain for `amqp://`, TLS
//!   (rustls) for `amqps://`, never plain text for `amqps://`.
//! - [`topology`]: idempotent declaration of exchanges and queues.
//! - [`delivery`]: [`InFlight`], a delivery that is acked or rejected exactly once.

pub mod broker;
pub mod connector;
pub mod delivery;
pub mod topology;
pub mod wire;

pub use broker::{Broker, Outgoing};
pub use connector::TlsError;
pub use delivery::InFlight;
pub use wire::Names;

use std::future::Future;
use std::time::Duration;

/// The deepest field table or array in a message's headers that lapin
/// decodes; deeper ones are kept as bytes (docs/RELIABILITY.md). It is the
/// vendored amq-protocol-types' bound, named here so that switchboard does
/// not compile against an unpatched parser (crates.io's has no such item,
/// and recursed until the stack overflowed).
pub const MAX_HEADER_NESTING: usize = deadpool_lapin::lapin::types::parsing::MAX_NESTING_DEPTH;

/// The longest one attempt to re-establish a consumer may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause between two attempts to re-establish a consumer.
pub const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// Calls `open` until it succeeds, pausing 100 ms, then twice as long each
/// time up to [`MAX_RECONNECT_PAUSE`]: how every long-lived consumer comes
/// back after losing its connection. `what` names it in the logs.
pub async fn reopen<T, F, Fut>(what: &str, mut open: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = crate::error::Result<T>>,
{
    let mut pause = Duration::from_millis(100);
    loop {
        // A broker that accepts the connection but never answers must not
        // stall the recovery: each attempt is bounded.
        let attempt = tokio::time::timeout(OPEN_TIMEOUT, open()).await;
        match attempt.unwrap_or_else(|_| {
            Err(crate::error::Error::Malformed(format!(
                "no answer within {OPEN_TIMEOUT:?}"
            )))
        }) {
            Ok(opened) => return opened,
            Err(e) => {
                tracing::warn!(%what, error = %e, retry_in = ?pause, "not re-established yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RECONNECT_PAUSE);
            }
        }
    }
}

/// Consumes `queue` on `channel` under the consumer tag of this instance and
/// `role` ([`wire::consumer_tag`]). `Some(prefetch)`: manual acks, at most
/// `prefetch` deliveries unacked at once (the bound on what a consumer holds
/// in memory); `None`: no acks (direct reply-to requires it). Never
/// exclusive: several processes may consume one service queue, and a
/// consumer coming back must not be refused by its own stale one.
pub async fn consume(
    broker: &Broker,
    channel: &deadpool_lapin::lapin::Channel,
    queue: &str,
    role: &str,
    prefetch: Option<u16>,
) -> crate::error::Result<deadpool_lapin::lapin::Consumer> {
    use deadpool_lapin::lapin::options::{BasicConsumeOptions, BasicQosOptions};
    if let Some(prefetch) = prefetch {
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
    }
    let consumer = channel
        .basic_consume(
            queue.into(),
            wire::consumer_tag(broker.instance_id(), role).into(),
            BasicConsumeOptions {
                no_local: false,
                no_ack: prefetch.is_none(),
                exclusive: false,
                nowait: false,
            },
            deadpool_lapin::lapin::types::FieldTable::default(),
        )
        .await?;
    Ok(consumer)
}

/// How long a clean close may take before it is abandoned.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes a connection cleanly if the broker answers within
/// [`CLOSE_TIMEOUT`]: a close on a dead connection may never complete, and
/// no shutdown or recovery may hang on one.
pub async fn close_connection(conn: &deadpool_lapin::lapin::Connection, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, why.into())).await;
}

/// Closes a channel cleanly, bounded like [`close_connection`].
pub async fn close_channel(ch: &deadpool_lapin::lapin::Channel, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ch.close(200, why.into())).await;
}
