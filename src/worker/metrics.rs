//! A worker's counters as a metrics [`Source`], read at scrape time.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::WorkerStats;
use crate::metrics::{Collected, Source};

/// One worker's [`WorkerStats`], labelled with its service.
pub(super) struct WorkerSource {
    service: String,
    stats: Arc<WorkerStats>,
}

impl WorkerSource {
    pub(super) fn new(service: &str, stats: Arc<WorkerStats>) -> Self {
        Self {
            service: service.to_owned(),
            stats,
        }
    }
}

impl Source for WorkerSource {
    fn collect(&self, out: &mut Collected) {
        let s = &self.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let v = out.worker(&self.service);
        v.deliveries += get(&s.deliveries);
        v.redeliveries += get(&s.redelivered);
        v.duplicates += get(&s.duplicates);
        v.replies += get(&s.replied);
        v.requeues += get(&s.requeued);
        v.dead_letters += get(&s.dead_lettered);
        v.expired += get(&s.expired);
        v.cancelled += get(&s.cancelled);
        v.progress += get(&s.progress);
        v.consuming += i64::from(s.consumer.is_up());
        v.handler.add(&s.handler_time.snapshot());
    }
}
