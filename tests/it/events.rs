//! Broadcast: every subscriber receives every event, in order.

use std::time::Duration;

use switchboard::events::{self, CloudEvent, SubscribeOptions, Subscription};

use crate::common::ctx;

#[actix_rt::test]
async fn three_subscribers_each_receive_every_event_in_order() {
    let c = ctx("fanout").await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(
            Subscription::start(&c.broker, SubscribeOptions::default())
                .await
                .unwrap(),
        );
    }
    let sent: Vec<CloudEvent> = (0..50)
        .map(|i| {
            CloudEvent::new("orders.created", "test", serde_json::json!({ "n": i }))
                .with_subject(format!("order-{i}"))
        })
        .collect();
    for e in &sent {
        events::publish(&c.broker, e).await.unwrap();
    }
    for sub in &mut subs {
        for expected in &sent {
            let got = tokio::time::timeout(Duration::from_secs(10), sub.recv())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .unwrap();
            assert_eq!(&got, expected);
        }
    }
    c.cleanup(&[]).await;
}

#[actix_rt::test]
async fn a_durable_subscriber_gets_what_was_published_while_it_was_away_and_filters_by_type() {
    let c = ctx("durable").await;
    let name = format!("{}-audit", c.prefix);
    let opts = SubscribeOptions {
        durable_name: Some(name.clone()),
        type_prefix: Some("audit.".into()),
    };
    // Subscribe once to create the queue, then go away.
    let first = Subscription::start(&c.broker, opts.clone()).await.unwrap();
    let queue = first.queue.clone();
    drop(first);
    events::publish(
        &c.broker,
        &CloudEvent::new("noise.x", "test", serde_json::json!(1)),
    )
    .await
    .unwrap();
    let wanted = CloudEvent::new("audit.login", "test", serde_json::json!({"user": "ada"}));
    events::publish(&c.broker, &wanted).await.unwrap();
    let mut back = Subscription::start(&c.broker, opts).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), back.recv())
        .await
        .expect("the event kept while away")
        .unwrap()
        .unwrap();
    assert_eq!(got, wanted);
    drop(back);
    let ch = c.broker.channel().await.unwrap();
    let _ = ch.queue_delete(queue.into(), Default::default()).await;
    c.cleanup(&[]).await;
}

/// A durable subscription acks an event when the next one is asked for
/// (handed to lapin without waiting for it to be written): an event taken
/// but not followed by a `recv` comes back to the next subscriber, one
/// followed by a `recv` never does, even when the subscription stops right
/// after.
#[actix_rt::test]
async fn a_durable_subscriber_acks_an_event_once_it_asks_for_the_next_and_not_before() {
    let c = ctx("durable-acks").await;
    let name = format!("{}-ledger", c.prefix);
    let opts = SubscribeOptions {
        durable_name: Some(name.clone()),
        type_prefix: None,
    };
    let recv = async |sub: &mut Subscription| {
        tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap()
    };
    let mut sub = Subscription::start(&c.broker, opts.clone()).await.unwrap();
    let queue = sub.queue.clone();
    let sent: Vec<CloudEvent> = (0..3)
        .map(|i| CloudEvent::new("ledger.entry", "test", serde_json::json!({ "n": i })))
        .collect();
    for e in &sent {
        events::publish(&c.broker, e).await.unwrap();
    }
    // Taken, never followed by another recv: not acked.
    assert_eq!(recv(&mut sub).await, sent[0]);
    sub.stop().await;
    let mut sub = Subscription::start(&c.broker, opts.clone()).await.unwrap();
    assert_eq!(
        recv(&mut sub).await,
        sent[0],
        "an event not yet handled comes back"
    );
    // Asking for the next acks it: stopped right after, it is gone for good.
    assert_eq!(recv(&mut sub).await, sent[1]);
    sub.stop().await;
    let mut sub = Subscription::start(&c.broker, opts).await.unwrap();
    assert_eq!(recv(&mut sub).await, sent[1], "taken last, not acked");
    assert_eq!(recv(&mut sub).await, sent[2], "the one before was acked");
    sub.stop().await;
    let ch = c.broker.channel().await.unwrap();
    let _ = ch.queue_delete(queue.into(), Default::default()).await;
    c.cleanup(&[]).await;
}
