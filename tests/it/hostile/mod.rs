//! Hostile input against the running gateway, over a real socket and the
//! real broker: a few hundred seeded random requests with garbage headers,
//! bodies, paths and queries, and a foreign AMQP peer publishing malformed
//! replies and requests. DESIGN.md: "Nothing that a client sends can crash
//! the process or lose another caller's data". So every request gets a
//! well-formed answer (2xx, or problem+json with a 4xx or a 503; never a
//! 500; a dropped connection only for a body over the limit), and afterwards
//! a normal call works and another caller's call is intact.
//!
//! # Layout
//! - [`http`]: hostile HTTP clients: random requests, headers, bodies, long-polls.
//! - [`peers`]: foreign AMQP peers (lapin) publishing malformed replies and requests.
//! - [`frames`]: raw AMQP frames no well-behaved client library would send
//!   (short strings that are not UTF-8), written over a plain socket.

mod frames;
mod http;
mod peers;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use deadpool_lapin::lapin::{
    BasicProperties,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable, LongString},
};
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use switchboard::settings::{Settings, TokenSettings};

use crate::common::{Foreign, Gw, eventually, foreign_client, gateway, poll_until};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";
/// The payload limit of these gateways.
const LIMIT: usize = 4096;
/// The seed of the hostile requests: the same run every time.
const SEED: u64 = 0x5eed_0005;
/// How many hostile requests one run sends.
const REQUESTS: usize = 300;

fn hostile_settings(s: &mut Settings) {
    let mut t = BTreeMap::new();
    t.insert(
        "alice".to_string(),
        TokenSettings::bearer(ALICE, &["echo", "fail", "count"]),
    );
    t.insert("bob".to_string(), TokenSettings::bearer(BOB, &["*"]));
    s.gateway.tokens = t;
    s.gateway.payload_limit_bytes = LIMIT;
    s.gateway.default_wait_s = 2;
    s.gateway.max_wait_s = 2;
    // Callbacks on, private targets refused: every Callback-Url sent below
    // is refused before any name is resolved or any address is called.
    s.callbacks.secret = crate::callbacks::SECRET.into();
    s.callbacks.allow_private = false;
}

/// A normal call still gets its synchronous answer.
async fn still_serving(gw: &Gw) {
    let res = gw
        .post("echo")
        .bearer_auth(ALICE)
        .body(r#"{"still":"serving"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.unwrap(), r#"{"still":"serving"}"#);
}

/// The status document of `id` as `token` sees it.
async fn document(gw: &Gw, token: &str, id: &str) -> (StatusCode, Value) {
    let res = gw
        .get(&format!("/v1/calls/{id}?wait=2"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status();
    (status, res.json().await.unwrap())
}

/// Publishes a reply to the gateway's reply queue as a foreign peer would.
async fn publish_reply(
    ch: &deadpool_lapin::lapin::Channel,
    queue: &str,
    correlation_id: Option<&str>,
    status: Option<AMQPValue>,
    content_type: &str,
    body: &[u8],
) {
    let mut headers = FieldTable::default();
    if let Some(s) = status {
        headers.insert("x-status".into(), s);
    }
    let mut props = BasicProperties::default()
        .with_content_type(content_type.into())
        .with_headers(headers);
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.into());
    }
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// A call to `slow` accepted with a 202 (it waits on the gate, so only a
/// foreign reply ends it).
async fn pending_call(gw: &Gw) -> String {
    accepted_call(gw, "slow").await
}

/// A call to `service` accepted with a 202; its id.
async fn accepted_call(gw: &Gw, service: &str) -> String {
    let res = gw
        .post(service)
        .bearer_auth(BOB)
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let doc: Value = res.json().await.unwrap();
    doc["id"].as_str().unwrap().to_owned()
}

/// Waits until the call is no longer pending and returns its document.
async fn ended(gw: &Gw, id: &str) -> Value {
    poll_until(Duration::from_secs(20), "the call ended", || async {
        let (status, doc) = document(gw, BOB, id).await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        if doc["status"] != "pending" {
            Ok(doc)
        } else {
            Err(doc)
        }
    })
    .await
}

fn random_bytes(rng: &mut StdRng, max_len: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max_len);
    (0..n).map(|_| rng.random()).collect()
}
