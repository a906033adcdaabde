//! The event hub and its HTTP streams: fan-out to sessions, filters, resuming
//! with a last event id, gaps, slow sessions, the session bound, and SSE and
//! WebSocket end to end over real sockets.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use switchboard::amqp::topology::EventsLog;
use switchboard::amqp::{Outgoing, wire};
use switchboard::events::hub::{
    EventFilter, EventHub, HubError, HubEvent, HubHandle, HubOptions, HubStats, Subscribed,
};
use switchboard::events::{self, CloudEvent};
use switchboard::gateway::streams::{SseOptions, sse_response, ws_relay};
use tokio::sync::mpsc::error::TryRecvError;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::common::{Ctx, ctx, eventually};

const WAIT: Duration = Duration::from_secs(10);

fn opts(history: usize, max_sessions: usize, session_buffer: usize) -> HubOptions {
    HubOptions {
        history,
        history_bytes: 64 << 20,
        max_sessions,
        session_buffer,
        log: EventsLog::new("1h", 16 << 20),
    }
}

async fn hub(c: &Ctx, o: HubOptions) -> HubHandle {
    EventHub::start(&c.broker, o).await.unwrap()
}

async fn subscribe(h: &HubHandle, filter: EventFilter, last: Option<&str>) -> Subscribed {
    h.subscribe(filter, last.map(str::to_owned)).await.unwrap()
}

fn all() -> EventFilter {
    EventFilter::default()
}

fn event(ty: &str, n: usize) -> CloudEvent {
    CloudEvent::new(ty, "test", serde_json::json!({ "n": n }))
}

async fn publish(c: &Ctx, e: &CloudEvent) {
    events::publish(&c.broker, e).await.unwrap();
}

/// The next event of a session, within [`WAIT`].
async fn next(sub: &mut Subscribed) -> Arc<HubEvent> {
    tokio::time::timeout(WAIT, sub.rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("the session is still open")
}

/// The CloudEvent a hub event carries.
fn cloud(ev: impl AsRef<HubEvent>) -> CloudEvent {
    serde_json::from_slice(&ev.as_ref().json).unwrap()
}

fn stat(s: &std::sync::atomic::AtomicU64) -> u64 {
    HubStats::get(s)
}

/// Waits until the hub has no session left.
async fn no_sessions_left(h: &HubHandle, what: &str) {
    eventually(WAIT, what, || {
        let n = stat(&h.stats.sessions);
        async move { n == 0 }
    })
    .await;
}

/// A WebSocket client connected to the test server's `/ws`.
async fn ws_connect(
    addr: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap()
        .0
}

async fn finish(c: Ctx, h: HubHandle) {
    h.stop().await;
    c.cleanup(&[]).await;
}

#[actix_rt::test]
async fn every_subscriber_gets_every_event_in_order() {
    let c = ctx("hub-fanout").await;
    let h = hub(&c, opts(100, 10, 64)).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(subscribe(&h, all(), None).await);
    }
    assert!(subs.iter().all(|s| !s.gap));
    assert_eq!(stat(&h.stats.sessions), 3);
    let sent: Vec<CloudEvent> = (0..30)
        .map(|n| event("orders.created", n).with_subject(format!("o-{n}")))
        .collect();
    for e in &sent {
        publish(&c, e).await;
    }
    for sub in &mut subs {
        // Offsets start at 0: `None` is below every one.
        let mut last_seq = None;
        for expected in &sent {
            let got = next(sub).await;
            assert_eq!(&cloud(&got), expected);
            assert_eq!(got.ty, "orders.created");
            assert_eq!(got.subject, expected.subject);
            assert!(Some(got.seq) > last_seq, "seq grows");
            // The position is the event's offset in the events log.
            assert_eq!(got.position, got.seq.to_string());
            assert!(!got.json.contains(&b'\n'));
            last_seq = Some(got.seq);
        }
    }
    assert_eq!(stat(&h.stats.relayed), 30);
    assert_eq!(stat(&h.stats.dropped_slow), 0);
    finish(c, h).await;
}

