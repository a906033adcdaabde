//! `switchboard bench`: a load generator in the spirit of RabbitMQ's
//! PerfTest, and the raw-lapin reference it is compared with in the same
//! run. Every measured point is one JSON line ([`Line`]).
//!
//! A run works under names of its own: the prefix `sbbench-<8 hex>` (unless
//! `--external`, which must meet the serving process's names) and instance
//! ids `sbbench-<8 hex>-<n>-<role>`, so it never meets a serving
//! `switchboard serve`; it deletes what it declared when it ends.
//!
//! # Layout
//! - this file: the command line ([`BenchArgs`]), [`run`] (the CLI: prints
//!   each line) and [`execute`] (the library: returns the lines), the run's
//!   names and their clean-up.
//! - [`load`]: keeps N calls in flight for a number of calls or a duration.
//! - [`report`]: [`Point`], [`Ratio`], [`Line`]; peak RSS and CPU readings.
//! - [`rpc`]: the switchboard variant: `RpcClient` and an echo `Worker`.
//! - [`raw`]: the reference on bare lapin: client and echo server.
//! - [`events`]: fanout publish/subscribe, both variants.

mod events;
mod http;
mod load;
mod notify;
mod pending;
mod raw;
pub mod report;
mod rig;
mod rpc;
mod sse;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use deadpool_lapin::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use tracing::{debug, info};

pub use report::{Line, Point, Ratio};

use crate::amqp::{Broker, Names};
use crate::error::{Error, Result};
use crate::settings::{AmqpSettings, QueueType, ReplyMode, ServiceSettings, Settings};
use load::{Measured, Stop};
use report::{Probe, Totals, Usage, per_s, round2, round3};

const WORKLOADS: &str = "\
Workloads:
  rpc      calls through switchboard's RpcClient to an echo service
  raw      the same calls written directly on lapin (the reference)
  compare  raw and rpc alternating in one run, plus a ratio line each
  events   CloudEvents through a fanout to K subscribers, both variants
  http     the HTTP gateway in this process: sync POST, 202 + long-poll, GET
           of a finished call, a bare actix-web GET (reference), and an rpc
           point with the same payload; ratios sync / rpc and get / bare
  sse      K SSE clients on the gateway's /v1/events next to an AMQP
           subscriber: SSE minus AMQP delivery latency per event, missing
  notify   a service that answers after a delay, called in each style (sync,
           longpoll, poll, callback, sse, amqp): completion-to-awareness
           delay and HTTP requests per call
  pending  N asynchronous calls (202) left pending in the gateway: its
           resident memory per pending call

