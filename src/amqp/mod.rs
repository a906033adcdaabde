//! The broker face: the connection pool and dedicated consumer connections,
//! topology declaration, publishing with publisher confirms, and the wire
//! conventions every other part uses.
//!
//! # Layout
//! - [`wire`]: names, headers, properties, status mapping (DESIGN.md's AMQP contract).
//! - [`broker`]: [`Broker`], the handle every part holds: pool, confirmed publishing.
//! - [`topology`]: idempotent declaration of exchanges and queues.
//! - [`delivery`]: [`InFlight`], a delivery that is acked or rejected exactly once.

pub mod broker;
pub mod delivery;
pub mod topology;
pub mod wire;

pub use broker::{Broker, Outgoing};
pub use delivery::InFlight;
pub use wire::Names;
