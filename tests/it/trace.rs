//! One W3C trace followed end to end: the `traceparent` of an HTTP request
//! reaches the worker (its request and its handler span), comes back in the
//! reply, and goes out with the callback and the lifecycle event.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use switchboard::amqp::{Outgoing, wire};
use switchboard::events::{SubscribeOptions, Subscription};
use switchboard::settings::ServiceSettings;
use switchboard::worker::{Reply, Request, Worker};
use tracing::span::{Attributes, Id, Record};
use tracing::{Subscriber, field::Field, field::Visit};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::common::{eventually, gateway};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A span's name and its fields.
type SpanFields = (String, BTreeMap<String, String>);

/// switchboard's spans seen on this thread: open ones by id (ids are
/// reused once a span closes), then closed ones in order.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<SpanLog>>);

#[derive(Default)]
struct SpanLog {
    open: HashMap<u64, SpanFields>,
    closed: Vec<SpanFields>,
}

impl Spans {
    fn all(&self) -> Vec<SpanFields> {
        let log = self.0.lock().unwrap();
        log.open
            .values()
            .chain(log.closed.iter())
            .cloned()
            .collect()
    }

    /// The fields of the spans named `name`.
    fn named(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        let log = self.0.lock().unwrap();
        log.open
            .values()
            .chain(log.closed.iter())
            .filter(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
            .collect()
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// A layer that keeps every span's fields, including those recorded later.
struct Capture(Spans);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if !attrs.metadata().target().starts_with("switchboard") {
            return;
        }
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let name = attrs.metadata().name().to_owned();
        let mut log = self.0.0.lock().unwrap();
        log.open.insert(id.into_u64(), (name, fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some((_, fields)) = self.0.0.lock().unwrap().open.get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        let mut log = self.0.0.lock().unwrap();
        if let Some(span) = log.open.remove(&id.into_u64()) {
            log.closed.push(span);
        }
    }
}

fn trace_of(traceparent: &str) -> &str {
    switchboard::telemetry::trace_id(traceparent).expect("a valid traceparent")
}

#[actix_rt::test]
async fn one_traceparent_goes_from_http_through_the_worker_and_its_reply_to_the_callback() {
    // The worker runs its deliveries on this thread: its spans land here.
    // With a scoped subscriber alone, tracing caches each span site's
    // interest from whichever thread reaches it first (another test's, with
    // no subscriber: "never"); a global one, even a no-op, makes it ask
    // every live subscriber instead.
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
    let spans = Spans::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(Capture(spans.clone())),
    );
    let receiver = crate::callbacks::Receiver::start(&[], 200, Duration::ZERO);
    let traced = ServiceSettings {
        timeout_ms: 10_000,
        ..ServiceSettings::default()
    };
    let svc = traced.clone();
    let gw = gateway("trace", move |s| {
        crate::gateway::with_callbacks(s, 3);
        s.services.insert("traced".into(), svc);
    })
    .await;
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let handler_saw = seen.clone();
    let worker = Worker::start(
        &gw.ctx.broker,
        "traced",
        &traced,
        Arc::new(move |req: Request| {
            handler_saw.lock().unwrap().push(req.traceparent.clone());
            async move { Ok(Reply::ok(req.content_type, req.payload)) }
        }),
    )
    .await
    .unwrap();
    let mut events = Subscription::start(&gw.ctx.broker, SubscribeOptions::default())
        .await
        .unwrap();

    let res = gw
        .post("traced")
        .header("traceparent", TRACEPARENT)
        .header("callback-url", receiver.url())
        .body(r#"{"order":7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let id = res.headers()["call-id"].to_str().unwrap().to_owned();

    // The worker: the request carries the trace (a new span id for the hop),
    // and the handler's span records its id next to the call id.
    eventually(Duration::from_secs(10), "the handler ran", || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    let got = seen.lock().unwrap()[0].clone().expect("a traceparent");
    assert_eq!(trace_of(&got), TRACE);
    assert_ne!(got, TRACEPARENT, "the gateway is a hop of its own");
    let handle = spans
        .named("handle")
        .into_iter()
        .find(|f| f.get("call_id") == Some(&id))
        .unwrap_or_else(|| panic!("no handle span for {id}: {:?}", spans.all()));
    assert_eq!(handle.get("trace_id").map(String::as_str), Some(TRACE));
    assert_eq!(handle.get("service").map(String::as_str), Some("traced"));

    // The callback: the completed event, with the caller's trace.
    eventually(
        Duration::from_secs(15),
        "the callback delivered",
        || async { !receiver.got().is_empty() },
    )
    .await;
    let callback: Value = serde_json::from_slice(&receiver.got()[0].body).unwrap();
    assert_eq!(callback["subject"], id.as_str());
    assert_eq!(trace_of(callback["traceparent"].as_str().unwrap()), TRACE);

    // The lifecycle event on the events exchange: the extension and the
    // AMQP header both carry it.
    let completed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.unwrap().unwrap();
            if e.ty == "switchboard.call.completed" && e.subject.as_deref() == Some(id.as_str()) {
                return e;
            }
        }
    })
    .await
    .expect("the completed event");
    assert_eq!(
        trace_of(completed.extensions["traceparent"].as_str().unwrap()),
        TRACE
    );

    // The reply: what the worker sends back to `reply_to` carries the
    // request's trace (read here on a reply queue of the test's own).
    let crate::common::Foreign {
        conn,
        reply_queue,
        mut replies,
        ..
    } = crate::common::foreign_client("trace-test").await;
    let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let props = wire::request_properties(
        &wire::RequestMeta {
            service: "traced",
            correlation_id: "trace-reply-1",
            message_id: None,
            reply_to: Some(reply_queue.as_str()),
            content_type: wire::CONTENT_JSON,
            timeout: Some(Duration::from_secs(10)),
            traceparent: Some(other),
            caller_waits: false,
        },
        false,
    );
    gw.ctx
        .broker
        .publish(Outgoing {
            exchange: &gw.ctx.broker.names().requests_exchange(),
            routing_key: "traced",
            payload: b"{}",
            properties: props,
            mandatory: true,
        })
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply")
        .unwrap()
        .unwrap();
    let back = wire::header_str(&reply.properties, wire::HEADER_TRACEPARENT).expect("traceparent");
    assert_eq!(trace_of(back), trace_of(other));

    let _ = conn.close(200, "done".into()).await;
    receiver.stop().await;
    // The extra worker stops first, so that it does not declare its queue
    // again once the queue is deleted.
    worker.drain(Duration::from_secs(1)).await;
    let ch = gw.ctx.broker.channel().await.unwrap();
    let names = gw.ctx.broker.names();
    for q in [names.service_queue("traced"), names.dead_queue("traced")] {
        let _ = ch.queue_delete(q.into(), Default::default()).await;
    }
    gw.cleanup().await;
}
