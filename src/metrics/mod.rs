//! Prometheus metrics: every metric switchboard exposes, by name, in one
//! place, and their exposition (`GET /metrics`).
//!
//! One [`Metrics`] registry belongs to each [`crate::amqp::Broker`] handle,
//! because every part already holds the broker: a process has one, and two
//! brokers in one process (tests) never mix their numbers.
//!
//! Two kinds of numbers, both cheap where things happen:
//! - The parts' own counters (`WorkerStats`, `RpcStats`, `HubStats`,
//!   `CallbackStats`, and the supervised consumers' statuses,
//!   [`crate::amqp::consumer::Consumers`]: plain atomics they keep anyway)
//!   are read at scrape time:
//!   each part registers a [`Source`] that adds its values to a [`Collected`],
//!   which is encoded here. Nothing extra runs per message.
//! - What only the gateway sees (calls by service, mode and status, their
//!   durations, stream sessions, requests refused by a caller's limits,
//!   channels opened on the publishing connections) is counted at the point
//!   where it happens, through handles made once per service
//!   ([`CallMetrics`]) or per caller ([`Metrics::limited`]): an atomic
//!   increment and a lock-free [`Histogram`] observation per call.
//!
//! Label sets are bounded: services and callers come from the settings,
//! `mode`, `status` (the HTTP status class), `role`, `reason`, `limit` and
//! `transport` from fixed lists, `consumer` from roles and configured services. Call ids never become labels (they are in the logs, as the
//! `call_id` field).
//!
//! # Layout
//! - [`histogram`]: the lock-free duration [`Histogram`].
//! - this file: [`Metrics`], the [`Source`] trait and [`Collected`], the
//!   gateway's [`CallMetrics`] and [`StreamSession`].

pub mod histogram;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

pub use histogram::{DURATION_BUCKETS, Histogram, HistogramValues};

/// `Content-Type` of the OpenMetrics text format (what Prometheus asks for).
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic Prometheus text format (version 0.0.4).
pub const CONTENT_TYPE_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How a call was asked for (`started`) or answered (`finished`): the
/// `mode` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The reply is the HTTP answer (a call whose wait ran out finishes as
    /// `async`).
    Sync,
    /// Answered `202 Accepted`; polled, long-polled or streamed.
    Async,
    /// Answered `202 Accepted`; the result is POSTed to a `Callback-Url`.
    Callback,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Sync, Mode::Async, Mode::Callback];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Callback => "callback",
        }
    }
}

/// The `status` label of a finished call: the class of its HTTP status
/// (an expired call is a 504, a dead-lettered one a 502).
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// The `status` label value of an HTTP status.
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[status_class_index(status)]
}

/// Which stream a session is served on: the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Server-Sent Events.
    Sse,
    /// WebSocket.
    WebSocket,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::WebSocket => "websocket",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    service: String,
    mode: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    caller: String,
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

