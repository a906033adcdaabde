//! `bench events`: CloudEvents published to a fanout and received by K
//! subscribers, paced (`--rate`) or saturated (`--saturated`: as fast as
//! [`MAX_IN_FLIGHT`] unconfirmed publishes allow); delivered events/s and
//! publish-to-delivery latency (the send time travels in the event's data).
//!
//! The variants ([`EventsVariant`]), each on an exchange of its own so that
//! none sees another's events:
//! - `switchboard` publishes with [`events::publish`] and receives through
//!   [`Subscription`]s on the run's events exchange;
//! - `raw` does the same on bare lapin, the straightforward way, with
//!   switchboard's guarantees: one publishing connection with a
//!   confirm-mode channel, persistent events with switchboard's properties;
//!   per subscriber a connection, a server-named exclusive queue bound to
//!   the fanout, prefetch 256 and one ack per event, as [`Subscription`]
//!   does;
//! - `plain` is RabbitMQ's tutorial 3 (publish/subscribe) as written:
//!   transient events with no properties, no confirms, subscribers that
//!   consume with automatic acks (no prefetch bound).
//!
//! `--events-log` binds an events log (a stream queue with the arguments of
//! `<prefix>.events.log`) to the switchboard variant's exchange (as `serve`,
//! `declare` and the gateway's hub do in a deployment), or to every
//! variant's, so that its cost per event is measured on its own.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use switchboard::amqp::{Broker, Names, topology, wire};
use switchboard::events::{self, CloudEvent, SubscribeOptions, Subscription};
use switchboard::lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use tokio::sync::Semaphore;

use crate::Out;
use crate::env::Env;
use crate::error::{BenchError, Result};
use crate::probe::Probe;
use crate::progress::{Progress, Tally, Total};
use crate::report::{Line, Point, Totals, histogram, per_s, ratio, record, round2, round3};

/// The type of the events the bench publishes.
pub(crate) const EVENT_TYPE: &str = "switchboard.bench.tick";
/// How long a subscriber waits for the next event before the rest count as lost.
const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// Publishes in flight at most; beyond it the publisher waits (and the
/// achieved rate, `calls_per_s`, falls below the asked one). Saturated, the
/// publisher keeps this many in flight.
const MAX_IN_FLIGHT: usize = 4096;
/// Prefetch of the `raw` subscribers: [`Subscription`]'s.
const RAW_PREFETCH: u16 = 256;

/// Flags of `bench events`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// Events published per measured point.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Publish for this many seconds instead (rate × duration events).
    #[arg(long, conflicts_with_all = ["events", "saturated"])]
    pub duration: Option<f64>,
    /// Events published before each point and not recorded.
    #[arg(long, default_value_t = 500)]
    pub warmup: u64,
    /// Events published per second (paced; up to 4096 publishes in flight).
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Publish as fast as the publisher can, up to 4096 publishes in flight
    /// (unconfirmed; `plain`: not yet written), instead of at `--rate`: the
    /// variants' throughput.
    #[arg(long, conflicts_with = "rate")]
    pub saturated: bool,
    /// Subscribers, each with a queue (and a connection) of its own.
    #[arg(long, default_value_t = 4)]
    pub subscribers: usize,
    /// Bytes of padding in each event's data.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Repetitions of the variants, alternating which goes first.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// The variants to measure, in this order on odd rounds (reversed on
    /// even ones).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "raw,switchboard,plain"
    )]
    pub variants: Vec<EventsVariant>,
    /// Which exchanges an events log is bound to (a stream queue with the
    /// arguments of `<prefix>.events.log`, which a deployment binds to its
    /// events exchange): none, the switchboard variant's (as in a
    /// deployment), or every variant's.
    #[arg(long, value_enum, default_value = "none")]
    pub events_log: EventsLogArg,
}

/// The variants of `bench events` (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum EventsVariant {
    /// `events::publish` and `events::Subscription`.
    Switchboard,
    /// Bare lapin with switchboard's guarantees: persistent and confirmed;
    /// manual acks under a prefetch of 256.
    Raw,
    /// RabbitMQ's tutorial 3 as written: transient, unconfirmed, automatic
    /// acks.
    Plain,
}

impl EventsVariant {
    /// The point's `variant`.
    pub fn name(self) -> &'static str {
        match self {
            EventsVariant::Switchboard => "switchboard",
            EventsVariant::Raw => "raw",
            EventsVariant::Plain => "plain",
        }
    }
}

