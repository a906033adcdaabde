//! Raw AMQP frames that lapin cannot send, written over a plain socket as
//! any other client of the vhost could: short strings that are not UTF-8
//! (and that outgrow 255 bytes once each bad byte becomes U+FFFD), header
//! tables and arrays nested 2,000 deep. Each is published to every one of
//! switchboard's own destinations: a service queue, the reply queue, the
//! dead-letter watch (through the dead exchange), the events exchange (the
//! event hub and a durable subscription); and into a durable reply queue
//! while the gateway is down, before it starts again.
//!
//! What a user observes afterwards: the process is alive (a stack overflow
//! or a panic on lapin's I/O thread aborts this whole test binary), calls
//! and events still flow, and no hostile message comes back: once its
//! consumer is gone, the queue it was sent to holds nothing (it was
//! settled, not left unacked to return).

use super::*;
use crate::gateway::Sse;
use deadpool_lapin::lapin::options::QueueDeclareOptions;
use switchboard::events::{self, CloudEvent, SubscribeOptions, Subscription};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes that are not UTF-8: 200 of them decode to 600 bytes of U+FFFD,
/// more than a short string can hold (255).
const NOT_UTF8: [u8; 200] = [0xff; 200];

/// A message as a raw client puts it on the wire: every short string is
/// bytes, the headers an encoded field table.
#[derive(Clone, Default)]
struct Raw {
    exchange: Vec<u8>,
    routing_key: Vec<u8>,
    content_type: Option<Vec<u8>>,
    /// An encoded field table, its length included.
    headers: Option<Vec<u8>>,
    correlation_id: Option<Vec<u8>>,
    reply_to: Option<Vec<u8>>,
    message_id: Option<Vec<u8>>,
    kind: Option<Vec<u8>>,
    app_id: Option<Vec<u8>>,
    body: Vec<u8>,
}

impl Raw {
    /// `self`, sent to `exchange` with `routing_key` (unless it has a
    /// hostile routing key of its own).
    fn to(&self, exchange: &str, routing_key: &str) -> Raw {
        let mut m = self.clone();
        m.exchange = exchange.as_bytes().to_vec();
        if m.routing_key.is_empty() {
            m.routing_key = routing_key.as_bytes().to_vec();
        }
        m
    }
}

/// A field table of `entries` (name, type tag, encoded value).
fn table(entries: &[(&[u8], u8, Vec<u8>)]) -> Vec<u8> {
    let mut content = Vec::new();
    for (name, tag, value) in entries {
        content.push(name.len() as u8);
        content.extend_from_slice(name);
        content.push(*tag);
        content.extend_from_slice(value);
    }
    [&(content.len() as u32).to_be_bytes()[..], &content].concat()
}

/// `levels` field tables (tag `F`) or arrays (tag `A`), each holding the
/// next; the innermost one empty. A header of 2,000 tables is 14 KB.
fn nested(tag: u8, levels: usize) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0, 0];
    for _ in 1..levels {
        let entry = match tag {
            b'F' => [&[1, b'n', b'F'][..], &bytes].concat(),
            _ => [&[b'A'][..], &bytes].concat(),
        };
        bytes = [&(entry.len() as u32).to_be_bytes()[..], &entry].concat();
    }
    bytes
}

/// The body of every hostile message: a valid JSON object (nothing but the
/// frame is hostile) by which a test tells them from the others.
const MARK: &[u8] = br#"{"hostile":true}"#;

