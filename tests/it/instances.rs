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