/// `--events-log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventsLogArg {
    /// No events log.
    None,
    /// On the switchboard variant's exchange only.
    Switchboard,
    /// On every variant's exchange.
    All,
}

impl EventsLogArg {
    fn on(self, variant: EventsVariant) -> bool {
        match self {
            EventsLogArg::None => false,
            EventsLogArg::Switchboard => variant == EventsVariant::Switchboard,
            EventsLogArg::All => true,
        }
    }
}

/// What a receiver reads from an event: its send time, µs since the run's epoch.
type Stamp = u64;

/// A publisher of one variant.
pub(crate) trait Publish: Clone + 'static {
    async fn publish(&self, event: CloudEvent) -> Result<(), String>;
}

/// A subscriber of one variant.
trait Receive: 'static {
    /// The next event's stamp; `None` when the subscription ended.
    async fn next(&mut self) -> Option<Result<Stamp, String>>;
}

/// switchboard's publisher: [`events::publish`].
#[derive(Clone)]
pub(crate) struct SbPublisher(pub(crate) Broker);

impl Publish for SbPublisher {
    async fn publish(&self, event: CloudEvent) -> Result<(), String> {
        events::publish(&self.0, &event)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Receive for Subscription {
    async fn next(&mut self) -> Option<Result<Stamp, String>> {
        Some(
            self.recv()
                .await?
                .map_err(|e| e.to_string())
                .and_then(|e| stamp(&e)),
        )
    }
}

/// The `raw` and `plain` publisher.
#[derive(Clone)]
struct RawPublisher {
    channel: Channel,
    exchange: Arc<str>,
    /// `plain`: no properties, no confirms.
    plain: bool,
}

impl Publish for RawPublisher {
    async fn publish(&self, event: CloudEvent) -> Result<(), String> {
        let body = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
        let props = if self.plain {
            // The tutorial's publisher sets none.
            BasicProperties::default()
        } else {
            // The properties of events::publish.
            BasicProperties::default()
                .with_content_type(wire::CONTENT_CLOUDEVENTS.into())
                .with_message_id(event.id.as_str().into())
                .with_type(event.ty.as_str().into())
                .with_app_id(wire::APP_ID.into())
                .with_timestamp(wire::now_ms() / 1000)
                .with_delivery_mode(wire::PERSISTENT)
        };
        let confirm = async {
            self.channel
                .basic_publish(
                    self.exchange.as_ref().into(),
                    "".into(),
                    BasicPublishOptions {
                        mandatory: false,
                        immediate: false,
                    },
                    &body,
                    props,
                )
                .await?
                .await
        }
        .await
        .map_err(|e| e.to_string())?;
        match confirm {
            Confirmation::Ack(_) => Ok(()),
            // No confirms asked for (plain): written is done.
            Confirmation::NotRequested if self.plain => Ok(()),
            other => Err(format!("not confirmed: {other:?}")),
        }
    }
}

/// The `raw` and `plain` subscriber.
struct RawSubscriber {
    consumer: Consumer,
    conn: Connection,
    /// `plain`: consumed with automatic acks.
    auto_ack: bool,
}

impl Receive for RawSubscriber {
    async fn next(&mut self) -> Option<Result<Stamp, String>> {
        let delivery = match self.consumer.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e.to_string())),
        };
        if !self.auto_ack {
            let _ = delivery
                .acker
                .ack(BasicAckOptions { multiple: false })
                .await;
        }
        Some(
            serde_json::from_slice::<CloudEvent>(&delivery.data)
                .map_err(|e| e.to_string())
                .and_then(|e| stamp(&e)),
        )
    }
}

fn stamp(event: &CloudEvent) -> Result<Stamp, String> {
    event
        .data
        .as_ref()
        .and_then(|d| d.get("sent_us"))
        .and_then(|v| v.as_u64())
        .ok_or_else(|| format!("event {} carries no send time", event.id))
}

/// The exchange of the `raw` or `plain` reference: a fanout of its own, so
/// the variants never see each other's events. Bench-only, under the run's
/// prefix.
fn reference_exchange(names: &Names, variant: EventsVariant) -> String {
    format!("{}.bench.{}-events", names.prefix(), variant.name())
}

