//! Hostile HTTP clients: seeded random requests with garbage headers,
//! bodies, paths and queries; header and body edge cases; long-polls of
//! calls that do not exist.

use super::*;

/// Bytes a header value may carry (no CR, LF, NUL or other control but
/// tab), with obs-text (0x80 and above) and the separators parsers care
/// about.
fn header_bytes(rng: &mut StdRng, max_len: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max_len);
    (0..n)
        .map(|_| match rng.random_range(0..10) {
            0..=5 => rng.random_range(0x20..=0x7e),
            6 => b'\t',
            7 => rng.random_range(0x80..=0xff),
            _ => *b"\",;=\\-".choose(rng).unwrap_or(&b'x'),
        })
        .collect()
}

fn header(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).expect("only bytes a header value may carry")
}

/// Every byte percent-encoded but the unreserved ones: any bytes as one
/// path segment or query value.
fn pct(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (*b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn pick<'a>(rng: &mut StdRng, options: &[&'a [u8]]) -> &'a [u8] {
    options.choose(rng).copied().unwrap_or_default()
}

fn prefer(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..8) {
        0 => header_bytes(rng, 120),
        1 => format!("wait={}", "9".repeat(rng.random_range(0..2000))).into_bytes(),
        2 | 3 => pick(
            rng,
            &[
                b"respond-async",
                b"RESPOND-ASYNC; x=y",
                b"wait=0, respond-async",
                b"respond-async, x=\"\xe9\"",
            ],
        )
        .to_vec(),
        _ => pick(
            rng,
            &[
                b"wait=1",
                b"wait=0",
                b"wait=99999999999",
                b"wait=4294967296",
                b"wait=-1",
                b"wait=1.5",
                "wait=\u{663}".as_bytes(),
                b"respond-async",
                b"respond-async, wait=1",
                br#"x="\",wait=1""#,
                b"wait=\xff",
                b"respond-async, x=\"\xe9\"",
                b"wait",
                b"wait=",
                b"handling=lenient; foo",
                b",,,;;;===",
                b"wait=\"1\"",
            ],
        )
        .to_vec(),
    }
}

fn content_type(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..10) {
        0 => header_bytes(rng, 80),
        1 => format!("application/{}", "a".repeat(rng.random_range(230..300))).into_bytes(),
        _ => pick(
            rng,
            &[
                b"application/json",
                b"application/json; charset=utf-8",
                b"text/plain",
                b"application/octet-stream",
                b"application/x-never-heard-of-it",
                b"application/vnd.weird+json",
                b"",
                b"json",
                b";;;",
                b"application/json; charset=\xff",
            ],
        )
        .to_vec(),
    }
}

fn idempotency_key(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => header_bytes(rng, 300),
        1 => "k".repeat(rng.random_range(250..260)).into_bytes(),
        _ => pick(rng, &[b"k1", b"k2", b"k3", b"with space", b"\xe9t\xe9"]).to_vec(),
    }
}

/// Callback URLs that are all refused before any name is resolved: bad
/// syntax or scheme, user info, too long, non-ASCII, or a literal or local
/// address.
fn callback_url(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..5) {
        // A scheme of its own: never http(s), so never resolved.
        0 => [b"x".as_slice(), &header_bytes(rng, 200)].concat(),
        1 => format!(
            "http://127.0.0.1/{}",
            "\"".repeat(rng.random_range(600..1000))
        )
        .into_bytes(),
        2 => format!("https://{}.example/", "a".repeat(3000)).into_bytes(),
        _ => pick(
            rng,
            &[
                b"http://127.0.0.1:1/hook",
                b"http://[::1]/",
                b"http://169.254.169.254/latest/meta-data/",
                b"http://10.0.0.1/",
                b"http://0x7f000001/",
                b"http://2130706433/",
                b"http://[::ffff:127.0.0.1]/",
                b"http://[64:ff9b::a9fe:a9fe]/",
                b"http://localhost/",
                b"http://user:pw@example.com/",
                b"ftp://example.com/",
                b"javascript:alert(1)",
                b"",
                b"http://",
                b"/relative",
                b"http://\xe9xample.com/",
            ],
        )
        .to_vec(),
    }
}

