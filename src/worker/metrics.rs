//! A worker's metrics: its counters as a metrics [`Source`], read at
//! scrape time, and their families (`switchboard_worker_*`, by service).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::WorkerStats;
use crate::metrics::{Collected, HistogramValues, Source, Values, counters, gauges};

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
        let v = out.values::<WorkerValues>().service(&self.service);
        v.deliveries += get(&s.deliveries);
        v.redeliveries += get(&s.redelivered);
        v.duplicates += get(&s.duplicates);
        v.replies += get(&s.replied);
        v.requeues += get(&s.requeued);
        v.replies_kept += get(&s.replies_kept);
        v.dead_letters += get(&s.dead_lettered);
        v.expired += get(&s.expired);
        v.cancelled += get(&s.cancelled);
        v.progress += get(&s.progress);
        v.consuming += i64::from(s.consumer.is_up());
        v.handler.add(&s.handler_time.snapshot());
    }
}

/// One worker's (or several workers' of one service) numbers.
#[derive(Debug, Default, Clone)]
pub(crate) struct ServiceValues {
    /// Deliveries taken from the queue.
    pub(crate) deliveries: u64,
    /// Deliveries the broker marked as redelivered.
    pub(crate) redeliveries: u64,
    /// Copies of requests already answered, settled without running again.
    pub(crate) duplicates: u64,
    /// Requests answered and acked.
    pub(crate) replies: u64,
    /// Deliveries given back for redelivery.
    pub(crate) requeues: u64,
    /// Replies kept for a copy of their request: the handler ran, the
    /// reply could not be published.
    pub(crate) replies_kept: u64,
    /// Deliveries the worker itself dead-lettered.
    pub(crate) dead_letters: u64,
    /// Requests dropped because their deadline had passed.
    pub(crate) expired: u64,
    /// Requests of cancelled calls: dropped unprocessed, or not answered.
    pub(crate) cancelled: u64,
    /// Progress reports published.
    pub(crate) progress: u64,
    /// Workers consuming now.
    pub(crate) consuming: i64,
    /// Handler run times.
    pub(crate) handler: HistogramValues,
}

/// Every service's workers' numbers at one scrape.
#[derive(Debug, Default)]
pub(crate) struct WorkerValues(BTreeMap<String, ServiceValues>);

impl WorkerValues {
    /// The numbers of `service`'s workers, to add to.
    pub(crate) fn service(&mut self, service: &str) -> &mut ServiceValues {
        if !self.0.contains_key(service) {
            self.0.insert(service.to_owned(), ServiceValues::default());
        }
        self.0
            .get_mut(service)
            .expect("inserted just above when missing")
    }
}

/// A worker counter family: name, help, and how to read it.
type WorkerFamily = (&'static str, &'static str, fn(&ServiceValues) -> u64);

impl Values for WorkerValues {
    const PART: &'static str = "workers";

    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let w = &self.0;
        if w.is_empty() {
            return Ok(());
        }
        let per_service = |f: fn(&ServiceValues) -> u64| {
            w.iter()
                .map(move |(s, v)| (s.as_str(), f(v)))
                .collect::<Vec<_>>()
        };
        let families: [WorkerFamily; 10] = [
            (
                "switchboard_worker_deliveries",
                "Requests delivered to the service's workers.",
                |v| v.deliveries,
            ),
            (
                "switchboard_worker_redeliveries",
                "Deliveries the broker marked as delivered before.",
                |v| v.redeliveries,
            ),
            (
                "switchboard_worker_duplicates",
                "Copies of requests already answered here, settled without running the handler again.",
                |v| v.duplicates,
            ),
            (
                "switchboard_worker_replies",
                "Requests answered (any status) and acked.",
                |v| v.replies,
            ),
            (
                "switchboard_worker_requeues",
                "Deliveries given back for redelivery after a panic, a transient failure or a reply that could not be published.",
                |v| v.requeues,
            ),
            (
                "switchboard_worker_replies_kept",
                "Replies whose handler ran but which could not be published (connection and publishing pool both failed): the request went back to the queue and its copy gets the kept reply instead of running the handler again.",
                |v| v.replies_kept,
            ),
            (
                "switchboard_worker_dead_letters",
                "Deliveries the worker rejected to the dead-letter exchange itself (classic queues; quorum queues dead-letter by their delivery limit, see switchboard status).",
                |v| v.dead_letters,
            ),
            (
                "switchboard_worker_expired",
                "Requests dropped unprocessed because their deadline had passed.",
                |v| v.expired,
            ),
            (
                "switchboard_worker_cancelled",
                "Requests whose caller cancelled the call: dropped before the handler began, or not answered.",
                |v| v.cancelled,
            ),
            (
                "switchboard_worker_progress_reports",
                "Progress reports handlers published to their callers.",
                |v| v.progress,
            ),
        ];
        for (name, help, f) in families {
            counters(enc, name, help, "service", &per_service(f))?;
        }
        let consuming: Vec<(&str, i64)> =
            w.iter().map(|(s, v)| (s.as_str(), v.consuming)).collect();
        gauges(
            enc,
            "switchboard_worker_consuming",
            "Workers of the service consuming now.",
            "service",
            &consuming,
        )?;
        let mut m = enc.encode_descriptor(
            "switchboard_worker_handler_duration",
            "Time the service's handler ran for one request.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (s, v) in w {
            v.handler
                .encode(m.encode_family(&[("service", s.as_str())])?)?;
        }
        Ok(())
    }
}