Output: one JSON line per measured point on stdout: kind, workload, variant,
profile, reply_mode, queue_type, payload, concurrency, calls, errors, seconds,
calls_per_s, p50_us, p99_us, max_us, peak_rss_kib (VmHWM during the point),
cpu_s / main_cpu_s / cpu_by_thread (CPU time of this process during the
point), broker_cpu_s (with --broker-pid), machine_cpu_s (all processes),
round; rpc adds confirm_p50_us / confirm_p99_us (until the request was
confirmed), events and sse add deliveries, delivered_per_s and rate; http
and notify add requests_per_call; notify adds aware_p50_us / aware_p99_us /
aware_max_us; sse adds minus_amqp_p50_us / minus_amqp_p99_us and missing;
pending adds rss_before_kib / rss_after_kib / rss_per_call_bytes.
`compare`, `events` and `http` add lines of kind \"ratio\": switchboard / raw
of calls/s (events: deliveries/s) and of p50 and p99; http's name what they
divide in `of` (\"sync / rpc\", \"get / bare\"). `bench <workload> --help`
says what each measures.

Every run uses a prefix and instance id of its own (sbbench-<8 hex>), so it
never meets a serving `switchboard serve` (with --external, only the instance
id: the prefix must be the server's), and deletes the queues and exchanges it
declared at the end. The broker is the configured one (amqp.url,
SWITCHBOARD__AMQP__URL).";

/// Measures switchboard's throughput and latency against RabbitMQ, next to
/// the same workload written directly on lapin.
#[derive(Debug, Clone, clap::Args)]
#[command(after_long_help = WORKLOADS)]
pub struct BenchArgs {
    /// Also report the CPU time the broker process (this pid: `pgrep -f
    /// beam.smp`) used during each point. Linux, same machine only.
    #[arg(long, global = true)]
    pub broker_pid: Option<u32>,
    /// The workload.
    #[command(subcommand)]
    pub workload: Workload,
}

/// The workloads of `switchboard bench`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Workload {
    /// Calls through switchboard's RpcClient to an echo service: an
    /// in-process echo worker (default) or a service served by another
    /// process (--external). One point per profile and concurrency.
    #[command(after_long_help = RPC_HELP)]
    Rpc(RpcArgs),
    /// The reference: the same calls written directly on lapin (one channel,
    /// publish and await the confirm, a consumer on the reply queue, a map
    /// from correlation id to waiter; an echo server on lapin that acks after
    /// its reply is confirmed), with identical properties, queue type and
    /// guarantees.
    #[command(after_long_help = RPC_HELP)]
    Raw(RpcArgs),
    /// raw and rpc side by side in one run, alternating, for every profile
    /// and concurrency; prints their points and a ratio line each
    /// (switchboard / raw).
    #[command(after_long_help = RPC_HELP)]
    Compare(CompareArgs),
    /// CloudEvents published at a paced rate to the events fanout, received
    /// by K subscribers (events::Subscription); delivered events/s and
    /// publish-to-delivery latency, next to a raw-lapin fanout in the same
    /// run, plus a ratio line.
    Events(EventsArgs),
    /// The HTTP gateway in this process with an echo worker, driven over
    /// keep-alive connections by a client on a thread of its own: `sync`
    /// POSTs (200), `accepted` POSTs (202, then long-poll), `get` of a
    /// finished call, and `bare` (the same GET from a bare actix-web
    /// handler, the reference of `get`); plus a `bench rpc` point with the
    /// same payload and calls in flight, and ratio lines `sync / rpc` and
    /// `get / bare`.
    #[command(after_long_help = HTTP_HELP)]
    Http(HttpArgs),
    /// How soon a client learns that a call has ended, per style (sync,
    /// long-poll, polling at Retry-After, callback, SSE per call, AMQP
    /// subscriber): a service that answers after --delay-ms, --clients
    /// clients at once; per style the delay from the handler's completion
    /// to the client's awareness, and HTTP requests per call.
    #[command(after_long_help = NOTIFY_HELP)]
    Notify(NotifyArgs),
    /// K SSE clients on the gateway's /v1/events (in this process) while
    /// events are published to the fanout at a paced rate, next to an AMQP
    /// subscriber: per event and client, the SSE delivery latency minus the
    /// AMQP subscriber's, and the events that never reached a client.
    #[command(after_long_help = SSE_HELP)]
    Sse(SseArgs),
    /// What a pending asynchronous call costs the gateway in memory: the
    /// gateway in this process serves a service whose worker holds its first
    /// request for an hour; --calls POSTs with `Prefer: respond-async` (each
    /// a 202) stay pending; the point reports VmRSS before and after them and
    /// the growth per call (rss_per_call_bytes).
    Pending(PendingArgs),
}

/// Flags of `bench pending`.
#[derive(Debug, Clone, clap::Args)]
pub struct PendingArgs {
    /// Calls left pending in the measured point.
    #[arg(long, default_value_t = 100_000)]
    pub calls: u64,
    /// Calls made (and left pending) before the first RSS reading.
    #[arg(long, default_value_t = 2_000)]
    pub warmup: u64,
    /// Connections, each with one POST at a time.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Size of each request's JSON payload in bytes (at least 10).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
}

const SSE_HELP: &str = "\
Two points (workload sse): variant amqp, an events::Subscription on the
fanout (the reference), and variant sse, --clients SSE clients on
GET /v1/events?type=switchboard.bench.tick, each on a keep-alive connection of
its own, all on the client thread. Publishing starts once every client is
subscribed; --warmup events first (not counted), then --events at --rate.
p50_us / p99_us: publish to delivery. minus_amqp_p50_us / minus_amqp_p99_us
(sse): for every event and client, the SSE client's delivery minus the AMQP
subscriber's of the same event (negative: the client had it first).
missing: events that never reached a client (10 s after the reference had
them all), summed over clients; errors = missing + failed publishes.

The gateway's stream bounds are raised for the run (max_streams to at least
--clients + 64, stream_buffer to at least 1024), and the soft open-files
limit (ulimit -n) to 2 x --clients + 512 where the hard limit allows.";