fn authorization(rng: &mut StdRng) -> Option<Vec<u8>> {
    if rng.random_bool(0.85) {
        return Some(format!("Bearer {ALICE}").into_bytes());
    }
    Some(match rng.random_range(0..4) {
        0 => header_bytes(rng, 100),
        1 => [b"Bearer ".as_slice(), &header_bytes(rng, 60)].concat(),
        2 => return None,
        _ => pick(
            rng,
            &[
                b"Basic YWxpY2U6",
                b"Bearer bob-token-0123456789ab\xff",
                b"bearer",
                b"Bearer  alice-token-0123456789x",
                b"Bearer\talice-token-0123456789",
            ],
        )
        .to_vec(),
    })
}

/// Garbage of up to `max_len` bytes one time in three, else one of `options`.
fn garbage_or(rng: &mut StdRng, max_len: usize, options: &[&[u8]]) -> Vec<u8> {
    if rng.random_range(0..3) == 0 {
        header_bytes(rng, max_len)
    } else {
        pick(rng, options).to_vec()
    }
}

/// Origins of web pages (this gateway allows none): a POST with one is 403.
fn origin(rng: &mut StdRng) -> Vec<u8> {
    garbage_or(
        rng,
        60,
        &[
            b"http://evil.example",
            b"null",
            b"https://app.example:8443",
            b"http://127.0.0.1",
        ],
    )
}

fn traceparent(rng: &mut StdRng) -> Vec<u8> {
    garbage_or(
        rng,
        80,
        &[
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-00000000000000000000000000000000-0000000000000000-00",
            b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"a-b-c-d",
        ],
    )
}

fn last_event_id(rng: &mut StdRng) -> Vec<u8> {
    garbage_or(
        rng,
        200,
        &[
            b"0123456789abcdef-5",
            b"-",
            b"--",
            b"x-18446744073709551616",
            b"\xff\xfe",
            b"",
        ],
    )
}

/// A call id: garbage of any length, another caller's, one of alice's own.
fn call_id(rng: &mut StdRng, known: &[String]) -> String {
    match rng.random_range(0..6) {
        0 => pct(&random_bytes(rng, 3000)),
        1 => pct(&header_bytes(rng, 100)),
        2 => uuid::Uuid::now_v7().to_string(),
        3 => pick(rng, &[b"..", b"%2F", b"%00", b"nope", b"%"])
            .iter()
            .map(|b| *b as char)
            .collect(),
        _ => known.choose(rng).cloned().unwrap_or_default(),
    }
}

fn wait_query(rng: &mut StdRng) -> String {
    match rng.random_range(0..3) {
        0 => pct(&random_bytes(rng, 30)),
        _ => pick(
            rng,
            &[
                b"1",
                b"0",
                b"2",
                b"99999999999999999999",
                b"-1",
                b"1e9",
                b"%ff",
                b"",
                b"%D9%A3",
                b"1&wait=2",
                b"00000000001",
                b"4294967296",
            ],
        )
        .iter()
        .map(|b| *b as char)
        .collect(),
    }
}

/// One hostile request and what a well-formed answer to it may be.
struct Hostile {
    what: String,
    method: Method,
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Option<Body>,
    /// A synchronous echo answer must carry back exactly this (content
    /// type as the gateway took it, body).
    echo: Option<(String, Vec<u8>)>,
}

enum Body {
    Bytes(Vec<u8>),
    /// Sent chunked, without a Content-Length.
    Chunked(Vec<u8>),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Bytes(b) | Body::Chunked(b) => b.len(),
        }
    }
}

fn body(rng: &mut StdRng) -> Body {
    let bytes = match rng.random_range(0..8) {
        0 => Vec::new(),
        1 => br#"{"order": 42, "note": "caf\u00e9"}"#.to_vec(),
        2 => vec![b'{', 0xff, 0xfe, b'}'],
        3 => vec![b'x'; LIMIT],
        4 => vec![b'y'; LIMIT + rng.random_range(1..3 * LIMIT)],
        _ => random_bytes(rng, 2000),
    };
    if rng.random_bool(0.2) {
        Body::Chunked(bytes)
    } else {
        Body::Bytes(bytes)
    }
}

