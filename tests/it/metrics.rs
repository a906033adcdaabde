//! `GET /metrics`: after a known set of calls, the counters and histogram
//! counts say exactly what happened; label values stay bounded.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use switchboard::gateway::MetricsServer;
use switchboard::rpc::{Call, RpcOptions};
use switchboard::worker;

use crate::common::{ctx, gateway, poll_until};

/// One scrape: `name{labels}` to value, and the page itself.
pub(crate) struct Scrape {
    samples: BTreeMap<String, f64>,
    pub(crate) text: String,
}

impl Scrape {
    /// The value of a sample, 0 when absent (a series not yet made).
    pub(crate) fn get(&self, series: &str) -> f64 {
        self.value(series).unwrap_or(0.0)
    }

    /// The value of a sample, if the series exists.
    pub(crate) fn value(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }
}

/// Parses the text format: every line that is not a comment is
/// `<series> <value>` (no exemplars or timestamps are written).
fn parse(text: String) -> Scrape {
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series and value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect();
    Scrape { samples, text }
}

pub(crate) async fn scrape(http: &reqwest::Client, url: &str) -> Scrape {
    let res = http
        .get(url)
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        // What Prometheus asks for, spelled out: a test of what a scraper sees.
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = res.text().await.unwrap();
    assert!(
        text.ends_with("# EOF\n"),
        "an OpenMetrics page ends with # EOF"
    );
    parse(text)
}

/// Scrapes until `cond` holds (counters that lag what the test saw, such as
/// a worker counting its reply after the confirm); fails after 20 s.
pub(crate) async fn scrape_until(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    cond: impl Fn(&Scrape) -> bool,
) -> Scrape {
    poll_until(Duration::from_secs(20), what, || async {
        let m = scrape(http, url).await;
        if cond(&m) {
            Ok(m)
        } else {
            Err(format!("\n{}", m.text))
        }
    })
    .await
}

