//! Slow and malformed HTTP from outside, over a raw socket: a body that
//! does not arrive is cut with a 408 and its connection closed, slow headers
//! are still cut, and what the gateway can shape is problem+json.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use super::{RawAnswer, problem, raw_drip, raw_exchange};
use crate::common::{Gw, gateway};

/// The body and header timeouts of these gateways, ms.
const TIMEOUT_MS: u64 = 1000;

fn addr(gw: &Gw) -> String {
    gw.base.trim_start_matches("http://").to_owned()
}

fn assert_408_problem_and_closed(what: &str, got: &RawAnswer) {
    assert_eq!(got.status(), Some(408), "{what}: {}", got.text());
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/problem+json"),
        "{what}: {}",
        got.text()
    );
    let doc: Value =
        serde_json::from_str(&got.body()).unwrap_or_else(|e| panic!("{what}: {e}: {}", got.text()));
    assert_eq!(doc["status"], 408, "{what}");
    assert!(got.closed, "{what}: the connection is still open");
}

const HEAD: &str = "POST /v1/services/echo/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n";

/// Issue 13, finding 3: headers plus one byte of a declared body held a
/// connection (and its slot) for minutes.
#[actix_rt::test]
async fn a_declared_body_that_does_not_arrive_is_cut_with_408() {
    let gw = gateway("sec-body", |s| {
        s.gateway.body_timeout_ms = TIMEOUT_MS;
    })
    .await;
    let addr = addr(&gw);
    // Far from the minutes it used to take.
    let limit = Duration::from_millis(TIMEOUT_MS + 5000);

    let started = tokio::time::Instant::now();
    let request = format!("{HEAD}Content-Length: 100\r\n\r\n{{");
    let got = raw_exchange(&addr, request.as_bytes(), limit).await;
    assert_408_problem_and_closed("one byte of 100", &got);
    assert!(started.elapsed() >= Duration::from_millis(TIMEOUT_MS));

    let request = format!("{HEAD}Transfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n");
    let got = raw_exchange(&addr, request.as_bytes(), limit).await;
    assert_408_problem_and_closed("one chunk and no end", &got);

    // A byte now and then does not keep it open: the timeout is for the
    // whole body, not between bytes.
    let request = format!("{HEAD}Content-Length: 1000\r\n\r\n");
    let byte = Some((Duration::from_millis(100), b" ".as_slice()));
    let got = raw_drip(&addr, request.as_bytes(), byte, limit).await;
    assert_408_problem_and_closed("a byte every 100 ms", &got);
    let request = format!("{HEAD}Transfer-Encoding: chunked\r\n\r\n");
    let chunk = Some((Duration::from_millis(100), b"1\r\n \r\n".as_slice()));
    let got = raw_drip(&addr, request.as_bytes(), chunk, limit).await;
    assert_408_problem_and_closed("a chunk every 100 ms", &got);

    // A route that reads no body: the body it was sent is not waited for.
    for route in [
        "GET /healthz",
        "GET /v1/calls/nope",
        "POST /v1/services/nosuch/calls",
    ] {
        let request = format!(
            "{route} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n"
        );
        let got = raw_drip(&addr, request.as_bytes(), chunk, limit).await;
        assert!(got.status().is_some(), "{route}: {}", got.text());
        assert!(
            got.closed,
            "{route}: a chunked body it does not read holds the connection"
        );
    }

    // A body that arrives in time is served.
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    gw.cleanup().await;
}

/// Slow headers stay cut (actix-web's client request timeout, set by
/// `gateway.header_timeout_ms`); that answer comes from the HTTP parser,
/// before any handler, so it has no body to shape.
#[actix_rt::test]
async fn slow_headers_are_cut() {
    let gw = gateway("sec-head", |s| {
        s.gateway.header_timeout_ms = TIMEOUT_MS;
    })
    .await;
    let limit = Duration::from_millis(TIMEOUT_MS + 5000);
    let started = tokio::time::Instant::now();
    let got = raw_exchange(
        &addr(&gw),
        b"POST /v1/services/echo/calls HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        limit,
    )
    .await;
    assert!(
        got.closed,
        "still open after {:?}: {}",
        started.elapsed(),
        got.text()
    );
    assert_eq!(got.status(), Some(408), "{}", got.text());
    // The head of a second request on a kept-alive connection, dripped:
    // actix-web times only a connection's first head; the gateway closes a
    // connection with no request in progress as long.
    let first = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /healthz HTTP/1.1\r\nX-A: ";
    let drip = Some((Duration::from_millis(100), b"b".as_slice()));
    let got = raw_drip(&addr(&gw), first.as_bytes(), drip, limit).await;
    assert_eq!(got.status(), Some(200), "{}", got.text());
    assert!(
        got.closed,
        "a dripped second head holds the connection: {}",
        got.text()
    );
    gw.cleanup().await;
}