fn hostile(rng: &mut StdRng, known: &[String]) -> Hostile {
    let mut headers = Vec::new();
    if let Some(a) = authorization(rng) {
        headers.push(("authorization", a));
    }
    let kind = rng.random_range(0..100);
    if kind < 55 {
        let service = match rng.random_range(0..10) {
            0 => "fail".to_owned(),
            1 => "count".to_owned(),
            2 => pct(&random_bytes(rng, 2000)),
            3 => "slow".to_owned(),
            _ => "echo".to_owned(),
        };
        let mut ct = None;
        for (name, p, make) in [
            ("prefer", 0.4, prefer as fn(&mut StdRng) -> Vec<u8>),
            ("content-type", 0.7, content_type),
            ("idempotency-key", 0.25, idempotency_key),
            ("callback-url", 0.15, callback_url),
            ("traceparent", 0.2, traceparent),
            ("last-event-id", 0.05, last_event_id),
            ("origin", 0.05, origin),
        ] {
            if rng.random_bool(p) {
                let v = make(rng);
                if name == "content-type" {
                    ct = Some(v.clone());
                }
                headers.push((name, v));
            }
        }
        // A second Prefer now and then: every value counts.
        if rng.random_bool(0.1) {
            headers.push(("prefer", prefer(rng)));
        }
        let body = body(rng);
        let echo = (service == "echo").then(|| {
            let ct = ct
                .as_deref()
                .and_then(|c| std::str::from_utf8(c).ok())
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .unwrap_or("application/json")
                .to_owned();
            let sent = match &body {
                Body::Bytes(b) | Body::Chunked(b) => b.clone(),
            };
            (ct, sent)
        });
        let path = format!("/v1/services/{service}/calls");
        return Hostile {
            what: format!("POST {}", &path[..path.len().min(80)]),
            method: Method::POST,
            path,
            headers,
            body: Some(body),
            echo,
        };
    }
    let (method, path) = match kind {
        55..=69 => (
            Method::GET,
            format!("/v1/calls/{}?wait={}", call_id(rng, known), wait_query(rng)),
        ),
        70..=77 => (
            Method::GET,
            format!("/v1/calls/{}/result", call_id(rng, known)),
        ),
        78..=83 => (
            Method::GET,
            format!("/v1/calls/{}/events", call_id(rng, known)),
        ),
        84..=93 => {
            if rng.random_bool(0.7) {
                headers.push(("last-event-id", last_event_id(rng)));
            }
            (
                Method::GET,
                format!(
                    "/v1/events?type={}&last_event_id={}",
                    pct(&header_bytes(rng, 40)),
                    pct(&header_bytes(rng, 200))
                ),
            )
        }
        _ => {
            let method = [Method::PUT, Method::DELETE, Method::PATCH, Method::GET]
                .choose(rng)
                .cloned()
                .unwrap_or(Method::GET);
            let path = match rng.random_range(0..4) {
                0 => format!("/v1/calls/{}", call_id(rng, known)),
                1 => "/v1/services/echo/calls".to_owned(),
                2 => format!("/{}", pct(&random_bytes(rng, 3000))),
                _ => format!("/v1/services/{}", pct(&header_bytes(rng, 50))),
            };
            (method, path)
        }
    };
    Hostile {
        what: format!("{method} {}", &path[..path.len().min(80)]),
        method,
        path,
        headers,
        body: None,
        echo: None,
    }
}