/// Declares an events log named `queue` (a stream with the arguments of
/// `<prefix>.events.log`) bound to `exchange`, to be deleted at the end.
async fn bind_events_log(env: &mut Env, queue: &str, exchange: &str) -> Result<()> {
    let conn = Connection::connect(env.amqp.first_node(), ConnectionProperties::default()).await?;
    let declared = async {
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: false,
                nowait: false,
            },
            topology::events_log_arguments(&env.amqp.events_log()),
        )
        .await?;
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }
    .await;
    let _ = conn.close(200, "declared".into()).await;
    // The deployment's log is deleted at the end anyway (Env::cleanup).
    if queue != env.names().events_log() && !env.queues.iter().any(|q| q == queue) {
        env.queues.push(queue.to_owned());
    }
    declared?;
    Ok(())
}

/// What every point of a run shares.
struct Plan<'a> {
    args: &'a EventsArgs,
    /// Events of each measured phase.
    events: u64,
    /// Events per second asked for; infinite when saturated.
    rate: f64,
    /// The clock of the send times in the events.
    epoch: Instant,
    /// The padding of each event's data.
    pad: String,
    probe: &'a Probe,
    progress: &'a Progress,
}

/// The ratio lines: switchboard over each reference that ran.
const RATIOS: &[EventsVariant] = &[EventsVariant::Raw, EventsVariant::Plain];

/// Runs the variants, alternating, and prints a point per variant and
/// round plus the ratio lines.
pub(crate) async fn run(
    env: &mut Env,
    args: &EventsArgs,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    let progress = out.progress().clone();
    let (events, rate) = if args.saturated {
        (args.events, f64::INFINITY)
    } else {
        (
            paced_count(args.rate, args.events, args.duration)?,
            args.rate,
        )
    };
    let mut variants = Vec::new();
    for v in &args.variants {
        if !variants.contains(v) {
            variants.push(*v);
        }
    }
    let plan = Plan {
        args,
        events,
        rate,
        epoch: Instant::now(),
        pad: "x".repeat(args.payload),
        probe,
        progress: &progress,
    };
    let rounds = args.rounds.max(1);
    let mut totals: Vec<(EventsVariant, Totals)> =
        variants.iter().map(|&v| (v, Totals::new())).collect();
    let mut last = None;
    for round in 1..=rounds {
        let mut order = variants.clone();
        if round % 2 == 0 {
            order.reverse();
        }
        for variant in order {
            let (mut point, hist) = match variant {
                EventsVariant::Switchboard => switchboard_point(env, &plan, round).await?,
                EventsVariant::Raw | EventsVariant::Plain => {
                    reference_point(env, &plan, variant, round).await?
                }
            };
            point.round = round;
            if let Some((_, t)) = totals.iter_mut().find(|(v, _)| *v == variant) {
                t.add(point.deliveries.unwrap_or(0), point.seconds, &hist);
            }
            out.emit(Line::Point(point.clone()));
            last = Some(point);
        }
    }
    let total = |variant| totals.iter().find(|(v, _)| *v == variant).map(|(_, t)| t);
    if let (Some(like), Some(sb)) = (last, total(EventsVariant::Switchboard)) {
        for (i, &reference) in RATIOS.iter().enumerate() {
            let Some(r) = total(reference) else { continue };
            let mut line = ratio(&like, rounds, sb, r);
            // The first reference's line has no `of` (as before `plain`).
            if i > 0 {
                line.of = Some(format!("switchboard / {}", reference.name()));
            }
            out.emit(Line::Ratio(line));
        }
    }
    Ok(())
}

/// One point of the switchboard variant: a broker handle of its own, its
/// subscriptions, measured, closed.
async fn switchboard_point(
    env: &mut Env,
    plan: &Plan<'_>,
    round: u32,
) -> Result<(Point, Histogram<u64>)> {
    let names = env.names();
    if plan.args.events_log.on(EventsVariant::Switchboard) {
        bind_events_log(env, &names.events_log(), &names.events_exchange()).await?;
    }
    let mut amqp = env.amqp.clone();
    amqp.instance_id = env.instance("events");
    let broker = Broker::connect(&amqp).await?;
    let mut subs = Vec::new();
    for _ in 0..plan.args.subscribers {
        match Subscription::start(&broker, SubscribeOptions::default()).await {
            Ok(s) => subs.push(s),
            Err(e) => {
                broker.close().await;
                return Err(e.into());
            }
        }
    }
    let publisher = SbPublisher(broker.clone());
    let result = measure(plan, publisher, subs, EventsVariant::Switchboard, round).await;
    // Dropping the subscriptions closes their connections.
    broker.close().await;
    Ok(result?.0)
}