/// The metrics of one process (one broker handle).
pub struct Metrics {
    /// What is encoded: the gateway's families and the [`Source`]s' collector.
    registry: Registry,
    /// The parts' counters, read at scrape time.
    sources: Arc<Sources>,
    started: Family<CallLabels, Counter>,
    finished: Family<FinishedLabels, Counter>,
    durations: Family<CallLabels, Histogram>,
    /// Handles per service, made once (see [`Metrics::calls`]).
    calls: RwLock<HashMap<String, Arc<CallMetrics>>>,
    sessions: Family<TransportLabels, Gauge>,
    dead_letters: Family<ServiceLabels, Counter>,
    /// Requests refused by a caller's limit, by caller (callers come from
    /// the settings, so the labels are bounded) and limit.
    limited: Family<LimitLabels, Counter>,
    /// Channels opened on the publishing pool's connections.
    channels_opened: Counter,
    /// Calls cancelled by their caller, by service.
    cancelled: Family<ServiceLabels, Counter>,
    /// Replies that arrived for calls already cancelled, dropped.
    after_cancel: Family<ServiceLabels, Counter>,
    broker_up: Gauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with every family declared.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let started = Family::<CallLabels, Counter>::default();
        let finished = Family::<FinishedLabels, Counter>::default();
        let durations = Family::<CallLabels, Histogram>::default();
        let sessions = Family::<TransportLabels, Gauge>::default();
        let dead_letters = Family::<ServiceLabels, Counter>::default();
        let cancelled = Family::<ServiceLabels, Counter>::default();
        let after_cancel = Family::<ServiceLabels, Counter>::default();
        let broker_up = Gauge::default();
        let limited = Family::<LimitLabels, Counter>::default();
        let channels_opened = Counter::default();
        registry.register(
            "switchboard_broker_channels_opened",
            "Channels this process opened on its publishing connections (declarations, reachability probes, publishing channels replaced): the channel churn it causes on the broker",
            channels_opened.clone(),
        );
        registry.register(
            "switchboard_gateway_limited",
            "Requests refused with 429 because their caller was over one of its limits (gateway.limits), by caller and limit (rate, pending, streams, long_polls)",
            limited.clone(),
        );
        registry.register(
            "switchboard_gateway_calls_started",
            "Calls the gateway published, by service and the mode the caller asked for",
            started.clone(),
        );
        registry.register(
            "switchboard_gateway_calls_finished",
            "Calls the gateway saw end, by service, the mode they were answered in and the class of their HTTP status (expired: 5xx)",
            finished.clone(),
        );
        registry.register_with_unit(
            "switchboard_gateway_call_duration",
            "Time from the request to the answer (sync), or from acceptance to completion (async, callback)",
            Unit::Seconds,
            durations.clone(),
        );
        registry.register(
            "switchboard_gateway_stream_sessions",
            "Event stream sessions open now, by transport",
            sessions.clone(),
        );
        registry.register(
            "switchboard_dead_letters",
            "Requests dead-lettered after failing on every allowed delivery, by service, as the gateway's dead-letter watch sees them",
            dead_letters.clone(),
        );
        registry.register(
            "switchboard_gateway_calls_cancelled",
            "Calls cancelled by their caller (DELETE /v1/calls/{id}), by service",
            cancelled.clone(),
        );
        registry.register(
            "switchboard_gateway_replies_after_cancel",
            "Replies that arrived for calls their caller had cancelled, dropped, by service",
            after_cancel.clone(),
        );
        registry.register(
            "switchboard_broker_up",
            "Whether the broker answered at the last scrape (1) or not (0)",
            broker_up.clone(),
        );
        // Zero, not absent, before the first session.
        for t in [Transport::Sse, Transport::WebSocket] {
            sessions.get_or_create_owned(&TransportLabels {
                transport: t.as_str(),
            });
        }
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(sources.clone()));
        Self {
            registry,
            sources,
            started,
            finished,
            durations,
            calls: RwLock::new(HashMap::new()),
            sessions,
            dead_letters,
            limited,
            channels_opened,
            cancelled,
            after_cancel,
            broker_up,
        }
    }

    /// A channel was opened on a publishing connection.
    pub fn channel_opened(&self) {
        self.channels_opened.inc();
    }

    /// The counter of requests of `caller` refused by its `limit` (made at
    /// the gateway's start for every configured caller, so it reads 0
    /// before the first refusal).
    pub fn limited(&self, caller: &str, limit: &'static str) -> Counter {
        self.limited.get_or_create_owned(&LimitLabels {
            caller: caller.to_owned(),
            limit,
        })
    }

    /// Adds a part's counters, read at every scrape from now on. A source
    /// stays registered for the life of the process, so its counters never
    /// go back when the part stops (the number of parts started is bounded).
    pub fn register(&self, source: impl Source) {
        self.sources
            .list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(source));
    }

    /// The call metrics of `service` (made on first use, then shared).
    pub fn calls(&self, service: &str) -> Arc<CallMetrics> {
        if let Some(c) = self
            .calls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
        {
            return c.clone();
        }
        let mut map = self.calls.write().unwrap_or_else(|p| p.into_inner());
        map.entry(service.to_owned())
            .or_insert_with(|| {
                let labels = |mode: Mode| CallLabels {
                    service: service.to_owned(),
                    mode: mode.as_str(),
                };
                Arc::new(CallMetrics {
                    service: service.to_owned(),
                    started: Mode::ALL.map(|m| self.started.get_or_create_owned(&labels(m))),
                    durations: Mode::ALL.map(|m| self.durations.get_or_create_owned(&labels(m))),
                    finished: Default::default(),
                    family: self.finished.clone(),
                })
            })
            .clone()
    }

    /// Counts an open stream session until the returned guard is dropped.
    pub fn stream_session(&self, transport: Transport) -> StreamSession {
        let gauge = self.sessions.get_or_create_owned(&TransportLabels {
            transport: transport.as_str(),
        });
        gauge.inc();
        StreamSession(gauge)
    }

    /// A request of `service` was dead-lettered. `service` must be one of
    /// the configured services (the dead-letter watch binds only those).
    pub fn dead_letter(&self, service: &str) {
        self.dead_letters
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// A call of `service` was cancelled by its caller.
    pub fn call_cancelled(&self, service: &str) {
        self.cancelled
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// A reply came for a call of `service` its caller had cancelled, and
    /// was dropped.
    pub fn reply_after_cancel(&self, service: &str) {
        self.after_cancel
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Records whether the broker answered a probe just now.
    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.set(i64::from(up));
    }

    /// The metrics as text: OpenMetrics when `openmetrics`, else the
    /// Prometheus text format. Returns the body and its content type.
    pub fn render(&self, openmetrics: bool) -> (String, &'static str) {
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

/// The gateway's counters of one service, made once so that counting a
/// call takes no lock and allocates nothing.
pub struct CallMetrics {
    service: String,
    started: [Counter; 3],
    durations: [Histogram; 3],
    /// By mode and status class, made on first use (most never happen).
    finished: [[OnceLock<Counter>; 5]; 3],
    family: Family<FinishedLabels, Counter>,
}

impl fmt::Debug for CallMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallMetrics")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl CallMetrics {
    /// A call was published in `mode`.
    pub fn started(&self, mode: Mode) {
        self.started[mode as usize].inc();
    }

    /// A call ended, answered in `mode` with HTTP `status`, `took` after it
    /// started (sync) or was accepted (async, callback).
    pub fn finished(&self, mode: Mode, status: u16, took: Duration) {
        let class = status_class_index(status);
        self.finished[mode as usize][class]
            .get_or_init(|| {
                self.family.get_or_create_owned(&FinishedLabels {
                    service: self.service.clone(),
                    mode: mode.as_str(),
                    status: STATUS_CLASSES[class],
                })
            })
            .inc();
        self.durations[mode as usize].observe(took);
    }
}

/// An open stream session, counted while it lives.
#[derive(Debug)]
pub struct StreamSession(Gauge);

impl Drop for StreamSession {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A part whose counters are read at scrape time.
pub trait Source: Send + Sync + 'static {
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
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut collected = Collected::default();
        for source in self.list.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            source.collect(&mut collected);
        }
        collected.encode(encoder)
    }
}