/// Sends `h` and checks that the answer is well formed; returns its status
/// (0: the connection was closed) and the call id of a 202.
async fn send_and_check(gw: &Gw, i: usize, h: Hostile) -> (u16, Option<String>) {
    let mut req = gw.http.request(h.method.clone(), gw.url(&h.path));
    for (name, v) in &h.headers {
        req = req.header(*name, header(v));
    }
    let over_limit = h.body.as_ref().is_some_and(|b| b.len() > LIMIT);
    req = match h.body {
        None => req,
        Some(Body::Bytes(b)) => req.body(b),
        Some(Body::Chunked(b)) => {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                b.chunks(700).map(|c| Ok(c.to_vec())).collect();
            req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
        }
    };
    let shown: Vec<String> = h
        .headers
        .iter()
        .map(|(n, v)| {
            let v = String::from_utf8_lossy(v);
            format!("{n}: {:?}", v.chars().take(60).collect::<String>())
        })
        .collect();
    let ctx = format!("request #{i} (seed {SEED:#x}) {} {shown:?}", h.what);
    let res = match tokio::time::timeout(Duration::from_secs(20), req.send()).await {
        Err(_) => panic!("{ctx}: no answer within 20 s"),
        Ok(Err(e)) => {
            assert!(over_limit, "{ctx}: connection failed: {e}");
            return (0, None);
        }
        Ok(Ok(res)) => res,
    };
    let status = res.status();
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{ctx}");
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        assert!(over_limit, "{ctx}: 413 for a body within the limit");
    }
    if status.is_client_error() || status.is_server_error() {
        assert!(
            status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "{ctx}: {status}"
        );
        assert_eq!(
            ct.as_deref(),
            Some("application/problem+json"),
            "{ctx}: {status}"
        );
        let doc: Value = match res.json().await {
            Ok(d) => d,
            Err(e) if over_limit => {
                // The connection may close under a 413's body.
                assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{ctx}: {e}");
                return (status.as_u16(), None);
            }
            Err(e) => panic!("{ctx}: {status} with a body that is not JSON: {e}"),
        };
        assert_eq!(doc["status"], status.as_u16(), "{ctx}: {doc}");
        assert!(doc["title"].is_string(), "{ctx}: {doc}");
        return (status.as_u16(), None);
    }
    assert!(status.is_success(), "{ctx}: {status}");
    if ct.as_deref() == Some("text/event-stream") {
        // A stream: its head is enough; dropping it closes the session.
        return (status.as_u16(), None);
    }
    if status == StatusCode::ACCEPTED {
        assert!(res.headers().contains_key("location"), "{ctx}");
        let doc: Value = res.json().await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        return (status.as_u16(), doc["id"].as_str().map(str::to_owned));
    }
    if let Some((sent_ct, sent)) = h.echo {
        // The service's own answer, passed through untouched.
        assert_eq!(ct.as_deref(), Some(sent_ct.as_str()), "{ctx}");
        let got = res.bytes().await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(&got[..], &sent[..], "{ctx}: the echo came back changed");
        return (status.as_u16(), None);
    }
    let _ = res.bytes().await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
    (status.as_u16(), None)
}

