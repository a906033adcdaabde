//! `bench http`: the gateway in this process ([`Rig`]) with an echo worker,
//! driven over keep-alive HTTP/1.1 connections by a client on a thread of
//! its own; one point per variant and concurrency (= connections):
//!
//! - `sync`: `POST /v1/services/echo/calls` with the payload, answered 200
//!   with the echo;
//! - `accepted`: the same POST with `Prefer: respond-async` (202), then
//!   `GET <Location>?wait=N` until the call has ended;
//! - `get`: `GET /v1/calls/{id}` of one finished call, again and again (a
//!   read of the call store);
//! - `bare`: the same GET answered by a bare actix-web handler that returns
//!   the same document as a constant, on another port: what HTTP alone costs.
//!
//! With the rpc reference (on by default) each concurrency also gets a
//! `bench rpc` point with the same payload and calls in flight, and a ratio
//! line `sync / rpc`; with `accepted` and `sync`, a ratio line `accepted /
//! sync`; with `get` and `bare`, a ratio line `get / bare`.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use switchboard::amqp::wire;
use switchboard::worker;

use crate::Out;
use crate::compare::Variant;
use crate::env::{Env, check_reply};
use crate::error::{BenchError, Result};
use crate::load::{LoadArgs, Measured, Phases, Stop, drive};
use crate::probe::{Probe, Usage};
use crate::progress::Progress;
use crate::report::{self, Labels, Line, Point, Totals, measured_point};
use crate::rig::{LocalServer, Rig, Served, http_client, on_client_thread};
use crate::rpc::{Profile, ReplyModeArg, RpcArgs, SbRpc};

pub(crate) const HTTP_HELP: &str = "\
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
(kind ratio, `of`): sync / rpc, accepted / sync and get / bare. A variant
listed more than once is measured that many times (alternate them to
spread the machine's noise), and its ratio lines use all of its points.";

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
    /// The point's `variant`.
    fn name(self) -> &'static str {
        match self {
            HttpVariant::Sync => "sync",
            HttpVariant::Accepted => "accepted",
            HttpVariant::Get => "get",
            HttpVariant::Bare => "bare",
        }
    }
}

/// The service the gateway serves (under the run's prefix).
const SERVICE: &str = "echo";

/// What a client thread needs to make calls of any variant.
#[derive(Clone)]
struct Spec {
    /// The gateway's base URL.
    base: String,
    /// The bare server's base URL.
    bare: String,
    payload: Bytes,
    /// The finished call that `get` and `bare` read, and its document's size.
    finished: String,
    doc_len: usize,
    /// `?wait=` of the long-polls of `accepted`, s.
    wait: u64,
}

/// Starts the gateway and the bare server, measures every point, stops them.
pub(crate) async fn run(
    env: &mut Env,
    args: &HttpArgs,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    let stop = args.load.stop()?;
    // The rpc reference's target: the same service settings as the rig's.
    let rpc_args = RpcArgs {
        load: args.load.clone(),
        payload: args.payload,
        concurrency: args.concurrency.clone(),
        reply_mode: ReplyModeArg::Queue,
        profile: vec![Profile::Safe],
        queue_type: None,
        external: false,
        worker_processes: Vec::new(),
        service: SERVICE.into(),
        timeout: 30.0,
    };
    let target = env.target(Variant::Switchboard, Profile::Safe, 0, &rpc_args)?;
    let served = Served {
        name: SERVICE.into(),
        settings: target.service_settings.clone().unwrap_or_default(),
        handler: worker::echo(Duration::ZERO),
    };
    let workers = args.workers;
    let rig = Rig::start(env, vec![served], |s| {
        if workers > 0 {
            s.gateway.workers = workers;
        }
    })
    .await?;
    let result = async {
        let (finished, doc) = finished_call(&rig, &target.payload).await?;
        let bare = bare_server(doc.clone(), rig.settings.gateway.workers)?;
        let spec = Spec {
            base: rig.base.clone(),
            bare: bare.base.clone(),
            payload: target.payload.clone(),
            finished,
            doc_len: doc.len(),
            wait: args.wait.max(1),
        };
        let sb = if args.with_rpc_reference {
            Some(SbRpc::start(&target, true).await?)
        } else {
            None
        };
        let measured = measure(args, &spec, sb.as_ref(), target.labels, stop, probe, out).await;
        if let Some(sb) = sb {
            sb.stop().await;
        }
        bare.stop().await;
        measured
    }
    .await;
    rig.stop().await;
    result
}

