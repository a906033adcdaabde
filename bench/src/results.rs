//! `bench results`: what large results cost the gateway in memory once the
//! calls have ended. The gateway in this process ([`Rig`]) serves a service
//! whose worker answers every call with `--result-bytes` bytes of control
//! characters (`text/plain`, six bytes each once JSON-escaped in a status
//! document: the worst case of issue 13, finding 2). Clients POST `--calls`
//! calls with `Prefer: respond-async` (each a 202) and long-poll each until
//! it has ended, over `--concurrency` keep-alive connections: every call's
//! end goes through the lifecycle event (published, relayed and kept by the
//! event hub) and the finished-call cache. The point reports the process's
//! resident set (VmRSS) after the warm-up and after the measured calls, and
//! the growth per call: what the event history and the cache keep of
//! results, within their byte budgets (`gateway.event_history_bytes`,
//! `gateway.finished_cache_bytes`, `gateway.inline_result_max_bytes`).

use std::time::Instant;

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;
use switchboard::amqp::wire;
use switchboard::worker;

use crate::Out;
use crate::env::{Env, json_payload};
use crate::error::{BenchError, Result};
use crate::load::{Phases, Stop};
use crate::probe::Probe;
use crate::report::{self, Labels, Line, measured_point};
use crate::rig::{Rig, Served, http_client, on_client_thread};

/// Flags of `bench results`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResultsArgs {
    /// Calls made and ended in the measured point.
    #[arg(long, default_value_t = 200)]
    pub calls: u64,
    /// Calls made and ended before the first RSS reading.
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// Connections, each with one call (POST, then long-poll) at a time.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Size of each result in bytes (control characters, `text/plain`).
    #[arg(long, default_value_t = 1_048_576)]
    pub result_bytes: usize,
}

/// The service that answers with a large result.
const SERVICE: &str = "large";

/// Starts the gateway, measures the point, stops it.
pub(crate) async fn run(
    env: &mut Env,
    args: &ResultsArgs,
    probe: &Probe,
    out: &mut Out<'_>,
) -> Result<()> {
    if args.calls == 0 {
        return Err(BenchError::flag("--calls", "must be positive"));
    }
    if args.concurrency == 0 {
        return Err(BenchError::flag("--concurrency", "must be positive"));
    }
    let svc = env.echo_settings();
    let labels = Labels::gateway(&svc, args.result_bytes);
    let result = Bytes::from(vec![1u8; args.result_bytes]);
    let handler: std::sync::Arc<dyn worker::Handler> = std::sync::Arc::new({
        let result = result.clone();
        move |_req: worker::Request| {
            let result = result.clone();
            async move { Ok(worker::Reply::ok("text/plain", result)) }
        }
    });
    let served = Served {
        name: SERVICE.into(),
        settings: svc,
        handler,
    };
    let rig = Rig::start(env, vec![served], |_| {}).await?;
    let url = rig.url(&format!("/v1/services/{SERVICE}/calls"));
    let base = rig.url("");
    let payload = json_payload(16);
    let (warmup, calls, concurrency) = (args.warmup, args.calls, args.concurrency);
    let probe2 = probe.clone();
    let progress = out.progress().clone();
    let measured = on_client_thread(move || async move {
        let client = http_client()?;
        let call = move || {
            let (client, url, base, payload) =
                (client.clone(), url.clone(), base.clone(), payload.clone());
            async move {
                let res = client
                    .post(&url)
                    .header(CONTENT_TYPE, wire::CONTENT_JSON)
                    .header("Prefer", "respond-async")
                    .body(payload)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if res.status().as_u16() != 202 {
                    return Err(format!("expected 202, got {}", res.status()));
                }
                let location = res
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or("a 202 without Location")?
                    .to_owned();
                // Long-polled until it ends (a wait may end first).
                loop {
                    let res = client
                        .get(format!("{base}{location}?wait=30"))
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if res.status().as_u16() != 200 {
                        return Err(format!("poll: {}", res.status()));
                    }
                    let doc: serde_json::Value = res.json().await.map_err(|e| e.to_string())?;
                    match doc["status"].as_str() {
                        Some("pending") => continue,
                        Some("succeeded") => return Ok(Instant::now()),
                        other => return Err(format!("the call ended {other:?}")),
                    }
                }
            }
        };
        let phases = Phases {
            label: "results".into(),
            warmup,
            stop: Stop::Calls(calls),
            probe: &probe2,
            progress: &progress,
        };
        Ok::<_, BenchError>(phases.run_with_rss(concurrency, call).await)
    })
    .await;
    rig.stop().await;
    let (m, usage, before, after) = measured??;
    let mut p = measured_point("results", "switchboard", labels, concurrency, 1, &m, usage);
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
