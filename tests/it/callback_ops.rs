//! Callbacks an operator can manage (issue 16): every attempt in the status
//! document, a dead-lettered callback sent again, a receiver's
//! `Retry-After` honoured, and a failing receiver host paused by its
//! circuit, with its state in `/metrics`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::callbacks::{Receiver, SECRET};
use crate::common::{Gw, eventually, gateway};
use crate::gateway::{json, with_callbacks};
use crate::progress::metric;

/// Polls the call's document until `cond` holds of it (a state that,
/// once reached, stays), then returns it.
async fn until(gw: &Gw, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(20), what, || async {
        cond(&gw.json(&format!("/v1/calls/{id}")).await)
    })
    .await;
    gw.json(&format!("/v1/calls/{id}")).await
}

async fn call_with_callback(gw: &Gw, url: &str) -> String {
    let res = gw
        .post("echo")
        .header("callback-url", url)
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    json(res).await["id"].as_str().unwrap().to_owned()
}

fn retry(gw: &Gw, id: &str) -> reqwest::RequestBuilder {
    gw.http
        .post(gw.url(&format!("/v1/calls/{id}/callback/retry")))
}

fn ms(rfc3339: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

#[actix_rt::test]
async fn every_attempt_is_listed_and_a_dead_callback_is_sent_again_once_signed() {
    let receiver = Receiver::start(&[500, 500], 200, Duration::ZERO);
    let gw = gateway("cbops-retry", |s| with_callbacks(s, 2)).await;
    let id = call_with_callback(&gw, &receiver.url()).await;
    let doc = until(&gw, &id, "dead", |d| d["callback"]["state"] == "dead").await;
    let history = doc["callback"]["history"].as_array().unwrap().clone();
    assert_eq!(history.len(), 2, "{doc}");
    for (n, a) in history.iter().enumerate() {
        assert_eq!(a["attempt"], n + 1);
        assert_eq!(a["status"], 500);
        assert!(a["error"].as_str().unwrap().contains("500"), "{a}");
        assert!(a["duration_ms"].as_i64().unwrap() >= 0);
        ms(&a["at"]);
    }
    assert!(ms(&history[0]["next_attempt_at"]) >= ms(&history[0]["at"]));
    assert!(history[1].get("next_attempt_at").is_none(), "{doc}");
    assert!(doc["callback"].get("next_attempt_at").is_none());

    // Only a dead callback is sent again; a call without one has none.
    let plain = json(
        gw.post("echo")
            .header("prefer", "respond-async")
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        retry(&gw, &plain).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let res = retry(&gw, &id).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // Pending again; the dispatcher, woken by the retry, may already have
    // delivered it by the time the answer reads the call.
    let state = json(res).await["callback"]["state"].clone();
    assert!(state == "pending" || state == "delivered", "{state}");
    let doc = until(&gw, &id, "delivered", |d| {
        d["callback"]["state"] == "delivered"
    })
    .await;
    let history = doc["callback"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 3, "{doc}");
    assert_eq!(history[2]["attempt"], 3);
    assert_eq!(history[2]["status"], 200);
    assert_eq!(doc["callback"]["attempts"], 1, "a new round: {doc}");

    let got = receiver.got();
    assert_eq!(got.len(), 3, "the resent callback did not arrive once");
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    assert_eq!(got[2].headers["webhook-id"], got[0].headers["webhook-id"]);
    assert_eq!(got[2].body, got[0].body);
    wh.verify(&got[2].body, &got[2].headers)
        .expect("the resent callback's signature verifies");
    let stamp = |r: &crate::callbacks::Received| -> i64 {
        r.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(stamp(&got[2]) >= stamp(&got[0]));

    let res = retry(&gw, &id).send().await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::CONFLICT,
        "a delivered callback resent"
    );
    receiver.stop().await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_receivers_retry_after_is_honoured_within_the_backoff_cap() {
    let receiver = Receiver::start(&[429], 200, Duration::ZERO);
    receiver.retry_after("1");
    let gw = gateway("cbops-after", |s| {
        with_callbacks(s, 3);
        // The backoff alone would try again within 20 ms.
        s.callbacks.initial_backoff_ms = 10;
        s.callbacks.max_backoff_ms = 5_000;
    })
    .await;
    let id = call_with_callback(&gw, &receiver.url()).await;
    let doc = until(&gw, &id, "delivered", |d| {
        d["callback"]["state"] == "delivered"
    })
    .await;
    let history = doc["callback"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{doc}");
    assert_eq!(history[0]["status"], 429);
    let first = ms(&history[0]["at"]);
    assert!(
        ms(&history[0]["next_attempt_at"]) - first >= 1000,
        "Retry-After not honoured: {doc}"
    );
    assert!(
        ms(&history[1]["at"]) - first >= 1000,
        "asked again too soon"
    );
    receiver.stop().await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_failing_host_is_paused_by_its_circuit_shown_in_the_metrics() {
    let receiver = Receiver::start(&[], 500, Duration::ZERO);
    let gw = gateway("cbops-circuit", |s| {
        with_callbacks(s, 10);
        s.callbacks.circuit_failures = 2;
        s.callbacks.circuit_pause_ms = 60_000;
    })
    .await;
    let first = call_with_callback(&gw, &receiver.url()).await;
    until(&gw, &first, "two failures", |d| {
        d["callback"]["attempts"] == 2
    })
    .await;
    let host = receiver
        .url()
        .trim_start_matches("http://")
        .replace("/hook", "");
    let series = format!("switchboard_callback_circuit_open{{host=\"{host}\"}}");
    assert_eq!(metric(&gw, &series).await, Some(1.0));

    // Another call to the same host waits without an attempt.
    let second = call_with_callback(&gw, &receiver.url()).await;
    let doc = until(&gw, &second, "paused", |d| {
        d["callback"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("paused"))
    })
    .await;
    assert_eq!(doc["callback"]["state"], "pending");
    assert_eq!(doc["callback"]["attempts"], 0);
    assert!(doc["callback"]["history"].as_array().unwrap().is_empty());
    let due = ms(&doc["callback"]["next_attempt_at"]);
    assert!(
        due - chrono::Utc::now().timestamp_millis() > 30_000,
        "not paused for the circuit's pause: {doc}"
    );
    assert_eq!(receiver.got().len(), 2, "the paused host was called");
    assert!(
        metric(&gw, "switchboard_callback_deferred_total")
            .await
            .unwrap()
            >= 1.0
    );
    let doc = &gw.json(&format!("/v1/calls/{first}")).await;
    assert_eq!(doc["callback"]["attempts"], 2, "{doc}");
    receiver.stop().await;
    gw.cleanup().await;
}