const NOTIFY_HELP: &str = "\
Styles (--style, a point each; variant = the style):
  sync      POST with `Prefer: wait=--wait`, answered 200 with the reply (Call-Id
            names the call)
  longpoll  POST `Prefer: respond-async` (202), then GET <Location>?wait=--wait
            until the call has ended
  poll      the 202, then GET <Location> after each Retry-After (the
            gateway's retry_after_s, jittered: 1 to 2 s by default)
  callback  POST with Callback-Url: a receiver in this process on 127.0.0.1
            (the run's gateway allows loopback callback targets)
  sse       the 202, then GET <Location>/events until the completed frame
  amqp      the 202, then the switchboard.call.completed event from an AMQP
            subscriber (events::Subscription) on the events fanout

The service's handler sleeps --delay-ms, then notes the instant it returns
its reply (by call id). aware_p50_us / aware_p99_us / aware_max_us: the
instant the client has the result (response read, callback or event
received) minus that instant, on one monotonic clock. p50_us / p99_us: the
whole call, from the POST. requests_per_call: HTTP requests the client sent
per call (the callback POST the gateway makes is not counted).";

const HTTP_HELP: &str = "\
Variants (--variant, each a point per --concurrency):
  sync      POST /v1/services/echo/calls with a --payload-byte JSON body,
            answered 200 with the echo (the service's queue as configured,
            persistent, confirmed, the gateway's durable reply queue)
  accepted  the same POST with `Prefer: respond-async` (202 + Location),
            then GET <Location>?wait=--wait until the call has ended
            (requests_per_call says how many requests that took)
  get       GET /v1/calls/{id} of one finished call, repeated: a read of the
            call store (SQLite in a temporary directory)
  bare      the same GET answered with the same document, a constant, by a
            bare actix-web handler on another port: what HTTP alone costs

--concurrency is the number of connections, each with one request at a
time (HTTP/1.1 keep-alive). The gateway runs in this process under the run's
prefix, without tokens, with --workers HTTP threads; the client runs on a
thread of its own (`bench-client` in cpu_by_thread). With
--with-rpc-reference true (the default) every concurrency also gets an rpc
point (RpcClient, same payload, as many calls in flight), and ratio lines
(kind ratio, `of`): sync / rpc and get / bare.";

const RPC_HELP: &str = "\
Profiles:
  safe  the service queue as configured (services.echo.queue_type, quorum by
        default), persistent requests, publisher confirms, manual acks
  fast  transient requests and a classic service queue (still confirmed and
        acked; replies stay persistent, as switchboard's worker sends them)

Each point: --warmup calls (not recorded), then --calls calls (or --duration
seconds) with --concurrency calls in flight, every caller a task on the actix
arbiter. A call counts as an error unless its reply has status 200 and the
request's body.";

/// How long each point lasts.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Calls per measured point.
    #[arg(long, default_value_t = 20_000)]
    pub calls: u64,
    /// Measure for this many seconds instead of a number of calls.
    #[arg(long, conflicts_with = "calls")]
    pub duration: Option<f64>,
    /// Calls made before each point, at its concurrency, and not recorded.
    #[arg(long, default_value_t = 1_000)]
    pub warmup: u64,
}

impl LoadArgs {
    /// When each measured point ends.
    pub(crate) fn stop(&self) -> Result<Stop> {
        match self.duration {
            Some(s) if s.is_finite() && s > 0.0 => Ok(Stop::After(Duration::from_secs_f64(s))),
            Some(_) => Err(Error::Malformed("--duration must be positive".into())),
            None => Ok(Stop::Calls(self.calls)),
        }
    }
}

/// Flags of `bench rpc` and `bench raw`.
#[derive(Debug, Clone, clap::Args)]
pub struct RpcArgs {
    /// How long each point lasts.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Size of each request's JSON payload in bytes (at least 10); the echo
    /// sends it back.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Calls in flight; a comma-separated list gives one point per value.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<usize>,
    /// Where replies come back: the client's durable reply queue, or RabbitMQ
    /// direct reply-to.
    #[arg(long, value_enum, default_value_t = ReplyModeArg::Queue)]
    pub reply_mode: ReplyModeArg,
    /// Delivery guarantees; a comma-separated list gives points for each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "safe")]
    pub profile: Vec<Profile>,
    /// The service queue's type, instead of the profile's (safe: the
    /// service's setting; fast: classic).
    #[arg(long, value_enum)]
    pub queue_type: Option<QueueTypeArg>,
    /// Call a service served by another process (`switchboard serve`) under
    /// the configured prefix, instead of an in-process echo worker. Only the
    /// run's reply queues are declared and deleted.
    #[arg(long)]
    pub external: bool,
    /// The service to call with --external (it must echo the request).
    #[arg(long, default_value = "echo")]
    pub service: String,
    /// Deadline of each call in seconds (also its AMQP expiration).
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// Flags of `bench compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// As `bench rpc`.
    #[command(flatten)]
    pub rpc: RpcArgs,
    /// Repetitions of raw and rpc, alternating which goes first; the ratio
    /// merges them.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
}

/// Flags of `bench events`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// Events published per measured point.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Publish for this many seconds instead (rate × duration events).
    #[arg(long, conflicts_with = "events")]
    pub duration: Option<f64>,
    /// Events published before each point and not recorded.
    #[arg(long, default_value_t = 500)]
    pub warmup: u64,
    /// Events published per second (paced; up to 4096 publishes in flight).
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Subscribers, each with a queue (and a connection) of its own.
    #[arg(long, default_value_t = 4)]
    pub subscribers: usize,
    /// Bytes of padding in each event's data.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Repetitions of raw and switchboard, alternating which goes first.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
}

/// Flags of `bench http`.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// How long each point lasts.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Size of each request's JSON payload in bytes (at least 10); the echo
    /// sends it back.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Connections, each with one request at a time; a comma-separated list
    /// gives one point per value.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<usize>,
    /// The variants to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sync,accepted,get,bare"
    )]
    pub variant: Vec<HttpVariant>,
    /// Also measure `bench rpc` with the same payload and calls in flight,
    /// and print the ratio sync / rpc.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub with_rpc_reference: bool,
    /// HTTP worker threads of the gateway and of the bare server (0: the
    /// `gateway.workers` setting; its default, 0, is one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Seconds each long-poll of `accepted` may wait (`?wait=`).
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
}