#[actix_rt::test]
async fn type_prefix_and_subject_filters_pick_their_events() {
    let c = ctx("hub-filter").await;
    let h = hub(&c, opts(100, 10, 64)).await;
    let mut everything = subscribe(&h, all(), None).await;
    let f = |t: Option<&str>, s: Option<&str>| EventFilter {
        type_prefix: t.map(Into::into),
        subject: s.map(Into::into),
        caller: None,
    };
    let filters = [
        f(Some("orders."), None),
        f(None, Some("u1")),
        f(Some("users."), Some("u1")),
        f(Some("nothing."), None),
    ];
    let mut subs = Vec::new();
    for filter in &filters {
        subs.push(subscribe(&h, filter.clone(), None).await);
    }
    let sent = vec![
        event("orders.created", 0).with_subject("o1"),
        event("users.login", 1).with_subject("u1"),
        event("orders.paid", 2).with_subject("u1"),
        event("users.logout", 3).with_subject("u2"),
        event("ordersX", 4),
        event("users.login", 5).with_subject("u1"),
    ];
    for e in &sent {
        publish(&c, e).await;
    }
    // The hub offers each event to every session in one step: once the
    // unfiltered session has the last one, the others have all theirs.
    for e in &sent {
        assert_eq!(&cloud(next(&mut everything).await), e);
    }
    let wanted = [vec![0, 2], vec![1, 2, 5], vec![1, 5], vec![]];
    for ((sub, filter), wanted) in subs.iter_mut().zip(&filters).zip(wanted) {
        for i in wanted {
            assert_eq!(cloud(next(sub).await), sent[i], "filter {filter:?}");
        }
        assert_eq!(sub.rx.try_recv().err(), Some(TryRecvError::Empty));
    }
    finish(c, h).await;
}

#[actix_rt::test]
async fn resuming_with_a_last_event_id_gives_exactly_the_events_after_it() {
    let c = ctx("hub-resume").await;
    let h = hub(&c, opts(100, 10, 4)).await;
    let mut everything = subscribe(&h, all(), None).await;
    let mut sent = Vec::new();
    let mut seen = Vec::new();
    // Lockstep, so that the small buffer of the unfiltered session never fills.
    for n in 0..10 {
        let e = event(if n % 2 == 0 { "a.x" } else { "b.x" }, n);
        publish(&c, &e).await;
        let got = next(&mut everything).await;
        assert_eq!(cloud(&got), e);
        sent.push(e);
        seen.push(got);
    }
    // After the 4th event: events 5..10 replayed (6 of them, more than the
    // buffer of 4: the replay does not count against it), then live ones.
    let mut resumed = subscribe(&h, all(), Some(&seen[3].position)).await;
    assert!(!resumed.gap);
    let mut resumed_a = subscribe(
        &h,
        EventFilter {
            type_prefix: Some("a.".into()),
            subject: None,
            caller: None,
        },
        Some(&seen[3].position),
    )
    .await;
    assert!(!resumed_a.gap);
    let mut at_the_end = subscribe(&h, all(), Some(&seen[9].position)).await;
    assert!(!at_the_end.gap);
    for n in 10..13 {
        let e = event("a.x", n);
        publish(&c, &e).await;
        assert_eq!(cloud(next(&mut everything).await), e);
        sent.push(e);
    }
    let got: Vec<CloudEvent> = {
        let mut v = Vec::new();
        for _ in 4..13 {
            v.push(cloud(next(&mut resumed).await));
        }
        v
    };
    assert_eq!(got, sent[4..13]);
    assert_eq!(resumed.rx.try_recv().err(), Some(TryRecvError::Empty));
    for i in [4, 6, 8, 10, 11, 12] {
        assert_eq!(cloud(next(&mut resumed_a).await), sent[i]);
    }
    assert_eq!(resumed_a.rx.try_recv().err(), Some(TryRecvError::Empty));
    for e in &sent[10..13] {
        assert_eq!(&cloud(next(&mut at_the_end).await), e);
    }
    assert_eq!(at_the_end.rx.try_recv().err(), Some(TryRecvError::Empty));
    assert_eq!(stat(&h.stats.dropped_slow), 0);
    finish(c, h).await;
}