#[actix_rt::test]
async fn a_scrape_after_known_calls_counts_them_by_service_mode_and_status() {
    let receiver = crate::callbacks::Receiver::start(&[], 200, Duration::ZERO);
    let gw = gateway("metrics", |s| {
        crate::gateway::with_callbacks(s, 3);
        // A stream's end is noticed at its next heartbeat.
        s.gateway.heartbeat_s = 1;
    })
    .await;
    let mut ids = Vec::new();
    let post = |service: &str| gw.post(service).body(r#"{"n":1}"#);
    // 3 synchronous successes, 1 synchronous 422 from the service.
    for _ in 0..3 {
        let res = post("echo").send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        ids.push(res.headers()["call-id"].to_str().unwrap().to_owned());
    }
    let res = post("fail").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // 2 asynchronous calls, followed to their end by long-polling.
    for _ in 0..2 {
        let res = post("echo")
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        let id = res.headers()["call-id"].to_str().unwrap().to_owned();
        let doc: serde_json::Value = gw
            .get(&format!("/v1/calls/{id}?wait=20"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(doc["status"], "succeeded");
        ids.push(id);
    }
    // 1 callback, delivered.
    let res = post("echo")
        .header("callback-url", receiver.url())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    ids.push(res.headers()["call-id"].to_str().unwrap().to_owned());
    // An open SSE stream is one session.
    let stream = gw.get("/v1/events").send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);

    let url = gw.url("/metrics");
    // Workers count a reply once its publish is confirmed, which may be just
    // after the gateway has it; the callback is delivered in the background.
    let m = scrape_until(&gw.http, &url, "workers and callbacks counted", |m| {
        m.get(r#"switchboard_worker_replies_total{service="echo"}"#) == 6.0
            && m.get(r#"switchboard_worker_replies_total{service="fail"}"#) == 1.0
            && m.get("switchboard_callback_deliveries_total") == 1.0
    })
    .await;

    let expect = [
        (
            r#"switchboard_gateway_calls_started_total{service="echo",mode="sync"}"#,
            3.0,
        ),
        (
            r#"switchboard_gateway_calls_started_total{service="fail",mode="sync"}"#,
            1.0,
        ),
        (
            r#"switchboard_gateway_calls_started_total{service="echo",mode="async"}"#,
            2.0,
        ),
        (
            r#"switchboard_gateway_calls_started_total{service="echo",mode="callback"}"#,
            1.0,
        ),
        (
            r#"switchboard_gateway_calls_finished_total{service="echo",mode="sync",status="2xx"}"#,
            3.0,
        ),
        (
            r#"switchboard_gateway_calls_finished_total{service="fail",mode="sync",status="4xx"}"#,
            1.0,
        ),
        (
            r#"switchboard_gateway_calls_finished_total{service="echo",mode="async",status="2xx"}"#,
            2.0,
        ),
        (
            r#"switchboard_gateway_calls_finished_total{service="echo",mode="callback",status="2xx"}"#,
            1.0,
        ),
        (
            r#"switchboard_gateway_call_duration_seconds_count{service="echo",mode="sync"}"#,
            3.0,
        ),
        (
            r#"switchboard_gateway_call_duration_seconds_bucket{le="+Inf",service="echo",mode="sync"}"#,
            3.0,
        ),
        (
            r#"switchboard_gateway_call_duration_seconds_count{service="fail",mode="sync"}"#,
            1.0,
        ),
        (
            r#"switchboard_gateway_call_duration_seconds_count{service="echo",mode="async"}"#,
            2.0,
        ),
        (
            r#"switchboard_gateway_call_duration_seconds_count{service="echo",mode="callback"}"#,
            1.0,
        ),
        (
            r#"switchboard_gateway_call_duration_seconds_count{service="slow",mode="sync"}"#,
            0.0,
        ),
        (
            r#"switchboard_worker_deliveries_total{service="echo"}"#,
            6.0,
        ),
        (
            r#"switchboard_worker_deliveries_total{service="fail"}"#,
            1.0,
        ),
        (
            r#"switchboard_worker_redeliveries_total{service="echo"}"#,
            0.0,
        ),
        (
            r#"switchboard_worker_handler_duration_seconds_count{service="echo"}"#,
            6.0,
        ),
        (
            r#"switchboard_worker_handler_duration_seconds_bucket{le="+Inf",service="echo"}"#,
            6.0,
        ),
        (
            r#"switchboard_worker_handler_duration_seconds_count{service="fail"}"#,
            1.0,
        ),
        (r#"switchboard_worker_consuming{service="echo"}"#, 1.0),
        ("switchboard_rpc_pending_calls", 0.0),
        (
            r#"switchboard_rpc_replies_dropped_total{reason="late"}"#,
            0.0,
        ),
        (
            r#"switchboard_rpc_replies_dropped_total{reason="unknown"}"#,
            0.0,
        ),
        ("switchboard_rpc_timeouts_total", 0.0),
        ("switchboard_callback_attempts_total", 1.0),
        ("switchboard_callback_dead_letters_total", 0.0),
        (
            r#"switchboard_gateway_stream_sessions{transport="sse"}"#,
            1.0,
        ),
        (
            r#"switchboard_gateway_stream_sessions{transport="websocket"}"#,
            0.0,
        ),
        (r#"switchboard_broker_reconnects_total{role="worker"}"#, 0.0),
        ("switchboard_broker_up", 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(m.get(series), value, "{series}\n{}", m.text);
    }
    // Every reply reached the call it answers: its waiting caller, or (once
    // the call was answered 202) the call store.
    assert_eq!(
        m.get("switchboard_rpc_replies_routed_total")
            + m.get("switchboard_rpc_replies_handed_off_total"),
        7.0
    );
    assert!(m.get("switchboard_rpc_replies_routed_total") >= 4.0);
    // Bounded labels: a call id never becomes one.
    for id in &ids {
        assert!(!m.text.contains(id.as_str()), "call id {id} in the metrics");
    }
    // A sync answer's duration is within the histogram's sum.
    assert!(
        m.get(r#"switchboard_gateway_call_duration_seconds_sum{service="echo",mode="sync"}"#) > 0.0
    );

    // The stream's session ends with the client.
    drop(stream);
    scrape_until(&gw.http, &url, "the SSE session uncounted", |m| {
        m.get(r#"switchboard_gateway_stream_sessions{transport="sse"}"#) == 0.0
    })
    .await;

    // Without an Accept for OpenMetrics: the Prometheus text format.
    let res = gw.http.get(&url).send().await.unwrap();
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = res.text().await.unwrap();
    assert!(text.contains("# TYPE switchboard_worker_deliveries_total counter"));
    receiver.stop().await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn without_the_gateway_the_workers_metrics_have_an_endpoint_of_their_own() {
    let c = ctx("metrics-only").await;
    c.worker("echo", &c.service(), worker::echo(Duration::ZERO))
        .await
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = MetricsServer::start(&c.broker, listener).unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    for _ in 0..4 {
        client.call(Call::new("echo", &b"{}"[..])).await.unwrap();
    }
    let http = reqwest::Client::new();
    let url = format!("http://{}/metrics", server.addr);
    let m = scrape_until(&http, &url, "four replies counted", |m| {
        m.get(r#"switchboard_worker_replies_total{service="echo"}"#) == 4.0
    })
    .await;
    assert_eq!(
        m.get(r#"switchboard_worker_deliveries_total{service="echo"}"#),
        4.0
    );
    assert_eq!(
        m.get(r#"switchboard_worker_handler_duration_seconds_count{service="echo"}"#),
        4.0
    );
    assert_eq!(m.get("switchboard_rpc_replies_routed_total"), 4.0);
    let health = http
        .get(format!("http://{}/healthz", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    server.stop().await;
    c.cleanup(&["echo"]).await;
}

/// `switchboard health` (the container's health check): 0 when `/healthz`
/// answers 2xx, 1 otherwise; by default it asks the gateway's address.
#[actix_rt::test]
async fn the_health_command_checks_the_processes_own_endpoint() {
    let up = crate::callbacks::Receiver::start(&[], 200, Duration::ZERO);
    let down = crate::callbacks::Receiver::start(&[], 503, Duration::ZERO);
    let health = |args: Vec<String>, bind: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("health")
            .args(args)
            .env("SWITCHBOARD__GATEWAY__BIND", bind)
            .output()
            .await
            .unwrap()
    };
    let addr = |url: String| {
        url.trim_start_matches("http://")
            .trim_end_matches("/hook")
            .to_owned()
    };
    let ok = health(vec![], addr(up.url())).await;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let got = up.got();
    assert_eq!(got.last().unwrap().path, "/healthz");
    let bad = health(vec![], addr(down.url())).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("503"));
    let url = format!("http://{}/healthz", addr(up.url()));
    let explicit = health(vec!["--url".into(), url], "127.0.0.1:9".into()).await;
    assert_eq!(explicit.status.code(), Some(0));
    let nobody = health(vec![], "127.0.0.1:9".into()).await;
    assert_eq!(nobody.status.code(), Some(1));
    up.stop().await;
    down.stop().await;
}
