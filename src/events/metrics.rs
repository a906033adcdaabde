//! The event hub's metrics: its counters as a metrics [`Source`], read at
//! scrape time, and their families (`switchboard_event_hub_*`).

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::DescriptorEncoder;

use super::hub::HubStats;
use crate::metrics::{Collected, Source, Values, counter};

impl Source for Arc<HubStats> {
    fn collect(&self, out: &mut Collected) {
        let v = out.values::<HubValues>();
        v.relayed += HubStats::get(&self.relayed);
        v.dropped_slow += HubStats::get(&self.dropped_slow);
        v.malformed += HubStats::get(&self.malformed);
        v.duplicates += HubStats::get(&self.duplicates);
    }
}

/// The event hubs' numbers.
#[derive(Debug, Default, Clone)]
pub(crate) struct HubValues {
    /// Events relayed to stream sessions.
    pub(crate) relayed: u64,
    /// Sessions dropped because they did not keep up.
    pub(crate) dropped_slow: u64,
    /// Messages on the events exchange that were not CloudEvents.
    pub(crate) malformed: u64,
    /// Copies of call lifecycle events dropped (an id relayed already).
    pub(crate) duplicates: u64,
}

impl Values for HubValues {
    const PART: &'static str = "hub";

    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let h = self;
        counter(
            enc,
            "switchboard_event_hub_relayed",
            "Events taken from the events exchange and offered to stream sessions.",
            h.relayed,
        )?;
        counter(
            enc,
            "switchboard_event_hub_slow_sessions_dropped",
            "Stream sessions dropped because they fell behind (their buffer was full).",
            h.dropped_slow,
        )?;
        counter(
            enc,
            "switchboard_event_hub_malformed",
            "Messages on the events exchange that were not CloudEvents (skipped).",
            h.malformed,
        )?;
        counter(
            enc,
            "switchboard_event_hub_duplicates_dropped",
            "Call lifecycle events dropped as copies of one relayed shortly before (the same CloudEvent id: published again across a gateway's death).",
            h.duplicates,
        )?;
        Ok(())
    }
}