/// The hostile messages, each with what it is.
fn hostile() -> Vec<(&'static str, Raw)> {
    let base = Raw {
        content_type: Some(b"application/json".to_vec()),
        body: MARK.to_vec(),
        ..Raw::default()
    };
    let mut mixed = b"call-".to_vec();
    mixed.extend([0xfe; 100]);
    vec![
        (
            "headers holding a table nested 2,000 deep",
            Raw {
                headers: Some(table(&[(b"x-deep", b'F', nested(b'F', 2000))])),
                ..base.clone()
            },
        ),
        (
            "headers holding an array nested 2,000 deep",
            Raw {
                headers: Some(table(&[(b"x-deep", b'A', nested(b'A', 2000))])),
                ..base.clone()
            },
        ),
        (
            "correlation_id = b\"\\xff\" * 200",
            Raw {
                correlation_id: Some(NOT_UTF8.to_vec()),
                ..base.clone()
            },
        ),
        (
            "correlation_id = b\"call-\" + b\"\\xfe\" * 100",
            Raw {
                correlation_id: Some(mixed),
                ..base.clone()
            },
        ),
        (
            "reply_to = b\"\\xff\" * 200",
            Raw {
                reply_to: Some(NOT_UTF8.to_vec()),
                correlation_id: Some(b"hostile-reply-to".to_vec()),
                ..base.clone()
            },
        ),
        (
            "message_id, type, app_id and content_type = b\"\\xff\" * 200",
            Raw {
                content_type: Some(NOT_UTF8.to_vec()),
                message_id: Some(NOT_UTF8.to_vec()),
                kind: Some(NOT_UTF8.to_vec()),
                app_id: Some(NOT_UTF8.to_vec()),
                ..base.clone()
            },
        ),
        (
            "a header named b\"\\xff\" * 200",
            Raw {
                headers: Some(table(&[(
                    &NOT_UTF8,
                    b'S',
                    [&[0, 0, 0, 1][..], b"v"].concat(),
                )])),
                ..base.clone()
            },
        ),
    ]
}

/// A hostile routing key: only an exchange that routes on anything
/// (fanout) takes it to one of switchboard's queues.
fn hostile_routing_key() -> (&'static str, Raw) {
    (
        "routing_key = b\"\\xff\" * 200",
        Raw {
            routing_key: NOT_UTF8.to_vec(),
            content_type: Some(b"application/json".to_vec()),
            body: MARK.to_vec(),
            ..Raw::default()
        },
    )
}

/// An AMQP 0-9-1 client over a plain socket, publishing with confirms.
struct RawClient {
    s: tokio::net::TcpStream,
}

fn short(b: &[u8]) -> Vec<u8> {
    assert!(
        b.len() <= 255,
        "a short string on the wire is at most 255 bytes"
    );
    [&[b.len() as u8][..], b].concat()
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend(channel.to_be_bytes());
    f.extend((payload.len() as u32).to_be_bytes());
    f.extend(payload);
    f.push(0xce);
    f
}

fn method(channel: u16, class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    frame(
        1,
        channel,
        &[&class.to_be_bytes()[..], &id.to_be_bytes(), args].concat(),
    )
}

impl RawClient {
    /// Connects to the tests' broker, opens channel 1 in confirm mode.
    async fn connect() -> Self {
        let url = url::Url::parse(&crate::common::amqp_url()).unwrap();
        let addr = (
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(5672),
        );
        let vhost = url::form_urlencoded::parse(url.path().trim_start_matches('/').as_bytes())
            .map(|(k, _)| k.into_owned())
            .next()
            .unwrap_or_else(|| "/".into());
        let login = format!("\0{}\0{}", url.username(), url.password().unwrap_or(""));
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = Self { s };
        c.s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        c.expect(10, 10).await; // connection.start
        let start_ok = [
            &0u32.to_be_bytes()[..],
            &short(b"PLAIN"),
            &(login.len() as u32).to_be_bytes(),
            login.as_bytes(),
            &short(b"en_US"),
        ]
        .concat();
        c.s.write_all(&method(0, 10, 11, &start_ok)).await.unwrap();
        let tune = c.expect(10, 30).await;
        // channel-max, frame-max as offered; no heartbeat.
        let tune_ok = [&tune[4..10], &[0, 0]].concat();
        c.s.write_all(&method(0, 10, 31, &tune_ok)).await.unwrap();
        let open = [short(vhost.as_bytes()), short(b""), vec![0]].concat();
        c.s.write_all(&method(0, 10, 40, &open)).await.unwrap();
        c.expect(10, 41).await; // connection.open-ok
        c.s.write_all(&method(1, 20, 10, &short(b"")))
            .await
            .unwrap();
        c.expect(20, 11).await; // channel.open-ok
        c.s.write_all(&method(1, 85, 10, &[0])).await.unwrap();
        c.expect(85, 11).await; // confirm.select-ok
        c
    }