/// Flags of `bench notify`.
#[derive(Debug, Clone, clap::Args)]
pub struct NotifyArgs {
    /// Calls per style.
    #[arg(long, default_value_t = 500)]
    pub calls: u64,
    /// Measure each style for this many seconds instead.
    #[arg(long, conflicts_with = "calls")]
    pub duration: Option<f64>,
    /// Calls made before each style's point and not recorded.
    #[arg(long, default_value_t = 50)]
    pub warmup: u64,
    /// Clients calling at once (each one call at a time).
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// How long the service works on each call before it replies, ms.
    #[arg(long, default_value_t = 200)]
    pub delay_ms: u64,
    /// The styles to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sync,longpoll,poll,callback,sse,amqp"
    )]
    pub style: Vec<NotifyStyle>,
    /// Size of each request's JSON payload in bytes (at least 10).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Seconds each long-poll may wait (`?wait=`).
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
    /// HTTP worker threads of the gateway (0: the `gateway.workers` setting).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

/// Flags of `bench sse`.
#[derive(Debug, Clone, clap::Args)]
pub struct SseArgs {
    /// SSE clients, each on a connection of its own.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Events published and measured.
    #[arg(long, default_value_t = 200)]
    pub events: u64,
    /// Publish for this many seconds instead (rate x duration events).
    #[arg(long, conflicts_with = "events")]
    pub duration: Option<f64>,
    /// Events published first and not counted.
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// Events published per second (paced).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Bytes of padding in each event's data.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// HTTP worker threads of the gateway (0: the `gateway.workers` setting).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

/// `bench notify --style`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyStyle {
    /// The reply as the POST's answer.
    Sync,
    /// 202, then long-polls.
    Longpoll,
    /// 202, then polls at Retry-After.
    Poll,
    /// A Callback-Url.
    Callback,
    /// 202, then the call's SSE stream.
    Sse,
    /// 202, then the lifecycle event from an AMQP subscriber.
    Amqp,
}

