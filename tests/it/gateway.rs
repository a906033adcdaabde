//! The HTTP gateway over a real socket, against real RabbitMQ: each route
//! and mode of DESIGN.md.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use switchboard::settings::TokenSettings;

use crate::common::{Gw, gateway, poll_until};

pub(crate) async fn json(res: reqwest::Response) -> Value {
    res.json().await.unwrap()
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn assert_problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    let doc = json(res).await;
    assert_eq!(doc["status"], status);
    assert!(doc["title"].is_string());
    doc
}

/// Polls a call's status document until it is no longer pending.
async fn finished(gw: &Gw, id: &str) -> Value {
    let res = gw
        .get(&format!("/v1/calls/{id}?wait=20"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    json(res).await
}

#[actix_rt::test]
async fn a_synchronous_call_answers_with_the_reply_and_is_not_kept() {
    let gw = gateway("gw-sync", |_| {}).await;
    let res = gw
        .post("echo")
        .header("content-type", "application/json")
        .body(r#"{"hello":"world"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type"), Some("application/json"));
    let id = header(&res, "call-id").unwrap().to_owned();
    assert_eq!(res.text().await.unwrap(), r#"{"hello":"world"}"#);

    // Any bytes pass through untouched, with their content type.
    let bytes: Vec<u8> = (0..=255u8).collect();
    let res = gw
        .post("echo")
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(res.bytes().await.unwrap().to_vec(), bytes);

    // A call answered synchronously is not kept.
    let res = gw.get(&format!("/v1/calls/{id}")).send().await.unwrap();
    assert_problem(res, 404).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_handler_error_passes_through_with_its_status() {
    let gw = gateway("gw-err", |_| {}).await;
    let res = gw.post("fail").body("{}").send().await.unwrap();
    assert!(header(&res, "call-id").is_some());
    let doc = assert_problem(res, 422).await;
    assert_eq!(doc["title"], "order rejected");
    assert_eq!(doc["detail"], "no stock");
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_slow_call_degrades_to_202_and_is_reachable_by_polling_and_long_polling() {
    let gw = gateway("gw-slow", |_| {}).await;
    let res = gw
        .post("slow")
        .header("prefer", "wait=1")
        .header("content-type", "text/plain")
        .body("slow one")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&res, "preference-applied"), Some("wait=1"));
    let location = header(&res, "location").unwrap().to_owned();
    let retry: u64 = header(&res, "retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    let doc = json(res).await;
    assert_eq!(doc["status"], "pending");
    assert_eq!(doc["service"], "slow");
    let id = doc["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/calls/{id}"));
    assert_eq!(doc["result_url"], format!("/v1/calls/{id}/result"));
    assert!(doc["completed_at"].is_null());

    // Polling: pending, with a Retry-After.
    let res = gw.get(&location).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(header(&res, "retry-after").is_some());
    assert_eq!(json(res).await["status"], "pending");
    let res = gw.get(&format!("{location}/result")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(header(&res, "retry-after").is_some());

    // Long-poll: held until the call ends, which the test lets happen.
    let poll = tokio::spawn(gw.get(&format!("{location}?wait=30")).send());
    // The long-poll is held by the gateway before the reply is allowed.
    let state = gw.gateway.as_ref().unwrap();
    crate::common::eventually(
        Duration::from_secs(10),
        "the long-poll is waiting",
        || async move { state.call_watchers() == 1 },
    )
    .await;
    gw.gate.add_permits(1);
    let doc = json(poll.await.unwrap().unwrap()).await;
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(doc["result"]["status"], 200);
    assert_eq!(doc["result"]["content_type"], "text/plain");
    assert_eq!(doc["result"]["body"], "slow one");
    assert!(doc["completed_at"].is_string());

    // The result exactly as a synchronous answer would have been.
    let res = gw.get(&format!("{location}/result")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type"), Some("text/plain"));
    assert_eq!(header(&res, "call-id"), Some(id.as_str()));
    assert_eq!(res.text().await.unwrap(), "slow one");
    gw.cleanup().await;
}

#[actix_rt::test]
async fn respond_async_answers_202_at_once_and_the_result_follows() {
    let gw = gateway("gw-async", |_| {}).await;
    let res = gw
        .post("echo")
        .header("prefer", "respond-async, handling=lenient")
        .body(r#"[1,2,3]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&res, "preference-applied"), Some("respond-async"));
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let doc = finished(&gw, &id).await;
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(doc["result"]["body"], serde_json::json!([1, 2, 3]));
    gw.cleanup().await;
}

#[actix_rt::test]
async fn an_idempotent_repeat_returns_the_same_call_and_publishes_nothing_new() {
    let gw = gateway("gw-idem", |_| {}).await;
    let send = |key: &str, body: &str| {
        gw.post("count")
            .header("idempotency-key", key)
            .header("prefer", "respond-async")
            .body(body.to_owned())
            .send()
    };
    let first = json(send("order-42", "{\"n\":1}").await.unwrap()).await;
    let id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(finished(&gw, &id).await["status"], "succeeded");
    let again = send("order-42", "{\"n\":1}").await.unwrap();
    assert_eq!(header(&again, "call-id"), Some(id.as_str()));
    assert_eq!(again.text().await.unwrap(), "{\"n\":1}");
    // Concurrent repeats of a new key make one call.
    let (a, b) = tokio::join!(send("order-43", "{}"), send("order-43", "{}"));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(header(&a, "call-id"), header(&b, "call-id"));
    let id43 = header(&a, "call-id").unwrap().to_owned();
    assert_eq!(finished(&gw, &id43).await["status"], "succeeded");
    assert_eq!(
        gw.counted.load(Ordering::SeqCst),
        2,
        "a repeat was published again"
    );

    // The same key with another body: 422. A malformed key: 400.
    let res = send("order-42", "{\"n\":2}").await.unwrap();
    assert_problem(res, 422).await;
    let res = gw
        .post("count")
        .header("idempotency-key", "has space")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn malformed_requests_get_problem_json_with_the_right_status() {
    let gw = gateway("gw-bad", |s| s.gateway.payload_limit_bytes = 1024).await;
    for prefer in ["wait=-1", "wait=soon", "wait=1.5"] {
        let res = gw
            .post("echo")
            .header("prefer", prefer)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_problem(res, 400).await;
    }
    let res = gw.post("echo").body(vec![b'x'; 2048]).send().await.unwrap();
    assert_problem(res, 413).await;
    let res = gw.post("nosuch").body("{}").send().await.unwrap();
    assert_problem(res, 404).await;
    let res = gw.get("/v1/calls/nope").send().await.unwrap();
    assert_problem(res, 404).await;
    let res = gw.get("/v1/calls/nope?wait=x").send().await.unwrap();
    assert_problem(res, 400).await;
    let res = gw.get("/no/such/route").send().await.unwrap();
    assert_problem(res, 404).await;
    // Nothing sent crashed it.
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn tokens_authenticate_limit_services_and_hide_other_callers_calls() {
    let gw = gateway("gw-auth", |s| {
        let mut t = BTreeMap::new();
        t.insert(
            "alice".to_string(),
            TokenSettings::bearer("alice-token-0123456789", &["echo"]),
        );
        t.insert(
            "bob".to_string(),
            TokenSettings::bearer("bob-token-0123456789ab", &["*"]),
        );
        s.gateway.tokens = t;
    })
    .await;
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(header(&res, "www-authenticate"), Some("Bearer"));
    assert_problem(res, 401).await;
    let res = gw
        .post("echo")
        .bearer_auth("wrong-token-0123456789")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;
    // A service alice may not call is, to her, one that does not exist.
    let res = gw
        .post("count")
        .bearer_auth("alice-token-0123456789")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
    let res = gw
        .post("echo")
        .bearer_auth("alice-token-0123456789")
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let mine = gw
        .get(&format!("/v1/calls/{id}"))
        .bearer_auth("alice-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.status(), StatusCode::OK);
    let theirs = gw
        .get(&format!("/v1/calls/{id}"))
        .bearer_auth("bob-token-0123456789ab")
        .send()
        .await
        .unwrap();
    assert_problem(theirs, 404).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_call_past_the_services_timeout_expires_and_its_result_is_504() {
    let gw = gateway("gw-expire", |s| {
        s.services.get_mut("slow").unwrap().timeout_ms = 500;
    })
    .await;
    let res = gw
        .post("slow")
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let doc = finished(&gw, &id).await;
    assert_eq!(doc["status"], "expired");
    assert!(doc.get("result").is_none());
    let res = gw
        .get(&format!("/v1/calls/{id}/result"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 504).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_dead_lettered_call_ends_failed() {
    let gw = gateway("gw-dead", |s| {
        s.services.get_mut("poison").unwrap().delivery_limit = 1;
    })
    .await;
    let res = gw
        .post("poison")
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let doc = finished(&gw, &id).await;
    assert_eq!(doc["status"], "failed");
    assert_eq!(doc["result"]["status"], 502);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_gateway_restarted_while_calls_are_pending_finishes_them_all_from_the_store() {
    let mut gw = gateway("gw-restart", |_| {}).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let res = gw
            .post("slow")
            .header("prefer", "respond-async")
            .body(format!("{{\"i\":{i}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        ids.push(json(res).await["id"].as_str().unwrap().to_owned());
    }
    gw.stop_gateway().await;
    // The replies arrive while no gateway runs: they wait in the reply queue.
    gw.gate.add_permits(5);
    gw.start_gateway().await;
    for (i, id) in ids.iter().enumerate() {
        let doc = finished(&gw, id).await;
        assert_eq!(doc["status"], "succeeded", "call {id}");
        assert_eq!(doc["result"]["body"]["i"], i);
    }
    gw.cleanup().await;
}

#[actix_rt::test]
async fn health_readiness_and_the_openapi_document() {
    let gw = gateway("gw-ops", |_| {}).await;
    for path in ["/healthz", "/readyz"] {
        let res = gw.get(path).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
    let doc = json(gw.get("/openapi.json").send().await.unwrap()).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/v1/services/{service}/calls",
        "/v1/calls/{id}",
        "/v1/calls/{id}/result",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/asyncapi.json",
    ] {
        assert!(
            paths.contains_key(route),
            "{route} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["StatusDocument"].is_object());
    gw.cleanup().await;
}

#[actix_rt::test]
async fn wait_is_capped_and_a_reply_within_it_is_answered() {
    let gw = gateway("gw-wait", |s| s.gateway.max_wait_s = 2).await;
    let res = gw
        .post("echo")
        .header("prefer", "wait=3600")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "preference-applied"), Some("wait=2"));
    let started = std::time::Instant::now();
    let res = gw
        .post("slow")
        .header("prefer", "wait=3600")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the cap was not applied"
    );
    gw.gate.add_permits(1);
    gw.cleanup().await;
}

/// Reads an SSE response frame by frame (frames end with a blank line).
pub(crate) struct Sse {
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

/// One SSE frame: its fields (comments skipped).
#[derive(Debug, Default)]
pub(crate) struct Frame {
    pub(crate) id: Option<String>,
    pub(crate) event: Option<String>,
    pub(crate) data: Option<Value>,
}

impl Sse {
    pub(crate) fn new(res: reqwest::Response) -> Self {
        Self {
            stream: Box::pin(res.bytes_stream()),
            buf: String::new(),
        }
    }

    /// The next event frame; `None` when the stream ended.
    pub(crate) async fn next(&mut self) -> Option<Frame> {
        use futures_util::StreamExt;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut f = Frame::default();
                for line in raw.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        f.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        f.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        f.data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                if f.event.is_some() {
                    return Some(f);
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.stream.next())
                .await
                .expect("an SSE frame within 20 s")?
                .ok()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

#[actix_rt::test]
async fn the_sse_stream_of_one_call_ends_with_its_terminal_state() {
    let gw = gateway("gw-callsse", |_| {}).await;
    let res = gw
        .post("slow")
        .header("prefer", "respond-async")
        .body("\"x\"")
        .send()
        .await
        .unwrap();
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let res = gw
        .get(&format!("/v1/calls/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&res, "x-accel-buffering"), Some("no"));
    let mut sse = Sse::new(res);
    let first = sse.next().await.unwrap();
    assert_eq!(first.event.as_deref(), Some("switchboard.call.accepted"));
    assert_eq!(first.data.as_ref().unwrap()["data"]["status"], "pending");
    gw.gate.add_permits(1);
    let last = sse.next().await.unwrap();
    assert_eq!(last.event.as_deref(), Some("switchboard.call.completed"));
    let data = &last.data.as_ref().unwrap()["data"];
    assert_eq!(data["status"], "succeeded");
    assert_eq!(data["result"]["body"], "x");
    assert_eq!(last.data.as_ref().unwrap()["subject"], id.as_str());
    assert!(
        sse.next().await.is_none(),
        "the stream did not end with the call"
    );

    // A finished call's stream: its end at once, then closed.
    let res = gw
        .get(&format!("/v1/calls/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut sse = Sse::new(res);
    assert_eq!(
        sse.next().await.unwrap().event.as_deref(),
        Some("switchboard.call.completed")
    );
    assert!(sse.next().await.is_none());
    gw.cleanup().await;
}

#[actix_rt::test]
async fn the_event_stream_resumes_with_last_event_id_without_loss_or_repeat() {
    use switchboard::events::{self, CloudEvent};
    let gw = gateway("gw-sse", |_| {}).await;
    let open = |last: Option<String>| {
        let mut r = gw.get("/v1/events?type=orders.");
        if let Some(l) = last {
            r = r.header("last-event-id", l);
        }
        r.send()
    };
    let mut sse = Sse::new(open(None).await.unwrap());
    let publish = |n: u32| {
        let broker = gw.ctx.broker.clone();
        async move {
            let e = CloudEvent::new("orders.created", "test", serde_json::json!({ "n": n }));
            events::publish(&broker, &e).await.unwrap();
            // Another type, filtered out by ?type=.
            let e = CloudEvent::new("users.created", "test", serde_json::json!({ "n": n }));
            events::publish(&broker, &e).await.unwrap();
        }
    };
    for n in 0..3 {
        publish(n).await;
    }
    let mut ids = Vec::new();
    for n in 0..3 {
        let f = sse.next().await.unwrap();
        assert_eq!(f.event.as_deref(), Some("orders.created"));
        assert_eq!(f.data.unwrap()["data"]["n"], n);
        ids.push(f.id.unwrap());
    }
    drop(sse);
    // Away for a while: events 3 and 4 are published meanwhile.
    publish(3).await;
    publish(4).await;
    let mut sse = Sse::new(open(Some(ids[2].clone())).await.unwrap());
    for n in 3..5 {
        let f = sse.next().await.unwrap();
        assert_eq!(f.data.unwrap()["data"]["n"], n, "lost or repeated an event");
    }
    publish(5).await;
    assert_eq!(sse.next().await.unwrap().data.unwrap()["data"]["n"], 5);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn websocket_clients_receive_events_as_text_frames() {
    use futures_util::StreamExt;
    use switchboard::events::{self, CloudEvent};
    use tokio_tungstenite::tungstenite::Message;
    let gw = gateway("gw-ws", |_| {}).await;
    let url = format!("{}/v1/events/ws", gw.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let state = gw.gateway.as_ref().unwrap();
    crate::common::eventually(
        Duration::from_secs(10),
        "the WebSocket session is open",
        || async move {
            state
                .hub()
                .stats
                .sessions
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1
        },
    )
    .await;
    let e = CloudEvent::new("orders.shipped", "test", serde_json::json!({"order": 7}));
    events::publish(&gw.ctx.broker, &e).await.unwrap();
    let got = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            break serde_json::from_str::<Value>(t.as_str()).unwrap();
        }
    };
    assert_eq!(got["id"], e.id.as_str());
    assert_eq!(got["type"], "orders.shipped");
    assert_eq!(got["data"]["order"], 7);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn event_streams_show_each_caller_only_its_own_calls() {
    use switchboard::events::{self, CloudEvent};
    let gw = gateway("gw-streamauth", |s| {
        let mut t = BTreeMap::new();
        for who in ["alice", "bob"] {
            t.insert(
                who.to_string(),
                TokenSettings::bearer(&format!("{who}-token-0123456789"), &["*"]),
            );
        }
        s.gateway.tokens = t;
    })
    .await;
    let res = gw.get("/v1/events").send().await.unwrap();
    assert_problem(res, 401).await;
    let bob = gw
        .get("/v1/events")
        .bearer_auth("bob-token-0123456789")
        .send()
        .await
        .unwrap();
    let mut bob = Sse::new(bob);
    let alice = gw
        .get("/v1/events")
        .bearer_auth("alice-token-0123456789")
        .send()
        .await
        .unwrap();
    let mut alice = Sse::new(alice);
    let state = gw.gateway.as_ref().unwrap();
    crate::common::eventually(
        Duration::from_secs(10),
        "both streams open",
        || async move {
            state
                .hub()
                .stats
                .sessions
                .load(std::sync::atomic::Ordering::Relaxed)
                == 2
        },
    )
    .await;
    let res = gw
        .post("echo")
        .bearer_auth("alice-token-0123456789")
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let done = gw
        .get(&format!("/v1/calls/{id}?wait=20"))
        .bearer_auth("alice-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(json(done).await["status"], "succeeded");
    let f = alice.next().await.unwrap();
    assert_eq!(f.event.as_deref(), Some("switchboard.call.accepted"));
    let f = alice.next().await.unwrap();
    assert_eq!(f.event.as_deref(), Some("switchboard.call.completed"));
    // Published after the hub relayed alice's call events (alice saw them):
    // the hub relays in order, so bob would have got them before this marker.
    let marker = CloudEvent::new("news.posted", "test", serde_json::json!(1));
    events::publish(&gw.ctx.broker, &marker).await.unwrap();
    assert_eq!(
        alice.next().await.unwrap().event.as_deref(),
        Some("news.posted")
    );
    let f = bob.next().await.unwrap();
    assert_eq!(
        f.event.as_deref(),
        Some("news.posted"),
        "bob saw another caller's call"
    );
    gw.cleanup().await;
}

/// Polls until the call's callback reaches `state`.
async fn callback_state(gw: &Gw, id: &str, state: &str) -> Value {
    let what = format!("the callback {state}");
    poll_until(Duration::from_secs(20), &what, || async {
        let doc = json(
            gw.get(&format!("/v1/calls/{id}?wait=1"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        if doc["callback"]["state"] == state {
            Ok(doc)
        } else {
            Err(doc)
        }
    })
    .await
}

pub(crate) fn with_callbacks(s: &mut switchboard::settings::Settings, max_attempts: u32) {
    s.callbacks.secret = crate::callbacks::SECRET.into();
    s.callbacks.allow_private = true;
    s.callbacks.initial_backoff_ms = 10;
    s.callbacks.max_backoff_ms = 50;
    s.callbacks.max_attempts = max_attempts;
}

#[actix_rt::test]
async fn a_callback_is_signed_retried_with_the_same_id_and_shown_in_the_status_document() {
    let receiver = crate::callbacks::Receiver::start(&[500, 503], 200, Duration::ZERO);
    let gw = gateway("gw-cb", |s| with_callbacks(s, 5)).await;
    let res = gw
        .post("echo")
        .header("callback-url", receiver.url())
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(r#"{"order":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::ACCEPTED,
        "a Callback-Url makes the call asynchronous"
    );
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let doc = callback_state(&gw, &id, "delivered").await;
    assert_eq!(doc["callback"]["attempts"], 3);
    assert_eq!(doc["callback"]["url"], receiver.url());
    let got = receiver.got();
    assert_eq!(got.len(), 3);
    let wh = standardwebhooks::Webhook::new(crate::callbacks::SECRET).unwrap();
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.headers["content-type"], "application/cloudevents+json");
        assert_eq!(r.headers["webhook-id"], got[0].headers["webhook-id"]);
        assert_eq!(r.body, got[0].body, "a retry sent other bytes");
        wh.verify(&r.body, &r.headers)
            .expect("the signature verifies with the secret");
    }
    let event: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(event["type"], "switchboard.call.completed");
    assert_eq!(event["subject"], id.as_str());
    assert_eq!(event["data"]["status"], "succeeded");
    assert_eq!(event["data"]["result"]["body"]["order"], 1);
    assert!(
        event["traceparent"]
            .as_str()
            .unwrap()
            .starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "the caller's trace does not reach the callback"
    );
    receiver.stop().await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_callback_is_stopped_by_410_and_dead_lettered_after_the_limit() {
    let gone = crate::callbacks::Receiver::start(&[], 410, Duration::ZERO);
    let failing = crate::callbacks::Receiver::start(&[], 500, Duration::ZERO);
    let gw = gateway("gw-cbdead", |s| with_callbacks(s, 3)).await;
    let start = |url: String| {
        gw.post("echo")
            .header("callback-url", url)
            .body("{}")
            .send()
    };
    let to_gone = json(start(gone.url()).await.unwrap()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let to_failing = json(start(failing.url()).await.unwrap()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc = callback_state(&gw, &to_gone, "dead").await;
    assert_eq!(doc["callback"]["attempts"], 1);
    assert_eq!(gone.got().len(), 1);
    let doc = callback_state(&gw, &to_failing, "dead").await;
    assert_eq!(doc["callback"]["attempts"], 3);
    assert!(
        doc["callback"]["last_error"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    assert_eq!(failing.got().len(), 3);
    // The call itself succeeded; only its callback is a dead letter.
    assert_eq!(doc["status"], "succeeded");
    gone.stop().await;
    failing.stop().await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn private_callback_urls_are_refused_and_callbacks_need_a_secret() {
    let gw = gateway("gw-cbssrf", |s| {
        with_callbacks(s, 3);
        s.callbacks.allow_private = false;
    })
    .await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "ftp://example.com/hook",
        "not a url",
    ] {
        let res = gw
            .post("echo")
            .header("callback-url", url)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_problem(res, 422).await;
    }
    gw.cleanup().await;
    let gw = gateway("gw-cbnone", |_| {}).await;
    let res = gw
        .post("echo")
        .header("callback-url", "http://127.0.0.1:9/hook")
        .body("{}")
        .send()
        .await
        .unwrap();
    let doc = assert_problem(res, 422).await;
    assert!(doc["detail"].as_str().unwrap().contains("not enabled"));
    gw.cleanup().await;
}

/// A long-poll of a call this gateway accepted: answered from what the
/// gateway knows of its own calls, it still answers at once once the call
/// has ended, also when the ended document is not kept in memory (a result
/// too large for the finished-call cache), and a call ended behind the
/// gateway's back (through the store, as another gateway of the store would)
/// is answered as ended at the latest when the wait runs out.
#[actix_rt::test]
async fn a_long_poll_of_a_call_accepted_here_answers_its_end_from_the_store_when_not_kept() {
    let gw = gateway("gw-lp-here", |s| s.gateway.max_wait_s = 60).await;
    let accept = |body: Vec<u8>| {
        gw.post("slow")
            .header("prefer", "respond-async")
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
    };
    // A result of 100 KiB: its document is larger than the cache keeps.
    let big = vec![b'x'; 100 * 1024];
    let res = accept(big.clone()).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    gw.gate.add_permits(1);
    poll_until(Duration::from_secs(10), "the call ended", || async {
        let doc = gw.json(&format!("/v1/calls/{id}")).await;
        if doc["status"] == "succeeded" {
            Ok(())
        } else {
            Err(doc["status"].to_string())
        }
    })
    .await;
    // Ended: a long-poll of 60 s answers at once (a client that gives up
    // after 20 s fails the test).
    let res = gw
        .get(&format!("/v1/calls/{id}?wait=60"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the long-poll of an ended call answered at once");
    let doc = json(res).await;
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(doc["result"]["status"], 200);

    // Ended through the store, not by this gateway: a long-poll of 2 s
    // answers `cancelled` (from the store) when its wait runs out.
    let res = accept(b"\"y\"".to_vec()).await.unwrap();
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let outside = switchboard::calls::CallStore::open(&gw.ctx.settings.gateway.store_url)
        .await
        .unwrap();
    assert!(
        outside
            .complete(
                &id,
                switchboard::calls::CallStatus::Cancelled,
                None,
                switchboard::amqp::wire::now_ms() as i64,
                None,
            )
            .await
            .unwrap()
    );
    outside.close().await;
    let doc = gw.json(&format!("/v1/calls/{id}?wait=2")).await;
    assert_eq!(doc["status"], "cancelled");
    assert_eq!(gw.gateway.as_ref().unwrap().call_watchers(), 0);
    // The slow handler of the second call is let go.
    gw.gate.add_permits(1);
    gw.cleanup().await;
}
