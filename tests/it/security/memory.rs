//! Memory is bounded in bytes, not only in counts (issue 13, finding 2): a
//! completed event no longer carries a large result (it links to
//! `/result`), and the event history and the finished-call cache each have
//! a byte budget that evicts the oldest, whatever their counts allow.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use switchboard::events::{self, CloudEvent};

use crate::common::gateway;
use crate::gateway::Sse;

/// The first bytes of an SSE answer, up to the end of its first frame.
async fn first_frame(res: reqwest::Response) -> String {
    let mut stream = res.bytes_stream();
    let mut buf = Vec::new();
    while !buf.windows(2).any(|w| w == b"\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("an SSE frame within 20 s")
            .expect("the stream goes on")
            .unwrap();
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).unwrap()
}

#[actix_rt::test]
async fn a_result_over_the_inline_bound_is_linked_from_its_event_not_carried() {
    let gw = gateway("sec-mem-inline", |s| {
        s.gateway.inline_result_max_bytes = 1024;
    })
    .await;
    let events = gw
        .get("/v1/events?type=switchboard.call.completed")
        .send()
        .await
        .unwrap();
    let mut sse = Sse::new(events);
    // Control characters: six bytes each once JSON-escaped.
    let large = "\u{1}".repeat(4096);
    let small = "x".repeat(100);
    let mut ids = Vec::new();
    for text in [&large, &small] {
        let res = gw
            .post("echo")
            .header("content-type", "text/plain")
            .header("prefer", "respond-async")
            .body(text.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        ids.push(res.headers()["call-id"].to_str().unwrap().to_owned());
    }
    // The two calls end in either order: their events, by call id.
    let mut ended = std::collections::HashMap::new();
    for _ in 0..2 {
        let event = sse.next().await.unwrap().data.unwrap();
        let subject = event["subject"].as_str().unwrap().to_owned();
        ended.insert(subject, event);
    }
    for (id, text) in ids.iter().zip([&large, &small]) {
        let event = ended.remove(id).expect("a completed event for each call");
        let doc = &event["data"];
        assert_eq!(doc["status"], "succeeded");
        let url = doc["result_url"].as_str().unwrap();
        assert_eq!(url, format!("/v1/calls/{id}/result"));
        if text.len() > 1024 {
            assert!(doc.get("result").is_none(), "{doc}");
            assert_eq!(doc["result_omitted"], true);
            assert!(event.to_string().len() < 2048, "the event stays small");
        } else {
            assert_eq!(doc["result"]["body"], text.as_str());
            assert!(doc.get("result_omitted").is_none(), "{doc}");
        }
        // The link gives the whole result, as a synchronous answer would.
        let res = gw.get(url).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(&res.text().await.unwrap(), text);
    }
    // The stream of the finished call shows its end the same way.
    let res = gw
        .get(&format!("/v1/calls/{}/events", ids[0]))
        .send()
        .await
        .unwrap();
    let mut call = Sse::new(res);
    let end = call.next().await.unwrap().data.unwrap();
    assert_eq!(end["data"]["result_omitted"], true);
    assert!(end["data"].get("result").is_none());
    // The status document itself still has the result.
    let doc: Value = gw
        .get(&format!("/v1/calls/{}", ids[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["result"]["body"], large.as_str());
    gw.cleanup().await;
}

#[actix_rt::test]
async fn the_event_history_evicts_by_bytes_before_its_count() {
    // Room for two 3,000-byte events, not three; the count would keep
    // 10,000.
    let gw = gateway("sec-mem-history", |s| {
        s.gateway.event_history = 10_000;
        s.gateway.event_history_bytes = 8 * 1024;
    })
    .await;
    let open = |last: Option<&str>| {
        let mut r = gw.get("/v1/events?type=mem.");
        if let Some(l) = last {
            r = r.header("last-event-id", l);
        }
        r.send()
    };
    let mut live = Sse::new(open(None).await.unwrap());
    let filler = "y".repeat(3000);
    let mut ids = Vec::new();
    for n in 0..4 {
        let e = CloudEvent::new(
            "mem.big",
            "test",
            serde_json::json!({ "n": n, "pad": filler }),
        );
        events::publish(&gw.ctx.broker, &e).await.unwrap();
        let f = live.next().await.unwrap();
        assert_eq!(f.data.unwrap()["data"]["n"], n);
        ids.push(f.id.unwrap());
    }
    let stats = gw.gateway.as_ref().unwrap().hub().stats.clone();
    let log_readers = || stats.log_readers.load(std::sync::atomic::Ordering::Relaxed);
    // After the second-newest: the newest is replayed from the history.
    let recent = first_frame(open(Some(&ids[2])).await.unwrap()).await;
    assert!(recent.starts_with(&format!("id: {}\n", ids[3])), "{recent}");
    assert_eq!(log_readers(), 0, "served from the history");
    // After the oldest: the event after it was evicted for its bytes, so
    // the events log serves it (no gap: the log keeps every event).
    let old = first_frame(open(Some(&ids[0])).await.unwrap()).await;
    assert!(old.starts_with(&format!("id: {}\n", ids[1])), "{old}");
    assert_eq!(log_readers(), 1, "served from the log");
    gw.cleanup().await;
}

#[actix_rt::test]
async fn the_finished_call_cache_evicts_by_bytes_before_its_count() {
    // Each document is a little over 10,000 bytes: room for three, not
    // four; the count would keep 16,384.
    let gw = gateway("sec-mem-finished", |s| {
        s.gateway.finished_cache_entries = 16_384;
        s.gateway.finished_cache_bytes = 35_000;
    })
    .await;
    let state = gw.gateway.as_ref().unwrap();
    let body = format!("\"{}\"", "z".repeat(10_000));
    let mut ids = Vec::new();
    for _ in 0..4 {
        let res = gw
            .post("echo")
            .header("prefer", "respond-async")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        let id = res.headers()["call-id"].to_str().unwrap().to_owned();
        // Ended one after the other, so they are cached in this order.
        let doc: Value = gw
            .get(&format!("/v1/calls/{id}?wait=30"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(doc["status"], "succeeded");
        ids.push(id);
    }
    // The store forgets them all: what is still answered comes from memory.
    for id in &ids {
        state.store().delete(id).await.unwrap();
    }
    let status = |id: &str| {
        let url = gw.url(&format!("/v1/calls/{id}"));
        let http = gw.http.clone();
        async move { http.get(url).send().await.unwrap().status() }
    };
    assert_eq!(
        status(&ids[0]).await,
        StatusCode::NOT_FOUND,
        "the oldest was evicted for its bytes"
    );
    for id in &ids[1..] {
        assert_eq!(status(id).await, StatusCode::OK, "kept in memory");
    }
    gw.cleanup().await;
}
