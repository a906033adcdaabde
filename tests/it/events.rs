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
