//! `bench notify`: how soon a client learns that a call has ended, in each
//! style, and how many HTTP requests that takes.
//!
//! The gateway runs in this process ([`Rig`]) with one service, `notify`,
//! whose handler waits `--delay-ms` and then notes the instant it returns
//! its reply ([`Completions`], keyed by call id). Clients (`--clients` at
//! once, on a thread of their own) make calls in one style each:
//!
//! - `sync`: POST, answered 200 with the reply;
//! - `longpoll`: POST `Prefer: respond-async` (202), then `GET
//!   <Location>?wait=N` until the call has ended;
//! - `poll`: the 202, then `GET <Location>` after each `Retry-After`;
//! - `callback`: POST with `Callback-Url` to a receiver on 127.0.0.1 in this
//!   process (the gateway allows loopback targets for the run);
//! - `sse`: the 202, then `GET <Location>/events` until its
//!   `switchboard.call.completed` frame;
//! - `amqp`: the 202, then the `switchboard.call.completed` event from an
//!   [`Subscription`] on the events fanout.
//!
//! Each call's awareness delay is the instant the client has the result
//! (the response read, the callback or event received) minus the instant
//! the handler returned: both on this process's monotonic clock, so the
//! figure is exact to the microsecond and includes everything after the
//! service's work: the reply's publish, the gateway's routing and store
//! write, and the notification path of the style. (The status document's
//! `completed_at` is when the gateway recorded the reply, to the
//! millisecond: it would leave out the reply's trip to the gateway.)

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use switchboard::amqp::wire;
use switchboard::events::{SubscribeOptions, Subscription};
use switchboard::settings::ServiceSettings;
use switchboard::worker::{HandlerError, Reply, Request};
use tokio::sync::oneshot;

use crate::Out;
use crate::env::{Env, check_reply, json_payload};
use crate::error::Result;
use crate::http::accepted_location;
use crate::load::{LoadArgs, Measured, Phases, Stop, drive};
use crate::probe::{Probe, Usage};
use crate::progress::Progress;
use crate::report::{self, Labels, Line, histogram, measured_point, record};
use crate::rig::{LocalServer, Rig, Served, http_client, on_client_thread};

pub(crate) const NOTIFY_HELP: &str = "\
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
    /// The point's `variant`.
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

/// The service the clients call.
const SERVICE: &str = "notify";
/// The type of the lifecycle event of a call that has ended (DESIGN.md,
/// "Lifecycle events"): spelled here as any subscriber outside the library
/// spells it, so that the `sse` and `amqp` styles fail if it drifts.
const EVENT_COMPLETED: &str = "switchboard.call.completed";
/// How long a client waits for a callback or an event before the call
/// counts as failed.
const NOTIFY_LIMIT: Duration = Duration::from_secs(30);

/// When the handler returned each call's reply, by call id.
type Completions = Arc<Mutex<HashMap<String, Instant>>>;

/// Where a notification that arrives on its own (callback, AMQP event)
/// meets the client waiting for it, whichever comes first.
#[derive(Clone, Default)]
struct Rendezvous(Arc<Mutex<HashMap<String, Slot>>>);

enum Slot {
    /// The client waits: hand it the arrival.
    Waiting(oneshot::Sender<Arrival>),
    /// The notification came before the client asked.
    Arrived(Arrival),
}

/// A notification: when it arrived, and whether the call succeeded.
type Arrival = (Instant, bool);

impl Rendezvous {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A poisoned map is still a map: a panicking client loses one call.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A notification about `id` arrived now.
    fn arrive(&self, id: &str, succeeded: bool) {
        let arrival = (Instant::now(), succeeded);
        let mut map = self.lock();
        match map.remove(id) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(arrival);
            }
            // A repeat (a callback retried) keeps the first arrival.
            Some(first @ Slot::Arrived(_)) => {
                map.insert(id.to_owned(), first);
            }
            None => {
                map.insert(id.to_owned(), Slot::Arrived(arrival));
            }
        }
    }

    /// The notification about `id`, when it comes (at most [`NOTIFY_LIMIT`]).
    async fn wait(&self, id: &str) -> Result<Arrival, String> {
        let rx = {
            let mut map = self.lock();
            if let Some(Slot::Arrived(a)) = map.remove(id) {
                return Ok(a);
            }
            let (tx, rx) = oneshot::channel();
            map.insert(id.to_owned(), Slot::Waiting(tx));
            rx
        };
        match tokio::time::timeout(NOTIFY_LIMIT, rx).await {
            Ok(Ok(a)) => Ok(a),
            _ => {
                self.lock().remove(id);
                Err(format!("no notification of call {id}"))
            }
        }
    }
}