impl NotifyArgs {
    /// How long each style's point lasts.
    fn load(&self) -> LoadArgs {
        LoadArgs {
            calls: self.calls,
            duration: self.duration,
            warmup: self.warmup,
        }
    }
}

impl NotifyStyle {
    fn name(self) -> &'static str {
        match self {
            NotifyStyle::Sync => "sync",
            NotifyStyle::Longpoll => "longpoll",
            NotifyStyle::Poll => "poll",
            NotifyStyle::Callback => "callback",
            NotifyStyle::Sse => "sse",
            NotifyStyle::Amqp => "amqp",
        }
    }
}

/// `bench http --variant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpVariant {
    /// POST answered 200 with the reply.
    Sync,
    /// POST answered 202, then long-polls until the call ends.
    Accepted,
    /// GET of a finished call's status document.
    Get,
    /// The same GET from a bare actix-web handler (the reference).
    Bare,
}

impl HttpVariant {
    fn name(self) -> &'static str {
        match self {
            HttpVariant::Sync => "sync",
            HttpVariant::Accepted => "accepted",
            HttpVariant::Get => "get",
            HttpVariant::Bare => "bare",
        }
    }
}

/// `--reply-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplyModeArg {
    /// The client's durable reply queue.
    Queue,
    /// RabbitMQ direct reply-to.
    Direct,
}

/// `--profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Configured queue type, persistent requests, confirms, manual acks.
    Safe,
    /// Classic queue, transient requests, confirms, manual acks.
    Fast,
}

/// `--queue-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueTypeArg {
    /// Replicated, counts deliveries.
    Quorum,
    /// Single node.
    Classic,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Safe => "safe",
            Profile::Fast => "fast",
        }
    }
}

/// Which implementation a point measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Variant {
    /// The library.
    Switchboard,
    /// The reference on bare lapin.
    Raw,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Switchboard => "switchboard",
            Variant::Raw => "raw",
        }
    }
}

/// Runs the benchmark and prints every line as JSON on stdout as soon as it
/// is measured: the CLI's `switchboard bench`.
pub async fn run(settings: Settings, args: BenchArgs) -> Result<()> {
    let mut print = |line: &Line| match serde_json::to_string(line) {
        Ok(json) => println!("{json}"),
        Err(e) => tracing::error!(error = %e, "a line could not be written"),
    };
    execute(&settings, &args, &mut print).await.map(|_| ())
}

/// Runs the benchmark named by `args` against the broker of `settings`;
/// hands each line to `on_line` as soon as it is measured, and returns them
/// all. Must run on an actix system (callers and actors are local tasks).
pub async fn execute(
    settings: &Settings,
    args: &BenchArgs,
    on_line: &mut dyn FnMut(&Line),
) -> Result<Vec<Line>> {
    let external = match &args.workload {
        Workload::Rpc(a) | Workload::Raw(a) => a.external,
        Workload::Compare(c) => c.rpc.external,
        Workload::Events(_)
        | Workload::Http(_)
        | Workload::Notify(_)
        | Workload::Sse(_)
        | Workload::Pending(_) => false,
    };
    let probe = Probe::new(args.broker_pid);
    let mut env = Env::start(settings, external).await?;
    info!(prefix = %env.amqp.prefix, instance = %env.amqp.instance_id, "bench run");
    let mut out = Out {
        lines: Vec::new(),
        on_line,
    };
    let result = match &args.workload {
        Workload::Rpc(a) => {
            rpc_points(&mut env, a, &[Variant::Switchboard], 1, &probe, &mut out).await
        }
        Workload::Raw(a) => rpc_points(&mut env, a, &[Variant::Raw], 1, &probe, &mut out).await,
        Workload::Compare(c) => {
            rpc_points(
                &mut env,
                &c.rpc,
                &[Variant::Raw, Variant::Switchboard],
                c.rounds.max(1),
                &probe,
                &mut out,
            )
            .await
        }
        Workload::Events(e) => events::run(&mut env, e, &probe, &mut out).await,
        Workload::Http(h) => http::run(&mut env, h, &probe, &mut out).await,
        Workload::Notify(n) => notify::run(&mut env, n, &probe, &mut out).await,
        Workload::Sse(a) => sse::run(&mut env, a, &probe, &mut out).await,
        Workload::Pending(a) => pending::run(&mut env, a, &probe, &mut out).await,
    };
    env.cleanup().await;
    result.map(|()| out.lines)
}

