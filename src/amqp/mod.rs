//! The broker face: the connection pool and dedicated consumer connections,
//! topology declaration, publishing with publisher confirms, and the wire
//! conventions every other part uses.
//!
//! # Layout
//! - [`wire`]: names, headers, properties, status mapping (DESIGN.md's AMQP contract).
//! - `broker`: [`Broker`], the handle every part holds: pool, confirmed publishing.
//! - `connector`: how connections are opened: plain for `amqp://`, TLS
//!   (rustls) for `amqps://`, never plain text for `amqps://`.
//! - [`topology`]: idempotent declaration of exchanges and queues.
//! - `delivery`: [`InFlight`], a delivery that is acked or rejected exactly once.
//! - `acks`: [`AckBatch`], the acks of one channel's deliveries written at
//!   the end of a turn, a contiguous run as one `multiple` ack.
//! - [`consumer`]: supervised consumers (prefetch, acks, reconnect with
//!   backoff, a watchdog, liveness for readiness and metrics), the one way
//!   every part consumes.

pub(crate) mod acks;
pub(crate) mod broker;
mod connector;
pub mod consumer;
pub(crate) mod delivery;
pub(crate) mod metrics;
pub mod topology;
pub mod wire;

pub use acks::{AckBatch, AckCounts};
pub use broker::{Broker, Outgoing};
pub use connector::TlsError;
pub use consumer::{ConsumerSpec, Supervisor};
pub use delivery::InFlight;
pub use wire::Names;

use std::time::Duration;

/// The deepest field table or array in a message's headers that lapin
/// decodes; deeper ones are kept as bytes (docs/RELIABILITY.md). It is the
/// vendored amq-protocol-types' bound, named here so that switchboard does
/// not compile against an unpatched parser (crates.io's has no such item,
/// and recursed until the stack overflowed).
pub const MAX_HEADER_NESTING: usize = deadpool_lapin::lapin::types::parsing::MAX_NESTING_DEPTH;

/// How long a clean close may take before it is abandoned.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes a connection cleanly if the broker answers within
/// [`CLOSE_TIMEOUT`]: a close on a dead connection may never complete, and
/// no shutdown or recovery may hang on one.
pub(crate) async fn close_connection(conn: &deadpool_lapin::lapin::Connection, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, why.into())).await;
}

/// Closes a channel cleanly, bounded like [`close_connection`].
pub(crate) async fn close_channel(ch: &deadpool_lapin::lapin::Channel, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ch.close(200, why.into())).await;
}