/// What a client thread needs for calls in any style.
#[derive(Clone)]
struct Spec {
    base: String,
    payload: Bytes,
    completions: Completions,
    rendezvous: Rendezvous,
    /// The callback receiver's URL.
    callback_url: String,
    /// `?wait=` of long-polls, s.
    wait: u64,
}

/// Runs every style and prints a point each.
pub(crate) async fn run(
    env: &mut Env,
    args: &NotifyArgs,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    let load = args.load();
    let stop = load.stop()?;
    let completions: Completions = Arc::default();
    let delay = Duration::from_millis(args.delay_ms);
    let noted = completions.clone();
    let handler = Arc::new(move |req: Request| {
        let noted = noted.clone();
        async move {
            tokio::time::sleep(delay).await;
            let id = req
                .correlation_id
                .ok_or_else(|| HandlerError::new(400, "a call without an id"))?;
            // The service's work is done: the rest is notification.
            noted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, Instant::now());
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    let configured = env.echo_settings();
    let svc = ServiceSettings {
        // Every client's call runs at once: each ends `delay` after it starts.
        concurrency: args.clients.clamp(1, 10_000) as u16,
        // Long enough for the work and a slow notification after it.
        timeout_ms: 30_000 + 2 * args.delay_ms,
        ..configured
    };
    let labels = Labels::gateway(&svc, args.payload);
    let rendezvous = Rendezvous::default();
    let receiver = callback_receiver(rendezvous.clone())?;
    let (wait, workers) = (args.wait.max(1), args.workers);
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 24]>())
    );
    let served = Served {
        name: SERVICE.into(),
        settings: svc,
        handler,
    };
    let rig = Rig::start(env, vec![served], |s| {
        s.callbacks.secret = secret;
        // The receiver is on loopback.
        s.callbacks.allow_private = true;
        s.gateway.max_wait_s = s.gateway.max_wait_s.max(wait);
        if workers > 0 {
            s.gateway.workers = workers;
        }
    })
    .await;
    let rig = match rig {
        Ok(r) => r,
        Err(e) => {
            receiver.stop().await;
            return Err(e);
        }
    };
    let spec = Spec {
        base: rig.base.clone(),
        payload: json_payload(args.payload),
        completions,
        rendezvous: rendezvous.clone(),
        callback_url: format!("{}/callback", receiver.base),
        wait,
    };
    let result = async {
        for &style in &args.style {
            // The AMQP style's subscriber: bound before any call is made.
            let subscriber = if style == NotifyStyle::Amqp {
                Some(AmqpWatcher::start(&rig, rendezvous.clone()).await?)
            } else {
                None
            };
            let measured = on_client_thread({
                let (spec, probe, clients, warmup) =
                    (spec.clone(), probe.clone(), args.clients, load.warmup);
                let progress = out.progress().clone();
                move || drive_style(spec, style, clients, warmup, stop, probe, progress)
            })
            .await;
            if let Some(s) = subscriber {
                s.stop();
            }
            let (m, usage, requests, aware) = measured??;
            let mut p = measured_point("notify", style.name(), labels, args.clients, 1, &m, usage);
            p.confirm_p50_us = None;
            p.confirm_p99_us = None;
            p.requests_per_call = Some(report::round3(requests as f64 / m.calls.max(1) as f64));
            p.aware_p50_us = Some(aware.value_at_quantile(0.5));
            p.aware_p99_us = Some(aware.value_at_quantile(0.99));
            p.aware_max_us = Some(aware.max());
            out.emit(Line::Point(p));
        }
        Ok(())
    }
    .await;
    rig.stop().await;
    receiver.stop().await;
    result
}