/// One worker's (or several workers' of one service) numbers.
#[derive(Debug, Default, Clone)]
pub struct WorkerValues {
    /// Deliveries taken from the queue.
    pub deliveries: u64,
    /// Deliveries the broker marked as redelivered.
    pub redeliveries: u64,
    /// Copies of requests already answered, settled without running again.
    pub duplicates: u64,
    /// Requests answered and acked.
    pub replies: u64,
    /// Deliveries given back for redelivery.
    pub requeues: u64,
    /// Deliveries the worker itself dead-lettered.
    pub dead_letters: u64,
    /// Requests dropped because their deadline had passed.
    pub expired: u64,
    /// Requests of cancelled calls: dropped unprocessed, or not answered.
    pub cancelled: u64,
    /// Progress reports published.
    pub progress: u64,
    /// Workers consuming now.
    pub consuming: i64,
    /// Handler run times.
    pub handler: HistogramValues,
}

/// The RPC clients' numbers.
#[derive(Debug, Default, Clone)]
pub struct RpcValues {
    /// Calls waiting for a reply now.
    pub pending: i64,
    /// Replies handed to their caller.
    pub routed: u64,
    /// Replies handed to the orphan sink (the gateway's call store).
    pub handed_off: u64,
    /// Replies for calls whose caller had given up.
    pub late: u64,
    /// Replies for no known call.
    pub unknown: u64,
    /// Replies without a usable correlation id.
    pub malformed: u64,
    /// Calls that reached their deadline without a reply.
    pub timeouts: u64,
    /// Progress reports handed to their caller or the call store.
    pub progress_routed: u64,
    /// Progress reports nobody took.
    pub progress_dropped: u64,
    /// Queues of dead gateways this one drains now ([`crate::calls::adopt`]).
    pub adopted_queues: i64,
    /// Replies taken from dead gateways' queues.
    pub adopted_replies: u64,
}

/// The event hubs' numbers.
#[derive(Debug, Default, Clone)]
pub struct HubValues {
    /// Events relayed to stream sessions.
    pub relayed: u64,
    /// Sessions dropped because they did not keep up.
    pub dropped_slow: u64,
    /// Messages on the events exchange that were not CloudEvents.
    pub malformed: u64,
}