#[actix_rt::test]
async fn a_last_event_id_older_than_the_history_is_read_from_the_log_and_one_that_is_no_position_gives_a_gap()
 {
    let c = ctx("hub-gap").await;
    let h = hub(&c, opts(3, 20, 64)).await;
    let mut everything = subscribe(&h, all(), None).await;
    let mut seen = Vec::new();
    for n in 0..10 {
        publish(&c, &event("x", n)).await;
        seen.push(next(&mut everything).await);
    }
    // The history holds the last 3 events (indexes 7..10); the log all.
    let just_in_time = subscribe(&h, all(), Some(&seen[6].position)).await;
    assert!(!just_in_time.gap, "the event after it is still kept");
    let too_old = subscribe(&h, all(), Some(&seen[2].position)).await;
    assert!(!too_old.gap, "the log still has the events after it");
    let mut gaps = Vec::new();
    for last in [
        "nonsense".to_string(),
        String::new(),
        "0123456789abcdef-3".into(), // a position of an earlier version
        "x".into(),
        "-1".into(),
        "+3".into(),
    ] {
        let sub = subscribe(&h, all(), Some(&last)).await;
        assert!(sub.gap, "{last:?} should be unknown");
        gaps.push(sub);
    }
    let mut just_in_time = just_in_time;
    for ev in &seen[7..10] {
        assert_eq!(next(&mut just_in_time).await.position, ev.position);
    }
    let mut too_old = too_old;
    for ev in &seen[3..10] {
        assert_eq!(next(&mut too_old).await.position, ev.position);
    }
    let live = event("x", 10);
    publish(&c, &live).await;
    assert_eq!(cloud(next(&mut just_in_time).await), live);
    assert_eq!(
        cloud(next(&mut too_old).await),
        live,
        "then live, no repeat"
    );
    for sub in &mut gaps {
        // Live only: the first thing it gets is the new event.
        assert_eq!(cloud(next(sub).await), live);
    }
    // The reader's consumer on the log goes with its client: the hub's
    // own is left.
    // (The management API: a passive declare of a stream counts none.)
    let log = c.broker.names().events_log();
    let api = switchboard::management::Management::new(&c.settings).unwrap();
    let consumers = || async {
        let all = api.consumers().await.unwrap();
        all.iter().filter(|k| k.queue.name == log).count()
    };
    let slow = Duration::from_secs(30);
    eventually(slow, "the hub and the reader consume the log", || async {
        consumers().await == 2
    })
    .await;
    drop(too_old);
    eventually(slow, "the reader's consumer is cancelled", || async {
        consumers().await == 1
    })
    .await;
    finish(c, h).await;
}

#[actix_rt::test]
async fn a_slow_session_is_dropped_while_another_keeps_receiving_everything() {
    let c = ctx("hub-slow").await;
    let h = hub(&c, opts(0, 10, 4)).await;
    let mut slow = subscribe(&h, all(), None).await;
    let mut fast = subscribe(&h, all(), None).await;
    let mut sent = Vec::new();
    for n in 0..12 {
        let e = event("x", n);
        publish(&c, &e).await;
        assert_eq!(cloud(next(&mut fast).await), e);
        sent.push(e);
    }
    // The 5th event found the slow session's buffer (4) full.
    assert_eq!(stat(&h.stats.dropped_slow), 1);
    assert_eq!(stat(&h.stats.sessions), 1);
    assert_eq!(stat(&h.stats.relayed), 12);
    // It still gets what was queued, then its stream ends.
    for e in &sent[..4] {
        assert_eq!(&cloud(next(&mut slow).await), e);
    }
    let end = tokio::time::timeout(WAIT, slow.rx.recv()).await.unwrap();
    assert!(end.is_none(), "the slow session's stream ends");
    finish(c, h).await;
}