/// One style's point on the client thread: warm-up (not recorded), then
/// the measured drive between two probe readings, each shown on
/// `progress`. Returns the drive, the readings, the HTTP requests made and
/// the awareness delays.
async fn drive_style(
    spec: Spec,
    style: NotifyStyle,
    clients: usize,
    warmup: u64,
    stop: Stop,
    probe: Probe,
    progress: Progress,
) -> Result<(Measured, Usage, u64, Histogram<u64>)> {
    let client = http_client()?;
    let requests = Rc::new(Cell::new(0u64));
    let aware = Rc::new(RefCell::new(histogram()));
    let call = {
        let (requests, aware) = (requests.clone(), aware.clone());
        move || {
            let (client, spec) = (client.clone(), spec.clone());
            let (requests, aware) = (requests.clone(), aware.clone());
            async move {
                let (id, at) = one_call(&client, &spec, style, &requests).await?;
                let done = spec
                    .completions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id)
                    .ok_or_else(|| format!("call {id} ended without its handler"))?;
                record(&mut aware.borrow_mut(), at.saturating_duration_since(done));
                Ok(at)
            }
        }
    };
    let phases = Phases {
        label: format!("notify {} clients={clients}", style.name()),
        warmup,
        stop,
        probe: &probe,
        progress: &progress,
    };
    let reset = || {
        requests.set(0);
        aware.replace(histogram());
    };
    let (m, usage) = phases
        .run(reset, |stop, tally| {
            drive(clients, stop, tally, call.clone())
        })
        .await;
    let aware = aware.replace(histogram());
    Ok((m, usage, requests.get(), aware))
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One call in `style`: its id and the instant the client knew its result.
async fn one_call(
    client: &reqwest::Client,
    spec: &Spec,
    style: NotifyStyle,
    requests: &Cell<u64>,
) -> Result<(String, Instant), String> {
    let count = || requests.set(requests.get() + 1);
    let post = || {
        count();
        client
            .post(format!("{}/v1/services/{SERVICE}/calls", spec.base))
            .header(CONTENT_TYPE, wire::CONTENT_JSON)
            .body(spec.payload.clone())
    };
    if style == NotifyStyle::Sync {
        // Waits as long as a long-poll would (the gateway's default may be shorter).
        let res = post()
            .header("Prefer", format!("wait={}", spec.wait))
            .send()
            .await
            .map_err(text)?;
        let status = res.status().as_u16();
        let id = res
            .headers()
            .get("call-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or("an answer without Call-Id")?;
        let body = res.bytes().await.map_err(text)?;
        let at = Instant::now();
        check_reply(status, body.len(), spec.payload.len())?;
        return Ok((id, at));
    }
    let res = match style {
        NotifyStyle::Callback => post().header("Callback-Url", spec.callback_url.as_str()),
        _ => post().header("Prefer", "respond-async"),
    }
    .send()
    .await
    .map_err(text)?;
    let location = accepted_location(&res)?;
    let id = location.rsplit('/').next().unwrap_or_default().to_owned();
    let url = format!("{}{location}", spec.base);
    let (at, succeeded) = match style {
        NotifyStyle::Longpoll => loop {
            count();
            let doc = get_doc(client, &format!("{url}?wait={}", spec.wait)).await?;
            if let Some(ended) = ended(&doc.1) {
                break (Instant::now(), ended);
            }
        },
        NotifyStyle::Poll => {
            let mut after = retry_after(&res);
            loop {
                tokio::time::sleep(after).await;
                count();
                let (headers, doc) = get_doc(client, &url).await?;
                if let Some(ended) = ended(&doc) {
                    break (Instant::now(), ended);
                }
                after = retry_after_of(&headers);
            }
        }
        NotifyStyle::Sse => {
            count();
            sse_until_completed(client, &format!("{url}/events")).await?
        }
        NotifyStyle::Callback | NotifyStyle::Amqp => spec.rendezvous.wait(&id).await?,
        NotifyStyle::Sync => unreachable!("answered above"),
    };
    if !succeeded {
        return Err(format!("call {id} did not succeed"));
    }
    Ok((id, at))
}

/// A status document and the headers it came with.
async fn get_doc(
    client: &reqwest::Client,
    url: &str,
) -> Result<(reqwest::header::HeaderMap, serde_json::Value), String> {
    let res = client.get(url).send().await.map_err(text)?;
    if !res.status().is_success() {
        return Err(format!("GET {url}: {}", res.status()));
    }
    let headers = res.headers().clone();
    Ok((headers, res.json().await.map_err(text)?))
}

/// `None` while the document says pending; else whether it succeeded.
fn ended(doc: &serde_json::Value) -> Option<bool> {
    match doc["status"].as_str() {
        Some("pending") => None,
        other => Some(other == Some("succeeded")),
    }
}

fn retry_after(res: &reqwest::Response) -> Duration {
    retry_after_of(res.headers())
}

/// The `Retry-After` in seconds, 1 s when absent or not a number.
fn retry_after_of(headers: &reqwest::header::HeaderMap) -> Duration {
    let secs = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs)
}

