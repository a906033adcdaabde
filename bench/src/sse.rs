//! `bench sse`: K clients on the gateway's `GET /v1/events` while events
//! are published to the events fanout at a paced rate, next to an AMQP
//! subscriber of the same fanout.
//!
//! Every event carries its number and send time. The AMQP subscriber
//! ([`Subscription`], on the main thread) and every SSE client (on the
//! client thread, one keep-alive connection each) note when each event
//! reached them, on one monotonic clock. Reported: publish-to-delivery at
//! the AMQP subscriber (point `amqp`) and at the SSE clients (point `sse`),
//! and for every event and client the SSE delivery minus the AMQP one
//! (`minus_amqp_p50_us`, `minus_amqp_p99_us`): what the gateway's hop (its
//! own queue, the hub actor, the HTTP write) adds. `missing` counts the
//! events that never reached a client (a client the hub dropped as slow
//! loses the rest).
//!
//! The gateway's stream bounds are raised for the run (`max_streams` to K
//! plus some, `stream_buffer` to at least 1024), and the soft limit of open
//! files to what K clients and their server ends need.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use switchboard::amqp::Broker;
use switchboard::events::{CloudEvent, SubscribeOptions, Subscription};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Out;
use crate::env::Env;
use crate::error::{BenchError, Result};
use crate::events::{EVENT_TYPE, SbPublisher, paced_count, publish_paced};
use crate::notify::find;
use crate::probe::Probe;
use crate::progress::Total;
use crate::report::{Line, Point, histogram, per_s, round2, round3};
use crate::rig::{Rig, http_client, on_client_thread};

pub(crate) const SSE_HELP: &str = "\
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

/// How long receivers may take after the last publish before what has not
/// arrived counts as missing.
const GRACE: Duration = Duration::from_secs(10);
/// Connections opened at once while the clients connect.
const CONNECTING: usize = 64;
/// File descriptors besides the clients' and the server's ends of their
/// connections: the broker connections, the store, the runtime.
const SPARE_FDS: u64 = 512;

/// When each event (by number) reached one receiver, µs since the run's
/// epoch; 0 = never.
type Arrivals = Vec<u64>;

/// Runs the workload: one `amqp` point and one `sse` point.
pub(crate) async fn run(
    env: &mut Env,
    args: &SseArgs,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    let n = paced_count(args.rate, args.events, args.duration)?;
    let k = args.clients.max(1);
    raise_fd_limit(2 * k as u64 + SPARE_FDS);
    let workers = args.workers;
    let rig = Rig::start(env, Vec::new(), |s| {
        s.gateway.max_streams = s.gateway.max_streams.max(k + 64);
        s.gateway.stream_buffer = s.gateway.stream_buffer.max(1024);
        if workers > 0 {
            s.gateway.workers = workers;
        }
    })
    .await?;
    let mut amqp = env.amqp.clone();
    amqp.instance_id = env.instance("sse-amqp");
    let result = match Broker::connect(&amqp).await {
        Ok(broker) => {
            let r = measure(&rig, &broker, args, n, k, probe, out).await;
            broker.close().await;
            r
        }
        Err(e) => Err(e.into()),
    };
    rig.stop().await;
    result
}