#[actix_rt::test]
async fn the_session_bound_refuses_one_more() {
    let c = ctx("hub-bound").await;
    let h = hub(&c, opts(10, 2, 8)).await;
    let a = subscribe(&h, all(), None).await;
    let mut b = subscribe(&h, all(), None).await;
    assert_eq!(
        h.subscribe(all(), None).await.err(),
        Some(HubError::TooManySessions { limit: 2 })
    );
    assert_eq!(stat(&h.stats.sessions), 2);
    // A client that left frees its place.
    drop(a);
    let mut d = subscribe(&h, all(), None).await;
    // So does an unsubscribed one; its stream ends.
    h.unsubscribe(b.id).await;
    let end = tokio::time::timeout(WAIT, b.rx.recv()).await.unwrap();
    assert!(end.is_none());
    let mut e = subscribe(&h, all(), None).await;
    assert!(h.subscribe(all(), None).await.is_err());
    let ev = event("x", 0);
    publish(&c, &ev).await;
    assert_eq!(cloud(next(&mut d).await), ev);
    assert_eq!(cloud(next(&mut e).await), ev);
    finish(c, h).await;
}

#[actix_rt::test]
async fn malformed_messages_are_skipped_and_counted() {
    let c = ctx("hub-malformed").await;
    let h = hub(&c, opts(10, 10, 8)).await;
    let mut sub = subscribe(&h, all(), None).await;
    for body in [&b"not json"[..], br#"{"type": "x"}"#, b"\xff\xfe"] {
        c.broker
            .publish(Outgoing {
                exchange: &c.broker.names().events_exchange(),
                routing_key: "",
                payload: body,
                properties: Default::default(),
                mandatory: false,
            })
            .await
            .unwrap();
    }
    let good = event("x", 1);
    publish(&c, &good).await;
    let got = next(&mut sub).await;
    assert_eq!(cloud(&got), good);
    // Skipped messages still take their offsets in the log (every reader
    // of the log sees them): positions are the log's, not the hub's.
    assert_eq!(got.seq, 3);
    assert_eq!(stat(&h.stats.malformed), 3);
    assert_eq!(stat(&h.stats.relayed), 1);
    finish(c, h).await;
}

// ---- HTTP: SSE and WebSocket over real sockets ----

/// What the test server's routes need.
#[derive(Clone)]
struct Routes {
    hub: HubHandle,
    heartbeat: Duration,
}

/// The type that ends the SSE test streams.
const END: &str = "test.end";

#[derive(serde::Deserialize)]
struct StreamQuery {
    #[serde(rename = "type")]
    ty: Option<String>,
}

