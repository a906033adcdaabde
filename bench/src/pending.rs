//! `bench pending`: what a pending asynchronous call costs the gateway in
//! memory. The gateway in this process ([`Rig`]) serves a service whose
//! only worker holds its first request for an hour, so every call after it
//! stays pending; clients POST `--calls` calls with `Prefer: respond-async`
//! (each answered 202) over `--concurrency` keep-alive connections. The
//! point reports the process's resident set (VmRSS) after the warm-up and
//! after the measured calls, and the growth per call: the memory a pending
//! call holds beyond its row in the call store (on disk) and its request in
//! the broker's queue.

use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use switchboard::amqp::wire;
use switchboard::settings::ServiceSettings;
use switchboard::worker;

use crate::Out;
use crate::env::{Env, json_payload};
use crate::error::{BenchError, Result};
use crate::load::{Phases, Stop};
use crate::probe::Probe;
use crate::report::{self, Labels, Line, measured_point};
use crate::rig::{Rig, Served, http_client, on_client_thread};

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

/// The service that never answers in time.
const SERVICE: &str = "hold";
/// How long its worker holds a request (and the calls' deadline).
const HOLD: Duration = Duration::from_secs(3600);

/// Starts the gateway, measures the point, stops it.
pub(crate) async fn run(
    env: &mut Env,
    args: &PendingArgs,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    if args.calls == 0 {
        return Err(BenchError::flag("--calls", "must be positive"));
    }
    if args.concurrency == 0 {
        return Err(BenchError::flag("--concurrency", "must be positive"));
    }
    let configured = env.echo_settings();
    let svc = ServiceSettings {
        concurrency: 1,
        timeout_ms: HOLD.as_millis() as u64,
        ..configured
    };
    let labels = Labels::gateway(&svc, args.payload);
    // Holds its request until the run ends (so the worker drains at once).
    let release = tokio_util::sync::CancellationToken::new();
    let handler: std::sync::Arc<dyn worker::Handler> = std::sync::Arc::new({
        let release = release.clone();
        move |req: worker::Request| {
            let release = release.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(HOLD) => {}
                    _ = release.cancelled() => {}
                }
                Ok(worker::Reply::ok(req.content_type, req.payload))
            }
        }
    });
    let served = Served {
        name: SERVICE.into(),
        settings: svc,
        handler,
    };
    // Every call stays pending: no bound on the (one) caller's.
    let rig = Rig::start(env, vec![served], |s| s.gateway.limits.max_pending = 0).await?;
    let url = rig.url(&format!("/v1/services/{SERVICE}/calls"));
    let payload = json_payload(args.payload);
    let (warmup, calls, concurrency) = (args.warmup, args.calls, args.concurrency);
    let probe2 = probe.clone();
    let progress = out.progress().clone();
    let measured = on_client_thread(move || async move {
        let client = http_client()?;
        let call = move || {
            let (client, url, payload) = (client.clone(), url.clone(), payload.clone());
            async move {
                let res = client
                    .post(&url)
                    .header(CONTENT_TYPE, wire::CONTENT_JSON)
                    .header("Prefer", "respond-async")
                    .body(payload)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                match res.status().as_u16() {
                    202 => Ok(Instant::now()),
                    s => Err(format!("expected 202, got {s}")),
                }
            }
        };
        let phases = Phases {
            label: "pending".into(),
            warmup,
            stop: Stop::Calls(calls),
            probe: &probe2,
            progress: &progress,
        };
        Ok::<_, BenchError>(phases.run_with_rss(concurrency, call).await)
    })
    .await;
    release.cancel();
    rig.stop().await;
    let (m, usage, before, after) = measured??;
    let mut p = measured_point("pending", "switchboard", labels, concurrency, 1, &m, usage);
    p.confirm_p50_us = None;
    p.confirm_p99_us = None;
    p.rss_before_kib = before;
    p.rss_after_kib = after;
    if let (Some(b), Some(a)) = (before, after) {
        let per_call = (a as f64 - b as f64) * 1024.0 / m.calls.max(1) as f64;
        p.rss_per_call_bytes = Some(report::round2(per_call));
    }
    out.emit(Line::Point(p));
    Ok(())
}
