//! The events log `<prefix>.events.log`: positions shared by every
//! instance. An SSE client resumes on another instance, and after a
//! restart, missing nothing and seeing nothing twice; an AMQP client replays
//! the log; a client resuming from before the log's retention is told what
//! it lost.

use std::time::Duration;

use deadpool_lapin::lapin::options::{BasicConsumeOptions, BasicQosOptions};
use deadpool_lapin::lapin::types::{AMQPValue, FieldTable};
use futures_util::StreamExt;
use switchboard::Broker;
use switchboard::amqp::topology::EventsLog;
use switchboard::amqp::wire;
use switchboard::events::hub::{EventFilter, EventHub, HubOptions};
use switchboard::events::{self, CloudEvent};
use switchboard::gateway::RunningGateway;

use crate::common::{Gw, ctx, gateway, poll_until};
use crate::gateway::{Frame, Sse};

const WAIT: Duration = Duration::from_secs(20);

fn event(ty: &str, n: u32) -> CloudEvent {
    CloudEvent::new(ty, "test", serde_json::json!({ "n": n }))
}

/// A second gateway instance on the same prefix as `gw` (its own instance
/// id, broker connections and store), as a second pod of one deployment.
async fn second_instance(gw: &Gw) -> (RunningGateway, Broker, String) {
    let mut settings = gw.ctx.settings.clone();
    settings.amqp.instance_id = format!("{}-b", settings.amqp.instance_id);
    settings.gateway.store_url =
        format!("sqlite://{}/calls-b.db?mode=rwc", gw.dir.path().display());
    let broker = Broker::connect(&settings.amqp).await.unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let g = switchboard::gateway::start(
        &settings,
        &broker,
        listener,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", g.addr);
    (g, broker, base)
}

/// Stops the second instance and deletes its own queues.
async fn stop_second(g: RunningGateway, broker: Broker) {
    g.stop().await;
    let ch = broker.channel().await.unwrap();
    let names = broker.names();
    for q in [
        names.reply_queue(broker.instance_id()),
        names.deadwatch_queue(broker.instance_id()),
    ] {
        let _ = ch.queue_delete(q.into(), Default::default()).await;
    }
    let _ = ch.close(200, "cleanup".into()).await;
    broker.close().await;
}

/// Opens `/v1/events` at `base`, resuming after `last` when given.
async fn open(http: &reqwest::Client, base: &str, query: &str, last: Option<&str>) -> Sse {
    let mut r = http.get(format!("{base}/v1/events{query}"));
    if let Some(l) = last {
        r = r.header("last-event-id", l);
    }
    let res = r.send().await.unwrap();
    assert_eq!(res.status(), 200);
    Sse::new(res)
}

/// The `n` of an event frame's CloudEvent data.
fn n_of(f: &Frame) -> u64 {
    f.data.as_ref().unwrap()["data"]["n"].as_u64().unwrap()
}

/// The next `count` frames' `(id, n)`.
async fn take(sse: &mut Sse, count: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    for _ in 0..count {
        let f = sse.next().await.expect("the stream goes on");
        got.push((f.id.as_deref().unwrap().parse().unwrap(), n_of(&f)));
    }
    got
}

#[actix_rt::test]
async fn an_sse_client_that_reconnects_to_another_instance_misses_nothing_and_repeats_nothing() {
    let gw = gateway("evlog-two", |_| {}).await;
    let (b, b_broker, b_base) = second_instance(&gw).await;
    let mut on_a = open(&gw.http, &gw.base, "", None).await;
    for n in 0..5 {
        events::publish(&gw.ctx.broker, &event("orders.created", n))
            .await
            .unwrap();
    }
    let first = take(&mut on_a, 5).await;
    assert_eq!(
        first.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    let last_id = first[4].0.to_string();
    drop(on_a);
    // Away: two events published meanwhile, one through each instance's
    // broker connection.
    events::publish(&gw.ctx.broker, &event("orders.created", 5))
        .await
        .unwrap();
    events::publish(&b_broker, &event("orders.created", 6))
        .await
        .unwrap();
    let mut on_b = open(&gw.http, &b_base, "", Some(&last_id)).await;
    events::publish(&b_broker, &event("orders.created", 7))
        .await
        .unwrap();
    let resumed = take(&mut on_b, 3).await;
    assert_eq!(
        resumed.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        [5, 6, 7],
        "nothing missed, nothing repeated"
    );
    // The ids go on from A's: B gives every event the same position.
    assert_eq!(
        resumed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [first[4].0 + 1, first[4].0 + 2, first[4].0 + 3]
    );
    // And a client of A sees the same ids for the same events.
    let mut again_on_a = open(&gw.http, &gw.base, "", Some(&first[1].0.to_string())).await;
    let again = take(&mut again_on_a, 6).await;
    assert_eq!(
        again,
        first[2..]
            .iter()
            .chain(&resumed)
            .copied()
            .collect::<Vec<_>>()
    );
    drop(on_b);
    drop(again_on_a);
    stop_second(b, b_broker).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_client_resumes_after_a_gateway_restart_with_its_filter() {
    let mut gw = gateway("evlog-restart", |_| {}).await;
    let mut sse = open(&gw.http, &gw.base, "?type=orders.", None).await;
    for n in 0..3 {
        events::publish(&gw.ctx.broker, &event("orders.created", n))
            .await
            .unwrap();
        events::publish(&gw.ctx.broker, &event("users.created", 100 + n))
            .await
            .unwrap();
    }
    let seen = take(&mut sse, 3).await;
    assert_eq!(seen.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [0, 1, 2]);
    drop(sse);
    gw.stop_gateway().await;
    // Published while no gateway runs: kept by the log.
    for n in 3..5 {
        events::publish(&gw.ctx.broker, &event("users.created", 100 + n))
            .await
            .unwrap();
        events::publish(&gw.ctx.broker, &event("orders.created", n))
            .await
            .unwrap();
    }
    gw.start_gateway().await;
    let mut sse = open(
        &gw.http,
        &gw.base,
        "?type=orders.",
        Some(&seen[2].0.to_string()),
    )
    .await;
    events::publish(&gw.ctx.broker, &event("orders.created", 5))
        .await
        .unwrap();
    let resumed = take(&mut sse, 3).await;
    assert_eq!(
        resumed.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        [3, 4, 5],
        "the restarted gateway replays from the log, filtered, then goes live"
    );
    assert!(resumed.windows(2).all(|w| w[0].0 < w[1].0));
    drop(sse);
    gw.cleanup().await;
}

/// Consumes the events log from `offset` (`first`, or a number) as any
/// AMQP 0-9-1 client would, and returns the first `count` deliveries'
/// offsets and CloudEvents.
async fn replay_over_amqp(
    broker: &Broker,
    offset: AMQPValue,
    count: usize,
) -> Vec<(u64, Option<CloudEvent>)> {
    let ch = broker.channel().await.unwrap();
    ch.basic_qos(100, BasicQosOptions { global: false })
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(wire::HEADER_STREAM_OFFSET.into(), offset);
    let mut consumer = ch
        .basic_consume(
            broker.names().events_log().as_str().into(),
            "replay".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < count {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery from the log")
            .unwrap()
            .unwrap();
        let offset = wire::stream_offset(&d.properties).expect("an offset header");
        got.push((offset, serde_json::from_slice(&d.data).ok()));
        d.acker.ack(Default::default()).await.unwrap();
    }
    let _ = ch.close(200, "replayed".into()).await;
    got
}

#[actix_rt::test]
async fn an_amqp_client_replays_the_log_from_the_first_event() {
    let gw = gateway("evlog-amqp", |_| {}).await;
    let sent: Vec<CloudEvent> = (0..4).map(|n| event("audit.login", n)).collect();
    for e in &sent {
        events::publish(&gw.ctx.broker, e).await.unwrap();
    }
    let got = replay_over_amqp(&gw.ctx.broker, AMQPValue::LongString("first".into()), 4).await;
    assert_eq!(
        got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "a new log starts at offset 0"
    );
    assert_eq!(
        got.into_iter().map(|(_, e)| e.unwrap()).collect::<Vec<_>>(),
        sent
    );
    // The same positions an SSE client is given.
    let mut sse = open(&gw.http, &gw.base, "", Some("1")).await;
    assert_eq!(take(&mut sse, 2).await, [(2, 2), (3, 3)]);
    drop(sse);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_client_resuming_from_before_the_retention_is_told_what_it_lost() {
    let c = ctx("evlog-lost").await;
    // A tiny log: segments of 1 KiB, 4 KiB kept at most.
    let log = EventsLog {
        max_age: "1h".into(),
        max_bytes: 4096,
        segment_bytes: 1024,
    };
    let hub = EventHub::start(
        &c.broker,
        HubOptions {
            history: 1,
            history_bytes: 1 << 20,
            max_sessions: 10,
            session_buffer: 64,
            log,
        },
    )
    .await
    .unwrap();
    // Publish until RabbitMQ has dropped the log's first segment.
    let mut n = 0u32;
    let first_kept = poll_until(
        Duration::from_secs(60),
        "the log's first segment dropped",
        || {
            let broker = c.broker.clone();
            n += 20;
            let batch = n;
            async move {
                for i in batch - 20..batch {
                    let e = event("bulk.x", i).with_subject("x".repeat(200));
                    events::publish(&broker, &e).await.unwrap();
                }
                let first =
                    replay_over_amqp(&broker, AMQPValue::LongString("first".into()), 1).await;
                match first[0].0 {
                    0 => Err("offset 0 still kept"),
                    kept => Ok(kept),
                }
            }
        },
    )
    .await;
    // Resuming after offset 0: offsets 1 .. first_kept - 1 are gone.
    let mut sub = hub
        .subscribe(EventFilter::default(), Some("0".into()))
        .await
        .unwrap();
    assert!(!sub.gap);
    let lost = tokio::time::timeout(WAIT, sub.rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lost.ty, wire::EVENT_EVENTS_LOST);
    let lost_event: CloudEvent = serde_json::from_slice(&lost.json).unwrap();
    let data = lost_event.data.unwrap();
    assert_eq!(data["first_lost"], 1);
    assert_eq!(data["last_lost"], first_kept - 1);
    // Resuming from the lost event goes on with the first event kept.
    assert_eq!(lost.position, (first_kept - 1).to_string());
    // Then the log from its first kept event, in order.
    let next = tokio::time::timeout(WAIT, sub.rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.seq, first_kept);
    assert_eq!(next.ty, "bulk.x");
    drop(sub);
    hub.stop().await;
    c.cleanup(&[]).await;
}

#[actix_rt::test]
async fn the_hub_misses_nothing_while_its_connection_comes_back() {
    let c = ctx("evlog-hub-back").await;
    let hub = EventHub::start(
        &c.broker,
        HubOptions {
            history: 100,
            history_bytes: 1 << 20,
            max_sessions: 10,
            session_buffer: 256,
            log: EventsLog::new("1h", 16 << 20),
        },
    )
    .await
    .unwrap();
    // Published through another instance's connections, which stay up.
    let mut other = c.settings.clone();
    other.amqp.instance_id = format!("{}-publisher", other.amqp.instance_id);
    let publisher = Broker::connect(&other.amqp).await.unwrap();
    let mut sub = hub.subscribe(EventFilter::default(), None).await.unwrap();
    events::publish(&publisher, &event("x", 0)).await.unwrap();
    let first = tokio::time::timeout(WAIT, sub.rx.recv())
        .await
        .unwrap()
        .unwrap();
    // The management API lists new connections with some delay: close the
    // hub's as soon as it shows (not whichever of the instance's shows
    // first: closing only another left the hub connected).
    let hub_connection = format!("switchboard/{}/hub", c.broker.instance_id());
    poll_until(
        Duration::from_secs(60),
        "the hub's connection to close",
        || async {
            match crate::common::kill_connections_named(&hub_connection).await {
                0 => Err("none listed yet"),
                k => Ok(k),
            }
        },
    )
    .await;
    // Right away, while the hub's consumer is (likely) still away.
    for n in 1..40 {
        events::publish(&publisher, &event("x", n)).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 1..40 {
        let ev = tokio::time::timeout(WAIT, sub.rx.recv())
            .await
            .expect("every event after the reconnect")
            .expect("the session stays open");
        let e: CloudEvent = serde_json::from_slice(&ev.json).unwrap();
        got.push((ev.seq, e.data.unwrap()["n"].as_u64().unwrap()));
    }
    assert_eq!(
        got,
        (1..40).map(|n| (first.seq + n, n)).collect::<Vec<_>>(),
        "nothing missed, nothing twice"
    );
    assert!(hub.stats.consumer.reconnects() >= 1, "the hub came back");
    drop(sub);
    hub.stop().await;
    publisher.close().await;
    c.cleanup(&[]).await;
}
