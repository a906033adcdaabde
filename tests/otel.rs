//! OTLP export, seen by a collector that the test runs: the spans of one call
//! through the gateway and a worker arrive as one trace, the caller's.
//!
//! A test binary of its own: the gateway serves on actix-web's threads,
//! which only a process-global subscriber reaches, and the exporting
//! subscriber must not be every other test's.

#[path = "it/common.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use prost::Message;
use reqwest::StatusCode;
use switchboard::rpc::{Call, RpcOptions};
use switchboard::telemetry::otlp;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use common::{eventually, gateway};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// One exported span, as the collector got it.
#[derive(Clone, Debug)]
struct Exported {
    service_name: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: BTreeMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// An OTLP/HTTP receiver on 127.0.0.1: `POST /v1/traces` with a protobuf
/// body, kept in `spans`.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Exported>>>,
    server: actix_web::dev::ServerHandle,
}

impl Collector {
    fn start() -> Self {
        let spans: Arc<Mutex<Vec<Exported>>> = Arc::default();
        let kept = web::Data::from(spans.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(kept.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .route("/v1/traces", web::post().to(receive))
        })
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Collector {
            url,
            spans,
            server: handle,
        }
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }

    /// The exported span named `name` whose `call_id` is `id`.
    fn span(&self, name: &str, id: &str) -> Option<Exported> {
        self.spans()
            .into_iter()
            .find(|s| s.name == name && s.attributes.get("call_id").map(String::as_str) == Some(id))
    }
}

async fn receive(body: web::Bytes, kept: web::Data<Mutex<Vec<Exported>>>) -> HttpResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut spans = kept.lock().unwrap();
    for rs in request.resource_spans {
        let service_name = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.push(Exported {
                service_name: service_name.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                attributes: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                    .collect(),
            });
        }
    }
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .body(ExportTraceServiceResponse::default().encode_to_vec())
}

#[actix_rt::test]
async fn the_spans_of_a_call_reach_the_collector_as_one_trace_the_callers() {
    let collector = Collector::start();
    let gw = gateway("otel", |s| {
        s.otel.enabled = true;
        s.otel.endpoint = collector.url.clone();
        s.otel.service_name = "switchboard-otel-test".into();
    })
    .await;
    // The only test here that installs a global subscriber: the gateway's
    // threads and this one (the workers') export through it.
    let (layer, exporter) = otlp::layer(&gw.ctx.settings.otel).unwrap();
    tracing_subscriber::registry()
        .with(EnvFilter::new("info"))
        .with(layer)
        .try_init()
        .expect("no other global subscriber in this binary");
    let exporter = Arc::new(exporter);
    // Ended spans go out in batches: ask for one until the spans are there.
    let flush = || {
        let exporter = exporter.clone();
        async move {
            tokio::task::spawn_blocking(move || exporter.flush())
                .await
                .unwrap()
        }
    };

    // A caller with a trace of its own.
    let res = gw
        .post("echo")
        .header("traceparent", TRACEPARENT)
        .body(r#"{"order":7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let id = res.headers()["call-id"].to_str().unwrap().to_owned();
    eventually(
        Duration::from_secs(15),
        "the gateway's and the worker's spans exported",
        || async {
            flush().await;
            collector.span("call", &id).is_some() && collector.span("handle", &id).is_some()
        },
    )
    .await;
    let call = collector.span("call", &id).unwrap();
    let handle = collector.span("handle", &id).unwrap();
    // The gateway's span continues the caller's: same trace, the caller's
    // span as parent.
    assert_eq!(call.trace_id, TRACE, "{call:?}");
    assert_eq!(call.parent_span_id, CALLER_SPAN, "{call:?}");
    assert_eq!(call.service_name, "switchboard-otel-test");
    assert_eq!(
        call.attributes.get("service").map(String::as_str),
        Some("echo")
    );
    // The worker's span is the gateway's child, over AMQP: one tree.
    assert_eq!(handle.trace_id, TRACE, "{handle:?}");
    assert_eq!(handle.parent_span_id, call.span_id, "{handle:?}");
    assert_eq!(
        handle.attributes.get("trace_id").map(String::as_str),
        Some(TRACE)
    );

    // A caller without one: the gateway's span starts the trace, and the
    // trace id in the logs is the exported one.
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let id = res.headers()["call-id"].to_str().unwrap().to_owned();
    eventually(
        Duration::from_secs(15),
        "the spans of the untraced call exported",
        || async {
            flush().await;
            collector.span("call", &id).is_some() && collector.span("handle", &id).is_some()
        },
    )
    .await;
    let call = collector.span("call", &id).unwrap();
    let handle = collector.span("handle", &id).unwrap();
    assert_eq!(call.parent_span_id, "", "a root span: {call:?}");
    assert_eq!(call.attributes.get("trace_id"), Some(&call.trace_id));
    assert_eq!(handle.trace_id, call.trace_id);
    assert_eq!(handle.parent_span_id, call.span_id);

    gw.cleanup().await;
    if let Ok(exporter) = Arc::try_unwrap(exporter) {
        exporter.shutdown(Duration::from_secs(5));
    }
    collector.server.stop(true).await;
}

/// Export must never hold up a call: with a collector that is gone, or one
/// that takes the connection and never answers, calls go on at full speed
/// and the spans that do not fit the (here tiny) queue are dropped.
#[actix_rt::test]
async fn a_collector_that_is_gone_or_silent_holds_up_no_call() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // Bound but never accepted from: the kernel takes the connection and
    // the request, and no answer ever comes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let c = common::ctx("otel-down").await;
    c.worker(
        "echo",
        &c.service(),
        switchboard::worker::echo(Duration::ZERO),
    )
    .await
    .unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let calls = |n: usize, endpoint: String| {
        let client = client.clone();
        async move {
            for i in 0..n {
                let reply = client
                    .call(Call::new("echo", format!("[{i}]").into_bytes()))
                    .await
                    .unwrap_or_else(|e| panic!("call {i} with the collector at {endpoint}: {e}"));
                assert_eq!(reply.status, 200);
            }
        }
    };
    for (endpoint, hangs) in [(closed, false), (silent_url, true)] {
        let mut otel = c.settings.otel.clone();
        otel.enabled = true;
        otel.endpoint = endpoint.clone();
        otel.queue_size = 2;
        // An export may take a minute: a call that waited for one would show.
        otel.timeout_ms = 60_000;
        let (layer, exporter) = otlp::layer(&otel).unwrap();
        // The worker runs its deliveries on this thread: its spans export
        // through this subscriber.
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        calls(5, endpoint.clone()).await;
        if hangs {
            // A full batch goes out at once: from now on an export hangs.
            eventually(
                Duration::from_secs(10),
                "an export reached the silent collector",
                || async { silent.accept().is_ok() },
            )
            .await;
        }
        let started = Instant::now();
        calls(20, endpoint.clone()).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "calls waited for the export to {endpoint}: {:?}",
            started.elapsed()
        );
        drop(guard);
        // Stopping does not wait for a hung export beyond its own bound.
        let stopping = Instant::now();
        exporter.shutdown(Duration::from_millis(200));
        assert!(stopping.elapsed() < Duration::from_secs(30));
    }
    c.cleanup(&["echo"]).await;
}