/// Reads a call's SSE stream until its `switchboard.call.completed` frame.
async fn sse_until_completed(client: &reqwest::Client, url: &str) -> Result<Arrival, String> {
    let res = client.get(url).send().await.map_err(text)?;
    if !res.status().is_success() {
        return Err(format!("GET {url}: {}", res.status()));
    }
    let marker = format!("event: {EVENT_COMPLETED}\n");
    let mut stream = res.bytes_stream();
    let mut seen = Vec::new();
    while let Some(chunk) = stream.next().await {
        seen.extend_from_slice(&chunk.map_err(text)?);
        let Some(at) = find(&seen, marker.as_bytes()) else {
            continue;
        };
        // The frame's data line: wait for its end (a blank line).
        let Some(end) = find(&seen[at..], b"\n\n") else {
            continue;
        };
        let now = Instant::now();
        let frame = &seen[at..at + end];
        let succeeded = find(frame, b"\"status\":\"succeeded\"").is_some();
        return Ok((now, succeeded));
    }
    Err("the call's stream ended before its completion".into())
}

/// Where `needle` first starts in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The receiver of callbacks: actix-web on 127.0.0.1:0, one thread; every
/// POST to `/callback` is a notification about the call named by the
/// CloudEvent's subject.
fn callback_receiver(rendezvous: Rendezvous) -> Result<LocalServer> {
    LocalServer::start("callback receiver", 1, move |cfg| {
        let rendezvous = rendezvous.clone();
        cfg.route(
            "/callback",
            web::post().to(move |body: Bytes| {
                let rendezvous = rendezvous.clone();
                async move {
                    let event: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    match event["subject"].as_str() {
                        Some(id) => {
                            let ok = event["data"]["status"] == "succeeded";
                            rendezvous.arrive(id, ok);
                            HttpResponse::NoContent().finish()
                        }
                        // Permanent: not worth a retry.
                        None => HttpResponse::Gone().finish(),
                    }
                }
            }),
        );
    })
}

/// The AMQP style's subscriber: the completed events of the run's calls,
/// each handed to the client waiting for it.
struct AmqpWatcher(tokio::task::JoinHandle<()>);

impl AmqpWatcher {
    async fn start(rig: &Rig, rendezvous: Rendezvous) -> Result<Self> {
        let mut sub = Subscription::start(
            &rig.broker,
            SubscribeOptions {
                durable_name: None,
                type_prefix: Some(EVENT_COMPLETED.into()),
            },
        )
        .await?;
        Ok(Self(actix_rt::spawn(async move {
            while let Some(next) = sub.recv().await {
                let Ok(event) = next else { continue };
                if let Some(id) = &event.subject {
                    let ok =
                        event.data.as_ref().and_then(|d| d["status"].as_str()) == Some("succeeded");
                    rendezvous.arrive(id, ok);
                }
            }
        })))
    }

    /// Ends the subscription (dropping it closes its connection).
    fn stop(self) {
        self.0.abort();
    }
}