/// Where lines go: kept, and handed to the caller at once.
pub(crate) struct Out<'a> {
    lines: Vec<Line>,
    on_line: &'a mut dyn FnMut(&Line),
}

impl Out<'_> {
    fn emit(&mut self, line: Line) {
        (self.on_line)(&line);
        self.lines.push(line);
    }
}

/// The run's names, and what it declared, to delete at the end.
pub(crate) struct Env {
    /// The broker settings under the run's prefix and instance id.
    amqp: AmqpSettings,
    /// The configured settings (services, rpc bounds).
    settings: Settings,
    /// Whether the service is another process's (nothing of its is deleted).
    external: bool,
    /// Declares the shared exchanges at start; deletes everything at the end.
    admin: Broker,
    /// Instance ids handed out (their reply queues are deleted).
    instances: Vec<String>,
    /// Services whose queues the run declared.
    services: Vec<String>,
    /// Exchanges of the raw references.
    exchanges: Vec<String>,
    /// Other queues the run declared (the bench gateway's dead-letter watch).
    queues: Vec<String>,
}

impl Env {
    /// The configured `echo` service's settings (queue type, delivery
    /// limit), for a service of the run's own.
    pub(crate) fn echo_settings(&self) -> ServiceSettings {
        self.settings
            .services
            .get("echo")
            .cloned()
            .unwrap_or_default()
    }

    async fn start(settings: &Settings, external: bool) -> Result<Self> {
        let run_id = format!(
            "sbbench-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut amqp = settings.amqp.clone();
        if !external {
            amqp.prefix = run_id.clone();
        }
        amqp.instance_id = run_id;
        let admin = Broker::connect(&amqp).await?;
        Ok(Self {
            amqp,
            settings: settings.clone(),
            external,
            admin,
            instances: Vec::new(),
            services: Vec::new(),
            exchanges: Vec::new(),
            queues: Vec::new(),
        })
    }

    fn names(&self) -> Names {
        self.admin.names().clone()
    }

    /// A new instance id for `role`, remembered for clean-up.
    fn instance(&mut self, role: &str) -> String {
        let id = format!(
            "{}-{}-{role}",
            self.amqp.instance_id,
            self.instances.len() + 1
        );
        self.instances.push(id.clone());
        id
    }

    /// What a variant needs to set itself up for one profile.
    fn target(&mut self, variant: Variant, profile: Profile, a: &RpcArgs) -> Result<Target> {
        if !(a.timeout.is_finite() && a.timeout > 0.0) {
            return Err(Error::Malformed(
                "--timeout must be a positive number".into(),
            ));
        }
        let configured = self.echo_settings();
        let queue_type = match (a.queue_type, profile) {
            (Some(QueueTypeArg::Quorum), _) => QueueType::Quorum,
            (Some(QueueTypeArg::Classic), _) | (None, Profile::Fast) => QueueType::Classic,
            (None, Profile::Safe) => configured.queue_type,
        };
        let qt_name = match queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        let (service, service_settings) = if self.external {
            (a.service.clone(), None)
        } else {
            let service = format!("{}-{}-{qt_name}", variant.name(), profile.name());
            self.services.push(service.clone());
            let svc = ServiceSettings {
                queue_type,
                timeout_ms: (a.timeout * 1000.0) as u64,
                ..configured
            };
            (service, Some(svc))
        };
        let payload = json_payload(a.payload);
        Ok(Target {
            amqp: self.amqp.clone(),
            url: self.amqp.url.clone(),
            names: self.names(),
            instance: self.instance(variant.name()),
            service,
            service_settings,
            reply_mode: match a.reply_mode {
                ReplyModeArg::Queue => ReplyMode::Queue,
                ReplyModeArg::Direct => ReplyMode::Direct,
            },
            persistent: profile == Profile::Safe,
            max_pending: self.settings.rpc.max_pending,
            labels: Labels {
                profile: profile.name(),
                reply_mode: match a.reply_mode {
                    ReplyModeArg::Queue => "queue",
                    ReplyModeArg::Direct => "direct",
                },
                queue_type: if self.external { "external" } else { qt_name },
                payload: payload.len(),
            },
            payload,
            timeout: Duration::from_secs_f64(a.timeout),
        })
    }

    /// Deletes the run's queues and exchanges (only its reply queues when the
    /// service is external), and closes the broker handle.
    async fn cleanup(self) {
        let names = self.admin.names().clone();
        let mut queues: Vec<String> = Vec::new();
        for s in &self.services {
            queues.push(names.service_queue(s));
            queues.push(names.dead_queue(s));
        }
        for i in &self.instances {
            queues.push(names.reply_queue(i));
        }
        queues.extend(self.queues.iter().cloned());
        let mut exchanges = self.exchanges.clone();
        if !self.external {
            exchanges.extend([
                names.requests_exchange(),
                names.dead_exchange(),
                names.events_exchange(),
            ]);
        }
        let mut channel = self.admin.channel().await.ok();
        for q in &queues {
            let Some(ch) = channel.as_ref() else { break };
            if let Err(e) = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                // A queue never declared (direct reply-to) may close the channel.
                debug!(queue = %q, error = %e, "queue not deleted");
                channel = self.admin.channel().await.ok();
            }
        }
        for x in &exchanges {
            let Some(ch) = channel.as_ref() else { break };
            if let Err(e) = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await
            {
                debug!(exchange = %x, error = %e, "exchange not deleted");
                channel = self.admin.channel().await.ok();
            }
        }
        if let Some(ch) = channel {
            let _ = ch.close(200, "bench done".into()).await;
        }
        self.admin.close().await;
    }
}