/// What waits on purpose is not idle: an event stream, a WebSocket and a
/// long-poll outlast `gateway.header_timeout_ms`.
#[actix_rt::test]
async fn streams_and_long_polls_outlast_the_header_timeout() {
    use futures_util::StreamExt;
    let gw = gateway("sec-idle", |s| {
        s.gateway.header_timeout_ms = TIMEOUT_MS;
        s.gateway.heartbeat_s = 1;
    })
    .await;
    let outlast = Duration::from_millis(TIMEOUT_MS * 3);
    // SSE: heartbeats keep coming past the timeout.
    let res = gw.get("/v1/events").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.bytes_stream();
    let started = tokio::time::Instant::now();
    while started.elapsed() < outlast {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("the stream goes on");
        assert!(matches!(chunk, Some(Ok(_))), "the stream ended: {chunk:?}");
    }
    drop(body);
    // WebSocket: still open, and answering, past the timeout.
    let url = format!("{}/v1/events/ws", gw.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let started = tokio::time::Instant::now();
    while started.elapsed() < outlast {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("the WebSocket goes on");
        assert!(matches!(msg, Some(Ok(_))), "the WebSocket ended: {msg:?}");
    }
    let _ = ws.close(None).await;
    // A long-poll of a call that stays pending.
    let res = gw
        .post("slow")
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let doc: Value = res.json().await.unwrap();
    let id = doc["id"].as_str().unwrap();
    let wait = outlast.as_secs().max(2);
    let res = gw
        .get(&format!("/v1/calls/{id}?wait={wait}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    gw.gate.add_permits(1);
    gw.cleanup().await;
}

/// Every error the gateway can shape is problem+json, also those actix-web
/// answers by itself. What the HTTP parser refuses before any handler runs
/// (docs/SECURITY.md lists it) has no body, and its connection is closed.
#[actix_rt::test]
async fn errors_of_the_http_layer_are_problem_json() {
    let gw = gateway("sec-shape", |s| {
        s.gateway.allowed_origins = vec!["http://app.example".into()];
    })
    .await;
    // A WebSocket route without an upgrade.
    let res = gw.get("/v1/events/ws").send().await.unwrap();
    problem(res, 400).await;
    // A preflight of an allowed origin for a method or header not allowed.
    for (method, headers) in [("PUT", "content-type"), ("POST", "x-not-honoured")] {
        let res = gw
            .http
            .request(reqwest::Method::OPTIONS, gw.url("/v1/services/echo/calls"))
            .header("origin", "http://app.example")
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
            .await
            .unwrap();
        problem(res, 400).await;
    }
    // An unknown route, a known route with another method.
    let res = gw.get("/v2/nothing").send().await.unwrap();
    problem(res, 404).await;
    let res = gw
        .http
        .delete(gw.url("/v1/services/echo/calls"))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    assert!(matches!(status, 404 | 405), "{status}");
    problem(res, status).await;
    // A service's own error reply passes through as the service made it.
    let res = gw.post("fail").body("{}").send().await.unwrap();
    problem(res, 422).await;

    // The HTTP parser's own refusals: no body, connection closed at once.
    let addr = addr(&gw);
    let limit = Duration::from_secs(5);
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a control character in a header",
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x01b\r\n\r\n".to_vec(),
            400,
        ),
        (
            "Content-Length beside Transfer-Encoding",
            format!("{HEAD}Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{{}}")
                .into_bytes(),
            400,
        ),
        (
            "over 96 headers",
            format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n{many}\r\n").into_bytes(),
            431,
        ),
    ];
    for (what, request, status) in cases {
        let got = raw_exchange(&addr, &request, limit).await;
        assert_eq!(got.status(), Some(status), "{what}: {}", got.text());
        assert!(got.closed, "{what}: still open");
    }
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    gw.cleanup().await;
}
