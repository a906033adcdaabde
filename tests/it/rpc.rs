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

use crate::common::{ctx, eventually, kill_connections_named, poll_until};

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

/// A worker of `held` whose handler says it started, then holds each
/// request until the returned gate gives it a permit.
async fn held_worker(
    c: &crate::common::Ctx,
) -> (Arc<Semaphore>, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let gate = Arc::new(Semaphore::new(0));
    let (started, started_rx) = tokio::sync::mpsc::unbounded_channel();
    let g = gate.clone();
    let held = Arc::new(move |req: Request| {
        let (g, started) = (g.clone(), started.clone());
        async move {
            let _ = started.send(());
            let _p = g
                .acquire()
                .await
                .map_err(|_| worker::HandlerError::new(500, "closed"))?;
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    c.worker("held", &c.service(), held).await.unwrap();
    (gate, started_rx)
}

#[actix_rt::test]
async fn the_pending_bound_refuses_calls_beyond_it() {
    let c = ctx("bound").await;
    let (gate, _started) = held_worker(&c).await;
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

/// A worker of the test's own on bare lapin, as a foreign service would
/// be: it answers each request on its `reply_to` and reports that address.
async fn foreign_echo(
    c: &crate::common::Ctx,
    service: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use deadpool_lapin::lapin::BasicProperties;
    use deadpool_lapin::lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions,
    };
    use deadpool_lapin::lapin::types::FieldTable;
    use futures_util::StreamExt;

    let ch = c.broker.channel().await.unwrap();
    switchboard::amqp::topology::declare_service(&ch, c.broker.names(), service, &c.service())
        .await
        .unwrap();
    let queue = c.broker.names().service_queue(service);
    let mut deliveries = ch
        .basic_consume(
            queue.as_str().into(),
            "foreign-echo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    actix_rt::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            let reply_to = d.properties.reply_to().clone().unwrap().to_string();
            let mut props = BasicProperties::default();
            if let Some(id) = d.properties.correlation_id() {
                props = props.with_correlation_id(id.clone());
            }
            ch.basic_publish(
                "".into(),
                reply_to.as_str().into(),
                BasicPublishOptions::default(),
                &d.data,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
            let _ = tx.send(reply_to);
        }
    });
    rx
}

#[actix_rt::test]
async fn in_auto_mode_a_waiting_call_comes_back_by_direct_reply_to_and_a_sent_one_through_the_reply_queue()
 {
    let c = ctx("auto-paths").await;
    let mut seen = foreign_echo(&c, "echo").await;
    let mut opts = RpcOptions::from(&c.settings.rpc);
    opts.reply_mode = ReplyMode::Auto;
    let client = c.client(opts).await.unwrap();
    let reply = client
        .call(Call::new("echo", &b"\"waits\""[..]))
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"\"waits\"");
    let reply_to = seen.recv().await.unwrap();
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to."),
        "a waiting call's reply_to: {reply_to}"
    );
    let reply = client
        .send(Call::new("echo", &b"\"outlives\""[..]))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"\"outlives\"");
    let reply_to = seen.recv().await.unwrap();
    assert_eq!(
        reply_to,
        c.broker.names().reply_queue(c.broker.instance_id())
    );
    assert!(client.waiting_consumer().unwrap().is_up());
    c.cleanup(&["echo"]).await;
}

#[actix_rt::test]
async fn in_auto_mode_a_waiting_call_whose_reply_connection_drops_fails_at_once_and_the_next_is_answered()
 {
    let c = ctx("auto-drop").await;
    let (gate, mut held_rx) = held_worker(&c).await;
    let mut opts = RpcOptions::from(&c.settings.rpc);
    opts.reply_mode = ReplyMode::Auto;
    let client = c.client(opts).await.unwrap();
    let deadline = Duration::from_secs(120);
    let first = {
        let client = client.clone();
        actix_rt::spawn(async move {
            client
                .call(Call::new("held", &b"1"[..]).timeout(deadline))
                .await
        })
    };
    held_rx.recv().await.unwrap();
    let prefix = format!("switchboard/{}/rpc-direct", c.broker.instance_id());
    // The management API lists a new connection with some delay.
    poll_until(Duration::from_secs(60), &prefix, || async {
        match kill_connections_named(&prefix).await {
            0 => Err("not listed yet"),
            k => Ok(k),
        }
    })
    .await;
    // Not at its deadline: the caller learns at once that its reply cannot come.
    let err = tokio::time::timeout(deadline / 2, first)
        .await
        .expect("the waiting call ends before its deadline")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::ReplyLost(_)), "got {err:?}");
    gate.add_permits(2);
    eventually(
        Duration::from_secs(30),
        "the direct reply consumer is back",
        || async { client.waiting_consumer().unwrap().is_up() },
    )
    .await;
    let reply = client.call(Call::new("held", &b"2"[..])).await.unwrap();
    assert_eq!(&reply.body[..], b"2");
    c.cleanup(&["held"]).await;
}