/// The numbers of the supervised consumers of one name
/// ([`crate::amqp::consumer`]): `worker/<service>`, `rpc`, `hub`,
/// `deadwatch`, `subscriber`.
#[derive(Debug, Default, Clone)]
pub struct ConsumerValues {
    /// Consumers of that name consuming now.
    pub up: i64,
    /// Times they were re-established after they were lost.
    pub reconnects: u64,
    /// Poison messages they settled to a dead-letter queue.
    pub poisoned: u64,
}

/// The callback dispatchers' numbers.
#[derive(Debug, Default, Clone)]
pub struct CallbackValues {
    /// Delivery attempts.
    pub attempts: u64,
    /// Callbacks delivered (answered 2xx).
    pub delivered: u64,
    /// Failed attempts scheduled again.
    pub retries: u64,
    /// Callbacks given up and kept as dead letters.
    pub dead_letters: u64,
    /// Attempts put off because their host's circuit was open.
    pub deferred: u64,
    /// Each receiver host followed, 1 while its circuit is open.
    pub circuits: Vec<(String, i64)>,
}

/// What the [`Source`]s report at one scrape; each adds to it.
#[derive(Debug, Default)]
pub struct Collected {
    workers: BTreeMap<String, WorkerValues>,
    rpc: Option<RpcValues>,
    hub: Option<HubValues>,
    callbacks: Option<CallbackValues>,
    consumers: BTreeMap<String, ConsumerValues>,
}

impl Collected {
    /// The numbers of `service`'s workers, to add to.
    pub fn worker(&mut self, service: &str) -> &mut WorkerValues {
        if !self.workers.contains_key(service) {
            self.workers
                .insert(service.to_owned(), WorkerValues::default());
        }
        self.workers
            .get_mut(service)
            .expect("inserted just above when missing")
    }

    /// The RPC clients' numbers, to add to.
    pub fn rpc(&mut self) -> &mut RpcValues {
        self.rpc.get_or_insert_with(Default::default)
    }

    /// The event hubs' numbers, to add to.
    pub fn hub(&mut self) -> &mut HubValues {
        self.hub.get_or_insert_with(Default::default)
    }

    /// The numbers of the consumers named `name`, to add to.
    pub fn consumer(&mut self, name: &str) -> &mut ConsumerValues {
        if !self.consumers.contains_key(name) {
            self.consumers
                .insert(name.to_owned(), ConsumerValues::default());
        }
        self.consumers
            .get_mut(name)
            .expect("inserted just above when missing")
    }

