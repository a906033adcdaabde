//! The callback dispatchers' metrics: their counters as a metrics
//! [`Source`], read at scrape time, and their families
//! (`switchboard_callback_*`, with each receiver host's circuit).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::DescriptorEncoder;

use super::dispatcher::CallbackStats;
use crate::metrics::{Collected, Source, Values, counter, gauges};

impl Source for Arc<CallbackStats> {
    fn collect(&self, out: &mut Collected) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let v = out.values::<CallbackValues>();
        v.attempts += get(&self.attempts);
        v.delivered += get(&self.delivered);
        v.retries += get(&self.retried);
        v.dead_letters += get(&self.dead);
        v.deferred += get(&self.deferred);
        for (host, open) in self.circuits.states() {
            v.circuits.push((host, i64::from(open)));
        }
    }
}

/// The callback dispatchers' numbers.
#[derive(Debug, Default, Clone)]
pub(crate) struct CallbackValues {
    /// Delivery attempts.
    pub(crate) attempts: u64,
    /// Callbacks delivered (answered 2xx).
    pub(crate) delivered: u64,
    /// Failed attempts scheduled again.
    pub(crate) retries: u64,
    /// Callbacks given up and kept as dead letters.
    pub(crate) dead_letters: u64,
    /// Attempts put off because their host's circuit was open.
    pub(crate) deferred: u64,
    /// Each receiver host followed, 1 while its circuit is open.
    pub(crate) circuits: Vec<(String, i64)>,
}

impl Values for CallbackValues {
    const PART: &'static str = "callbacks";

    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let c = self;
        counter(
            enc,
            "switchboard_callback_attempts",
            "Callback delivery attempts.",
            c.attempts,
        )?;
        counter(
            enc,
            "switchboard_callback_deliveries",
            "Callbacks delivered (answered 2xx).",
            c.delivered,
        )?;
        counter(
            enc,
            "switchboard_callback_retries",
            "Failed callback attempts scheduled to be tried again.",
            c.retries,
        )?;
        counter(
            enc,
            "switchboard_callback_dead_letters",
            "Callbacks given up and kept as dead letters.",
            c.dead_letters,
        )?;
        counter(
            enc,
            "switchboard_callback_deferred",
            "Callback attempts put off because their receiver host's circuit was open.",
            c.deferred,
        )?;
        let circuits: Vec<(&str, i64)> = c.circuits.iter().map(|(h, v)| (h.as_str(), *v)).collect();
        gauges(
            enc,
            "switchboard_callback_circuit_open",
            "Per receiver host (host:port) that failed lately: 1 while its circuit is open (its callbacks paused, or one attempt trying it), 0 while closed.",
            "host",
            &circuits,
        )?;
        Ok(())
    }
}
