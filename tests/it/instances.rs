//! Several gateways on one store (issue 15), in one process: a gateway that
//! stops has its pending calls finished by another, which adopts its reply
//! queue (`calls::adopt`). The SIGKILL case, across processes on
//! PostgreSQL, is `tests/deployment.rs`.

use std::time::Duration;

use crate::common::{eventually, gateway, poll_until, queue_consumers};

#[actix_rt::test]
async fn a_gateway_that_stops_has_its_pending_calls_finished_by_another_on_the_store() {
    let mut gw = gateway("adopt", |_| {}).await;
    // Gateway B: the same store and prefix, an instance of its own.
    let mut settings_b = gw.ctx.settings.clone();
    settings_b.amqp.instance_id = format!("{}-b", gw.ctx.prefix);
    let broker_b = switchboard::Broker::connect(&settings_b.amqp)
        .await
        .unwrap();
    let b = switchboard::gateway::start(
        &settings_b,
        &broker_b,
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let base_b = format!("http://{}", b.addr);

    // A call accepted by A, held by its worker.
    let res = gw
        .post("slow")
        .header("Prefer", "respond-async")
        .body("{\"n\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let id = res.headers()["Call-Id"].to_str().unwrap().to_owned();
    let a_queue = gw
        .ctx
        .broker
        .names()
        .reply_queue(gw.ctx.broker.instance_id());
    let a_deadwatch = gw
        .ctx
        .broker
        .names()
        .deadwatch_queue(gw.ctx.broker.instance_id());

    // A stops (and says so in the store); then the worker answers, into
    // A's reply queue, which nobody of A reads any more.
    gw.stop_gateway().await;
    gw.gate.add_permits(1);

    let http = reqwest::Client::new();
    let status = poll_until(Duration::from_secs(15), "the call ends on B", || async {
        let doc: serde_json::Value = http
            .get(format!("{base_b}/v1/calls/{id}"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        match doc["status"].as_str() {
            Some("pending") | None => Err(format!("{doc}")),
            Some(s) => Ok(s.to_owned()),
        }
    })
    .await;
    assert_eq!(status, "succeeded");
    // B took it from A's queue, then deleted A's queues (drained, nothing
    // of A pending). The adopter counts the reply once the store has taken
    // it, and the store shows it ended a moment before that.
    poll_until(
        Duration::from_secs(15),
        "B counts the adopted reply",
        || async {
            let metrics = http
                .get(format!("{base_b}/metrics"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            if metrics.contains("switchboard_rpc_adopted_replies_total 1") {
                Ok(())
            } else {
                Err(metrics)
            }
        },
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "A's queues are deleted",
        || async {
            queue_consumers(&broker_b, &a_queue).await.is_none()
                && queue_consumers(&broker_b, &a_deadwatch).await.is_none()
        },
    )
    .await;

    b.stop().await;
    let ch = broker_b.channel().await.unwrap();
    let names = broker_b.names();
    for q in [
        names.reply_queue(broker_b.instance_id()),
        names.deadwatch_queue(broker_b.instance_id()),
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    broker_b.close().await;
    gw.cleanup().await;
}

/// The window of RELIABILITY.md: a gateway killed after storing a call's
/// end and before its `switchboard.call.completed` was confirmed. Its
/// reply, never acked, is back in its reply queue, marked redelivered; the
/// gateway that adopts the queue finds the call ended and publishes its
/// completion (and its `accepted`) again, with the ids a live gateway gives
/// them: a subscriber on the events exchange sees each once.
#[actix_rt::test]
async fn a_call_whose_gateway_died_before_its_completion_was_published_gets_it_from_the_adopter() {
    use deadpool_lapin::lapin::BasicProperties;
    use deadpool_lapin::lapin::options::{
        BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
    };
    use deadpool_lapin::lapin::types::FieldTable;
    use switchboard::calls::{CallStatus, CallStore, NewCall, StoredResult};
    use switchboard::events::lifecycle_event_id;
    use switchboard::{SubscribeOptions, Subscription};

    const ACCEPTED: &str = "switchboard.call.accepted";
    const COMPLETED: &str = "switchboard.call.completed";
    let gw = gateway("adopt-event", |_| {}).await;
    let broker = gw.ctx.broker.clone();
    let mut sub = Subscription::start(
        &broker,
        SubscribeOptions {
            durable_name: None,
            type_prefix: Some("switchboard.call.".into()),
        },
    )
    .await
    .unwrap();
    // Events until the completion of `call`, in order.
    async fn until_completed(sub: &mut Subscription, call: &str) -> Vec<switchboard::CloudEvent> {
        let mut got = Vec::new();
        loop {
            let e = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                .await
                .unwrap_or_else(|_| panic!("no completion of {call} within 30 s; got {got:?}"))
                .unwrap()
                .unwrap();
            let done = e.ty == COMPLETED && e.subject.as_deref() == Some(call);
            got.push(e);
            if done {
                return got;
            }
        }
    }
    let call_202 = |n: u32| {
        gw.post("echo")
            .header("Prefer", "respond-async")
            .body(format!("{{\"n\":{n}}}"))
            .send()
    };

    // A call ended by a live gateway: its events' ids are made of its id.
    let res = call_202(0).await.unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let live = res.headers()["Call-Id"].to_str().unwrap().to_owned();
    let first = until_completed(&mut sub, &live).await;
    let of_live: Vec<_> = first
        .iter()
        .filter(|e| e.subject.as_deref() == Some(live.as_str()))
        .map(|e| (e.ty.as_str(), e.id.clone()))
        .collect();
    assert_eq!(
        of_live,
        [
            (ACCEPTED, lifecycle_event_id(&live, ACCEPTED)),
            (COMPLETED, lifecycle_event_id(&live, COMPLETED)),
        ]
    );

    // Gateway D, on the same store: its call `id` ended (stored), its
    // completion never published, its reply taken and not acked when it
    // was killed.
    let dead = format!("{}-dead", gw.ctx.prefix);
    let names = broker.names();
    let (reply_q, dead_q) = (names.reply_queue(&dead), names.deadwatch_queue(&dead));
    let ch = broker.channel().await.unwrap();
    for q in [&reply_q, &dead_q] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let store = CallStore::open(&gw.ctx.settings.gateway.store_url)
        .await
        .unwrap()
        .for_instance(&dead);
    let id = uuid::Uuid::now_v7().to_string();
    let body = b"{\"n\":1}".to_vec();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    store
        .insert(&NewCall {
            id: id.clone(),
            caller: "anonymous".into(),
            service: "echo".into(),
            created_ms: now - 1000,
            deadline_ms: now + 60_000,
            published: true,
            idem_key: None,
            body_hash: None,
            traceparent: None,
            callback_url: None,
        })
        .await
        .unwrap();
    let result = StoredResult {
        status: 200,
        content_type: "application/json".into(),
        body: body.clone(),
    };
    let ended = store
        .complete_plain(&id, CallStatus::Succeeded, Some(result), now)
        .await
        .unwrap()
        .expect("the call ends");
    ch.basic_publish(
        "".into(),
        reply_q.as_str().into(),
        BasicPublishOptions::default(),
        &body,
        BasicProperties::default()
            .with_correlation_id(id.as_str().into())
            .with_content_type("application/json".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // D's consumer had it, unacked: its channel goes with D.
    let d_channel = broker.channel().await.unwrap();
    let taken = poll_until(Duration::from_secs(10), "D takes its reply", || async {
        d_channel
            .basic_get(reply_q.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert!(!taken.delivery.redelivered);
    d_channel.close(320, "killed".into()).await.unwrap();
    // D's row, silent: the live gateway adopts its queues.
    store.heartbeat(&reply_q, &dead_q).await.unwrap();
    store.mark_gone().await.unwrap();

    let adopted = until_completed(&mut sub, &id).await;
    let of_dead: Vec<_> = adopted
        .iter()
        .filter(|e| e.subject.as_deref() == Some(id.as_str()))
        .collect();
    assert_eq!(
        of_dead
            .iter()
            .map(|e| (e.ty.as_str(), e.id.clone()))
            .collect::<Vec<_>>(),
        [
            (ACCEPTED, lifecycle_event_id(&id, ACCEPTED)),
            (COMPLETED, lifecycle_event_id(&id, COMPLETED)),
        ],
        "the accepted event, then the completion"
    );
    let completion = of_dead[1];
    let data = completion.data.as_ref().unwrap();
    assert_eq!(data["status"], "succeeded");
    assert_eq!(data["result"]["body"]["n"], 1, "{data}");
    assert_eq!(
        completion.time.map(|t| t.timestamp_millis()),
        ended.completed_ms,
        "the time the call ended"
    );

    // Nothing more about it: once D's queues are gone (drained, nothing of
    // D pending), the events of one more call come next.
    eventually(
        Duration::from_secs(30),
        "D's queues are deleted",
        || async {
            queue_consumers(&broker, &reply_q).await.is_none()
                && queue_consumers(&broker, &dead_q).await.is_none()
        },
    )
    .await;
    let res = call_202(2).await.unwrap();
    let marker = res.headers()["Call-Id"].to_str().unwrap().to_owned();
    let rest = until_completed(&mut sub, &marker).await;
    let again: Vec<_> = rest
        .iter()
        .filter(|e| e.subject.as_deref() != Some(marker.as_str()))
        .map(|e| (e.ty.clone(), e.subject.clone()))
        .collect();
    assert!(again.is_empty(), "events after the adoption: {again:?}");
    let metrics = gw
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchboard_gateway_end_events_republished_total{service=\"echo\"} 1"),
        "{metrics}"
    );

    sub.stop().await;
    store.close().await;
    for q in [&reply_q, &dead_q] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    gw.cleanup().await;
}
