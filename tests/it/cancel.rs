//! Cancellation of calls (issue 16): `DELETE /v1/calls/{id}` while the call
//! is queued and while it runs (the library worker's `Request::cancelled`),
//! what callers and callbacks see, and an outside AMQP worker that watches
//! `switchboard.call.cancelled` and whose reply comes too late.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_lapin::lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use switchboard::amqp::topology;
use switchboard::settings::{ServiceSettings, TokenSettings};
use switchboard::worker::CancelWatch;
use switchboard::worker::{Handler, HandlerError, Reply, Request};
use tokio::sync::{Semaphore, mpsc};

use crate::common::{Gw, eventually, gateway, test_service};
use crate::gateway::{Sse, json};
use crate::progress::metric;

async fn assert_problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let doc = json(res).await;
    assert_eq!(doc["status"], status);
    doc
}

fn cancel(gw: &Gw, id: &str) -> reqwest::RequestBuilder {
    gw.http.delete(gw.url(&format!("/v1/calls/{id}")))
}

async fn start_async(req: reqwest::RequestBuilder) -> String {
    let res = req
        .header("prefer", "respond-async")
        .body("\"x\"")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    json(res).await["id"].as_str().unwrap().to_owned()
}

/// A handler that says when it starts (with its payload), then waits for a
/// permit of `gate` or for its call's cancellation (and says so in `told`).
fn holding(
    gate: Arc<Semaphore>,
    started: mpsc::Sender<String>,
    told: Arc<AtomicBool>,
    runs: Arc<AtomicU64>,
) -> Arc<dyn Handler> {
    Arc::new(move |req: Request| {
        let (gate, started, told, runs) =
            (gate.clone(), started.clone(), told.clone(), runs.clone());
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = started
                .send(String::from_utf8_lossy(&req.payload).into_owned())
                .await;
            tokio::select! {
                p = gate.acquire() => {
                    p.map_err(|_| HandlerError::new(500, "gate closed"))?.forget();
                }
                _ = req.cancelled() => {
                    told.store(true, Ordering::SeqCst);
                }
            }
            Ok(Reply::ok(req.content_type.clone(), req.payload.clone()))
        }
    })
}

struct Holding {
    gate: Arc<Semaphore>,
    started: mpsc::Receiver<String>,
    told: Arc<AtomicBool>,
    runs: Arc<AtomicU64>,
    worker: switchboard::worker::WorkerHandle,
}

async fn serve_holding(gw: &Gw, service: &str) -> Holding {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, started) = mpsc::channel(8);
    let told = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let svc = gw.ctx.settings.services[service].clone();
    let worker = gw
        .ctx
        .worker(
            service,
            &svc,
            holding(gate.clone(), tx, told.clone(), runs.clone()),
        )
        .await
        .unwrap();
    Holding {
        gate,
        started,
        told,
        runs,
        worker,
    }
}

