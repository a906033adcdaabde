//! One caller can no longer starve the others (issue 13, finding 5): each
//! caller has its own rate, pending calls, streams and long-polls
//! (`gateway.limits`, a token's own `limits`). Alice is held to small
//! limits and gets 429 with `Retry-After` and problem+json at each, counted
//! in `switchboard_gateway_limited_total{caller,limit}`; Bob, on the same
//! gateway at the same moment, is still served.
//!
//! And `/readyz` no longer makes the broker open a channel per request
//! (finding 7), while it still notices a consumer going down.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use switchboard::settings::{CallerLimitsOverride, Settings, TokenSettings};

use super::{ALICE, BOB, problem};
use crate::common::{Gw, eventually, gateway};
use crate::consumers::{Proxy, behind, ready, unready};
use crate::metrics::scrape;
use switchboard::amqp::wire;

/// Alice and Bob may call every service; Alice has `alice` as her limits,
/// Bob the defaults.
fn callers(alice: CallerLimitsOverride) -> impl FnOnce(&mut Settings) {
    move |s| {
        let mut t = BTreeMap::new();
        let mut a = TokenSettings::bearer(ALICE, &["*"]);
        a.limits = alice;
        t.insert("alice".to_string(), a);
        t.insert("bob".to_string(), TokenSettings::bearer(BOB, &["*"]));
        s.gateway.tokens = t;
    }
}

