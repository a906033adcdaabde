//! Callbacks: delivery of call results to the caller's `Callback-Url`,
//! signed per Standard Webhooks, retried with exponential backoff and
//! jitter, kept as a dead letter when never delivered.
//!
//! The call store holds every callback's delivery state (waiting, pending
//! with the time of the next attempt, delivered, dead), the event id and the
//! exact bytes to send: deliveries survive a restart, and the status document
//! shows where each stands. When a call with a callback completes, the
//! gateway stores it with [`crate::calls::CallStore::complete`] and calls
//! [`DispatcherHandle::wake`].
//!
//! # Layout
//! - `ssrf`: which URLs may be called: checks at acceptance
//!   ([`check_url`]) and an address-checking resolver for delivery.
//! - `sign`: the Standard Webhooks headers.
//! - `dispatcher`: the delivery loop, its handle and counters.

mod dispatcher;
pub(crate) mod metrics;
mod sign;
mod ssrf;

pub use dispatcher::{CallbackStats, Dispatcher, DispatcherHandle, MAX_IDLE};
pub use ssrf::{CallbackUrlError, check_url};