/// One point of the `raw` or `plain` reference: set up, measured, closed.
async fn reference_point(
    env: &mut Env,
    plan: &Plan<'_>,
    variant: EventsVariant,
    round: u32,
) -> Result<(Point, Histogram<u64>)> {
    let (conn, publisher, subs) = reference_side(env, plan.args, variant).await?;
    let measured = measure(plan, publisher, subs, variant, round).await;
    let p = match measured {
        Ok((p, subs)) => {
            for s in subs {
                let _ = s.conn.close(200, "bench done".into()).await;
            }
            Ok(p)
        }
        Err(e) => Err(e),
    };
    let _ = conn.close(200, "bench done".into()).await;
    p
}

/// The `raw` or `plain` side: a publisher connection and channel on the
/// variant's exchange, and `--subscribers` subscribers on connections of
/// their own.
async fn reference_side(
    env: &mut Env,
    args: &EventsArgs,
    variant: EventsVariant,
) -> Result<(Connection, RawPublisher, Vec<RawSubscriber>)> {
    let plain = variant == EventsVariant::Plain;
    let instance = env.instance(&format!("{}-events", variant.name()));
    let exchange = reference_exchange(&env.names(), variant);
    let props = |role: &str| {
        ConnectionProperties::default()
            .with_connection_name(wire::connection_name(&instance, role).into())
    };
    let conn = Connection::connect(
        env.amqp.first_node(),
        props(&format!("{}-publisher", variant.name())),
    )
    .await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: false,
                // The tutorial's exchange is not durable; the cost per
                // event is the same.
                durable: !plain,
                auto_delete: false,
                internal: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await?;
    if !env.exchanges.contains(&exchange) {
        env.exchanges.push(exchange.clone());
    }
    if args.events_log.on(variant) {
        bind_events_log(env, &format!("{exchange}.log"), &exchange).await?;
    }
    if !plain {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    let mut subs = Vec::new();
    for _ in 0..args.subscribers {
        let sconn = Connection::connect(
            env.amqp.first_node(),
            props(&format!("{}-subscriber", variant.name())),
        )
        .await?;
        let ch = sconn.create_channel().await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    passive: false,
                    durable: false,
                    exclusive: true,
                    auto_delete: true,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        if !plain {
            ch.basic_qos(RAW_PREFETCH, BasicQosOptions { global: false })
                .await?;
        }
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                wire::consumer_tag(&instance, &format!("{}-events", variant.name())).into(),
                BasicConsumeOptions {
                    no_local: false,
                    no_ack: plain,
                    exclusive: false,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await?;
        subs.push(RawSubscriber {
            consumer,
            conn: sconn,
            auto_ack: plain,
        });
    }
    let publisher = RawPublisher {
        channel,
        exchange: exchange.into(),
        plain,
    };
    Ok((conn, publisher, subs))
}

/// Warm-up, then the measured phase; gives the subscribers back.
async fn measure<P: Publish, R: Receive>(
    plan: &Plan<'_>,
    publisher: P,
    subs: Vec<R>,
    variant: EventsVariant,
    round: u32,
) -> Result<((Point, Histogram<u64>), Vec<R>)> {
    let Plan {
        args,
        events,
        epoch,
        probe,
        ..
    } = *plan;
    let pad = plan.pad.as_str();
    let make = |seq: u64| {
        CloudEvent::new(
            EVENT_TYPE,
            "switchboard-bench",
            json!({"seq": seq, "sent_us": epoch.elapsed().as_micros() as u64, "pad": pad}),
        )
    };
    let payload = serde_json::to_vec(&make(0)).map(|v| v.len()).unwrap_or(0);
    let label = format!(
        "events {} round {round}/{}",
        variant.name(),
        args.rounds.max(1)
    );
    let warmup = plan.progress.phase(
        format!("{label} warm-up"),
        "events",
        Total::Count(args.warmup),
    );
    let (subs, _) = phase(
        subs,
        &publisher,
        args.warmup,
        plan.rate,
        epoch,
        &make,
        warmup.tally(),
    )
    .await;
    drop(warmup);
    let measured = plan.progress.phase(label, "events", Total::Count(events));
    let snap = probe.start();
    let (subs, ph) = phase(
        subs,
        &publisher,
        events,
        plan.rate,
        epoch,
        &make,
        measured.tally(),
    )
    .await;
    let usage = probe.finish(&snap);
    drop(measured);
    let k = args.subscribers as u64;
    let seconds = ph.seconds;
    let point = usage.into_point(Point {
        workload: "events".into(),
        variant: variant.name().into(),
        profile: "safe".into(),
        reply_mode: "none".into(),
        queue_type: "fanout".into(),
        payload,
        concurrency: args.subscribers,
        calls: events,
        errors: ph.publish_errors + (events * k).saturating_sub(ph.delivered) + ph.bad,
        seconds: round3(seconds),
        calls_per_s: round2(per_s(events, seconds)),
        p50_us: ph.hist.value_at_quantile(0.5),
        p99_us: ph.hist.value_at_quantile(0.99),
        max_us: ph.hist.max(),
        confirm_p50_us: None,
        confirm_p99_us: None,
        round: 1,
        deliveries: Some(ph.delivered),
        delivered_per_s: Some(round2(per_s(ph.delivered, seconds))),
        // Saturated: none asked for.
        rate: (!args.saturated).then_some(args.rate),
        ..Point::default()
    });
    Ok(((point, ph.hist), subs))
}

/// What one phase measured.
struct Phase {
    hist: Histogram<u64>,
    /// Events received, by all subscribers together (`bad` included).
    delivered: u64,
    /// Received events that could not be read.
    bad: u64,
    publish_errors: u64,
    /// From the first publish to the last delivery.
    seconds: f64,
}

/// Publishes `n` events at `rate` while every subscriber receives them.
async fn phase<P: Publish, R: Receive>(
    subs: Vec<R>,
    publisher: &P,
    n: u64,
    rate: f64,
    epoch: Instant,
    make: &impl Fn(u64) -> CloudEvent,
    tally: Tally,
) -> (Vec<R>, Phase) {
    let start = Instant::now();
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            actix_rt::spawn(async move {
                let mut hist = histogram();
                let (mut got, mut bad) = (0u64, 0u64);
                let mut last = Instant::now();
                while got < n {
                    match tokio::time::timeout(IDLE_LIMIT, sub.next()).await {
                        Ok(Some(Ok(sent))) => {
                            let now = epoch.elapsed().as_micros() as u64;
                            record(&mut hist, Duration::from_micros(now.saturating_sub(sent)));
                        }
                        Ok(Some(Err(_))) => bad += 1,
                        Ok(None) | Err(_) => break,
                    }
                    got += 1;
                    last = Instant::now();
                }
                (sub, hist, got, bad, last)
            })
        })
        .collect();
    let publish_errors = publish_paced(publisher, n, rate, start, make, tally).await;
    let mut phase = Phase {
        hist: histogram(),
        delivered: 0,
        bad: 0,
        publish_errors,
        seconds: 0.0,
    };
    let mut subs = Vec::new();
    let mut end = start;
    for r in receivers {
        // A receiver task only ends by returning.
        if let Ok((sub, hist, got, bad, last)) = r.await {
            let _ = phase.hist.add(&hist);
            phase.delivered += got;
            phase.bad += bad;
            end = end.max(last);
            subs.push(sub);
        }
    }
    phase.seconds = end.duration_since(start).as_secs_f64();
    (subs, phase)
}

