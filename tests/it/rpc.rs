//! The RPC client against real workers: replies, concurrency, reply modes,
//! missing services, deadlines.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;
use switchboard::Error;
use switchboard::rpc::{Call, RpcClient, RpcOptions};
use switchboard::settings::ReplyMode;
use switchboard::worker::{self, Reply, Request};
use tokio::sync::Semaphore;

use crate::common::{ctx, eventually};

async fn echo_setup(
    name: &str,
    mode: ReplyMode,
) -> (
    crate::common::Ctx,
    RpcClient,
    switchboard::worker::WorkerHandle,
) {
    let c = ctx(name).await;
    let worker = c
        .worker("echo", &c.service(), worker::echo(Duration::ZERO))
        .await
        .unwrap();
    let mut opts = RpcOptions::from(&c.settings.rpc);
    opts.reply_mode = mode;
    let client = c.client(opts).await.unwrap();
    (c, client, worker)
}

#[actix_rt::test]
async fn a_call_reaches_a_worker_and_gets_its_reply() {
    let (c, client, _conn) = echo_setup("call", ReplyMode::Queue).await;
    let reply = client
        .call(Call::new("echo", &b"{\"hello\":\"world\"}"[..]))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.content_type, "application/json");
    assert_eq!(&reply.body[..], b"{\"hello\":\"world\"}");
    assert_eq!(client.stats().pending.load(Ordering::Relaxed), 0);
    c.cleanup(&["echo"]).await;
}

#[actix_rt::test]
async fn two_thousand_concurrent_calls_each_get_their_own_reply() {
    let (c, client, _conn) = echo_setup("many", ReplyMode::Queue).await;
    let calls = (0..2000).map(|i| {
        let client = client.clone();
        async move {
            let body = format!("{{\"n\":{i}}}");
            let reply = client
                .call(Call::new("echo", body.clone().into_bytes()).timeout(Duration::from_secs(60)))
                .await
                .unwrap();
            assert_eq!(reply.body_text(), body, "call {i} got another call's reply");
        }
    });
    join_all(calls).await;
    assert_eq!(client.stats().routed.load(Ordering::Relaxed), 2000);
    assert_eq!(client.stats().dropped(), 0);
    c.cleanup(&["echo"]).await;
}

#[actix_rt::test]
async fn direct_reply_to_mode_works() {
    let (c, client, _conn) = echo_setup("direct", ReplyMode::Direct).await;
    assert_eq!(client.reply_to(), "amq.rabbitmq.reply-to");
    let calls = (0..50).map(|i| {
        let client = client.clone();
        async move {
            let reply = client
                .call(Call::new("echo", format!("[{i}]").into_bytes()))
                .await
                .unwrap();
            assert_eq!(reply.body_text(), format!("[{i}]"));
        }
    });
    join_all(calls).await;
    c.cleanup(&["echo"]).await;
}

#[actix_rt::test]
async fn a_call_to_a_service_with_no_queue_fails_at_once() {
    let (c, client, _conn) = echo_setup("noroute", ReplyMode::Queue).await;
    let err = client
        .call(Call::new("nobody-serves-this", &b"{}"[..]).timeout(Duration::from_secs(600)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoRoute { .. }), "got {err:?}");
    assert!(err.to_string().contains("nobody-serves-this"));
    // The failed call left no pending entry behind.
    eventually(Duration::from_secs(5), "pending back to 0", || async {
        client.stats().pending.load(Ordering::Relaxed) == 0
    })
    .await;
    c.cleanup(&["echo"]).await;
}

#[actix_rt::test]
async fn a_call_the_broker_refuses_fails_with_nacked_not_a_timeout() {
    use switchboard::lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use switchboard::lapin::types::{AMQPValue, FieldTable};
    let (c, client, _conn) = echo_setup("nacked", ReplyMode::Queue).await;
    // A queue that refuses every message (an operator's length limit of 0
    // with `reject-publish`), bound where calls to `full` go.
    let names = c.broker.names();
    let queue = names.service_queue("full");
    let ch = c.broker.channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        names.requests_exchange().as_str().into(),
        "full".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let err = client
        .call(Call::new("full", &b"{}"[..]).timeout(Duration::from_secs(600)))
        .await
        .unwrap_err();
    // Sent again on new channels, refused each time: the caller learns it
    // at once, may try later, and no timeout is counted.
    assert!(matches!(err, Error::Nacked), "got {err:?}");
    assert!(err.is_recoverable());
    assert_eq!(client.stats().pending.load(Ordering::Relaxed), 0);
    assert_eq!(client.stats().timed_out.load(Ordering::Relaxed), 0);
    // The worker's service goes on.
    let reply = client.call(Call::new("echo", &b"{}"[..])).await.unwrap();
    assert_eq!(reply.status, 200);
    c.cleanup(&["echo", "full"]).await;
}

#[actix_rt::test]
async fn a_slow_handler_times_out_and_its_late_reply_is_dropped() {
    let c = ctx("slow").await;
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let slow = Arc::new(move |req: Request| {
        let g = g.clone();
        async move {
            // Held until the test has seen the caller time out.
            let _permit = g
                .acquire()
                .await
                .map_err(|_| worker::HandlerError::new(500, "gate closed"))?;
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    let svc = c.service();
    c.worker("slow", &svc, slow).await.unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();

    let started = tokio::time::Instant::now();
    let err = client
        .call(Call::new("slow", &b"1"[..]).timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "got {err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline was not kept"
    );
    eventually(
        Duration::from_secs(5),
        "the timed-out call is unregistered",
        || async { client.stats().pending.load(Ordering::Relaxed) == 0 },
    )
    .await;

    // Let the handler answer: the late reply is dropped and counted.
    gate.add_permits(1);
    eventually(Duration::from_secs(10), "late reply counted", || async {
        client.stats().late.load(Ordering::Relaxed) == 1
    })
    .await;

    // The client still works.
    gate.add_permits(1);
    let reply = client
        .call(Call::new("slow", &b"2"[..]).timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"2");
    c.cleanup(&["slow"]).await;
}

#[actix_rt::test]
async fn the_pending_bound_refuses_calls_beyond_it() {
    let c = ctx("bound").await;
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let held = Arc::new(move |req: Request| {
        let g = g.clone();
        async move {
            let _p = g
                .acquire()
                .await
                .map_err(|_| worker::HandlerError::new(500, "closed"))?;
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    c.worker("held", &c.service(), held).await.unwrap();
    let mut opts = RpcOptions::from(&c.settings.rpc);
    opts.max_pending = 3;
    let client = c.client(opts).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..3 {
        pending.push(
            client
                .send(Call::new("held", format!("{i}").into_bytes()))
                .await
                .unwrap(),
        );
    }
    let err = client
        .send(Call::new("held", &b"x"[..]))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Overloaded { limit: 3 }), "got {err:?}");
    gate.add_permits(3);
    for p in pending {
        assert_eq!(p.wait().await.unwrap().status, 200);
    }
    // Room again.
    gate.add_permits(1);
    assert!(client.call(Call::new("held", &b"y"[..])).await.is_ok());
    c.cleanup(&["held"]).await;
}
