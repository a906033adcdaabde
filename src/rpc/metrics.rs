//! An RPC client's metrics: its counters as a metrics [`Source`], read at
//! scrape time, and their families (`switchboard_rpc_*`, summed over the
//! process's clients).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::DescriptorEncoder;

use super::RpcStats;
use crate::metrics::{Collected, Source, Values, counter, counters, gauge};

/// One client's [`RpcStats`].
pub(super) struct RpcSource(pub(super) Arc<RpcStats>);

impl Source for RpcSource {
    fn collect(&self, out: &mut Collected) {
        let s = &self.0;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let v = out.values::<RpcValues>();
        // Only this registration holds the counters once the client and its
        // router are gone: their calls are no longer pending anywhere.
        if Arc::strong_count(s) > 1 {
            v.pending += i64::try_from(get(&s.pending)).unwrap_or(i64::MAX);
        }
        v.routed += get(&s.routed);
        v.handed_off += get(&s.handed_off);
        v.late += get(&s.late);
        v.unknown += get(&s.unknown);
        v.malformed += get(&s.malformed);
        v.timeouts += get(&s.timed_out);
        v.progress_routed += get(&s.progress_routed);
        v.progress_dropped += get(&s.progress_dropped);
    }
}

/// The RPC clients' numbers.
#[derive(Debug, Default, Clone)]
pub(crate) struct RpcValues {
    /// Calls waiting for a reply now.
    pub(crate) pending: i64,
    /// Replies handed to their caller.
    pub(crate) routed: u64,
    /// Replies handed to the orphan sink (the gateway's call store).
    pub(crate) handed_off: u64,
    /// Replies for calls whose caller had given up.
    pub(crate) late: u64,
    /// Replies for no known call.
    pub(crate) unknown: u64,
    /// Replies without a usable correlation id.
    pub(crate) malformed: u64,
    /// Calls that reached their deadline without a reply.
    pub(crate) timeouts: u64,
    /// Progress reports handed to their caller or the call store.
    pub(crate) progress_routed: u64,
    /// Progress reports nobody took.
    pub(crate) progress_dropped: u64,
    /// Queues of dead gateways this one drains now (`calls::adopt`).
    pub(crate) adopted_queues: i64,
    /// Replies taken from dead gateways' queues.
    pub(crate) adopted_replies: u64,
}

impl Values for RpcValues {
    const PART: &'static str = "rpc";

    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let r = self;
        gauge(
            enc,
            "switchboard_rpc_pending_calls",
            "Calls waiting for a reply now.",
            r.pending,
        )?;
        counter(
            enc,
            "switchboard_rpc_replies_routed",
            "Replies handed to the caller waiting for them.",
            r.routed,
        )?;
        counter(
            enc,
            "switchboard_rpc_replies_handed_off",
            "Replies of calls nobody waits for in memory (answered 202, or made before a restart), handed to the call store.",
            r.handed_off,
        )?;
        counters(
            enc,
            "switchboard_rpc_replies_dropped",
            "Replies nobody waited for: late (the caller had given up), unknown (no such call here) or malformed (no correlation id).",
            "reason",
            &[
                ("late", r.late),
                ("unknown", r.unknown),
                ("malformed", r.malformed),
            ],
        )?;
        counter(
            enc,
            "switchboard_rpc_timeouts",
            "Calls that reached their deadline without a reply.",
            r.timeouts,
        )?;
        counter(
            enc,
            "switchboard_rpc_progress_routed",
            "Progress reports handed to the caller reading them, or recorded on a stored call.",
            r.progress_routed,
        )?;
        counter(
            enc,
            "switchboard_rpc_progress_dropped",
            "Progress reports nobody took: of a call not followed here or already ended, read by nobody, not kept up with, or malformed.",
            r.progress_dropped,
        )?;
        gauge(
            enc,
            "switchboard_rpc_adopted_queues",
            "Reply queues of dead gateways sharing the call store that this one drains now.",
            r.adopted_queues,
        )?;
        counter(
            enc,
            "switchboard_rpc_adopted_replies",
            "Replies taken from dead gateways' reply queues and handed to the call store.",
            r.adopted_replies,
        )?;
        Ok(())
    }
}