    /// The payload of the next frame.
    async fn read_frame(&mut self) -> Vec<u8> {
        let mut head = [0u8; 7];
        self.s.read_exact(&mut head).await.unwrap();
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        self.s.read_exact(&mut payload).await.unwrap();
        payload.truncate(size);
        payload
    }

    /// The next frame, which must be the method `class`.`id`: a close from
    /// the broker instead fails the test with the broker's words.
    async fn expect(&mut self, class: u16, id: u16) -> Vec<u8> {
        let f = self.read_frame().await;
        let got = (
            u16::from_be_bytes([f[0], f[1]]),
            u16::from_be_bytes([f[2], f[3]]),
        );
        assert_eq!(
            got,
            (class, id),
            "the broker answered {got:?}: {}",
            String::from_utf8_lossy(&f)
        );
        f
    }

    /// Publishes `m` and waits for the broker's confirm: the message is in
    /// its queues.
    async fn publish(&mut self, m: &Raw) {
        let publish = [
            &[0, 0][..],
            &short(&m.exchange),
            &short(&m.routing_key),
            &[0],
        ]
        .concat();
        self.s
            .write_all(&method(1, 60, 40, &publish))
            .await
            .unwrap();
        // Property flags, highest bit first, and the values in that order.
        let fields = [
            (15, m.content_type.as_deref().map(short)),
            (13, m.headers.clone()),
            (10, m.correlation_id.as_deref().map(short)),
            (9, m.reply_to.as_deref().map(short)),
            (7, m.message_id.as_deref().map(short)),
            (5, m.kind.as_deref().map(short)),
            (3, m.app_id.as_deref().map(short)),
        ];
        let mut flags: u16 = 0;
        let mut props = Vec::new();
        for (bit, value) in fields {
            if let Some(v) = value {
                flags |= 1 << bit;
                props.extend(v);
            }
        }
        let header = [
            &60u16.to_be_bytes()[..],
            &0u16.to_be_bytes(),
            &(m.body.len() as u64).to_be_bytes(),
            &flags.to_be_bytes(),
            &props,
        ]
        .concat();
        self.s.write_all(&frame(2, 1, &header)).await.unwrap();
        self.s.write_all(&frame(3, 1, &m.body)).await.unwrap();
        self.expect(60, 80).await; // basic.ack
    }

    async fn close(mut self) {
        let close = [&200u16.to_be_bytes()[..], &short(b"bye"), &[0, 0, 0, 0]].concat();
        self.s.write_all(&method(0, 10, 50, &close)).await.unwrap();
        self.expect(10, 51).await; // connection.close-ok
    }
}

/// Publishes every message of `messages` to `exchange` with `routing_key`.
async fn publish_all(messages: &[(&str, Raw)], exchange: &str, routing_key: &str) {
    let mut c = RawClient::connect().await;
    for (_, m) in messages {
        c.publish(&m.to(exchange, routing_key)).await;
    }
    c.close().await;
}

/// How many hostile messages (by their body) `queue` holds once no
/// consumer holds any: it waits until the queue has no consumer (a
/// consumer's unacked messages are back in the queue by then), then takes
/// every message out.
async fn hostile_left(gw: &Gw, queue: &str) -> usize {
    use deadpool_lapin::lapin::options::BasicGetOptions;
    let ch = gw.ctx.broker.channel().await.unwrap();
    let consumers = || async {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .unwrap()
            .consumer_count()
    };
    let what = format!("no consumer on {queue}");
    eventually(Duration::from_secs(10), &what, || async {
        consumers().await == 0
    })
    .await;
    let mut hostile = 0;
    let take = BasicGetOptions { no_ack: true };
    while let Some(m) = ch.basic_get(queue.into(), take).await.unwrap() {
        hostile += usize::from(m.delivery.data == MARK);
    }
    let _ = ch.close(200, "counted".into()).await;
    hostile
}

/// Fails if `queue` holds a hostile message once no consumer holds any.
async fn assert_none_left(gw: &Gw, queue: &str) {
    let left = hostile_left(gw, queue).await;
    assert_eq!(left, 0, "{left} hostile messages left in {queue}");
}

