//! Interoperability with a foreign AMQP client written directly on lapin,
//! as a RabbitMQ tutorial-6 program would be.

use std::time::Duration;

use deadpool_lapin::lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions},
    types::FieldTable,
};
use futures_util::StreamExt;
use switchboard::amqp::topology;
use switchboard::rpc::{Call, RpcOptions};
use switchboard::worker::{self};

use crate::common::ctx;

#[actix_rt::test]
async fn a_tutorial_six_client_calls_a_switchboard_service() {
    let c = ctx("tut6-call").await;
    c.worker("echo", &c.service(), worker::echo(Duration::ZERO))
        .await
        .unwrap();

    // The foreign client: its own connection, an exclusive server-named
    // reply queue, a publish to the default exchange with the queue's name.
    let crate::common::Foreign {
        conn: foreign,
        channel: ch,
        reply_queue: reply_q,
        mut replies,
    } = crate::common::foreign_client("tut6").await;
    ch.basic_publish(
        "".into(),
        c.broker.names().service_queue("echo").into(),
        BasicPublishOptions::default(),
        b"30",
        BasicProperties::default()
            .with_reply_to(reply_q)
            .with_correlation_id("tut6-corr-1".into()),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("tut6-corr-1")
    );
    assert_eq!(&reply.data[..], b"30");
    let _ = foreign.close(200, "done".into()).await;
    c.cleanup(&["echo"]).await;
}

#[actix_rt::test]
async fn a_switchboard_client_calls_a_service_served_by_a_foreign_worker() {
    let c = ctx("tut6-serve").await;
    // The queue as switchboard declares it; a foreign worker consumes it.
    let setup = c.broker.channel().await.unwrap();
    topology::declare_service(&setup, c.broker.names(), "fib", &c.service())
        .await
        .unwrap();
    let foreign =
        deadpool_lapin::lapin::Connection::connect(&crate::common::amqp_url(), Default::default())
            .await
            .unwrap();
    let ch = foreign.create_channel().await.unwrap();
    let mut requests = ch
        .basic_consume(
            c.broker.names().service_queue("fib").into(),
            "foreign-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let server_ch = ch.clone();
    let server = tokio::spawn(async move {
        let d = requests.next().await.unwrap().unwrap();
        let n: u64 = std::str::from_utf8(&d.data)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let fib = (0..n).fold((0u64, 1u64), |(a, b), _| (b, a + b)).0;
        server_ch
            .basic_publish(
                "".into(),
                d.properties.reply_to().clone().unwrap(),
                BasicPublishOptions::default(),
                fib.to_string().as_bytes(),
                BasicProperties::default()
                    .with_correlation_id(d.properties.correlation_id().clone().unwrap()),
            )
            .await
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    });
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let reply = client
        .call(Call::new("fib", &b"10"[..]).timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    // No x-status and no content type from the foreign worker: 200 and octet-stream.
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"55");
    server.await.unwrap();
    let _ = foreign.close(200, "done".into()).await;
    c.cleanup(&["fib"]).await;
}