async fn sse_route(
    req: HttpRequest,
    q: web::Query<StreamQuery>,
    r: web::Data<Routes>,
) -> HttpResponse {
    let last = req
        .headers()
        .get("Last-Event-ID")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let filter = EventFilter {
        type_prefix: q.into_inner().ty,
        subject: None,
        caller: None,
    };
    match r.hub.subscribe(filter, last).await {
        Ok(sub) => sse_response(
            sub,
            r.heartbeat,
            SseOptions {
                first: vec![Bytes::from_static(b"retry: 1000\n\n")],
                close_after: Some(Box::new(|ev: &HubEvent| ev.ty == END)),
                ..SseOptions::default()
            },
        ),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

async fn ws_route(
    req: HttpRequest,
    body: web::Payload,
    r: web::Data<Routes>,
) -> Result<HttpResponse, actix_web::Error> {
    match r.hub.subscribe(all(), None).await {
        Ok(sub) => ws_relay(&req, body, sub, r.heartbeat, None).await,
        Err(_) => Ok(HttpResponse::ServiceUnavailable().finish()),
    }
}

/// An HTTP server on 127.0.0.1:<free port> with `/events` (SSE) and `/ws`.
fn serve(hub: &HubHandle, heartbeat: Duration) -> (String, actix_web::dev::ServerHandle) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = Routes {
        hub: hub.clone(),
        heartbeat,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(routes.clone()))
            .route("/events", web::get().to(sse_route))
            .route("/ws", web::get().to(ws_route))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (addr.to_string(), handle)
}

/// An SSE frame's fields, in order.
fn fields(frame: &str) -> Vec<(&str, &str)> {
    frame
        .lines()
        .map(|l| l.split_once(": ").unwrap_or((l, "")))
        .collect()
}

/// The whole body, which must end within [`WAIT`].
async fn read_to_end(resp: reqwest::Response) -> String {
    let mut stream = resp.bytes_stream();
    let mut body = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.unwrap());
        }
    })
    .await
    .expect("the stream ends");
    String::from_utf8(body).unwrap()
}

