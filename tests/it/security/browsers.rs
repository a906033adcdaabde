//! What a web page can make a browser do to the gateway: a WebSocket
//! upgrade or a POST carrying a foreign `Origin` is refused, CORS answers
//! only the allowed origins, requests without `Origin` (servers, curl) are
//! unaffected, and an anonymous gateway answers only loopback host names
//! (a page that rebinds its own name to 127.0.0.1 is refused).

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::StatusCode;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use super::{problem, raw_exchange, two_callers};
use crate::common::{Gw, gateway};

const EVIL: &str = "http://evil.example";
const APP: &str = "http://app.example";

fn ws_url(gw: &Gw) -> String {
    format!("{}/v1/events/ws", gw.base.replace("http://", "ws://"))
}

/// Opens a WebSocket to the event stream with `origin`; the HTTP status of
/// the answer (101 when upgraded) and its body.
async fn ws_open(gw: &Gw, origin: Option<&str>) -> (u16, String) {
    let mut req = ws_url(gw).into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((mut ws, res)) => {
            let _ = ws.close(None).await;
            (res.status().as_u16(), String::new())
        }
        Err(tungstenite::Error::Http(res)) => {
            let ct = res
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert_eq!(ct, "application/problem+json");
            let body =
                String::from_utf8_lossy(res.body().as_deref().unwrap_or_default()).into_owned();
            (res.status().as_u16(), body)
        }
        Err(e) => panic!("WebSocket to {origin:?}: {e}"),
    }
}

/// Issue 13, finding 4: on the loopback-only anonymous default, a page of
/// any site could open the event stream (and read the victim's results).
#[actix_rt::test]
async fn a_websocket_upgrade_from_a_foreign_origin_is_403() {
    let gw = gateway("sec-ws", |_| {}).await;
    let (status, body) = ws_open(&gw, Some(EVIL)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"status\":403"), "{body}");
    let (status, _) = ws_open(&gw, Some("null")).await;
    assert_eq!(status, 403, "a sandboxed page sends Origin: null");
    // Without Origin: not a browser, upgraded as before.
    let (status, _) = ws_open(&gw, None).await;
    assert_eq!(status, 101);
    gw.cleanup().await;
}

/// Issue 13, finding 4: a cross-origin `text/plain` POST (a "simple"
/// request, sent without a preflight) started a call.
#[actix_rt::test]
async fn a_cross_origin_text_plain_post_is_403() {
    let gw = gateway("sec-post", |_| {}).await;
    let res = gw
        .post("count")
        .header("origin", EVIL)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let doc = problem(res, 403).await;
    assert!(doc["detail"].as_str().unwrap().contains("Origin"), "{doc}");
    assert!(res_has_no_cors(&gw, EVIL).await);
    assert_eq!(gw.counted.load(Ordering::SeqCst), 0, "nothing ran");
    // The same POST without Origin (curl, a server) is served.
    let res = gw
        .post("count")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // No origin is allowed: no CORS header on any answer.
    assert!(
        !res.headers()
            .keys()
            .any(|k| k.as_str().starts_with("access-control-")),
        "{res:?}"
    );
    assert_eq!(gw.counted.load(Ordering::SeqCst), 1);
    gw.cleanup().await;
}

/// Header `name` of `res` in lower case, empty when absent.
fn lower_header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// A GET from a foreign origin is answered (it changes nothing) without
/// CORS headers, so the browser does not let the page read it.
async fn res_has_no_cors(gw: &Gw, origin: &str) -> bool {
    let res = gw
        .get("/healthz")
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    res.status() == StatusCode::OK && res.headers().get("access-control-allow-origin").is_none()
}

#[actix_rt::test]
async fn an_allowed_origin_gets_cors_headers_and_its_preflight() {
    let gw = gateway("sec-cors", |s| {
        two_callers(s);
        s.gateway.allowed_origins = vec![APP.into()];
    })
    .await;
    let preflight = |origin: &'static str| {
        gw.http
            .request(reqwest::Method::OPTIONS, gw.url("/v1/services/echo/calls"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, prefer, idempotency-key",
            )
            .send()
    };
    let res = preflight(APP).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let h = |name: &str| lower_header(&res, name);
    assert_eq!(h("access-control-allow-origin"), APP);
    assert!(
        h("access-control-allow-methods").contains("post"),
        "{res:?}"
    );
    assert!(
        h("access-control-allow-headers").contains("idempotency-key"),
        "{res:?}"
    );
    assert!(
        h("access-control-allow-credentials").is_empty(),
        "no cookies are used"
    );
    // Another origin's preflight is refused.
    problem(preflight(EVIL).await.unwrap(), 403).await;

    // The call itself: answered, with the headers the page may read.
    let res = gw
        .post("echo")
        .bearer_auth(super::ALICE)
        .header("origin", APP)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let h = |name: &str| lower_header(&res, name);
    assert_eq!(h("access-control-allow-origin"), APP);
    assert!(
        h("access-control-expose-headers").contains("call-id"),
        "{res:?}"
    );
    assert!(h("vary").contains("origin"), "{res:?}");
    // Its WebSocket upgrade too (a bearer token still required).
    let mut req = ws_url(&gw).into_client_request().unwrap();
    req.headers_mut().insert("origin", APP.parse().unwrap());
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", super::ALICE).parse().unwrap(),
    );
    let (mut ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(res.status().as_u16(), 101);
    let _ = ws.close(None).await;
    // Other origins still get 403.
    let res = gw
        .post("echo")
        .bearer_auth(super::ALICE)
        .header("origin", EVIL)
        .body("{}")
        .send()
        .await
        .unwrap();
    problem(res, 403).await;
    gw.cleanup().await;
}

/// A page whose own name is rebound to 127.0.0.1 makes same-origin
/// requests: its GETs carry no `Origin`, but they name its host. An
/// anonymous gateway (loopback only) answers loopback names only.
#[actix_rt::test]
async fn an_anonymous_gateway_answers_only_loopback_host_names() {
    let gw = gateway("sec-host", |_| {}).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let port = addr.rsplit(':').next().unwrap().to_owned();
    let get = |host: String| {
        let addr = addr.clone();
        async move {
            let req =
                format!("GET /v1/events HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            raw_exchange(&addr, req.as_bytes(), Duration::from_secs(2)).await
        }
    };
    for host in [
        format!("evil.example:{port}"),
        "evil.example".into(),
        format!("127.0.0.1.nip.io:{port}"),
    ] {
        let got = get(host.clone()).await;
        assert_eq!(got.status(), Some(403), "{host}: {}", got.text());
        assert_eq!(
            got.header("content-type").as_deref(),
            Some("application/problem+json")
        );
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "localhost".into(),
        format!("[::1]:{port}"),
    ] {
        let got = get(host.clone()).await;
        assert_eq!(got.status(), Some(200), "{host}: {}", got.text());
    }
    gw.cleanup().await;

    // With tokens the gateway may face a network under any name.
    let gw = gateway("sec-host-tokens", two_callers).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let req = "GET /healthz HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n";
    let got = raw_exchange(&addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(got.status(), Some(200), "{}", got.text());
    gw.cleanup().await;
}