async fn measure(
    rig: &Rig,
    broker: &Broker,
    args: &SseArgs,
    n: u64,
    k: usize,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    let total = (args.warmup + n) as usize;
    let epoch = Instant::now();
    // The reference: bound before anything is published.
    let mut sub = Subscription::start(
        broker,
        SubscribeOptions {
            durable_name: None,
            type_prefix: Some(EVENT_TYPE.into()),
        },
    )
    .await?;
    let amqp_arrivals = Rc::new(RefCell::new(vec![0u64; total]));
    let amqp_task = actix_rt::spawn({
        let arrivals = amqp_arrivals.clone();
        async move {
            let mut got = 0;
            while got < total {
                let Ok(Some(next)) = tokio::time::timeout(GRACE, sub.recv()).await else {
                    break;
                };
                let now = epoch.elapsed().as_micros() as u64;
                if let Some(seq) = next.ok().as_ref().and_then(seq_of) {
                    note(&mut arrivals.borrow_mut(), seq, now);
                    got += 1;
                }
            }
        }
    });
    // The SSE clients connect; once all are subscribed, publishing starts.
    let cancel = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    // The measured phase's first reading, handed to the client thread: it
    // takes the last one before it ends, while its own CPU time still shows.
    let (snap_tx, snap_rx) = tokio::sync::oneshot::channel();
    let url = rig.url(&format!("/v1/events?type={EVENT_TYPE}"));
    let clients = actix_rt::spawn(on_client_thread({
        let cancel = cancel.clone();
        let probe = probe.clone();
        move || async move {
            let arrivals = sse_clients(url, k, total, epoch, ready_tx, cancel).await;
            let usage = snap_rx.await.ok().map(|snap| probe.finish(&snap));
            arrivals.map(|a| (a, usage))
        }
    }));
    match ready_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            cancel.cancel();
            amqp_task.abort();
            return Err(setup(format!("SSE clients: {e}")));
        }
        Err(_) => {
            amqp_task.abort();
            return Err(setup("the SSE clients did not start".into()));
        }
    }
    info!(clients = k, "SSE clients subscribed; publishing");
    let sent = Rc::new(RefCell::new(vec![0u64; total]));
    let pad = "x".repeat(args.payload);
    let make = |seq: u64| {
        let sent_us = epoch.elapsed().as_micros() as u64;
        if let Some(slot) = sent.borrow_mut().get_mut(seq as usize) {
            *slot = sent_us;
        }
        CloudEvent::new(
            EVENT_TYPE,
            "switchboard-bench",
            json!({"seq": seq, "sent_us": sent_us, "pad": pad}),
        )
    };
    let publisher = SbPublisher(broker.clone());
    let progress = out.progress().clone();
    let phase = progress.phase("sse warm-up".into(), "events", Total::Count(args.warmup));
    let mut publish_errors = publish_paced(
        &publisher,
        args.warmup,
        args.rate,
        Instant::now(),
        &make,
        phase.tally(),
    )
    .await;
    drop(phase);
    let phase = progress.phase(format!("sse clients={k}"), "events", Total::Count(n));
    let _ = snap_tx.send(probe.start());
    let warmup = args.warmup;
    let make_measured = |i| make(warmup + i);
    publish_errors += publish_paced(
        &publisher,
        n,
        args.rate,
        Instant::now(),
        &make_measured,
        phase.tally(),
    )
    .await;
    drop(phase);
    let _ = amqp_task.await;
    // What has not reached a client GRACE after the reference has it is missing.
    let mut clients = clients;
    let per_client = tokio::select! {
        r = &mut clients => r,
        () = tokio::time::sleep(GRACE) => {
            cancel.cancel();
            clients.await
        }
    };
    let (per_client, usage) = match per_client {
        Ok(Ok(Ok(v))) => v,
        Ok(Ok(Err(e))) | Ok(Err(e)) => return Err(e),
        Err(e) => return Err(setup(format!("SSE clients: {e}"))),
    };
    let sent = sent.borrow();
    let amqp = amqp_arrivals.borrow();
    let measured = args.warmup as usize..total;
    let mut amqp_hist = histogram();
    let mut amqp_missing = 0;
    let mut last = 0u64;
    for i in measured.clone() {
        match amqp[i] {
            0 => amqp_missing += 1,
            at => {
                amqp_hist.saturating_record(at.saturating_sub(sent[i]).max(1));
                last = last.max(at);
            }
        }
    }
    let mut sse_hist = histogram();
    // Kept whole and sorted (a histogram's buckets would blur small
    // differences, and some are negative).
    let mut diffs: Vec<i64> = Vec::with_capacity(per_client.len() * n as usize);
    let mut missing = 0u64;
    for arrivals in &per_client {
        for i in measured.clone() {
            let at = arrivals.get(i).copied().unwrap_or(0);
            if at == 0 {
                missing += 1;
                continue;
            }
            last = last.max(at);
            sse_hist.saturating_record(at.saturating_sub(sent[i]).max(1));
            if amqp[i] != 0 {
                diffs.push(at as i64 - amqp[i] as i64);
            }
        }
    }
    let first = sent.get(args.warmup as usize).copied().unwrap_or(0);
    let seconds = last.saturating_sub(first) as f64 / 1e6;
    let base = usage.unwrap_or_default().into_point(Point {
        workload: "sse".into(),
        profile: "safe".into(),
        reply_mode: "none".into(),
        queue_type: "fanout".into(),
        payload: args.payload,
        calls: n,
        seconds: round3(seconds),
        calls_per_s: round2(per_s(n, seconds)),
        round: 1,
        rate: Some(args.rate),
        ..Point::default()
    });
    let amqp_delivered = n - amqp_missing;
    out.emit(Line::Point(Point {
        variant: "amqp".into(),
        concurrency: 1,
        errors: publish_errors + amqp_missing,
        deliveries: Some(amqp_delivered),
        delivered_per_s: Some(round2(per_s(amqp_delivered, seconds))),
        missing: Some(amqp_missing),
        ..quantiles(&base, &amqp_hist)
    }));
    let delivered = n * per_client.len() as u64 - missing;
    diffs.sort_unstable();
    out.emit(Line::Point(Point {
        variant: "sse".into(),
        concurrency: k,
        errors: publish_errors + missing,
        deliveries: Some(delivered),
        delivered_per_s: Some(round2(per_s(delivered, seconds))),
        missing: Some(missing),
        minus_amqp_p50_us: quantile(&diffs, 0.5),
        minus_amqp_p99_us: quantile(&diffs, 0.99),
        ..quantiles(&base, &sse_hist)
    }));
    Ok(())
}

/// A failure of the workload's set-up (its clients connecting).
fn setup(reason: String) -> BenchError {
    BenchError::Setup {
        workload: "sse",
        reason,
    }
}

/// `base` with the median, 99th percentile and maximum of `h`.
fn quantiles(base: &Point, h: &Histogram<u64>) -> Point {
    Point {
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        ..base.clone()
    }
}

