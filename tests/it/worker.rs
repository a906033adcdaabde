//! Workers: error replies, poison messages, expired requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_lapin::lapin::options::BasicGetOptions;
use switchboard::amqp::{Outgoing, wire};
use switchboard::rpc::{Call, RpcOptions};
use switchboard::worker::{HandlerError, Reply, Request};

use crate::common::{ctx, eventually, poll_until};

#[actix_rt::test]
async fn a_handler_error_is_a_problem_json_reply_with_its_status() {
    let c = ctx("err").await;
    let h = Arc::new(|req: Request| async move {
        if &req.payload[..] == b"\"missing\"" {
            Err(HandlerError::new(404, "no such order").with_detail("order 7 does not exist"))
        } else {
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    c.worker("orders", &c.service(), h).await.unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let reply = client
        .call(Call::new("orders", &b"\"missing\""[..]))
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(reply.content_type, "application/problem+json");
    let doc: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["status"], 404);
    assert_eq!(doc["title"], "no such order");
    assert_eq!(doc["detail"], "order 7 does not exist");
    c.cleanup(&["orders"]).await;
}

#[actix_rt::test]
async fn a_handler_that_always_panics_ends_in_the_dead_letter_queue_and_the_worker_keeps_serving() {
    let c = ctx("poison").await;
    let attempts = Arc::new(AtomicU64::new(0));
    let a = attempts.clone();
    let h = Arc::new(move |req: Request| {
        let a = a.clone();
        async move {
            if &req.payload[..] == b"\"poison\"" {
                a.fetch_add(1, Ordering::Relaxed);
                panic!("this request always crashes the handler");
            }
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    let mut svc = c.service();
    svc.delivery_limit = 2;
    let handle = c.worker("fragile", &svc, h).await.unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let poisoned = client
        .send(Call::new("fragile", &b"\"poison\""[..]).timeout(Duration::from_secs(60)))
        .await
        .unwrap();

    // The request lands in sb.svc.fragile.dead after the delivery limit.
    let ch = c.broker.channel().await.unwrap();
    let dead_queue = c.broker.names().dead_queue("fragile");
    let dead = poll_until(Duration::from_secs(30), "dead-lettered", || async {
        ch.basic_get(dead_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .ok_or("the dead-letter queue is empty")
    })
    .await;
    assert_eq!(&dead.delivery.data[..], b"\"poison\"");
    assert_eq!(
        dead.delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some(poisoned.call_id())
    );
    // Delivered more than once (redelivered), but never looped forever.
    let n = attempts.load(Ordering::Relaxed);
    assert!((2..=4).contains(&n), "handler ran {n} times");
    // The worker handed it back at least once itself (a delivery returned
    // because a channel was lost, as a loaded machine's watchdog may do,
    // counts against the limit too without passing through the worker).
    assert!(handle.stats.requeued.load(Ordering::Relaxed) >= 1);

    // The worker still serves other requests.
    let reply = client
        .call(Call::new("fragile", &b"\"fine\""[..]))
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"\"fine\"");
    drop(poisoned);
    c.cleanup(&["fragile"]).await;
}

#[actix_rt::test]
async fn a_request_past_its_deadline_is_not_worked_on() {
    let c = ctx("expired").await;
    let ran = Arc::new(AtomicU64::new(0));
    let r = ran.clone();
    let h = Arc::new(move |req: Request| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::Relaxed);
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    let handle = c.worker("late", &c.service(), h).await.unwrap();
    // A request whose deadline passed a second ago (as if it waited in the queue).
    let mut props = wire::request_properties(
        &wire::RequestMeta {
            service: "late",
            correlation_id: "stale-1",
            message_id: None,
            reply_to: None,
            content_type: wire::CONTENT_JSON,
            timeout: None,
            traceparent: None,
            caller_waits: false,
        },
        true,
    );
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        wire::HEADER_DEADLINE.into(),
        deadpool_lapin::lapin::types::AMQPValue::LongLongInt((wire::now_ms() - 1000) as i64),
    );
    props = props.with_headers(headers);
    c.broker
        .publish(Outgoing {
            exchange: &c.broker.names().requests_exchange(),
            routing_key: "late",
            payload: b"{}",
            properties: props,
            mandatory: true,
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the stale request is dropped",
        || async { handle.stats.expired.load(Ordering::Relaxed) == 1 },
    )
    .await;
    assert_eq!(
        ran.load(Ordering::Relaxed),
        0,
        "the handler ran a stale request"
    );
    c.cleanup(&["late"]).await;
}

/// Publishes a request for `service` whose reply goes to `reply_to`, with
/// or without [`wire::HEADER_CALLER_WAITS`], as a foreign caller would.
async fn request_replied_to(
    c: &crate::common::Ctx,
    service: &str,
    id: &str,
    reply_to: &str,
    caller_waits: bool,
) {
    let meta = wire::RequestMeta {
        service,
        correlation_id: id,
        message_id: None,
        reply_to: Some(reply_to),
        content_type: wire::CONTENT_JSON,
        timeout: Some(Duration::from_secs(30)),
        traceparent: None,
        caller_waits,
    };
    c.broker
        .publish(Outgoing {
            exchange: &c.broker.names().requests_exchange(),
            routing_key: service,
            payload: b"{}",
            properties: wire::request_properties(&meta, true),
            mandatory: true,
        })
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_caller_that_waits_in_memory_gets_a_transient_reply_and_others_a_persistent_one() {
    use deadpool_lapin::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use deadpool_lapin::lapin::types::FieldTable;
    let c = ctx("waits").await;
    let handle = c
        .worker(
            "waits",
            &c.service(),
            switchboard::worker::echo(Duration::ZERO),
        )
        .await
        .unwrap();
    // A reply queue of the test's own, read as a foreign caller reads it.
    let replies = format!("{}.t-waits-replies", c.prefix);
    let ch = c.broker.channel().await.unwrap();
    ch.queue_declare(
        replies.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    request_replied_to(&c, "waits", "waiting", &replies, true).await;
    request_replied_to(&c, "waits", "stored", &replies, false).await;
    let mut modes = std::collections::HashMap::new();
    while modes.len() < 2 {
        let m = poll_until(Duration::from_secs(10), "a reply", || async {
            ch.basic_get(replies.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
                .ok_or("no reply yet")
        })
        .await;
        let p = &m.delivery.properties;
        let id = p.correlation_id().as_ref().unwrap().to_string();
        modes.insert(id, *p.delivery_mode());
    }
    assert_eq!(
        modes["waiting"],
        Some(1),
        "a waiting caller's reply is transient"
    );
    assert_eq!(
        modes["stored"],
        Some(wire::PERSISTENT),
        "a reply to a caller that does not say it waits is persistent"
    );
    eventually(Duration::from_secs(10), "both requests acked", || async {
        handle.stats.replied.load(Ordering::Relaxed) == 2
    })
    .await;
    let _ = ch
        .queue_delete(replies.as_str().into(), QueueDeleteOptions::default())
        .await;
    c.cleanup(&["waits"]).await;
}

#[actix_rt::test]
async fn a_library_call_says_its_caller_waits_and_a_send_does_not() {
    let c = ctx("waitsays").await;
    // No worker: the requests stay in the service queue, to be read there.
    let ch = c.broker.channel().await.unwrap();
    switchboard::amqp::topology::declare_service(&ch, c.broker.names(), "waitsays", &c.service())
        .await
        .unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let called = {
        let client = client.clone();
        actix_rt::spawn(async move {
            client
                .call(Call::new("waitsays", &b"1"[..]).timeout(Duration::from_secs(30)))
                .await
        })
    };
    let sent = client
        .send(Call::new("waitsays", &b"2"[..]).timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    let queue = c.broker.names().service_queue("waitsays");
    let mut waits = std::collections::HashMap::new();
    while waits.len() < 2 {
        let m = poll_until(Duration::from_secs(10), "a request", || async {
            ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "no request yet".to_owned())
        })
        .await;
        waits.insert(
            m.delivery.data.clone(),
            wire::caller_waits(&m.delivery.properties),
        );
    }
    assert!(waits[&b"1".to_vec()], "RpcClient::call sets the header");
    assert!(!waits[&b"2".to_vec()], "RpcClient::send does not");
    called.abort();
    drop(sent);
    c.cleanup(&["waitsays"]).await;
}
