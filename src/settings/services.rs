//! `[services.<name>]`: one service's queue, handler and limits, and the
//! rule for names.

use std::time::Duration;

use serde::Deserialize;

/// The queue type of a service queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, counts deliveries (`x-delivery-limit`).
    Quorum,
    /// Single node, faster.
    Classic,
}

/// Built-in handlers that `serve` can run for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinHandler {
    /// Replies with the request's body and content type.
    Echo,
}

/// `[services.<name>]`: one service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Built-in handler that `serve` runs for this service, if any.
    #[serde(default)]
    pub handler: Option<BuiltinHandler>,
    /// Echo only: delay before replying, ms.
    #[serde(default)]
    pub delay_ms: u64,
    /// Prefetch: handlers running at once in one worker.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: u16,
    /// Quorum or classic.
    #[serde(default = "defaults::queue_type")]
    pub queue_type: QueueType,
    /// Deliveries before a request is dead-lettered.
    #[serde(default = "defaults::delivery_limit")]
    pub delivery_limit: u32,
    /// The service's deadline for a call, ms.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Lifecycle events for synchronously answered calls too.
    #[serde(default)]
    pub sync_events: bool,
}

mod defaults {
    use super::QueueType;
    pub(super) fn concurrency() -> u16 {
        64
    }
    pub(super) fn queue_type() -> QueueType {
        QueueType::Quorum
    }
    pub(super) fn delivery_limit() -> u32 {
        5
    }
    pub(super) fn timeout_ms() -> u64 {
        30_000
    }
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            handler: None,
            delay_ms: 0,
            concurrency: defaults::concurrency(),
            queue_type: defaults::queue_type(),
            delivery_limit: defaults::delivery_limit(),
            timeout_ms: defaults::timeout_ms(),
            sync_events: false,
        }
    }
}

impl ServiceSettings {
    /// The service's deadline as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

pub(super) fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Names that end up in queue names: ASCII letters, digits, `-`, `_`, `.`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(name_char)
}

pub(super) fn name_rule(got: &str) -> String {
    format!("must be 1 to 100 of ASCII letters, digits, '-', '_' or '.' (got {got:?})")
}
