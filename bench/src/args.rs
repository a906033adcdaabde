//! The command line of `switchboard bench` ([`BenchArgs`]): the workloads
//! and the text of `--help`. Each workload's own flags live with it
//! ([`RpcArgs`], [`EventsArgs`], ...).

use crate::compare::CompareArgs;
use crate::events::EventsArgs;
use crate::http::{self, HttpArgs};
use crate::notify::{self, NotifyArgs};
use crate::pending::PendingArgs;
use crate::plain::ResponderArgs;
use crate::results::ResultsArgs;
use crate::rpc::{self, RpcArgs};
use crate::sse::{self, SseArgs};

const WORKLOADS: &str = "\
Workloads:
  rpc      calls through switchboard's RpcClient to an echo service
  raw      the same calls written directly on lapin (the reference)
  compare  rpc (switchboard, switchboard-waits), raw and the tutorials' plain
           loop (plain, plain-guarantees) alternating in one run, plus ratio
           lines (--variants to choose)
  events   CloudEvents through a fanout to K subscribers, paced or
           --saturated: switchboard, raw (lapin with its guarantees) and
           plain (tutorial 3), ratios switchboard / raw and / plain
  http     the HTTP gateway in this process: sync POST, 202 + long-poll, GET
           of a finished call, a bare actix-web GET (reference), and an rpc
           point with the same payload; ratios sync / rpc, accepted / sync
           and get / bare
  sse      K SSE clients on the gateway's /v1/events next to an AMQP
           subscriber: SSE minus AMQP delivery latency per event, missing
  notify   a service that answers after a delay, called in each style (sync,
           longpoll, poll, callback, sse, amqp): completion-to-awareness
           delay and HTTP requests per call
  pending  N asynchronous calls (202) left pending in the gateway: its
           resident memory per pending call
  results  N asynchronous calls with large results, each long-polled until
           it ends: the gateway's resident memory once they have ended