/// Reads until the body so far contains `needle`.
async fn read_until(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    body: &mut String,
    needle: &str,
) {
    tokio::time::timeout(WAIT, async {
        while !body.contains(needle) {
            let chunk = stream.next().await.expect("more body").unwrap();
            body.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle:?} within 10 s; got {body:?}"));
}

#[actix_rt::test]
async fn sse_frames_events_resumes_with_last_event_id_and_closes_after_the_last() {
    let c = ctx("hub-sse").await;
    let h = hub(&c, opts(100, 10, 64)).await;
    // A heartbeat longer than the test: the bodies are exactly the frames.
    let (addr, server) = serve(&h, Duration::from_secs(60));
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/events");
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(header("x-accel-buffering").as_deref(), Some("no"));
    // A filtered stream, subscribed before anything is published.
    let filtered = client
        .get(format!("{url}?type=orders."))
        .send()
        .await
        .unwrap();

    let sent = vec![
        event("orders.created", 0).with_subject("o1"),
        CloudEvent::new(
            "users.note",
            "test",
            serde_json::json!({"text": "two\nlines"}),
        ),
        event("orders.paid", 2),
        event(END, 3),
    ];
    for e in &sent {
        publish(&c, e).await;
    }
    let body = read_to_end(resp).await;
    let frames: Vec<&str> = body.split_terminator("\n\n").collect();
    assert_eq!(frames[0], "retry: 1000");
    assert_eq!(frames.len(), 1 + sent.len(), "{body:?}");
    let mut ids = Vec::new();
    for (frame, e) in frames[1..].iter().zip(&sent) {
        let f = fields(frame);
        assert_eq!(f.len(), 3, "id, event, data: {frame:?}");
        assert_eq!(f[0].0, "id");
        assert_eq!(f[1], ("event", e.ty.as_str()));
        assert_eq!(f[2].0, "data");
        let data: CloudEvent = serde_json::from_str(f[2].1).unwrap();
        assert_eq!(&data, e);
        ids.push(f[0].1.to_owned());
    }

    // The filtered stream saw only the orders; `test.end` is not among them,
    // so it is still open: read what it has, then leave.
    let mut fstream = filtered.bytes_stream();
    let mut fbody = String::new();
    read_until(&mut fstream, &mut fbody, "orders.paid").await;
    let events: Vec<&str> = fbody
        .split_terminator("\n\n")
        .filter_map(|f| f.strip_prefix("id: "))
        .collect();
    assert_eq!(events.len(), 2, "{fbody:?}");
    drop(fstream);

    // Resume after the second event: the third and the last, then the end.
    let resumed = client
        .get(&url)
        .header("Last-Event-ID", &ids[1])
        .send()
        .await
        .unwrap();
    let body = read_to_end(resumed).await;
    let frames: Vec<&str> = body.split_terminator("\n\n").collect();
    assert_eq!(frames.len(), 3, "{body:?}");
    assert_eq!(frames[0], "retry: 1000");
    assert_eq!(fields(frames[1])[0], ("id", ids[2].as_str()));
    assert_eq!(fields(frames[2])[0], ("id", ids[3].as_str()));

    // An unknown position: `: gap` first, then live events.
    let gap = client
        .get(&url)
        .header("Last-Event-ID", "elsewhere-7")
        .send()
        .await
        .unwrap();
    publish(&c, &event(END, 4)).await;
    let body = read_to_end(gap).await;
    let frames: Vec<&str> = body.split_terminator("\n\n").collect();
    assert_eq!(frames[0], ": gap");
    assert_eq!(frames[1], "retry: 1000");
    assert_eq!(frames.len(), 3, "{body:?}");
    assert_eq!(fields(frames[2])[1], ("event", END));

    server.stop(false).await;
    finish(c, h).await;
}

#[actix_rt::test]
async fn sse_sends_keep_alives_and_a_client_that_leaves_is_noticed() {
    let c = ctx("hub-sse-leave").await;
    let h = hub(&c, opts(10, 10, 8)).await;
    let (addr, server) = serve(&h, Duration::from_millis(50));
    let resp = reqwest::get(format!("http://{addr}/events")).await.unwrap();
    assert_eq!(stat(&h.stats.sessions), 1);
    let mut stream = resp.bytes_stream();
    let mut body = String::new();
    read_until(&mut stream, &mut body, ": keep-alive\n\n").await;
    assert!(
        body.starts_with("retry: 1000\n\n: keep-alive\n\n"),
        "{body:?}"
    );
    drop(stream);
    // No event flows: only the heartbeat's failed write can tell that the
    // client left; then the hub sweeps the session out.
    no_sessions_left(&h, "the session of the client that left is removed").await;
    server.stop(false).await;
    finish(c, h).await;
}

#[actix_rt::test]
async fn websocket_relays_events_as_text_frames_and_answers_pings() {
    let c = ctx("hub-ws").await;
    let h = hub(&c, opts(10, 10, 64)).await;
    let (addr, server) = serve(&h, Duration::from_millis(100));
    let mut ws = ws_connect(&addr).await;
    assert_eq!(stat(&h.stats.sessions), 1);
    // What a client says is ignored, never fatal.
    ws.send(WsMessage::text("hello")).await.unwrap();
    ws.send(WsMessage::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    ws.send(WsMessage::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    let sent: Vec<CloudEvent> = (0..3).map(|n| event("ws.x", n)).collect();
    for e in &sent {
        publish(&c, e).await;
    }
    let mut got = Vec::new();
    let mut pong = false;
    let mut server_pinged = false;
    tokio::time::timeout(WAIT, async {
        while got.len() < sent.len() || !pong || !server_pinged {
            match ws.next().await.expect("the socket is open").unwrap() {
                WsMessage::Text(t) => got.push(serde_json::from_str::<CloudEvent>(&t).unwrap()),
                WsMessage::Pong(p) => {
                    assert_eq!(&p[..], b"are you there");
                    pong = true;
                }
                WsMessage::Ping(_) => server_pinged = true,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("events, a pong and a ping within 10 s");
    assert_eq!(got, sent);
    // Close: the server answers with a Close and the session goes.
    ws.close(None).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while let Some(msg) = ws.next().await {
            if matches!(msg, Ok(WsMessage::Close(_)) | Err(_)) {
                break;
            }
        }
    })
    .await
    .expect("the server closes too");
    no_sessions_left(&h, "the closed WebSocket's session is removed").await;
    server.stop(false).await;
    finish(c, h).await;
}

#[actix_rt::test]
async fn a_websocket_whose_session_the_hub_drops_is_closed_with_try_again_later() {
    let c = ctx("hub-ws-stop").await;
    let h = hub(&c, opts(10, 10, 64)).await;
    let (addr, server) = serve(&h, Duration::from_secs(60));
    let mut ws = ws_connect(&addr).await;
    // Stopping the hub ends every session.
    h.stop().await;
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await.expect("a Close frame").unwrap() {
                WsMessage::Close(frame) => break frame,
                _ => continue,
            }
        }
    })
    .await
    .expect("closed within 10 s")
    .expect("with a reason");
    assert_eq!(u16::from(close.code), 1013);
    server.stop(false).await;
    c.cleanup(&[]).await;
}

#[actix_rt::test]
async fn a_pretty_printed_event_from_any_client_is_relayed_as_one_line() {
    // A service publishing with any AMQP client (pretty JSON, no CloudEvents
    // content type) still reaches the hub's sessions, as one line of JSON.
    let c = ctx("hub-raw").await;
    let h = hub(&c, opts(10, 10, 8)).await;
    let mut sub = subscribe(&h, all(), None).await;
    let e = event("raw.x", 0);
    c.broker
        .publish(Outgoing {
            exchange: &c.broker.names().events_exchange(),
            routing_key: "",
            payload: &serde_json::to_vec_pretty(&e).unwrap(),
            properties: deadpool_lapin::lapin::BasicProperties::default()
                .with_content_type(wire::CONTENT_JSON.into()),
            mandatory: false,
        })
        .await
        .unwrap();
    let got = next(&mut sub).await;
    assert_eq!(cloud(&got), e);
    assert!(!got.json.contains(&b'\n'), "stored as one line");
    finish(c, h).await;
}

/// A call lifecycle event published twice with the same id (at least once
/// across a gateway's death) reaches a session once, live, from the
/// history and from a reader of the log; events of other types are never
/// taken for copies.
#[actix_rt::test]
async fn a_copy_of_a_call_lifecycle_event_reaches_a_session_once() {
    let c = ctx("hub-dedup").await;
    let h = hub(&c, opts(100, 10, 64)).await;
    let mut live = subscribe(&h, all(), None).await;
    let before = event("x", 0);
    publish(&c, &before).await;
    let first_position = next(&mut live).await.position.clone();
    let mut completed = event("switchboard.call.completed", 1).with_subject("call-1");
    completed.id = events::lifecycle_event_id("call-1", "switchboard.call.completed");
    // A foreign event reusing an id, twice: not a call lifecycle event.
    let mut foreign = event("orders.created", 2);
    foreign.id = "7".into();
    let after = event("x", 3);
    for e in [&completed, &completed, &foreign, &foreign, &after] {
        publish(&c, e).await;
    }
    let expected = [&completed, &foreign, &foreign, &after];
    for e in expected {
        assert_eq!(&cloud(next(&mut live).await), e);
    }
    assert_eq!(stat(&h.stats.duplicates), 1);
    // Resumed from the history, then from the log (a history of 100 covers
    // it; a hub of history 1 does not), the copy is not there either.
    let mut from_history = subscribe(&h, all(), Some(&first_position)).await;
    for e in expected {
        assert_eq!(&cloud(next(&mut from_history).await), e);
    }
    let h1 = hub(&c, opts(1, 10, 64)).await;
    let mut watch = subscribe(&h1, all(), None).await;
    let marker = event("x", 4);
    publish(&c, &marker).await;
    for e in [&marker] {
        assert_eq!(&cloud(next(&mut live).await), e);
        assert_eq!(&cloud(next(&mut watch).await), e);
    }
    let mut from_log = subscribe(&h1, all(), Some(&first_position)).await;
    for e in [&completed, &foreign, &foreign, &after, &marker] {
        assert_eq!(&cloud(next(&mut from_log).await), e);
    }
    assert!(
        matches!(live.rx.try_recv(), Err(TryRecvError::Empty)),
        "nothing more"
    );
    h1.stop().await;
    finish(c, h).await;
}
