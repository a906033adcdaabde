//! Several gateways on one store (issue 15), in one process: a gateway that
//! stops has its pending calls finished by another, which adopts its reply
//! queue (`calls::adopt`). The SIGKILL case, across processes on
//! PostgreSQL, is `tests/deployment.rs`.

use std::time::{Duration, Instant};

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

const ACCEPTED: &str = "switchboard.call.accepted";
const COMPLETED: &str = "switchboard.call.completed";

/// A subscriber to every call lifecycle event on the events exchange.
async fn lifecycle_subscriber(broker: &switchboard::Broker) -> switchboard::Subscription {
    switchboard::Subscription::start(
        broker,
        switchboard::SubscribeOptions {
            durable_name: None,
            type_prefix: Some("switchboard.call.".into()),
        },
    )
    .await
    .unwrap()
}

/// The events `sub` gets until the completion of `call`, in order.
async fn until_completed(
    sub: &mut switchboard::Subscription,
    call: &str,
) -> Vec<switchboard::CloudEvent> {
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

/// `(type, id)` of the events of `got` about `call`.
fn about(got: &[switchboard::CloudEvent], call: &str) -> Vec<(String, String)> {
    got.iter()
        .filter(|e| e.subject.as_deref() == Some(call))
        .map(|e| (e.ty.clone(), e.id.clone()))
        .collect()
}

/// What a live gateway publishes about `call`: its `accepted`, then its
/// completion, with ids made of its id.
fn published_once(call: &str) -> Vec<(String, String)> {
    use switchboard::events::lifecycle_event_id;
    vec![
        (ACCEPTED.into(), lifecycle_event_id(call, ACCEPTED)),
        (COMPLETED.into(), lifecycle_event_id(call, COMPLETED)),
    ]
}

/// A 202 call to `echo` through `gw`; its id.
async fn call_202(gw: &crate::common::Gw, n: u32) -> String {
    let res = gw
        .post("echo")
        .header("Prefer", "respond-async")
        .body(format!("{{\"n\":{n}}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    res.headers()["Call-Id"].to_str().unwrap().to_owned()
}

/// What a gateway killed in the window leaves: a call of its (instance
/// `store`'s) ended in the store, its completion never published, and its
/// reply in `reply_queue`, taken by the gateway and not acked (so
/// redelivered). The call's id and the time it ended.
async fn ended_in_the_window(
    broker: &switchboard::Broker,
    store: &switchboard::calls::CallStore,
    reply_queue: &str,
) -> (String, i64) {
    use deadpool_lapin::lapin::BasicProperties;
    use deadpool_lapin::lapin::options::{BasicGetOptions, BasicPublishOptions};
    use switchboard::calls::{CallStatus, NewCall, StoredResult};

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
    store
        .complete_plain(&id, CallStatus::Succeeded, Some(result), now)
        .await
        .unwrap()
        .expect("the call ends");
    let ch = broker.channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        reply_queue.into(),
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
    // The gateway's consumer had it, unacked: its channel goes with it.
    let taken = poll_until(Duration::from_secs(10), "the reply is taken", || async {
        ch.basic_get(reply_queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert!(!taken.delivery.redelivered);
    ch.close(320, "killed".into()).await.unwrap();
    (id, now)
}

/// The window of RELIABILITY.md: a gateway killed after storing a call's
/// end and before its `switchboard.call.completed` was confirmed. Its
/// reply, never acked, is back in its reply queue, marked redelivered; the
/// gateway that adopts the queue finds the call ended and publishes its
/// completion (and its `accepted`) again, with the ids a live gateway gives
/// them: a subscriber on the events exchange sees each once.
#[actix_rt::test]
async fn a_call_whose_gateway_died_before_its_completion_was_published_gets_it_from_the_adopter() {
    use deadpool_lapin::lapin::options::QueueDeclareOptions;
    use deadpool_lapin::lapin::types::FieldTable;

    let gw = gateway("adopt-event", |_| {}).await;
    let broker = gw.ctx.broker.clone();
    let mut sub = lifecycle_subscriber(&broker).await;

    // A call ended by a live gateway: its events' ids are made of its id.
    let live = call_202(&gw, 0).await;
    assert_eq!(
        about(&until_completed(&mut sub, &live).await, &live),
        published_once(&live)
    );

    // Gateway D, on the same store, killed in the window.
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
    let store = switchboard::calls::CallStore::open(&gw.ctx.settings.gateway.store_url)
        .await
        .unwrap()
        .for_instance(&dead);
    let (id, ended_ms) = ended_in_the_window(&broker, &store, &reply_q).await;
    // D's row, silent: the live gateway adopts its queues.
    store.heartbeat(&reply_q, &dead_q).await.unwrap();
    store.mark_gone().await.unwrap();

    let adopted = until_completed(&mut sub, &id).await;
    assert_eq!(
        about(&adopted, &id),
        published_once(&id),
        "the accepted event, then the completion"
    );
    let completion = adopted.last().unwrap();
    let data = completion.data.as_ref().unwrap();
    assert_eq!(data["status"], "succeeded");
    assert_eq!(data["result"]["body"]["n"], 1, "{data}");
    assert_eq!(
        completion.time.map(|t| t.timestamp_millis()),
        Some(ended_ms),
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
    let marker = call_202(&gw, 2).await;
    let rest = until_completed(&mut sub, &marker).await;
    assert_eq!(about(&rest, &marker), published_once(&marker));
    assert_eq!(rest.len(), 2, "events after the adoption: {rest:?}");
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

/// The same window with one gateway, started again under its instance id:
/// it finds the reply in its own reply queue and publishes the completion
/// it had not.
#[actix_rt::test]
async fn a_gateway_killed_before_a_completion_was_published_publishes_it_when_back() {
    let mut gw = gateway("restart-event", |_| {}).await;
    let broker = gw.ctx.broker.clone();
    let mut sub = lifecycle_subscriber(&broker).await;
    gw.stop_gateway().await;
    let me = broker.instance_id().to_owned();
    let store = switchboard::calls::CallStore::open(&gw.ctx.settings.gateway.store_url)
        .await
        .unwrap()
        .for_instance(&me);
    let (id, _) = ended_in_the_window(&broker, &store, &broker.names().reply_queue(&me)).await;
    gw.start_gateway().await;
    let got = until_completed(&mut sub, &id).await;
    assert_eq!(
        about(&got, &id),
        [(
            COMPLETED.to_string(),
            switchboard::events::lifecycle_event_id(&id, COMPLETED)
        )]
    );
    let marker = call_202(&gw, 2).await;
    let rest = until_completed(&mut sub, &marker).await;
    assert_eq!(about(&rest, &marker), published_once(&marker));
    assert_eq!(rest.len(), 2, "events after the restart: {rest:?}");
    sub.stop().await;
    store.close().await;
    gw.cleanup().await;
}

/// A call accepted by gateway A and cancelled through gateway B of the same
/// store: a long-poll on A answers `cancelled` long before its wait runs
/// out, whether it was waiting already when B cancelled (A learns of the
/// end from the `switchboard.call.cancelled` event its hub reads) or comes
/// after (A no longer counts the call among its pending ones).
#[actix_rt::test]
async fn a_long_poll_on_the_accepting_gateway_answers_an_end_made_through_another() {
    const WAIT: Duration = Duration::from_secs(20);
    let gw = gateway("lp-elsewhere", |s| s.gateway.max_wait_s = 60).await;
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
    let accept = || async {
        let res = gw
            .post("slow")
            .header("Prefer", "respond-async")
            .body("{\"n\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 202);
        res.headers()["Call-Id"].to_str().unwrap().to_owned()
    };
    let cancel_on_b = |id: String| {
        let http = gw.http.clone();
        let url = format!("{base_b}/v1/calls/{id}");
        async move {
            let res = http.delete(url).send().await.unwrap();
            assert_eq!(res.status().as_u16(), 200);
            let doc: serde_json::Value = res.json().await.unwrap();
            assert_eq!(doc["status"], "cancelled");
        }
    };
    // A long-poll of `WAIT` on A: its status and how long it took. The
    // client gives up a while after the wait, so a long-poll never woken
    // fails the test instead of hanging it.
    let long_poll = |id: String| {
        let req = gw
            .get(&format!("/v1/calls/{id}?wait={}", WAIT.as_secs()))
            .timeout(WAIT + Duration::from_secs(10));
        async move {
            let started = Instant::now();
            let doc: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            (
                doc["status"].as_str().unwrap_or_default().to_owned(),
                started.elapsed(),
            )
        }
    };

    // Waiting on A when B cancels: woken.
    let id = accept().await;
    let waiting = actix_rt::spawn(long_poll(id.clone()));
    let a = gw.gateway.as_ref().unwrap();
    eventually(
        Duration::from_secs(10),
        "the long-poll waits on A",
        || async { a.call_watchers() == 1 },
    )
    .await;
    cancel_on_b(id).await;
    let (status, took) = waiting.await.unwrap();
    assert_eq!(status, "cancelled");
    assert!(
        took < WAIT / 2,
        "answered after {took:?} of a {WAIT:?} wait"
    );

    // Cancelled through B first, then long-polled on A: answered from the
    // store, not held for the wait.
    let id = accept().await;
    cancel_on_b(id.clone()).await;
    let (status, took) = long_poll(id).await;
    assert_eq!(status, "cancelled");
    assert!(
        took < WAIT / 2,
        "answered after {took:?} of a {WAIT:?} wait"
    );
    assert_eq!(a.call_watchers(), 0);

    // The slow handlers are let go (their replies find their calls ended).
    gw.gate.add_permits(2);
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

const CANCELLED: &str = "switchboard.call.cancelled";

/// The events `sub` gets until one of type `ty` about `call`, in order.
async fn until_event(
    sub: &mut switchboard::Subscription,
    ty: &str,
    call: &str,
) -> Vec<switchboard::CloudEvent> {
    let mut got = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .unwrap_or_else(|_| panic!("no {ty} of {call} within 30 s; got {got:?}"))
            .unwrap()
            .unwrap();
        let done = e.ty == ty && e.subject.as_deref() == Some(call);
        got.push(e);
        if done {
            return got;
        }
    }
}

/// Declares dead gateway `dead`'s two queues, records its row in the
/// store and marks it gone at once: a live gateway adopts it.
async fn declare_dead(
    broker: &switchboard::Broker,
    store: &switchboard::calls::CallStore,
    dead: &str,
) -> (String, String) {
    use deadpool_lapin::lapin::options::QueueDeclareOptions;
    use deadpool_lapin::lapin::types::FieldTable;
    let names = broker.names();
    let (reply_q, dead_q) = (names.reply_queue(dead), names.deadwatch_queue(dead));
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
    store.heartbeat(&reply_q, &dead_q).await.unwrap();
    store.mark_gone().await.unwrap();
    (reply_q, dead_q)
}

/// A gateway that ended one of its calls in a way no message tells again
/// (`status`: expired at its deadline, or cancelled) and was killed before
/// the event's confirm: the store row says it owes that event
/// (`end_event_pending`). The gateway that adopts it publishes the event
/// once, with the id and time a live gateway gives it, then clears the
/// flag: a second adoption of the same instance publishes nothing.
async fn an_owed_end_event_is_published_by_the_adopter(
    name: &str,
    status: switchboard::calls::CallStatus,
    ty: &str,
) {
    use switchboard::calls::NewCall;

    let gw = gateway(name, |_| {}).await;
    let broker = gw.ctx.broker.clone();
    let mut sub = lifecycle_subscriber(&broker).await;

    let dead = format!("{}-dead", gw.ctx.prefix);
    let store = switchboard::calls::CallStore::open(&gw.ctx.settings.gateway.store_url)
        .await
        .unwrap()
        .for_instance(&dead);
    // A call of D's, ended by D (the tracker's own statement), its event
    // never published.
    let id = uuid::Uuid::now_v7().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    store
        .insert(&NewCall {
            id: id.clone(),
            caller: "anonymous".into(),
            service: "echo".into(),
            created_ms: now - 2000,
            deadline_ms: now - 1000,
            published: true,
            idem_key: None,
            body_hash: None,
            traceparent: None,
            callback_url: None,
        })
        .await
        .unwrap();
    store
        .complete_plain(&id, status, None, now)
        .await
        .unwrap()
        .expect("the call ends");
    let (reply_q, dead_q) = declare_dead(&broker, &store, &dead).await;

    let got = until_event(&mut sub, ty, &id).await;
    let (accepted, end) = (
        switchboard::events::lifecycle_event_id(&id, ACCEPTED),
        switchboard::events::lifecycle_event_id(&id, ty),
    );
    assert_eq!(
        about(&got, &id),
        [(ACCEPTED.to_string(), accepted), (ty.to_string(), end)],
        "D stored the call: its accepted event again, then its end, once each"
    );
    let event = got.last().unwrap();
    assert_eq!(event.data.as_ref().unwrap()["status"], status.as_str());
    assert_eq!(
        event.time.map(|t| t.timestamp_millis()),
        Some(now),
        "the time the call ended"
    );
    let gone = || async {
        queue_consumers(&broker, &reply_q).await.is_none()
            && queue_consumers(&broker, &dead_q).await.is_none()
    };
    eventually(Duration::from_secs(30), "D's queues are deleted", gone).await;

    // D seen again and gone again: adopted a second time, nothing owed.
    declare_dead(&broker, &store, &dead).await;
    eventually(
        Duration::from_secs(30),
        "D's queues are deleted again",
        gone,
    )
    .await;
    let marker = call_202(&gw, 2).await;
    let rest = until_completed(&mut sub, &marker).await;
    assert_eq!(about(&rest, &marker), published_once(&marker));
    assert_eq!(rest.len(), 2, "events after the adoptions: {rest:?}");

    sub.stop().await;
    store.close().await;
    let ch = broker.channel().await.unwrap();
    for q in [&reply_q, &dead_q] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_call_expired_by_a_gateway_that_died_before_its_event_was_published_gets_it_from_the_adopter()
 {
    an_owed_end_event_is_published_by_the_adopter(
        "owed-expired",
        switchboard::calls::CallStatus::Expired,
        COMPLETED,
    )
    .await;
}

#[actix_rt::test]
async fn a_call_cancelled_through_a_gateway_that_died_before_its_event_was_published_gets_it_from_the_adopter()
 {
    an_owed_end_event_is_published_by_the_adopter(
        "owed-cancelled",
        switchboard::calls::CallStatus::Cancelled,
        CANCELLED,
    )
    .await;
}

/// A cancellation whose gateway died before its event's confirm, asked
/// again by its caller through another gateway: the answer is `409` (the
/// call has ended), and the owed `switchboard.call.cancelled` goes out
/// with it, once; a third `DELETE` publishes no copy.
#[actix_rt::test]
async fn a_delete_of_a_cancelled_call_whose_event_is_owed_publishes_it_once() {
    use switchboard::calls::{CallStatus, NewCall};

    let gw = gateway("owed-delete", |_| {}).await;
    let broker = gw.ctx.broker.clone();
    let mut sub = lifecycle_subscriber(&broker).await;
    // Cancelled through gateway D, which died before the event's confirm
    // (alive in nobody's eyes: not adopted).
    let store = switchboard::calls::CallStore::open(&gw.ctx.settings.gateway.store_url)
        .await
        .unwrap()
        .for_instance(&format!("{}-dead", gw.ctx.prefix));
    let id = uuid::Uuid::now_v7().to_string();
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
    store
        .complete_plain(&id, CallStatus::Cancelled, None, now)
        .await
        .unwrap()
        .expect("the call ends");

    let http = reqwest::Client::new();
    for _ in 0..2 {
        let res = http
            .delete(gw.url(&format!("/v1/calls/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 409);
    }
    let marker = call_202(&gw, 2).await;
    let got = until_completed(&mut sub, &marker).await;
    assert_eq!(
        about(&got, &id),
        [(
            CANCELLED.to_string(),
            switchboard::events::lifecycle_event_id(&id, CANCELLED)
        )],
        "{got:?}"
    );
    assert_eq!(about(&got, &marker), published_once(&marker));
    assert_eq!(got.len(), 3, "{got:?}");

    sub.stop().await;
    store.close().await;
    gw.cleanup().await;
}