/// Checks a 429 of `limit`: problem+json, `Retry-After` of at least
/// `min_retry` seconds, a detail naming the setting.
async fn too_many(res: reqwest::Response, setting: &str, min_retry: u64) -> Value {
    let retry: u64 = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!(retry >= min_retry, "Retry-After {retry} < {min_retry}");
    let doc = problem(res, 429).await;
    let detail = doc["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(setting), "{doc}");
    doc
}

/// `switchboard_gateway_limited_total{caller,limit}` now.
async fn limited(gw: &Gw, caller: &str, limit: &str) -> f64 {
    scrape(&gw.http, &gw.url("/metrics")).await.get(&format!(
        r#"switchboard_gateway_limited_total{{caller="{caller}",limit="{limit}"}}"#
    ))
}

/// Asserts the counters of a limit: Alice refused `n` times, Bob never,
/// and both series present (made at start, bounded to configured callers).
async fn counted(gw: &Gw, limit: &str, n: f64) {
    let m = scrape(&gw.http, &gw.url("/metrics")).await;
    for (caller, want) in [("alice", n), ("bob", 0.0)] {
        let series =
            format!(r#"switchboard_gateway_limited_total{{caller="{caller}",limit="{limit}"}}"#);
        assert!(m.text.contains(&series), "{series} missing");
        assert_eq!(m.get(&series), want, "{series}");
    }
    assert!(!m.text.contains(r#"caller="anonymous""#), "no such caller");
}

#[actix_rt::test]
async fn a_caller_over_its_rate_gets_429_while_another_is_served() {
    // One request per 1000 s, three at once: the fourth is refused for
    // long enough that no replenishment can make this test flaky.
    let gw = gateway(
        "sec-lim-rate",
        callers(CallerLimitsOverride {
            rate_per_s: Some(0.001),
            burst: Some(3),
            ..Default::default()
        }),
    )
    .await;
    let alice = || {
        gw.post("echo")
            .bearer_auth(ALICE)
            .header("prefer", "wait=5")
            .body("{}")
            .send()
    };
    for _ in 0..3 {
        assert_eq!(alice().await.unwrap().status(), StatusCode::OK);
    }
    too_many(alice().await.unwrap(), "rate_per_s", 100).await;
    // Every route that serves her counts: a poll too.
    let poll = gw
        .get("/v1/calls/nosuch")
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    too_many(poll, "rate_per_s", 100).await;
    // Without a valid token nothing is taken from her rate: 401.
    let anon = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    // Bob is served as if Alice were not there.
    for _ in 0..10 {
        let res = gw
            .post("echo")
            .bearer_auth(BOB)
            .header("prefer", "wait=5")
            .body(r#""bob""#)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.text().await.unwrap(), r#""bob""#);
    }
    counted(&gw, "rate", 2.0).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn without_tokens_anonymous_is_one_caller_with_the_default_limits() {
    let gw = gateway("sec-lim-anon", |s| {
        s.gateway.limits.rate_per_s = 0.001;
        s.gateway.limits.burst = 1;
    })
    .await;
    let get = || gw.get("/v1/calls/nosuch").send();
    assert_eq!(get().await.unwrap().status(), StatusCode::NOT_FOUND);
    too_many(get().await.unwrap(), "rate_per_s", 100).await;
    assert_eq!(limited(&gw, "anonymous", "rate").await, 1.0);
    // Operations routes serve no caller: not limited.
    let ready = gw.get("/healthz").send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_caller_at_its_pending_calls_gets_429_while_another_starts_calls() {
    let gw = gateway(
        "sec-lim-pending",
        callers(CallerLimitsOverride {
            max_pending: Some(2),
            ..Default::default()
        }),
    )
    .await;
    let start = |token: &'static str| {
        gw.post("slow")
            .bearer_auth(token)
            .header("prefer", "respond-async")
            .body(r#""held""#)
            .send()
    };
    let keyed = |key: &'static str| {
        gw.post("slow")
            .bearer_auth(ALICE)
            .header("prefer", "respond-async")
            .header("idempotency-key", key)
            .body(r#""held""#)
            .send()
    };
    let mut ids = Vec::new();
    for res in [start(ALICE).await.unwrap(), keyed("k-1").await.unwrap()] {
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        ids.push(res.headers()["call-id"].to_str().unwrap().to_owned());
    }
    too_many(start(ALICE).await.unwrap(), "max_pending", 1).await;
    // A new key is a new call: refused, and nothing kept of it...
    too_many(keyed("k-2").await.unwrap(), "max_pending", 1).await;
    // ...while a repeat is no new call: it gets its call, as always.
    let again = keyed("k-1").await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["call-id"], ids[1].as_str());
    // A synchronous call would become pending as well: refused too.
    let sync = gw
        .post("echo")
        .bearer_auth(ALICE)
        .body("{}")
        .send()
        .await
        .unwrap();
    too_many(sync, "max_pending", 1).await;
    // Bob is not held by Alice's calls.
    for _ in 0..3 {
        assert_eq!(start(BOB).await.unwrap().status(), StatusCode::ACCEPTED);
    }
    counted(&gw, "pending", 3.0).await;
    // Once hers end she may start calls again.
    gw.gate.add_permits(5);
    let done = gw
        .get(&format!("/v1/calls/{}?wait=30", ids[0]))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    let doc: Value = done.json().await.unwrap();
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(start(ALICE).await.unwrap().status(), StatusCode::ACCEPTED);
    // The refused key was not kept: it starts a call now.
    let k2 = keyed("k-2").await.unwrap();
    assert_eq!(k2.status(), StatusCode::ACCEPTED);
    assert!(!ids.iter().any(|id| k2.headers()["call-id"] == id.as_str()));
    gw.gate.add_permits(100);
    gw.cleanup().await;
}

/// A POST far below the bound skips the store count (gateway::limits,
/// PENDING_RECOUNT): calls made back to back, faster than a recount, must
/// still be stopped exactly at the bound.
#[actix_rt::test]
async fn calls_made_back_to_back_stop_exactly_at_the_pending_bound() {
    let gw = gateway(
        "sec-lim-burst",
        callers(CallerLimitsOverride {
            max_pending: Some(6),
            ..Default::default()
        }),
    )
    .await;
    let start = || {
        gw.post("slow")
            .bearer_auth(ALICE)
            .header("prefer", "respond-async")
            .body(r#""held""#)
            .send()
    };
    for n in 0..6 {
        let res = start().await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED, "call {n}");
    }
    too_many(start().await.unwrap(), "max_pending", 1).await;
    let sync = gw
        .post("echo")
        .bearer_auth(ALICE)
        .body("{}")
        .send()
        .await
        .unwrap();
    too_many(sync, "max_pending", 1).await;
    gw.gate.add_permits(100);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_caller_at_its_streams_gets_429_while_another_opens_streams() {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let gw = gateway("sec-lim-streams", |s| {
        callers(CallerLimitsOverride {
            max_streams: Some(1),
            ..Default::default()
        })(s);
        // A client that left is noticed at the next heartbeat.
        s.gateway.heartbeat_s = 1;
    })
    .await;
    let sse = |token: &'static str| gw.get("/v1/events").bearer_auth(token).send();
    let held = sse(ALICE).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    too_many(sse(ALICE).await.unwrap(), "max_streams", 1).await;
    // The stream of one call counts as well, and so does a WebSocket.
    let call = gw
        .get("/v1/calls/nosuch/events")
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    too_many(call, "max_streams", 1).await;
    let mut req = format!("{}/v1/events/ws", gw.base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
    match tokio_tungstenite::connect_async(req.clone()).await {
        Err(WsError::Http(res)) => {
            assert_eq!(res.status().as_u16(), 429);
            assert!(res.headers().contains_key("retry-after"));
        }
        other => panic!("a second stream of alice's opened: {:?}", other.map(|_| ())),
    }
    // Bob opens streams as he likes.
    let mut bobs = Vec::new();
    for _ in 0..3 {
        let res = sse(BOB).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        bobs.push(res);
    }
    counted(&gw, "streams", 3.0).await;
    // Alice closes her stream: her slot comes back once the gateway
    // notices (its next heartbeat write fails).
    drop(held);
    eventually(
        Duration::from_secs(20),
        "alice may open a stream again",
        || async {
            let res = sse(ALICE).await.unwrap();
            res.status() == StatusCode::OK
        },
    )
    .await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_caller_at_its_long_polls_gets_429_while_another_long_polls() {
    let gw = gateway(
        "sec-lim-polls",
        callers(CallerLimitsOverride {
            max_long_polls: Some(1),
            ..Default::default()
        }),
    )
    .await;
    let state = gw.gateway.as_ref().unwrap();
    let start = |token: &'static str| {
        let req = gw
            .post("slow")
            .bearer_auth(token)
            .header("prefer", "respond-async")
            .body(r#""held""#)
            .send();
        async move {
            let res = req.await.unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            res.headers()["call-id"].to_str().unwrap().to_owned()
        }
    };
    let (a, b) = (start(ALICE).await, start(BOB).await);
    let long_poll = |token: &'static str, id: &str, wait: u32| {
        gw.get(&format!("/v1/calls/{id}?wait={wait}"))
            .bearer_auth(token)
            .send()
    };
    let first = tokio::spawn(long_poll(ALICE, &a, 60));
    eventually(
        Duration::from_secs(10),
        "alice's long-poll is held",
        || async move { state.call_watchers() == 1 },
    )
    .await;
    too_many(long_poll(ALICE, &a, 60).await.unwrap(), "max_long_polls", 1).await;
    // A plain poll takes no slot.
    let poll = long_poll(ALICE, &a, 0).await.unwrap();
    assert_eq!(poll.status(), StatusCode::OK);
    // Bob long-polls his own call meanwhile: held too, not refused.
    let bobs = tokio::spawn(long_poll(BOB, &b, 60));
    eventually(
        Duration::from_secs(10),
        "bob's long-poll is held",
        || async move { state.call_watchers() == 2 },
    )
    .await;
    counted(&gw, "long_polls", 1.0).await;
    // Both calls end: both long-polls answer with the end.
    gw.gate.add_permits(2);
    for held in [first, bobs] {
        let res = held.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let doc: Value = res.json().await.unwrap();
        assert_eq!(doc["status"], "succeeded", "{doc}");
    }
    // Her slot is back.
    let c = start(ALICE).await;
    let again = tokio::spawn(long_poll(ALICE, &c, 60));
    eventually(
        Duration::from_secs(10),
        "alice long-polls again",
        || async move { state.call_watchers() == 1 },
    )
    .await;
    gw.gate.add_permits(1);
    assert_eq!(again.await.unwrap().unwrap().status(), StatusCode::OK);
    gw.cleanup().await;
}

/// Issue 13, finding 7: `/readyz` opened and closed a broker channel per
/// request, so anyone could make the broker churn. Now a probe is reused for
/// a second; the consumers' state is still read at every request, so a
/// worker whose connection is wedged (the consumers tests' freezing proxy)
/// is reported at once.
#[actix_rt::test]
async fn readiness_reuses_a_recent_probe_and_still_sees_a_consumer_go_down() {
    let proxy = Proxy::start().await;
    let gw = gateway("sec-readyz", behind(&proxy)).await;
    let readyz = gw.url("/readyz");
    let opened = || async {
        scrape(&gw.http, &gw.url("/metrics"))
            .await
            .get("switchboard_broker_channels_opened_total")
    };
    ready(&gw.http, &readyz).await;
    let before = opened().await;
    let started = std::time::Instant::now();
    for _ in 0..200 {
        let res = gw.http.get(&readyz).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let after = opened().await;
    // At most one probe per second of the burst (and the one at its start).
    let allowed = started.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(
        after - before <= allowed,
        "{} channels opened for 200 readiness checks in {:?}",
        after - before,
        started.elapsed()
    );

    // A consumer that goes down is seen, whatever the probe says.
    let instance = gw.ctx.broker.instance_id().to_owned();
    proxy.freeze(&wire::connection_name(&instance, "worker/echo"));
    let detail = unready(&gw.http, &readyz, "worker/echo").await;
    assert!(detail.contains("is down since"), "{detail}");
    proxy.thaw();
    ready(&gw.http, &readyz).await;
    gw.cleanup().await;
}