/// How many events a paced phase publishes: `events`, or `rate` x
/// `duration` when a duration is given; checks both.
pub(crate) fn paced_count(rate: f64, events: u64, duration: Option<f64>) -> Result<u64> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(BenchError::flag("--rate", "must be a positive number"));
    }
    match duration {
        Some(secs) if secs.is_finite() && secs > 0.0 => Ok((rate * secs).ceil() as u64),
        Some(_) => Err(BenchError::flag("--duration", "must be positive")),
        None => Ok(events),
    }
}

/// Publishes `n` events made by `make` at `rate` per second from `start`
/// (up to [`MAX_IN_FLIGHT`] unconfirmed; an infinite `rate`: as fast as
/// that bound allows), counting each on `tally`, and
/// returns once every publish is confirmed or failed, with the number that
/// failed.
pub(crate) async fn publish_paced<P: Publish>(
    publisher: &P,
    n: u64,
    rate: f64,
    start: Instant,
    make: &impl Fn(u64) -> CloudEvent,
    tally: Tally,
) -> u64 {
    let errors = Rc::new(Cell::new(0u64));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    for seq in 0..n {
        if rate.is_finite() {
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        // The semaphore is never closed: acquiring cannot fail.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let publisher = publisher.clone();
        let errors = errors.clone();
        let tally = tally.clone();
        let event = make(seq);
        actix_rt::spawn(async move {
            if publisher.publish(event).await.is_err() {
                errors.set(errors.get() + 1);
            }
            tally.add(1);
            drop(permit);
        });
    }
    // Every publish confirmed (or failed).
    let _ = permits.acquire_many(MAX_IN_FLIGHT as u32).await;
    errors.get()
}
