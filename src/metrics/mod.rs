//! Prometheus metrics: the registry of a process and its exposition
//! (`GET /metrics`). Each part declares, names and encodes its own metrics
//! next to the code that counts them (`amqp/metrics.rs`,
//! `amqp/consumer/metrics.rs`, `calls/metrics.rs`, `gateway/metrics.rs`,
//! `worker/metrics.rs`, `rpc/metrics.rs`, `events/metrics.rs`,
//! `callbacks/metrics.rs`); this module only holds them together.
//!
//! One [`Metrics`] registry belongs to each [`crate::amqp::Broker`] handle,
//! because every part already holds the broker: a process has one, and two
//! brokers in one process (tests) never mix their numbers.
//!
//! Two kinds of numbers, both cheap where things happen:
//! - The parts' own counters (`WorkerStats`, `RpcStats`, `HubStats`,
//!   `CallbackStats`, the supervised consumers' statuses: plain atomics
//!   they keep anyway) are read at scrape time: each part registers a
//!   [`Source`] that adds its values to a [`Collected`] (one [`Values`] per
//!   part, summed over its sources), and each part's values encode
//!   themselves. Nothing extra runs per message.
//! - What is counted at the point where it happens (calls by service, mode
//!   and status and their durations, stream sessions, requests refused by
//!   a caller's limits, channels opened) are prometheus-client families
//!   that their parts declare in the registry when it is made
//!   ([`Metrics::new`]) and reach through [`Metrics::calls`],
//!   [`Metrics::gateway`] and [`Metrics::broker`]: an atomic increment and
//!   a lock-free [`Histogram`] observation per call.
//!
//! Label sets are bounded: services and callers come from the settings,
//! `mode`, `status` (the HTTP status class), `role`, `reason`, `limit` and
//! `transport` from fixed lists, `consumer` from roles and configured
//! services. Call ids never become labels (they are in the logs, as the
//! `call_id` field).
//!
//! # Layout
//! - [`histogram`]: the lock-free duration [`Histogram`].
//! - this file: [`Metrics`], the [`Source`] trait, [`Collected`] and
//!   [`Values`], the encoding helpers the parts share.

pub(crate) mod histogram;

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub(crate) use histogram::{Histogram, HistogramValues};

use crate::amqp::metrics::BrokerMetrics;
use crate::calls::metrics::CallsMetrics;
use crate::gateway::metrics::GatewayMetrics;

/// `Content-Type` of the OpenMetrics text format (what Prometheus asks for).
pub(crate) const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic Prometheus text format (version 0.0.4).
pub(crate) const CONTENT_TYPE_TEXT: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The metrics of one process (one broker handle).
pub(crate) struct Metrics {
    /// What is encoded: the parts' families and the [`Source`]s' collector.
    registry: Registry,
    /// The parts' counters, read at scrape time.
    sources: Arc<Sources>,
    /// The broker connection's own (channels opened, reachability).
    broker: BrokerMetrics,
    /// The calls' lifecycle, by service.
    calls: CallsMetrics,
    /// The HTTP face's (stream sessions, limits).
    gateway: GatewayMetrics,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with every part's families declared: a family reads 0
    /// (or is listed empty) before its part first counts, whether or not
    /// the part runs in this process.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let broker = BrokerMetrics::new(&mut registry);
        let gateway = GatewayMetrics::new(&mut registry);
        let calls = CallsMetrics::new(&mut registry);
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(sources.clone()));
        Self {
            registry,
            sources,
            broker,
            calls,
            gateway,
        }
    }

    /// The broker connection's metrics.
    pub(crate) fn broker(&self) -> &BrokerMetrics {
        &self.broker
    }

    /// The calls' metrics.
    pub(crate) fn calls(&self) -> &CallsMetrics {
        &self.calls
    }

    /// The gateway's metrics.
    pub(crate) fn gateway(&self) -> &GatewayMetrics {
        &self.gateway
    }

    /// Adds a part's counters, read at every scrape from now on. A source
    /// stays registered for the life of the process, so its counters never
    /// go back when the part stops (the number of parts started is bounded).
    pub(crate) fn register(&self, source: impl Source) {
        self.sources
            .list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(source));
    }

    /// The metrics as text: OpenMetrics when `openmetrics`, else the
    /// Prometheus text format. Returns the body and its content type.
    pub(crate) fn render(&self, openmetrics: bool) -> (String, &'static str) {
        let mut out = String::with_capacity(16 * 1024);
        let (encoded, content_type) = if openmetrics {
            (
                prometheus_client::encoding::text::encode(&mut out, &self.registry),
                CONTENT_TYPE_OPENMETRICS,
            )
        } else {
            (
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry),
                CONTENT_TYPE_TEXT,
            )
        };
        // Writing to a String cannot fail; an encoder error would be a bug
        // in a label, and a partial page is still more use than none.
        if let Err(e) = encoded {
            tracing::error!(error = %e, "metrics could not be encoded in full");
        }
        (out, content_type)
    }
}