/// The exchange of the raw events reference: a fanout of its own, so the two
/// variants never see each other's events. Bench-only, under the run's prefix.
pub(crate) fn raw_events_exchange(names: &Names) -> String {
    format!("{}.bench.raw-events", names.prefix())
}

/// Everything a variant needs to set itself up.
pub(crate) struct Target {
    /// Broker settings (url, pool) under the run's prefix.
    pub amqp: AmqpSettings,
    /// The broker's URL.
    pub url: String,
    /// Names under the run's prefix.
    pub names: Names,
    /// This variant's instance id (its reply queue's name).
    pub instance: String,
    /// The service called.
    pub service: String,
    /// How to declare and serve it in-process; `None` when external.
    pub service_settings: Option<ServiceSettings>,
    pub reply_mode: ReplyMode,
    /// Persistent requests (`safe`) or transient (`fast`).
    pub persistent: bool,
    /// Bound on pending calls of switchboard's client.
    pub max_pending: usize,
    /// The request body.
    pub payload: Bytes,
    /// Each call's deadline.
    pub timeout: Duration,
    /// How the points are labelled.
    pub labels: Labels,
}

/// The labels of a point.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Labels {
    profile: &'static str,
    reply_mode: &'static str,
    queue_type: &'static str,
    /// Bytes of each request body.
    payload: usize,
}

/// A JSON body of `size` bytes (at least 10): `{"pad":"xxx..."}`.
pub fn json_payload(size: usize) -> Bytes {
    let pad = "x".repeat(size.saturating_sub(10));
    Bytes::from(format!("{{\"pad\":\"{pad}\"}}"))
}

/// A reply is right when its status is 200 and it echoes the request's body.
pub(crate) fn check_reply(status: u16, len: usize, expected: usize) -> Result<(), String> {
    if status != 200 {
        return Err(format!("reply status {status}"));
    }
    if len != expected {
        return Err(format!("reply of {len} bytes, expected {expected}"));
    }
    Ok(())
}

/// One side of an rpc comparison, set up for one profile.
enum Side {
    Switchboard(Box<rpc::SbRpc>),
    Raw(Box<raw::RawRpc>),
}