/// Every point, then the ratio lines.
async fn measure(
    args: &HttpArgs,
    spec: &Spec,
    sb: Option<&SbRpc>,
    labels: Labels,
    stop: Stop,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    let mut totals: HashMap<(usize, &str), (Totals, Point)> = HashMap::new();
    let mut keep = |name: &'static str, c: usize, p: &Point, m: &Measured| {
        let (t, _) = totals
            .entry((c, name))
            .or_insert_with(|| (Totals::new(), p.clone()));
        t.add(m.calls, p.seconds, &m.hist);
    };
    for &c in &args.concurrency {
        for &v in &args.variant {
            let (m, usage, requests) = on_client_thread({
                let spec = spec.clone();
                let probe = probe.clone();
                let progress = out.progress().clone();
                let warmup = args.load.warmup;
                move || drive_variant(spec, v, c, warmup, stop, probe, progress)
            })
            .await??;
            let mut p = measured_point("http", v.name(), labels, c, 1, &m, usage);
            p.confirm_p50_us = None;
            p.confirm_p99_us = None;
            p.requests_per_call = Some(report::round3(requests as f64 / (m.calls.max(1)) as f64));
            keep(v.name(), c, &p, &m);
            out.emit(Line::Point(p));
        }
        if let Some(sb) = sb {
            let phases = Phases {
                label: format!("http rpc reference c={c}"),
                warmup: args.load.warmup,
                stop,
                probe,
                progress: out.progress(),
            };
            let (m, usage) = phases
                .run(|| {}, |stop, tally| sb.drive(c, stop, tally))
                .await;
            let p = measured_point("rpc", Variant::Switchboard.name(), labels, c, 1, &m, usage);
            keep("rpc", c, &p, &m);
            out.emit(Line::Point(p));
        }
    }
    for &c in &args.concurrency {
        for (num, den) in [("sync", "rpc"), ("accepted", "sync"), ("get", "bare")] {
            if let (Some((n, like)), Some((d, _))) = (totals.get(&(c, num)), totals.get(&(c, den)))
            {
                let mut r = report::ratio(like, 1, n, d);
                r.of = Some(format!("{num} / {den}"));
                out.emit(Line::Ratio(r));
            }
        }
    }
    Ok(())
}

