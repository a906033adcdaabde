//! What a bench run reports: one [`Line`] per measured [`Point`] and per
//! [`Ratio`]; the [`Labels`] of a point and [`measured_point`], which
//! makes one from a drive; latency histograms and the [`Totals`] a ratio
//! is computed from. The process readings each point carries are the
//! [`probe`](crate::probe)'s.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use switchboard::settings::{QueueType, ServiceSettings};

use crate::load::Measured;
use crate::probe::Usage;

/// One JSON line of output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
// A run makes a few dozen lines: their size does not matter, plain access does.
#[allow(clippy::large_enum_variant)]
pub enum Line {
    /// A measured point.
    Point(Point),
    /// switchboard against the raw reference, measured in the same run.
    Ratio(Ratio),
}

/// One measured point: a workload, a variant and a concurrency.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// `rpc`, `events`, `http`, `sse` or `notify`.
    pub workload: String,
    /// `switchboard` (the library) or `raw` (the reference on bare lapin).
    pub variant: String,
    /// `safe` or `fast` (rpc); `safe` for events (always persistent, confirmed).
    pub profile: String,
    /// `queue` or `direct` (rpc); `none` for events.
    pub reply_mode: String,
    /// The service queue's type (`quorum`, `classic`), `external` when the
    /// service is served by another process, `fanout` for events.
    pub queue_type: String,
    /// Bytes of each request (rpc) or event (events) body.
    pub payload: usize,
    /// rpc with `--worker-processes`: the `switchboard serve` processes
    /// serving the service (absent: a worker in the bench's process).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub worker_processes: Option<usize>,
    /// Calls in flight (rpc); subscribers (events).
    pub concurrency: usize,
    /// Calls completed (rpc); events published (events). Includes errors.
    pub calls: u64,
    /// Calls or events that failed (error, timeout, wrong reply, lost event).
    pub errors: u64,
    /// Wall time of the measured calls, s.
    pub seconds: f64,
    /// `calls / seconds`.
    pub calls_per_s: f64,
    /// Median latency of successful calls (events: publish to delivery), µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Highest latency, µs.
    pub max_us: u64,
    /// rpc only: median time from a call's start until the broker confirmed
    /// its request (the rest of `p50_us` is the wait for the reply), µs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub confirm_p50_us: Option<u64>,
    /// rpc only: 99th percentile of the same, µs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub confirm_p99_us: Option<u64>,
    /// Peak resident set size (VmHWM, KiB) during this point when the peak
    /// could be reset before it, else the process's peak so far.
    pub peak_rss_kib: Option<u64>,
    /// Whether `peak_rss_kib` covers this point only.
    pub peak_rss_reset: bool,
    /// CPU time of the whole process during the point, s.
    pub cpu_s: Option<f64>,
    /// CPU time of the thread running the actix system (every actor and
    /// load task of the bench, and lapin's internal RPC tasks), s.
    pub main_cpu_s: Option<f64>,
    /// CPU time by thread name (`lapin-io-loop` = lapin's socket threads), s.
    pub cpu_by_thread: BTreeMap<String, f64>,
    /// CPU time of the broker process during the point (`--broker-pid`), s.
    pub broker_cpu_s: Option<f64>,
    /// CPU time used on the whole machine during the point (all processes,
    /// all cores; `/proc/stat`), s: what is neither `cpu_s` nor
    /// `broker_cpu_s` is someone else's load.
    pub machine_cpu_s: Option<f64>,
    /// Which repetition of an alternating comparison (1-based).
    pub round: u32,
    /// Events only: events delivered to all subscribers together.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deliveries: Option<u64>,
    /// Events only: `deliveries / seconds`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delivered_per_s: Option<f64>,
    /// Events only: the publishing rate asked for, events/s.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate: Option<f64>,
    /// http and notify: HTTP requests the client made per call (a POST and
    /// the GETs that followed it), over all calls of the point.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub requests_per_call: Option<f64>,
    /// notify only: median time from the worker's completion of a call (its
    /// handler returned the reply) until the client knew the result, µs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub aware_p50_us: Option<u64>,
    /// notify only: 99th percentile of the same, µs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub aware_p99_us: Option<u64>,
    /// notify only: the highest of the same, µs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub aware_max_us: Option<u64>,
    /// sse only: median, over every event and SSE client, of the client's
    /// delivery latency minus the AMQP subscriber's for the same event, µs
    /// (negative: the SSE client had it first).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub minus_amqp_p50_us: Option<i64>,
    /// sse only: 99th percentile of the same, µs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub minus_amqp_p99_us: Option<i64>,
    /// sse only: events that did not reach a client (summed over clients).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub missing: Option<u64>,
    /// pending only: resident set (VmRSS) after the warm-up, KiB.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rss_before_kib: Option<u64>,
    /// pending only: resident set once every measured call is pending, KiB.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rss_after_kib: Option<u64>,
    /// pending only: (rss_after - rss_before) / calls, bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rss_per_call_bytes: Option<f64>,
}