#[actix_rt::test]
async fn hostile_requests_get_well_formed_answers_and_harm_no_one() {
    let gw = gateway("hostile-http", hostile_settings).await;

    // Bob's calls before the storm: one finished, one with an idempotency
    // key that alice's random requests use too (keys are per caller).
    let res = gw
        .post("count")
        .bearer_auth(BOB)
        .header("prefer", "respond-async")
        .header("content-type", "application/octet-stream")
        .body(vec![0xff, 0x00, 0xfe])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let bobs: Value = res.json().await.unwrap();
    let bobs_id = bobs["id"].as_str().unwrap().to_owned();
    let (_, before) = document(&gw, BOB, &bobs_id).await;
    assert_eq!(before["status"], "succeeded", "{before}");
    let res = gw
        .post("echo")
        .bearer_auth(BOB)
        .header("idempotency-key", "k1")
        .body(r#"{"bob":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let bobs_keyed = res.headers()["call-id"].to_str().unwrap().to_owned();

    let mut rng = StdRng::seed_from_u64(SEED);
    let mut known = vec![bobs_id.clone(), bobs_keyed.clone()];
    let mut seen = BTreeMap::<u16, usize>::new();
    for i in 0..REQUESTS {
        let h = hostile(&mut rng, &known);
        let (status, id) = send_and_check(&gw, i, h).await;
        *seen.entry(status).or_default() += 1;
        known.extend(id);
    }
    // The storm reached every kind of answer, not only the first refusal.
    for status in [200, 202, 400, 401, 403, 404, 413, 422] {
        assert!(seen.contains_key(&status), "no {status} among {seen:?}");
    }

    still_serving(&gw).await;
    // Bob's calls are intact, and his key still names his call.
    let (status, after) = document(&gw, BOB, &bobs_id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after, before);
    let res = gw
        .get(&format!("/v1/calls/{bobs_id}/result"))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(&res.bytes().await.unwrap()[..], &[0xff, 0x00, 0xfe]);
    let res = gw
        .post("echo")
        .bearer_auth(BOB)
        .header("idempotency-key", "k1")
        .body(r#"{"bob":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["call-id"], bobs_keyed.as_str());
    assert_eq!(res.text().await.unwrap(), r#"{"bob":1}"#);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn headers_the_gateway_cannot_pass_on_are_refused_and_preferences_survive_obs_text() {
    let gw = gateway("hostile-headers", hostile_settings).await;
    // A content type longer than an AMQP short string (255 bytes) cannot be
    // published: 400, and the connection it would have broken still works.
    for n in [256, 300, 4000] {
        let res = gw
            .post("echo")
            .bearer_auth(ALICE)
            .header("content-type", format!("application/{}", "a".repeat(n)))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{n}");
    }
    let longest = format!("application/{}", "a".repeat(255 - "application/".len()));
    let res = gw
        .post("echo")
        .bearer_auth(ALICE)
        .header("content-type", longest.as_str())
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], longest.as_str());
    // The library refuses them too, rather than panic inside lapin.
    let rpc = gw.gateway.as_ref().unwrap().rpc();
    let long = switchboard::rpc::Call::new("echo", &b"{}"[..]).content_type("a".repeat(256));
    assert!(matches!(
        rpc.call(long).await,
        Err(switchboard::Error::TooLong { .. })
    ));
    let long = switchboard::rpc::Call::new("echo", &b"{}"[..]).message_id("k".repeat(256));
    assert!(matches!(
        rpc.call(long).await,
        Err(switchboard::Error::TooLong { .. })
    ));
    // An unknown preference with obs-text does not hide respond-async.
    let res = gw
        .post("echo")
        .bearer_auth(ALICE)
        .header("prefer", header(b"respond-async, x=\"caf\xe9\""))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // A wait that is not a number is a 400, whatever bytes it has.
    let res = gw
        .post("echo")
        .bearer_auth(ALICE)
        .header("prefer", header(b"wait=\xff"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    still_serving(&gw).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn bodies_up_to_the_limit_pass_and_over_it_are_413_chunked_or_not() {
    let gw = gateway("hostile-bodies", hostile_settings).await;
    let chunked = |b: Vec<u8>| {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            b.chunks(1000).map(|c| Ok(c.to_vec())).collect();
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
    };
    for (size, is_chunked) in [
        (LIMIT, false),
        (LIMIT, true),
        (LIMIT + 1, false),
        (LIMIT + 1, true),
        (LIMIT * 50, true),
    ] {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let req = gw
            .post("echo")
            .bearer_auth(ALICE)
            .header("content-type", "application/json");
        let req = if is_chunked {
            req.body(chunked(body.clone()))
        } else {
            req.body(body.clone())
        };
        let what = format!("{size} bytes, chunked: {is_chunked}");
        match req.send().await {
            Ok(res) if size <= LIMIT => {
                assert_eq!(res.status(), StatusCode::OK, "{what}");
                assert_eq!(&res.bytes().await.unwrap()[..], &body[..], "{what}");
            }
            Ok(res) => assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE, "{what}"),
            // The gateway may close the connection under a body it refused.
            Err(e) => assert!(size > LIMIT, "{what}: {e}"),
        }
    }
    still_serving(&gw).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn long_polls_of_calls_that_do_not_exist_leave_nothing_behind() {
    let gw = gateway("hostile-longpoll", hostile_settings).await;
    let running = gw.gateway.as_ref().unwrap();
    let mut rng = StdRng::seed_from_u64(SEED);
    for i in 0..50 {
        let id = match i % 3 {
            0 => pct(&random_bytes(&mut rng, 3000)),
            1 => uuid::Uuid::now_v7().to_string(),
            _ => "x".repeat(rng.random_range(65..5000)),
        };
        let res = gw
            .get(&format!("/v1/calls/{id}?wait=2"))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    }
    // No long-poller is waiting, and none is counted: nothing was kept.
    assert_eq!(running.call_watchers(), 0);
    gw.cleanup().await;
}