/// A part whose counters are read at scrape time.
pub(crate) trait Source: Send + Sync + 'static {
    /// Adds this part's values to `out`.
    fn collect(&self, out: &mut Collected);
}

#[derive(Default)]
struct Sources {
    list: Mutex<Vec<Box<dyn Source>>>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut collected = Collected::default();
        for source in self.list.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            source.collect(&mut collected);
        }
        for values in collected.parts.values() {
            values.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// A part's numbers at one scrape, summed over its [`Source`]s, and how
/// they are written.
pub(crate) trait Values: Default + Send + 'static {
    /// The part's name: one [`Values`] type per name; parts are encoded in
    /// the order of their names.
    const PART: &'static str;

    /// Writes the part's families.
    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result;
}

/// [`Values`] of any part, as [`Collected`] keeps them.
trait AnyValues: Send {
    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result;
    fn as_any(&mut self) -> &mut dyn Any;
}

impl<V: Values> AnyValues for V {
    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        Values::encode(self, enc)
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

/// What the [`Source`]s report at one scrape; each adds to its part's
/// [`Values`].
#[derive(Default)]
pub(crate) struct Collected {
    parts: BTreeMap<&'static str, Box<dyn AnyValues>>,
}

impl fmt::Debug for Collected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.parts.keys()).finish()
    }
}

impl Collected {
    /// The values of part `V`, to add to (made empty on first use).
    pub(crate) fn values<V: Values>(&mut self) -> &mut V {
        self.parts
            .entry(V::PART)
            .or_insert_with(|| Box::new(V::default()))
            .as_any()
            .downcast_mut()
            // Only `V` is ever inserted under `V::PART`, unless two parts
            // share a name: a bug that every scrape (and the tests) shows.
            .expect("one Values type per part name")
    }
}

/// Writes a counter without labels.
pub(crate) fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

/// Writes a counter family with one label, a row per value.
pub(crate) fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    rows: &[(&str, u64)],
) -> fmt::Result {
    let mut m: MetricEncoder = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in rows {
        m.encode_family(&[(label, *value)])?
            .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
    }
    Ok(())
}

/// Writes a gauge without labels.
pub(crate) fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// Writes a gauge family with one label, a row per value.
pub(crate) fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    rows: &[(&str, i64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, v) in rows {
        m.encode_family(&[(label, *value)])?.encode_gauge(v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::amqp::consumer::metrics::ConsumerValues;
    use crate::calls::metrics::Mode;
    use crate::gateway::metrics::Transport;
    use crate::rpc::metrics::RpcValues;
    use crate::worker::metrics::WorkerValues;

    struct Fake;

    impl Source for Fake {
        fn collect(&self, out: &mut Collected) {
            let w = out.values::<WorkerValues>().service("echo");
            w.deliveries += 2;
            w.consuming += 1;
            out.values::<RpcValues>().late += 1;
            out.values::<ConsumerValues>().named("worker/echo").up += 1;
        }
    }

    #[test]
    fn families_follow_the_naming_conventions_and_sources_add_up() {
        let m = Metrics::new();
        m.register(Fake);
        m.register(Fake);
        let calls = m.calls().service("echo");
        calls.started(Mode::Sync);
        calls.finished(Mode::Sync, 200, Duration::from_millis(3));
        calls.finished(Mode::Async, 504, Duration::from_secs(30));
        let session = m.gateway().stream_session(Transport::Sse);
        let (text, ct) = m.render(true);
        assert_eq!(ct, CONTENT_TYPE_OPENMETRICS);
        for line in [
            "switchboard_gateway_calls_started_total{service=\"echo\",mode=\"sync\"} 1",
            "switchboard_gateway_calls_finished_total{service=\"echo\",mode=\"sync\",status=\"2xx\"} 1",
            "switchboard_gateway_calls_finished_total{service=\"echo\",mode=\"async\",status=\"5xx\"} 1",
            "switchboard_gateway_call_duration_seconds_count{service=\"echo\",mode=\"sync\"} 1",
            "switchboard_gateway_stream_sessions{transport=\"sse\"} 1",
            "switchboard_gateway_stream_sessions{transport=\"websocket\"} 0",
            "switchboard_worker_deliveries_total{service=\"echo\"} 4",
            "switchboard_worker_consuming{service=\"echo\"} 2",
            "switchboard_rpc_replies_dropped_total{reason=\"late\"} 2",
            "switchboard_broker_reconnects_total{role=\"worker\"} 0",
            "switchboard_consumer_up{consumer=\"worker/echo\"} 2",
            "switchboard_consumer_poison_total{consumer=\"worker/echo\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        drop(session);
        let (text, ct) = m.render(false);
        assert_eq!(ct, CONTENT_TYPE_TEXT);
        assert!(text.contains("switchboard_gateway_stream_sessions{transport=\"sse\"} 0"));
        assert!(!text.contains("# EOF"));
    }
}