impl Side {
    async fn start(variant: Variant, t: &Target) -> Result<Self> {
        Ok(match variant {
            Variant::Switchboard => Side::Switchboard(Box::new(rpc::SbRpc::start(t).await?)),
            Variant::Raw => Side::Raw(Box::new(raw::RawRpc::start(t).await?)),
        })
    }

    async fn drive(&self, concurrency: usize, stop: Stop) -> Measured {
        match self {
            Side::Switchboard(s) => s.drive(concurrency, stop).await,
            Side::Raw(r) => r.drive(concurrency, stop).await,
        }
    }

    async fn stop(self) {
        match self {
            Side::Switchboard(s) => s.stop().await,
            Side::Raw(r) => r.stop().await,
        }
    }
}

/// The points of `bench rpc`, `bench raw` and `bench compare`: for each
/// profile, the variants set up side by side, then for each round and
/// concurrency one point per variant (alternating which goes first), then
/// a ratio line per concurrency when there are two variants.
async fn rpc_points(
    env: &mut Env,
    a: &RpcArgs,
    variants: &[Variant],
    rounds: u32,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    let stop = a.load.stop()?;
    for &profile in &a.profile {
        let targets = variants
            .iter()
            .map(|&v| env.target(v, profile, a).map(|t| (v, t)))
            .collect::<Result<Vec<_>>>()?;
        let mut sides = Vec::new();
        let mut result = Ok(());
        for (variant, target) in &targets {
            match Side::start(*variant, target).await {
                Ok(side) => sides.push((*variant, target.labels, side)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            measure_sides(&sides, a, stop, rounds, probe, out).await;
        }
        for (_, _, side) in sides {
            side.stop().await;
        }
        result?;
    }
    Ok(())
}

async fn measure_sides(
    sides: &[(Variant, Labels, Side)],
    a: &RpcArgs,
    stop: Stop,
    rounds: u32,
    probe: &Probe,
    out: &mut Out<'_>,
) {
    let mut totals: HashMap<(usize, Variant), Totals> = HashMap::new();
    let mut last: HashMap<usize, Point> = HashMap::new();
    for round in 1..=rounds {
        for &c in &a.concurrency {
            let order: Vec<_> = if round % 2 == 1 {
                sides.iter().collect()
            } else {
                sides.iter().rev().collect()
            };
            for (variant, labels, side) in order {
                if a.load.warmup > 0 {
                    side.drive(c, Stop::Calls(a.load.warmup)).await;
                }
                let snap = probe.start();
                let m = side.drive(c, stop).await;
                let usage = probe.finish(&snap);
                let point = measured_point("rpc", variant.name(), *labels, c, round, &m, usage);
                totals.entry((c, *variant)).or_insert_with(Totals::new).add(
                    m.calls,
                    point.seconds,
                    &m.hist,
                );
                last.insert(c, point.clone());
                out.emit(Line::Point(point));
            }
        }
    }
    if sides.len() < 2 {
        return;
    }
    for &c in &a.concurrency {
        let sb = totals.get(&(c, Variant::Switchboard));
        let raw = totals.get(&(c, Variant::Raw));
        if let (Some(sb), Some(raw), Some(like)) = (sb, raw, last.get(&c)) {
            out.emit(Line::Ratio(report::ratio(like, rounds, sb, raw)));
        }
    }
}

/// The point of one drive of `workload`'s `variant`: its call latencies,
/// the time to the confirm of each request, and the probe's readings.
impl Labels {
    /// The labels of a point through the gateway: profile `safe`, the
    /// gateway's durable reply queue, `svc`'s queue type.
    pub(crate) fn gateway(svc: &ServiceSettings, payload: usize) -> Self {
        Labels {
            profile: "safe",
            reply_mode: "queue",
            queue_type: match svc.queue_type {
                QueueType::Quorum => "quorum",
                QueueType::Classic => "classic",
            },
            payload: payload.max(10),
        }
    }
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn payloads_have_the_size_asked_for() {
        for size in [10, 11, 256, 4096] {
            let p = super::json_payload(size);
            assert_eq!(p.len(), size);
            assert!(serde_json::from_slice::<serde_json::Value>(&p).is_ok());
        }
        assert_eq!(super::json_payload(0).len(), 10);
    }
}