Output: one JSON line per measured point on stdout: kind, workload, variant,
profile, reply_mode, queue_type, payload, concurrency, calls, errors, seconds,
calls_per_s, p50_us, p99_us, max_us, peak_rss_kib (VmHWM during the point),
cpu_s / main_cpu_s / cpu_by_thread (CPU time of this process during the
point), broker_cpu_s (with --broker-pid), machine_cpu_s (all processes),
round; rpc adds confirm_p50_us / confirm_p99_us (until the request was
confirmed), events and sse add deliveries, delivered_per_s and rate; http
and notify add requests_per_call; notify adds aware_p50_us / aware_p99_us /
aware_max_us; sse adds minus_amqp_p50_us / minus_amqp_p99_us and missing;
pending and results add rss_before_kib / rss_after_kib / rss_per_call_bytes.
`compare`, `events` and `http` add lines of kind \"ratio\": switchboard / raw
of calls/s (events: deliveries/s) and of p50 and p99; http's name what they
divide in `of` (\"sync / rpc\", \"accepted / sync\", \"get / bare\"). `bench <workload> --help`
says what each measures.

Every run uses a prefix and instance id of its own (sbbench-<8 hex>), so it
never meets a serving `switchboard serve` (with --external, only the instance
id: the prefix must be the server's), and deletes the queues and exchanges it
declared at the end. The broker is the configured one (amqp.url,
SWITCHBOARD__AMQP__URL).

While stderr is a terminal, each warm-up and measured point shows a progress
bar there (cleared when it ends); stdout has the JSON lines only.";

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
    #[command(after_long_help = rpc::RPC_HELP)]
    Rpc(RpcArgs),
    /// The reference: the same calls written directly on lapin (one channel,
    /// publish and await the confirm, a consumer on the reply queue, a map
    /// from correlation id to waiter; an echo server on lapin that acks after
    /// its reply is confirmed), with identical properties, queue type and
    /// guarantees.
    #[command(after_long_help = rpc::RPC_HELP)]
    Raw(RpcArgs),
    /// rpc, raw and the tutorials' plain RPC loop side by side in one run,
    /// alternating, for every profile and concurrency; prints their points
    /// and ratio lines (switchboard / raw, and each switchboard side over
    /// each plain one). Variants: switchboard (`send`: a call that may
    /// outlive its caller), switchboard-waits (`call`: the caller waits in
    /// memory), raw, plain (the tutorials' loop: requester here, responder
    /// a process of its own), plain-guarantees (the same with
    /// switchboard's guarantees).
    #[command(after_long_help = rpc::RPC_HELP)]
    Compare(CompareArgs),
    /// CloudEvents published at a paced rate (or `--saturated`) to the
    /// events fanout, received by K subscribers (events::Subscription);
    /// delivered events/s and publish-to-delivery latency, next to a
    /// raw-lapin fanout with the same guarantees and RabbitMQ's tutorial 3
    /// (plain) in the same run, plus ratio lines (switchboard / raw, and
    /// `of` "switchboard / plain").
    Events(EventsArgs),
    /// The HTTP gateway in this process with an echo worker, driven over
    /// keep-alive connections by a client on a thread of its own: `sync`
    /// POSTs (200), `accepted` POSTs (202, then long-poll), `get` of a
    /// finished call, and `bare` (the same GET from a bare actix-web
    /// handler, the reference of `get`); plus a `bench rpc` point with the
    /// same payload and calls in flight, and ratio lines `sync / rpc`,
    /// `accepted / sync` and `get / bare`.
    #[command(after_long_help = http::HTTP_HELP)]
    Http(HttpArgs),
    /// How soon a client learns that a call has ended, per style (sync,
    /// long-poll, polling at Retry-After, callback, SSE per call, AMQP
    /// subscriber): a service that answers after --delay-ms, --clients
    /// clients at once; per style the delay from the handler's completion
    /// to the client's awareness, and HTTP requests per call.
    #[command(after_long_help = notify::NOTIFY_HELP)]
    Notify(NotifyArgs),
    /// K SSE clients on the gateway's /v1/events (in this process) while
    /// events are published to the fanout at a paced rate, next to an AMQP
    /// subscriber: per event and client, the SSE delivery latency minus the
    /// AMQP subscriber's, and the events that never reached a client.
    #[command(after_long_help = sse::SSE_HELP)]
    Sse(SseArgs),
    /// What a pending asynchronous call costs the gateway in memory: the
    /// gateway in this process serves a service whose worker holds its first
    /// request for an hour; --calls POSTs with `Prefer: respond-async` (each
    /// a 202) stay pending; the point reports VmRSS before and after them and
    /// the growth per call (rss_per_call_bytes).
    Pending(PendingArgs),
    /// What large results cost the gateway in memory once their calls have
    /// ended: a service answers every call with --result-bytes bytes of
    /// control characters (six bytes each JSON-escaped); --calls POSTs with
    /// `Prefer: respond-async`, each long-polled until it ends (its
    /// lifecycle event kept by the event hub, its document offered to the
    /// finished-call cache); the point reports VmRSS before and after them
    /// and the growth per call (rss_per_call_bytes).
    Results(ResultsArgs),
    /// The plain reference's responder process (spawned by `compare`).
    #[command(hide = true)]
    PlainResponder(ResponderArgs),
}

impl Workload {
    /// Whether the workload calls a service served by another process.
    pub(crate) fn external(&self) -> bool {
        match self {
            Workload::Rpc(a) | Workload::Raw(a) => a.external,
            Workload::Compare(c) => c.rpc.external,
            Workload::Events(_)
            | Workload::Http(_)
            | Workload::Notify(_)
            | Workload::Sse(_)
            | Workload::Pending(_)
            | Workload::Results(_)
            | Workload::PlainResponder(_) => false,
        }
    }
}