/// One point of `variant` on the client thread: warm-up (not recorded),
/// then the measured drive between two probe readings, each shown on
/// `progress`. Also returns the HTTP requests the measured calls made.
async fn drive_variant(
    spec: Spec,
    variant: HttpVariant,
    concurrency: usize,
    warmup: u64,
    stop: Stop,
    probe: Probe,
    progress: Progress,
) -> Result<(Measured, Usage, u64)> {
    let client = http_client()?;
    let requests = Rc::new(Cell::new(0u64));
    let call = {
        let requests = requests.clone();
        move || {
            let (client, spec, requests) = (client.clone(), spec.clone(), requests.clone());
            async move { one_call(&client, &spec, variant, &requests).await }
        }
    };
    let phases = Phases {
        label: format!("http {} c={concurrency}", variant.name()),
        warmup,
        stop,
        probe: &probe,
        progress: &progress,
    };
    let (m, usage) = phases
        .run(
            || requests.set(0),
            |stop, tally| drive(concurrency, stop, tally, call.clone()),
        )
        .await;
    Ok((m, usage, requests.get()))
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One call of `variant`; answers when it has ended well.
async fn one_call(
    client: &reqwest::Client,
    spec: &Spec,
    variant: HttpVariant,
    requests: &Cell<u64>,
) -> Result<Instant, String> {
    let count = || requests.set(requests.get() + 1);
    match variant {
        HttpVariant::Sync => {
            count();
            let res = post(client, spec).send().await.map_err(text)?;
            let status = res.status().as_u16();
            let body = res.bytes().await.map_err(text)?;
            check_reply(status, body.len(), spec.payload.len())?;
        }
        HttpVariant::Accepted => {
            count();
            let res = post(client, spec)
                .header("Prefer", "respond-async")
                .send()
                .await
                .map_err(text)?;
            let location = accepted_location(&res)?;
            let url = format!("{}{location}?wait={}", spec.base, spec.wait);
            loop {
                count();
                let doc: serde_json::Value = client
                    .get(&url)
                    .send()
                    .await
                    .map_err(text)?
                    .json()
                    .await
                    .map_err(text)?;
                match doc["status"].as_str() {
                    Some("pending") => continue,
                    Some("succeeded") => break,
                    other => return Err(format!("call ended {other:?}")),
                }
            }
        }
        HttpVariant::Get | HttpVariant::Bare => {
            count();
            let base = if variant == HttpVariant::Get {
                &spec.base
            } else {
                &spec.bare
            };
            let res = client
                .get(format!("{base}/v1/calls/{}", spec.finished))
                .send()
                .await
                .map_err(text)?;
            let status = res.status().as_u16();
            let body = res.bytes().await.map_err(text)?;
            check_reply(status, body.len(), spec.doc_len)?;
        }
    }
    Ok(Instant::now())
}

fn post(client: &reqwest::Client, spec: &Spec) -> reqwest::RequestBuilder {
    client
        .post(format!("{}/v1/services/{SERVICE}/calls", spec.base))
        .header(CONTENT_TYPE, wire::CONTENT_JSON)
        .body(spec.payload.clone())
}

/// The `Location` of a 202; an error for any other answer.
pub(crate) fn accepted_location(res: &reqwest::Response) -> Result<String, String> {
    if res.status().as_u16() != 202 {
        return Err(format!("expected 202, got {}", res.status()));
    }
    res.headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| "a 202 without Location".to_owned())
}

/// Makes one call that is kept (202), waits until it has ended, and returns
/// its id and its status document as `GET /v1/calls/{id}` answers it.
async fn finished_call(rig: &Rig, payload: &Bytes) -> Result<(String, Bytes)> {
    let failed = |reason: String| BenchError::Setup {
        workload: "http",
        reason,
    };
    let client = http_client()?;
    let res = client
        .post(rig.url(&format!("/v1/services/{SERVICE}/calls")))
        .header(CONTENT_TYPE, wire::CONTENT_JSON)
        .header("Prefer", "respond-async")
        .body(payload.clone())
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let location = accepted_location(&res).map_err(failed)?;
    let id = location.rsplit('/').next().unwrap_or_default().to_owned();
    let ended = client
        .get(rig.url(&format!("{location}?wait=30")))
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let doc: serde_json::Value = ended.json().await.map_err(|e| failed(e.to_string()))?;
    if doc["status"] != "succeeded" {
        return Err(failed(format!("the call ended {}", doc["status"])));
    }
    let doc = client
        .get(rig.url(&location))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| failed(e.to_string()))?
        .bytes()
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok((id, doc))
}

/// The reference of `get`: actix-web with one route that answers the same
/// document, a constant, with nothing behind it; `workers` threads (0: one
/// per core, as the gateway).
fn bare_server(doc: Bytes, workers: usize) -> Result<LocalServer> {
    LocalServer::start("bare server", workers, move |cfg| {
        let doc = doc.clone();
        cfg.route(
            "/v1/calls/{id}",
            web::get().to(move || {
                let doc = doc.clone();
                async move {
                    HttpResponse::Ok()
                        .content_type(wire::CONTENT_JSON)
                        .body(doc)
                }
            }),
        );
    })
}