/// The value of one series of the process's metrics (0 when absent).
fn series(gw: &Gw, name: &str) -> f64 {
    let (text, _) = gw.ctx.broker.render_metrics(false);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Stops every worker of the gateway (as a shutdown would).
async fn stop_workers(gw: &Gw) {
    for (_, w) in &gw.workers {
        w.drain(Duration::ZERO).await;
    }
}

#[actix_rt::test]
async fn hostile_requests_on_a_service_queue_cost_nothing_but_themselves() {
    let mut gw = gateway("hostile-svc", hostile_settings).await;
    let queue = gw.ctx.broker.names().service_queue("echo");
    let messages = hostile();
    publish_all(&messages, "", &queue).await;
    // Alive, and echo (behind the hostile requests in its queue) answers.
    still_serving(&gw).await;
    let redelivered = r#"switchboard_worker_redeliveries_total{service="echo"}"#;
    assert_eq!(series(&gw, redelivered), 0.0, "a hostile request came back");
    // Each was settled once: with its worker gone, nothing returns.
    gw.stop_gateway().await;
    stop_workers(&gw).await;
    assert_none_left(&gw, &queue).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn hostile_replies_do_not_stop_replies() {
    let mut gw = gateway("hostile-reply", hostile_settings).await;
    let broker = gw.ctx.broker.clone();
    let queue = broker.names().reply_queue(broker.instance_id());
    let pending = pending_call(&gw).await;
    let messages = hostile();
    publish_all(&messages, "", &queue).await;
    // Calls still get their replies, synchronous or not.
    still_serving(&gw).await;
    let ch = broker.channel().await.unwrap();
    publish_reply(&ch, &queue, Some(&pending), None, "application/json", b"{}").await;
    assert_eq!(ended(&gw, &pending).await["status"], "succeeded");
    gw.stop_gateway().await;
    assert_none_left(&gw, &queue).await;
    // Those without a correlation id are poison, kept where operators look;
    // the others are replies to no call: counted and dropped.
    let poison = broker.names().poison_queue();
    let uncorrelated = messages
        .iter()
        .filter(|(_, m)| m.correlation_id.is_none())
        .count();
    assert_eq!(
        hostile_left(&gw, &poison).await,
        uncorrelated,
        "in {poison}"
    );
    gw.cleanup().await;
}

#[actix_rt::test]
async fn hostile_dead_letters_do_not_stop_the_dead_letter_watch() {
    let mut gw = gateway("hostile-dlx", |s| {
        hostile_settings(s);
        s.services.get_mut("poison").unwrap().delivery_limit = 1;
    })
    .await;
    let names = gw.ctx.broker.names().clone();
    let watch = names.deadwatch_queue(gw.ctx.broker.instance_id());
    let messages = hostile();
    // As the broker dead-letters a request of `poison`: to the dead
    // exchange with the service's name, so to its dead-letter queue and to
    // the gateway's dead-letter watch.
    publish_all(&messages, &names.dead_exchange(), "poison").await;
    // The watch still sees a real dead letter: a call that fails for good
    // ends failed.
    let id = accepted_call(&gw, "poison").await;
    let doc = ended(&gw, &id).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    gw.stop_gateway().await;
    assert_none_left(&gw, &watch).await;
    // The hostile messages stay where an operator looks for dead letters.
    let dead = names.dead_queue("poison");
    assert_eq!(hostile_left(&gw, &dead).await, messages.len(), "in {dead}");
    gw.cleanup().await;
}

#[actix_rt::test]
async fn hostile_events_stop_neither_streams_nor_subscriptions() {
    let gw = gateway("hostile-events", hostile_settings).await;
    let broker = gw.ctx.broker.clone();
    let res = gw.get("/v1/events").bearer_auth(BOB).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut sse = Sse::new(res);
    let name = format!("{}-sub", gw.ctx.prefix);
    let mut sub = Subscription::start(
        &broker,
        SubscribeOptions {
            durable_name: Some(name.clone()),
            type_prefix: None,
        },
    )
    .await
    .unwrap();
    let mut messages = hostile();
    messages.push(hostile_routing_key());
    publish_all(&messages, &broker.names().events_exchange(), "").await;
    // Events published after them reach the stream and the subscription.
    for n in 0..2 {
        let e = CloudEvent::new("orders.created", "test", serde_json::json!({ "n": n }));
        events::publish(&broker, &e).await.unwrap();
    }
    // Bounded: a dead hub or subscription would wait for ever.
    let limit = Duration::from_secs(10);
    for n in 0..2 {
        let f = tokio::time::timeout(limit, sse.next())
            .await
            .expect("no event on the stream")
            .expect("the event stream ended");
        assert_eq!(f.event.as_deref(), Some("orders.created"));
        assert_eq!(f.data.unwrap()["data"]["n"], n);
        let e = tokio::time::timeout(limit, sub.recv())
            .await
            .expect("no event in the subscription")
            .expect("the subscription ended")
            .unwrap();
        assert_eq!(e.data.unwrap()["n"], n);
    }
    // No hostile event is left in the subscription's queue to come back.
    let queue = sub.queue.clone();
    drop(sub);
    let left = hostile_left(&gw, &queue).await;
    let ch = broker.channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    assert_eq!(left, 0, "hostile events left in {queue}");
    // Not CloudEvents: poison on a durable subscription, kept where
    // operators look (the hub's temporary queue skips them).
    let poison = broker.names().poison_queue();
    assert_eq!(
        hostile_left(&gw, &poison).await,
        messages.len(),
        "in {poison}"
    );
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_restart_with_hostile_messages_waiting_in_its_queues_is_healthy() {
    use switchboard::worker;
    let mut gw = gateway("hostile-restart", hostile_settings).await;
    let broker = gw.ctx.broker.clone();
    let reply_queue = broker.names().reply_queue(broker.instance_id());
    let service_queue = broker.names().service_queue("echo");
    let pending = pending_call(&gw).await;
    // Down: the durable queues stay, and the hostile messages wait there.
    gw.stop_gateway().await;
    stop_workers(&gw).await;
    let messages = hostile();
    publish_all(&messages, "", &reply_queue).await;
    publish_all(&messages, "", &service_queue).await;
    // Up again, on the same prefix and instance.
    let settings = gw.ctx.settings.services["echo"].clone();
    let echo = gw
        .ctx
        .worker("echo", &settings, worker::echo(Duration::ZERO))
        .await
        .unwrap();
    gw.workers.push(("echo".into(), echo));
    gw.start_gateway().await;
    let ready = gw.get("/readyz").send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    still_serving(&gw).await;
    let ch = broker.channel().await.unwrap();
    publish_reply(
        &ch,
        &reply_queue,
        Some(&pending),
        None,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(ended(&gw, &pending).await["status"], "succeeded");
    gw.stop_gateway().await;
    stop_workers(&gw).await;
    assert_none_left(&gw, &reply_queue).await;
    assert_none_left(&gw, &service_queue).await;
    gw.cleanup().await;
}

/// Found by this test: lapin (4.12, amq-protocol 10.6) failed to parse a
/// delivery whose correlation id is not UTF-8 and closed the whole
/// connection, so one such message from any client stopped every consumer
/// on it and came back to the next one forever. Fixed by the patched
/// amq-protocol-types in vendor/ (lossy decoding): the request is answered
/// or dropped like any other, the reply is counted as unknown.
#[actix_rt::test]
async fn a_correlation_id_that_is_not_utf8_does_not_stop_consumers() {
    let gw = gateway("hostile-raw", hostile_settings).await;
    let broker = &gw.ctx.broker;
    let pending = pending_call(&gw).await;
    let short_bad = Raw {
        content_type: Some(b"application/json".to_vec()),
        correlation_id: Some(b"\xff\xfe".to_vec()),
        body: b"{}".to_vec(),
        ..Raw::default()
    };
    let one = [("correlation_id = b\"\\xff\\xfe\"", short_bad)];
    publish_all(&one, "", &broker.names().service_queue("echo")).await;
    publish_all(&one, "", &broker.names().reply_queue(broker.instance_id())).await;
    // The services still answer...
    for service in ["echo", "count"] {
        let res = gw
            .post(service)
            .bearer_auth(ALICE)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{service}");
    }
    // ...and replies still reach their calls.
    let ch = broker.channel().await.unwrap();
    publish_reply(
        &ch,
        &broker.names().reply_queue(broker.instance_id()),
        Some(&pending),
        None,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(ended(&gw, &pending).await["status"], "succeeded");
    gw.cleanup().await;
}
