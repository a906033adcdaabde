//! [`Histogram`]: a duration histogram that observes with atomics only, so
//! that timing a call or a handler never takes a lock on the hot path.
//!
//! prometheus-client's own histogram locks a mutex per observation; this one
//! keeps one atomic per bucket and the sum in nanoseconds, and works out the
//! count from the buckets at scrape time, so `_count` always equals the
//! `+Inf` bucket even while observations go on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds (seconds) of every switchboard duration histogram: from half
/// a millisecond (a synchronous call on one machine) to an hour (an
/// asynchronous call that waited for a slow service).
pub(crate) const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 3600.0,
];

/// A histogram of durations. Cheap to clone: clones observe into the same
/// buckets.
#[derive(Clone)]
pub struct Histogram {
    inner: Arc<Inner>,
}

struct Inner {
    /// Upper bounds, ascending; the `+Inf` bucket is implicit.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more than `bounds`.
    buckets: Box<[AtomicU64]>,
    /// Sum of the observations, in nanoseconds (wraps after 584 years).
    sum_ns: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            inner: Arc::new(Inner {
                bounds,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_ns: AtomicU64::new(0),
            }),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // The first bucket whose bound is at least the value (`le`).
        let i = self.inner.bounds.partition_point(|b| *b < secs);
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The values now.
    pub fn snapshot(&self) -> HistogramValues {
        HistogramValues {
            bounds: self.inner.bounds,
            buckets: self
                .inner
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.inner.sum_ns.load(Ordering::Relaxed),
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(DURATION_BUCKETS)
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        f.debug_struct("Histogram")
            .field("count", &s.count())
            .field("sum_ns", &s.sum_ns)
            .finish()
    }
}

/// What a [`Histogram`] held at one moment; snapshots with the same bounds
/// add up (several workers of one service).
#[derive(Debug, Clone, Default)]
pub struct HistogramValues {
    bounds: &'static [f64],
    buckets: Vec<u64>,
    sum_ns: u64,
}

impl HistogramValues {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds `other`'s observations to these (an empty one takes its bounds).
    pub fn add(&mut self, other: &HistogramValues) {
        if self.buckets.is_empty() {
            *self = other.clone();
            return;
        }
        if self.bounds != other.bounds {
            // Only histograms of one kind are ever added; never mix bounds.
            return;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    /// Writes the histogram's samples (`_sum`, `_count`, `_bucket`).
    pub fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.sum_ns as f64 / 1e9,
            self.count(),
            &buckets,
            None,
        )
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.snapshot().encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_at_least_as_large() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(100));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(3));
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![1, 1, 1]);
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_ns, 3_600_000_000);
        let mut total = HistogramValues::default();
        total.add(&s);
        total.add(&s);
        assert_eq!(total.count(), 6);
    }
}