/// The `q` quantile of `sorted` (the lowest value with at least `q` of
/// them at or below it); `None` when empty.
fn quantile(sorted: &[i64], q: f64) -> Option<i64> {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted.get(rank.min(sorted.len()).checked_sub(1)?).copied()
}

/// The number the bench gave an event.
fn seq_of(event: &CloudEvent) -> Option<usize> {
    event
        .data
        .as_ref()?
        .get("seq")?
        .as_u64()
        .map(|s| s as usize)
}

/// Notes the first arrival of event `seq`.
fn note(arrivals: &mut Arrivals, seq: usize, at: u64) {
    if let Some(slot) = arrivals.get_mut(seq).filter(|s| **s == 0) {
        *slot = at.max(1);
    }
}

/// On the client thread: connects `k` SSE clients to `url` (at most
/// [`CONNECTING`] at a time), says when all are subscribed, then reads
/// until each has `total` events or `cancel`. Returns each client's arrivals.
async fn sse_clients(
    url: String,
    k: usize,
    total: usize,
    epoch: Instant,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    cancel: CancellationToken,
) -> Result<Vec<Arrivals>> {
    let client = match http_client() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return Err(e);
        }
    };
    let connected: Vec<_> = futures_util::stream::iter(0..k)
        .map(|_| {
            let req = client.get(&url).send();
            async move {
                let res = req.await.map_err(|e| e.to_string())?;
                if !res.status().is_success() {
                    return Err(format!("GET /v1/events: {}", res.status()));
                }
                Ok(res)
            }
        })
        .buffer_unordered(CONNECTING)
        .collect()
        .await;
    let mut streams = Vec::with_capacity(k);
    for c in connected {
        match c {
            Ok(res) => streams.push(res),
            Err(e) => {
                let _ = ready.send(Err(e.clone()));
                return Err(setup(e));
            }
        }
    }
    let _ = ready.send(Ok(()));
    let ended_early = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = streams
        .into_iter()
        .map(|res| {
            let cancel = cancel.clone();
            let ended_early = ended_early.clone();
            actix_rt::spawn(async move {
                let mut arrivals = vec![0u64; total];
                let mut got = 0;
                let mut stream = res.bytes_stream();
                let mut buf = BytesMut::new();
                while got < total {
                    let chunk = tokio::select! {
                        () = cancel.cancelled() => break,
                        c = stream.next() => c,
                    };
                    let Some(Ok(chunk)) = chunk else {
                        ended_early.fetch_add(1, Ordering::Relaxed);
                        break;
                    };
                    let now = epoch.elapsed().as_micros() as u64;
                    buf.extend_from_slice(&chunk);
                    while let Some(end) = find(&buf, b"\n\n") {
                        if let Some(seq) = frame_seq(&buf[..end]) {
                            note(&mut arrivals, seq, now);
                            got += 1;
                        }
                        buf.advance(end + 2);
                    }
                }
                arrivals
            })
        })
        .collect();
    let mut out = Vec::with_capacity(k);
    for r in readers {
        // A reader task only ends by returning.
        if let Ok(a) = r.await {
            out.push(a);
        }
    }
    let early = ended_early.load(Ordering::Relaxed);
    if early > 0 {
        warn!(clients = early, "SSE streams ended before their last event");
    }
    Ok(out)
}

/// The `seq` of a bench event's SSE frame, read without parsing its JSON:
/// the only `"seq":` in the frame is the bench's (the CloudEvent has no
/// such attribute, and `pad` is all `x`).
fn frame_seq(frame: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b"\"seq\":";
    let at = find(frame, KEY)? + KEY.len();
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Raises the soft limit of open files to `want` (at most the hard limit)
/// when it is lower; logs what it could not do.
fn raise_fd_limit(want: u64) {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given, nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            warn!("the open-files limit could not be read");
            return;
        }
        let want = want as libc::rlim_t;
        let have = lim.rlim_cur;
        if have >= want {
            return;
        }
        let raised = want.min(lim.rlim_max);
        lim.rlim_cur = raised;
        // SAFETY: setrlimit reads the struct it is given, nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 || raised < want {
            warn!(
                have,
                want,
                hard = lim.rlim_max,
                "the open-files limit is below what the clients need; some may fail to connect"
            );
        } else {
            info!(from = have, to = raised, "open-files limit raised");
        }
    }
    #[cfg(not(unix))]
    let _ = want;
}

#[cfg(test)]
mod tests {
    use super::{frame_seq, quantile};

    #[test]
    fn quantiles_of_signed_values() {
        let v: Vec<i64> = (-50..50).collect();
        assert_eq!(quantile(&v, 0.5), Some(-1));
        assert_eq!(quantile(&v, 0.99), Some(48));
        assert_eq!(quantile(&[7], 0.5), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn the_seq_of_a_frame_is_read() {
        let frame = br#"id: e-3
event: switchboard.bench.tick
data: {"data":{"pad":"xx","sent_us":12,"seq":42},"id":"a"}"#;
        assert_eq!(frame_seq(frame), Some(42));
        assert_eq!(frame_seq(b": keep-alive"), None);
    }
}