    /// The callback dispatchers' numbers, to add to.
    pub fn callbacks(&mut self) -> &mut CallbackValues {
        self.callbacks.get_or_insert_with(Default::default)
    }

    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let w = &self.workers;
        if !w.is_empty() {
            let per_service = |f: fn(&WorkerValues) -> u64| {
                w.iter()
                    .map(move |(s, v)| (s.as_str(), f(v)))
                    .collect::<Vec<_>>()
            };
            let families: [WorkerFamily; 9] = [
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
                counters(&mut enc, name, help, "service", &per_service(f))?;
            }
            let consuming: Vec<(&str, i64)> =
                w.iter().map(|(s, v)| (s.as_str(), v.consuming)).collect();
            gauges(
                &mut enc,
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
        }
        if let Some(r) = &self.rpc {
            gauge(
                &mut enc,
                "switchboard_rpc_pending_calls",
                "Calls waiting for a reply now.",
                r.pending,
            )?;
            counter(
                &mut enc,
                "switchboard_rpc_replies_routed",
                "Replies handed to the caller waiting for them.",
                r.routed,
            )?;
            counter(
                &mut enc,
                "switchboard_rpc_replies_handed_off",
                "Replies of calls nobody waits for in memory (answered 202, or made before a restart), handed to the call store.",
                r.handed_off,
            )?;
            counters(
                &mut enc,
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
                &mut enc,
                "switchboard_rpc_timeouts",
                "Calls that reached their deadline without a reply.",
                r.timeouts,
            )?;
            counter(
                &mut enc,
                "switchboard_rpc_progress_routed",
                "Progress reports handed to the caller reading them, or recorded on a stored call.",
                r.progress_routed,
            )?;
            counter(
                &mut enc,
                "switchboard_rpc_progress_dropped",
                "Progress reports nobody took: of a call not followed here or already ended, read by nobody, not kept up with, or malformed.",
                r.progress_dropped,
            )?;
            gauge(
                &mut enc,
                "switchboard_rpc_adopted_queues",
                "Reply queues of dead gateways sharing the call store that this one drains now.",
                r.adopted_queues,
            )?;
            counter(
                &mut enc,
                "switchboard_rpc_adopted_replies",
                "Replies taken from dead gateways' reply queues and handed to the call store.",
                r.adopted_replies,
            )?;
        }
        if let Some(h) = &self.hub {
            counter(
                &mut enc,
                "switchboard_event_hub_relayed",
                "Events taken from the events exchange and offered to stream sessions.",
                h.relayed,
            )?;
            counter(
                &mut enc,
                "switchboard_event_hub_slow_sessions_dropped",
                "Stream sessions dropped because they fell behind (their buffer was full).",
                h.dropped_slow,
            )?;
            counter(
                &mut enc,
                "switchboard_event_hub_malformed",
                "Messages on the events exchange that were not CloudEvents (skipped).",
                h.malformed,
            )?;
        }
        if let Some(c) = &self.callbacks {
            counter(
                &mut enc,
                "switchboard_callback_attempts",
                "Callback delivery attempts.",
                c.attempts,
            )?;
            counter(
                &mut enc,
                "switchboard_callback_deliveries",
                "Callbacks delivered (answered 2xx).",
                c.delivered,
            )?;
            counter(
                &mut enc,
                "switchboard_callback_retries",
                "Failed callback attempts scheduled to be tried again.",
                c.retries,
            )?;
            counter(
                &mut enc,
                "switchboard_callback_dead_letters",
                "Callbacks given up and kept as dead letters.",
                c.dead_letters,
            )?;
            counter(
                &mut enc,
                "switchboard_callback_deferred",
                "Callback attempts put off because their receiver host's circuit was open.",
                c.deferred,
            )?;
            let circuits: Vec<(&str, i64)> =
                c.circuits.iter().map(|(h, v)| (h.as_str(), *v)).collect();
            gauges(
                &mut enc,
                "switchboard_callback_circuit_open",
                "Per receiver host (host:port) that failed lately: 1 while its circuit is open (its callbacks paused, or one attempt trying it), 0 while closed.",
                "host",
                &circuits,
            )?;
        }
        let c = &self.consumers;
        if !c.is_empty() {
            let up: Vec<(&str, i64)> = c.iter().map(|(n, v)| (n.as_str(), v.up)).collect();
            gauges(
                &mut enc,
                "switchboard_consumer_up",
                "Consumers of that name (worker/<service>, rpc, hub, deadwatch, subscriber) consuming now; 0 while one is down (lost, re-establishing, its actor or task gone).",
                "consumer",
                &up,
            )?;
            let poisoned: Vec<(&str, u64)> =
                c.iter().map(|(n, v)| (n.as_str(), v.poisoned)).collect();
            counters(
                &mut enc,
                "switchboard_consumer_poison",
                "Messages a consumer could not decode or handle, settled once to a dead-letter queue (the service's, or <prefix>.poison) so that they never come back.",
                "consumer",
                &poisoned,
            )?;
            // By role: the name up to its first '/' (worker/<service> -> worker).
            let mut by_role: BTreeMap<&str, u64> = BTreeMap::new();
            for (name, v) in c {
                let role = name.split('/').next().unwrap_or(name);
                *by_role.entry(role).or_default() += v.reconnects;
            }
            let reconnects: Vec<(&str, u64)> = by_role.into_iter().collect();
            counters(
                &mut enc,
                "switchboard_broker_reconnects",
                "Consumer connections re-established after they were lost, by role (worker, rpc, hub, deadwatch, subscriber).",
                "role",
                &reconnects,
            )?;
        }
        Ok(())
    }
}

/// A worker counter family: name, help, and how to read it.
type WorkerFamily = (&'static str, &'static str, fn(&WorkerValues) -> u64);

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

fn counters(
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

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn gauges(
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
    use super::*;

    struct Fake;

    impl Source for Fake {
        fn collect(&self, out: &mut Collected) {
            let w = out.worker("echo");
            w.deliveries += 2;
            w.consuming += 1;
            out.rpc().late += 1;
            out.consumer("worker/echo").up += 1;
        }
    }

    #[test]
    fn families_follow_the_naming_conventions_and_sources_add_up() {
        let m = Metrics::new();
        m.register(Fake);
        m.register(Fake);
        let calls = m.calls("echo");
        calls.started(Mode::Sync);
        calls.finished(Mode::Sync, 200, Duration::from_millis(3));
        calls.finished(Mode::Async, 504, Duration::from_secs(30));
        let session = m.stream_session(Transport::Sse);
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

    #[test]
    fn status_classes_are_bounded() {
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(0), "1xx");
        assert_eq!(status_class(504), "5xx");
        assert_eq!(status_class(999), "5xx");
    }
}