/// switchboard divided by raw, for one workload, profile and concurrency,
/// over every round of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// `rpc`, `events` or `http`.
    pub workload: String,
    /// What is divided by what, when it is not switchboard by raw (`http`:
    /// `"sync / rpc"`, `"get / bare"`): the `switchboard_*` fields then hold
    /// the first, the `raw_*` fields the second.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub of: Option<String>,
    /// As in [`Point`].
    pub profile: String,
    /// As in [`Point`].
    pub reply_mode: String,
    /// As in [`Point`].
    pub queue_type: String,
    /// As in [`Point`].
    pub concurrency: usize,
    /// Rounds merged.
    pub rounds: u32,
    /// switchboard's calls/s (events: deliveries/s), all rounds together.
    pub switchboard_calls_per_s: f64,
    /// raw's calls/s (events: deliveries/s), all rounds together.
    pub raw_calls_per_s: f64,
    /// `switchboard_calls_per_s / raw_calls_per_s`: below 1 is slower.
    pub calls_per_s_ratio: f64,
    /// The calls/s ratio of each round (the two points of a round ran one
    /// right after the other, so load from elsewhere tends to hit both).
    pub round_ratios: Vec<f64>,
    /// The median of `round_ratios`: the figure least moved by one
    /// disturbed round.
    pub median_round_ratio: f64,
    /// switchboard's median latency over all rounds, µs.
    pub switchboard_p50_us: u64,
    /// raw's median latency over all rounds, µs.
    pub raw_p50_us: u64,
    /// `switchboard_p50_us / raw_p50_us`: above 1 is slower.
    pub p50_ratio: f64,
    /// switchboard's p99 over all rounds divided by raw's.
    pub p99_ratio: f64,
}

/// A latency histogram in µs, 1 µs to 10 minutes, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid histogram bounds")
}

/// Records `d` in µs (values beyond the bounds are clamped).
pub(crate) fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_micros().min(u128::from(u64::MAX)) as u64);
}

/// Everything of a variant's measurements that a ratio needs, summed over rounds.
#[derive(Debug)]
pub(crate) struct Totals {
    pub ops: u64,
    pub seconds: f64,
    pub hist: Histogram<u64>,
    /// Operations per second of each round, in order.
    pub rates: Vec<f64>,
}

impl Totals {
    pub fn new() -> Self {
        Self {
            ops: 0,
            seconds: 0.0,
            hist: histogram(),
            rates: Vec::new(),
        }
    }

    pub fn add(&mut self, ops: u64, seconds: f64, hist: &Histogram<u64>) {
        self.ops += ops;
        self.seconds += seconds;
        self.rates.push(per_s(ops, seconds));
        // Same bounds on both sides: addition cannot fail.
        let _ = self.hist.add(hist);
    }

    fn per_s(&self) -> f64 {
        per_s(self.ops, self.seconds)
    }
}

/// The labels of a point.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Labels {
    pub profile: &'static str,
    pub reply_mode: &'static str,
    pub queue_type: &'static str,
    /// Bytes of each request body.
    pub payload: usize,
    /// `switchboard serve` processes serving the service, if any.
    pub worker_processes: Option<usize>,
}

impl Labels {
    /// The labels of a point through the gateway: profile `safe`, the
    /// gateway's durable reply queue, `svc`'s queue type.
    pub fn gateway(svc: &ServiceSettings, payload: usize) -> Self {
        Labels {
            profile: "safe",
            reply_mode: "queue",
            queue_type: match svc.queue_type {
                QueueType::Quorum => "quorum",
                QueueType::Classic => "classic",
            },
            payload: payload.max(10),
            worker_processes: None,
        }
    }
}

/// The point of one drive of `workload`'s `variant`: its call latencies,
/// the time to the confirm of each request, and the probe's readings.
pub(crate) fn measured_point(
    workload: &str,
    variant: &str,
    labels: Labels,
    concurrency: usize,
    round: u32,
    m: &Measured,
    usage: Usage,
) -> Point {
    let seconds = m.elapsed.as_secs_f64();
    usage.into_point(Point {
        workload: workload.into(),
        variant: variant.into(),
        profile: labels.profile.into(),
        reply_mode: labels.reply_mode.into(),
        queue_type: labels.queue_type.into(),
        payload: labels.payload,
        worker_processes: labels.worker_processes,
        concurrency,
        calls: m.calls,
        errors: m.errors,
        seconds: round3(seconds),
        calls_per_s: round2(per_s(m.calls, seconds)),
        p50_us: m.hist.value_at_quantile(0.5),
        p99_us: m.hist.value_at_quantile(0.99),
        max_us: m.hist.max(),
        confirm_p50_us: Some(m.confirmed.value_at_quantile(0.5)),
        confirm_p99_us: Some(m.confirmed.value_at_quantile(0.99)),
        round,
        deliveries: None,
        delivered_per_s: None,
        rate: None,
        ..Point::default()
    })
}

/// The ratio line of `sb` against `raw`, labelled like `like`.
pub(crate) fn ratio(like: &Point, rounds: u32, sb: &Totals, raw: &Totals) -> Ratio {
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let q = |t: &Totals, q: f64| t.hist.value_at_quantile(q);
    let round_ratios: Vec<f64> = sb
        .rates
        .iter()
        .zip(&raw.rates)
        .map(|(s, r)| round3(div(*s, *r)))
        .collect();
    Ratio {
        of: None,
        median_round_ratio: median(&round_ratios),
        round_ratios,
        workload: like.workload.clone(),
        profile: like.profile.clone(),
        reply_mode: like.reply_mode.clone(),
        queue_type: like.queue_type.clone(),
        concurrency: like.concurrency,
        rounds,
        switchboard_calls_per_s: round2(sb.per_s()),
        raw_calls_per_s: round2(raw.per_s()),
        calls_per_s_ratio: round3(div(sb.per_s(), raw.per_s())),
        switchboard_p50_us: q(sb, 0.5),
        raw_p50_us: q(raw, 0.5),
        p50_ratio: round3(div(q(sb, 0.5) as f64, q(raw, 0.5) as f64)),
        p99_ratio: round3(div(q(sb, 0.99) as f64, q(raw, 0.99) as f64)),
    }
}

/// The median (the mean of the middle two for an even count), 0 when empty.
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => round3((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `n / seconds`, 0 for an empty interval.
pub(crate) fn per_s(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