#[actix_rt::test]
async fn a_running_call_cancelled_tells_its_handler_and_ends_cancelled_everywhere() {
    let receiver = crate::callbacks::Receiver::start(&[], 200, Duration::ZERO);
    let gw = gateway("cx-run", |s| {
        crate::gateway::with_callbacks(s, 3);
        s.services.insert("hold".into(), test_service());
    })
    .await;
    let mut h = serve_holding(&gw, "hold").await;
    let id = start_async(gw.post("hold").header("callback-url", receiver.url())).await;
    let mut sse = Sse::new(
        gw.get(&format!("/v1/calls/{id}/events"))
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(
        sse.next().await.unwrap().event.as_deref(),
        Some("switchboard.call.accepted")
    );
    assert_eq!(h.started.recv().await.as_deref(), Some("\"x\""));

    let res = cancel(&gw, &id).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let doc = json(res).await;
    assert_eq!(doc["status"], "cancelled");
    assert!(doc["completed_at"].is_string());

    let end = sse.next().await.unwrap();
    assert_eq!(end.event.as_deref(), Some("switchboard.call.cancelled"));
    assert_eq!(end.data.unwrap()["data"]["status"], "cancelled");
    assert!(sse.next().await.is_none(), "the call's stream did not end");

    eventually(Duration::from_secs(10), "the handler told", || async {
        h.told.load(Ordering::SeqCst)
    })
    .await;
    eventually(Duration::from_secs(10), "the worker counted it", || async {
        h.worker.stats.cancelled.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(h.worker.stats.replied.load(Ordering::Relaxed), 0);

    // Ended: the result says so, a second cancel is a conflict.
    let res = gw
        .get(&format!("/v1/calls/{id}/result"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 409).await;
    assert_problem(cancel(&gw, &id).send().await.unwrap(), 409).await;
    let doc = gw.json(&format!("/v1/calls/{id}?wait=5")).await;
    assert_eq!(doc["status"], "cancelled");

    // The callback says it, signed.
    eventually(
        Duration::from_secs(15),
        "the callback delivered",
        || async { !receiver.got().is_empty() },
    )
    .await;
    let got = receiver.got();
    let wh = standardwebhooks::Webhook::new(crate::callbacks::SECRET).unwrap();
    wh.verify(&got[0].body, &got[0].headers).unwrap();
    let event: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(event["type"], "switchboard.call.cancelled");
    assert_eq!(event["data"]["status"], "cancelled");
    assert_eq!(
        metric(
            &gw,
            "switchboard_gateway_calls_cancelled_total{service=\"hold\"}"
        )
        .await,
        Some(1.0)
    );
    h.gate.close();
    receiver.stop().await;
    gw.cleanup_with(&["hold"]).await;
}

#[actix_rt::test]
async fn a_queued_call_cancelled_is_dropped_by_the_worker_that_receives_it() {
    let gw = gateway("cx-queued", |s| {
        s.services.insert(
            "one".into(),
            ServiceSettings {
                // One at a time: the second call waits in the queue.
                concurrency: 1,
                ..test_service()
            },
        );
    })
    .await;
    let mut h = serve_holding(&gw, "one").await;
    let first = start_async(gw.post("one")).await;
    h.started.recv().await.unwrap();
    let second = start_async(gw.post("one")).await;
    let watch = CancelWatch::shared(&gw.ctx.broker).await.unwrap();
    let heard = watch.heard();
    let res = cancel(&gw, &second).send().await.unwrap();
    assert_eq!(json(res).await["status"], "cancelled");
    eventually(Duration::from_secs(10), "the workers heard it", || async {
        watch.heard() > heard
    })
    .await;
    assert_eq!(h.worker.stats.deliveries.load(Ordering::Relaxed), 1);

    // The first ends; the second is delivered and dropped unprocessed.
    h.gate.add_permits(1);
    eventually(Duration::from_secs(10), "the second dropped", || async {
        h.worker.stats.cancelled.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(h.worker.stats.deliveries.load(Ordering::Relaxed), 2);
    assert_eq!(h.runs.load(Ordering::SeqCst), 1, "the cancelled call ran");
    let doc = gw.json(&format!("/v1/calls/{first}?wait=10")).await;
    assert_eq!(doc["status"], "succeeded");
    let doc = gw.json(&format!("/v1/calls/{second}")).await;
    assert_eq!(doc["status"], "cancelled");
    drop(watch);
    gw.cleanup_with(&["one"]).await;
}

#[actix_rt::test]
async fn only_the_caller_cancels_and_only_a_pending_call() {
    let gw = gateway("cx-who", |s| {
        let mut t = BTreeMap::new();
        t.insert(
            "alice".to_string(),
            TokenSettings::bearer("alice-token-0123456789", &["*"]),
        );
        t.insert(
            "bob".to_string(),
            TokenSettings::bearer("bob-token-0123456789ab", &["*"]),
        );
        s.gateway.tokens = t;
    })
    .await;
    let alice = "alice-token-0123456789";
    let id = start_async(gw.post("slow").bearer_auth(alice)).await;
    // Bob cannot see it, so cannot cancel it.
    let res = cancel(&gw, &id)
        .bearer_auth("bob-token-0123456789ab")
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
    assert_problem(cancel(&gw, &id).send().await.unwrap(), 401).await;
    let res = cancel(&gw, "no-such-call")
        .bearer_auth(alice)
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
    // An ended call cannot be cancelled.
    let done = start_async(gw.post("echo").bearer_auth(alice)).await;
    let doc = json(
        gw.get(&format!("/v1/calls/{done}?wait=10"))
            .bearer_auth(alice)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(doc["status"], "succeeded");
    let res = cancel(&gw, &done).bearer_auth(alice).send().await.unwrap();
    assert_problem(res, 409).await;
    // Alice's own pending call: cancelled.
    let res = cancel(&gw, &id).bearer_auth(alice).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    gw.gate.add_permits(1);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn an_outside_worker_hears_the_cancellation_and_its_late_reply_is_dropped_and_counted() {
    let gw = gateway("cx-ext", |s| {
        s.services.insert(
            "ext".into(),
            ServiceSettings {
                handler: None,
                ..test_service()
            },
        );
    })
    .await;
    let names = gw.ctx.broker.names().clone();
    let setup = gw.ctx.broker.channel().await.unwrap();
    topology::declare_service(&setup, &names, "ext", &test_service())
        .await
        .unwrap();
    // The worker of another language: the queue's requests, and the
    // events exchange through an exclusive queue of its own.
    let conn =
        deadpool_lapin::lapin::Connection::connect(&crate::common::amqp_url(), Default::default())
            .await
            .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let events_q = ch
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        events_q.name().clone(),
        names.events_exchange().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut events = ch
        .basic_consume(
            events_q.name().clone(),
            "outside-events".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut requests = ch
        .basic_consume(
            names.service_queue("ext").into(),
            "outside-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let id = start_async(gw.post("ext")).await;
    let d = tokio::time::timeout(Duration::from_secs(10), requests.next())
        .await
        .expect("a request within 10 s")
        .unwrap()
        .unwrap();
    let res = cancel(&gw, &id).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the cancellation within 10 s")
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&e.data).unwrap();
        if event["type"] == "switchboard.call.cancelled" {
            assert_eq!(event["subject"], id.as_str());
            break;
        }
    }
    // The worker replies all the same (it did not watch in time).
    ch.basic_publish(
        "".into(),
        d.properties.reply_to().clone().unwrap(),
        BasicPublishOptions::default(),
        b"\"too late\"",
        BasicProperties::default()
            .with_correlation_id(d.properties.correlation_id().clone().unwrap()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    d.ack(BasicAckOptions::default()).await.unwrap();
    let series = "switchboard_gateway_replies_after_cancel_total{service=\"ext\"}";
    eventually(
        Duration::from_secs(10),
        "the late reply counted",
        || async { metric(&gw, series).await == Some(1.0) },
    )
    .await;
    let doc = gw.json(&format!("/v1/calls/{id}")).await;
    assert_eq!(doc["status"], "cancelled");
    assert!(
        doc.get("result").is_none(),
        "the late reply was kept: {doc}"
    );
    let _ = conn.close(200, "done".into()).await;
    gw.cleanup_with(&["ext"]).await;
}

/// The `202` is not held for the `accepted` event's confirm: a call
/// cancelled the moment its `202` arrives is still told of on the events
/// exchange in order, `accepted` before `cancelled` (the end waits for the
/// `accepted` publish), and the same for calls that end at once.
#[actix_rt::test]
async fn a_call_ended_right_after_its_202_is_told_of_after_its_accepted_event() {
    let gw = gateway("cx-order", |_| {}).await;
    let mut sub = switchboard::events::Subscription::start(
        &gw.ctx.broker,
        switchboard::events::SubscribeOptions {
            durable_name: None,
            type_prefix: Some("switchboard.call.".into()),
        },
    )
    .await
    .unwrap();
    const CALLS: usize = 20;
    let mut ids = Vec::new();
    for i in 0..CALLS {
        if i % 2 == 0 {
            // Held by its worker: cancelled as soon as it is accepted.
            let id = start_async(gw.post("slow")).await;
            let res = cancel(&gw, &id).send().await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            ids.push((id, "switchboard.call.cancelled"));
        } else {
            // Echoed at once: its reply is usually in before the 202.
            let id = start_async(gw.post("echo")).await;
            ids.push((id, "switchboard.call.completed"));
        }
    }
    let mut seen: Vec<(String, String)> = Vec::new();
    while seen.len() < 2 * CALLS {
        let event = tokio::time::timeout(Duration::from_secs(20), sub.recv())
            .await
            .expect("the calls' events within 20 s")
            .expect("the subscription goes on")
            .unwrap();
        seen.push((event.subject.unwrap_or_default(), event.ty));
    }
    for (id, end) in &ids {
        let of: Vec<&str> = seen
            .iter()
            .filter(|(s, _)| s == id)
            .map(|(_, t)| t.as_str())
            .collect();
        assert_eq!(of, ["switchboard.call.accepted", *end], "events of {id}");
    }
    sub.stop().await;
    gw.gate.add_permits(CALLS);
    gw.cleanup().await;
}

/// The bindings whose source is `exchange` (management API):
/// `(destination, destination_type, routing_key)`.
async fn bindings_from(exchange: &str) -> Vec<(String, String, String)> {
    let url = format!(
        "{}/api/exchanges/%2F/{exchange}/bindings/source",
        crate::common::management_url()
    );
    let list: Vec<Value> = reqwest::Client::new()
        .get(url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let s = |b: &Value, k: &str| b[k].as_str().unwrap().to_owned();
    list.iter()
        .map(|b| {
            (
                s(b, "destination"),
                s(b, "destination_type"),
                s(b, "routing_key"),
            )
        })
        .collect()
}

#[actix_rt::test]
async fn the_watch_is_sent_cancellations_only_and_fanout_subscribers_everything() {
    use switchboard::amqp::wire;
    use switchboard::events::{self, CloudEvent, SubscribeOptions, Subscription};

    let c = crate::common::ctx("cx-only").await;
    let names = c.broker.names().clone();
    let watch = CancelWatch::shared(&c.broker).await.unwrap();
    assert!(watch.filtered(), "the watch reads the whole fanout");
    // A subscriber of the fanout, as every existing one binds.
    let mut sub = Subscription::start(&c.broker, SubscribeOptions::default())
        .await
        .unwrap();

    // The watch's queue is bound to the events by type, for cancellations
    // (and events published without their type as key), not to the fanout.
    let by_type = bindings_from(&names.events_types_exchange()).await;
    let watch_queues: Vec<&String> = by_type.iter().map(|(d, _, _)| d).collect();
    assert!(!watch_queues.is_empty());
    let mut keys: Vec<&str> = by_type.iter().map(|(_, _, k)| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["", wire::EVENT_CALL_CANCELLED], "{by_type:?}");
    let fanout = bindings_from(&names.events_exchange()).await;
    assert!(
        fanout.contains(&(
            names.events_types_exchange(),
            "exchange".into(),
            String::new()
        )),
        "{fanout:?}"
    );
    for (d, kind, _) in &fanout {
        assert!(
            kind == "exchange" || *d == sub.queue,
            "a queue other than the subscriber's on the fanout: {fanout:?}"
        );
        assert!(!watch_queues.contains(&d), "{fanout:?}");
    }

    // Other events, each confirmed (so in every queue it is routed to)
    // before the next is published, then a cancellation: the watch is sent
    // the cancellation alone; the fanout's subscriber gets them all.
    let (received, heard) = (watch.received(), watch.heard());
    let types = [
        wire::EVENT_CALL_ACCEPTED,
        wire::EVENT_CALL_PROGRESS,
        wire::EVENT_CALL_COMPLETED,
        "com.example.invoice.paid",
        wire::EVENT_CALL_CANCELLED,
    ];
    for ty in types {
        let subject = if ty == wire::EVENT_CALL_CANCELLED {
            "gone"
        } else {
            "other"
        };
        let event = CloudEvent::new(ty, "test", serde_json::json!({})).with_subject(subject);
        events::publish(&c.broker, &event).await.unwrap();
    }
    eventually(Duration::from_secs(10), "the watch heard it", || async {
        watch.heard() > heard
    })
    .await;
    assert!(watch.is_cancelled("gone"));
    assert!(!watch.is_cancelled("other"));
    assert_eq!(
        watch.received() - received,
        1,
        "the watch was sent events other than the cancellation"
    );
    for ty in types {
        let event = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("the fanout's subscriber gets every event")
            .unwrap()
            .unwrap();
        assert_eq!(event.ty, ty);
    }
    sub.stop().await;
    drop(watch);
    c.cleanup(&[]).await;
}
