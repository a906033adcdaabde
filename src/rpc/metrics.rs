//! An RPC client's counters as a metrics [`Source`], read at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::RpcStats;
use crate::metrics::{Collected, Source};

/// One client's [`RpcStats`].
pub(super) struct RpcSource(pub(super) Arc<RpcStats>);

impl Source for RpcSource {
    fn collect(&self, out: &mut Collected) {
        let s = &self.0;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let v = out.rpc();
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
