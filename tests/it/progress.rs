//! Progress reports of long-running calls (issue 16): over HTTP (status
//! document, the call's SSE stream, `/v1/events`), through the library's
//! `RpcClient`, and from an outside AMQP worker that sends the header
//! `x-sb-progress` by hand.

use std::sync::Arc;
use std::time::Duration;

use deadpool_lapin::lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions},
    types::{AMQPValue, FieldTable},
};
use futures_util::StreamExt;
use reqwest::StatusCode;
use switchboard::amqp::{Outgoing, topology, wire};
use switchboard::rpc::{Call, RpcOptions};
use switchboard::settings::ServiceSettings;
use switchboard::worker::{Handler, HandlerError, Reply, Request};
use tokio::sync::Semaphore;

use crate::common::{Gw, ctx, eventually, gateway, test_service};
use crate::gateway::{Sse, json};

/// A handler that reports 0.25 ("step 1") and 0.5 ("step 2"), each after
/// taking a permit of `gate`, then replies with the payload after a third.
pub(crate) fn stepping(gate: Arc<Semaphore>) -> Arc<dyn Handler> {
    Arc::new(move |req: Request| {
        let gate = gate.clone();
        async move {
            let take = || async {
                gate.acquire()
                    .await
                    .map_err(|_| HandlerError::new(500, "gate closed"))
                    .map(|p| p.forget())
            };
            for (n, fraction) in [(1, 0.25), (2, 0.5)] {
                take().await?;
                req.progress(fraction, format!("step {n}"))
                    .await
                    .map_err(|e| HandlerError::new(500, e.to_string()))?;
            }
            take().await?;
            Ok(Reply::ok(req.content_type.clone(), req.payload.clone()))
        }
    })
}

/// The value of a metric (a line `name value`, or `name{labels} value`).
pub(crate) async fn metric(gw: &Gw, series: &str) -> Option<f64> {
    crate::metrics::scrape(&gw.http, &gw.url("/metrics"))
        .await
        .value(series)
}

async fn start_async(gw: &Gw, service: &str) -> String {
    let res = gw
        .post(service)
        .header("prefer", "respond-async")
        .body("\"x\"")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    json(res).await["id"].as_str().unwrap().to_owned()
}

#[actix_rt::test]
async fn progress_shows_in_the_status_document_and_both_event_streams() {
    let gw = gateway("pg-http", |s| {
        s.services.insert("steps".into(), test_service());
    })
    .await;
    let gate = Arc::new(Semaphore::new(0));
    let svc = gw.ctx.settings.services["steps"].clone();
    gw.ctx
        .worker("steps", &svc, stepping(gate.clone()))
        .await
        .unwrap();
    let mut all = Sse::new(
        gw.get("/v1/events?type=switchboard.call.progress")
            .send()
            .await
            .unwrap(),
    );
    let id = start_async(&gw, "steps").await;
    let mut call = Sse::new(
        gw.get(&format!("/v1/calls/{id}/events"))
            .send()
            .await
            .unwrap(),
    );
    let first = call.next().await.unwrap();
    assert_eq!(first.event.as_deref(), Some("switchboard.call.accepted"));
    assert!(first.data.unwrap()["data"].get("progress").is_none());
    // A worker that has reported nothing: the document has no progress.
    assert!(
        &gw.json(&format!("/v1/calls/{id}"))
            .await
            .get("progress")
            .is_none()
    );

    gate.add_permits(1);
    let f = call.next().await.unwrap();
    assert_eq!(f.event.as_deref(), Some("switchboard.call.progress"));
    let data = f.data.unwrap();
    assert_eq!(data["subject"], id.as_str());
    assert_eq!(data["data"]["status"], "pending");
    assert_eq!(data["data"]["progress"], 0.25);
    assert_eq!(data["data"]["note"], "step 1");
    let doc = &gw.json(&format!("/v1/calls/{id}")).await;
    assert_eq!(doc["status"], "pending", "progress ended the call: {doc}");
    assert_eq!(doc["progress"], 0.25);
    assert_eq!(doc["note"], "step 1");
    let f = all.next().await.unwrap();
    assert_eq!(f.event.as_deref(), Some("switchboard.call.progress"));
    assert_eq!(f.data.unwrap()["data"]["progress"], 0.25);

    gate.add_permits(1);
    let f = call.next().await.unwrap();
    assert_eq!(f.event.as_deref(), Some("switchboard.call.progress"));
    assert_eq!(f.data.unwrap()["data"]["note"], "step 2");
    gate.add_permits(1);
    let last = call.next().await.unwrap();
    assert_eq!(last.event.as_deref(), Some("switchboard.call.completed"));
    let data = last.data.unwrap();
    assert_eq!(data["data"]["status"], "succeeded");
    assert_eq!(data["data"]["progress"], 0.5);
    assert!(call.next().await.is_none(), "the call's stream did not end");

    // A report that comes after the reply is dropped: the document stays.
    let dropped = "switchboard_rpc_progress_dropped_total";
    let before = metric(&gw, dropped).await.unwrap_or(0.0);
    let broker = &gw.ctx.broker;
    let reply_queue = broker.names().reply_queue(broker.instance_id());
    broker
        .publish(Outgoing {
            exchange: "",
            routing_key: &reply_queue,
            payload: b"late",
            properties: wire::progress_properties(Some(&id.as_str().into()), 0.9, None),
            mandatory: true,
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the late report counted",
        || async { metric(&gw, dropped).await.unwrap_or(0.0) > before },
    )
    .await;
    let doc = &gw.json(&format!("/v1/calls/{id}")).await;
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(doc["progress"], 0.5);
    assert_eq!(doc["note"], "step 2");
    gw.cleanup_with(&["steps"]).await;
}

#[actix_rt::test]
async fn the_rpc_client_streams_progress_before_the_reply_and_plain_callers_get_only_the_reply() {
    let c = ctx("pg-lib").await;
    let reporting = Arc::new(|req: Request| async move {
        for n in 1..=3 {
            req.progress(f64::from(n) / 4.0, format!("part {n}"))
                .await
                .map_err(|e| HandlerError::new(500, e.to_string()))?;
        }
        Ok(Reply::ok(req.content_type.clone(), req.payload.clone()))
    });
    let worker = c.worker("parts", &c.service(), reporting).await.unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();

    let (pending, mut progress) = client
        .send_with_progress(Call::new("parts", &b"\"p\""[..]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(p) = progress.recv().await {
        assert_eq!(p.call_id, pending.call_id());
        seen.push((p.fraction, p.note.unwrap()));
    }
    assert_eq!(
        seen,
        [
            (0.25, "part 1".to_owned()),
            (0.5, "part 2".to_owned()),
            (0.75, "part 3".to_owned())
        ]
    );
    let reply = pending.wait().await.unwrap();
    assert_eq!(&reply.body[..], b"\"p\"");

    // A caller that reads no progress gets the reply, never a report.
    let reply = client.call(Call::new("parts", &b"7"[..])).await.unwrap();
    assert_eq!((reply.status, &reply.body[..]), (200, &b"7"[..]));

    // A tutorial-6 client (no x-sb-accepts-progress): only the reply.
    let f = crate::common::foreign_client("pg-lib").await;
    let mut replies = f.replies;
    f.channel
        .basic_publish(
            "".into(),
            c.broker.names().service_queue("parts").into(),
            BasicPublishOptions::default(),
            b"8",
            BasicProperties::default()
                .with_reply_to(f.reply_queue.clone())
                .with_correlation_id("t6-parts".into()),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(wire::progress_of(&first.properties), None);
    assert_eq!(&first.data[..], b"8");
    assert_eq!(
        worker
            .stats
            .progress
            .load(std::sync::atomic::Ordering::Relaxed),
        6,
        "reports sent to a caller that does not read them"
    );
    let _ = f.conn.close(200, "done".into()).await;
    c.cleanup(&["parts"]).await;
}

#[actix_rt::test]
async fn an_outside_worker_reports_progress_with_the_header() {
    let gw = gateway("pg-ext", |s| {
        s.services.insert(
            "ext".into(),
            ServiceSettings {
                handler: None,
                ..test_service()
            },
        );
    })
    .await;
    let setup = gw.ctx.broker.channel().await.unwrap();
    topology::declare_service(&setup, gw.ctx.broker.names(), "ext", &test_service())
        .await
        .unwrap();
    // The worker of another language: its own connection, the queue's
    // requests, progress and reply published by hand.
    let conn =
        deadpool_lapin::lapin::Connection::connect(&crate::common::amqp_url(), Default::default())
            .await
            .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut requests = ch
        .basic_consume(
            gw.ctx.broker.names().service_queue("ext").into(),
            "outside-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let id = start_async(&gw, "ext").await;
    let d = tokio::time::timeout(Duration::from_secs(10), requests.next())
        .await
        .expect("a request within 10 s")
        .unwrap()
        .unwrap();
    assert!(wire::accepts_progress(&d.properties));
    let reply_to = d.properties.reply_to().clone().unwrap();
    let report = |value: AMQPValue, note: &'static [u8]| {
        let mut h = FieldTable::default();
        h.insert(wire::HEADER_PROGRESS.into(), value);
        let props = BasicProperties::default()
            .with_correlation_id(d.properties.correlation_id().clone().unwrap())
            .with_headers(h);
        let (ch, reply_to) = (ch.clone(), reply_to.clone());
        async move {
            ch.basic_publish(
                "".into(),
                reply_to,
                BasicPublishOptions::default(),
                note,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    // Out of range: dropped, and not taken for the reply either.
    report(AMQPValue::LongString("2".into()), b"too far").await;
    // As a decimal string, as pika or amqplib would send it.
    report(AMQPValue::LongString("0.5".into()), b"half way").await;
    eventually(Duration::from_secs(10), "the report recorded", || async {
        &gw.json(&format!("/v1/calls/{id}")).await["progress"] == 0.5
    })
    .await;
    let doc = &gw.json(&format!("/v1/calls/{id}")).await;
    assert_eq!(doc["status"], "pending");
    assert_eq!(doc["note"], "half way");
    assert_eq!(
        metric(&gw, "switchboard_rpc_progress_dropped_total").await,
        Some(1.0),
        "the malformed report was not dropped"
    );
    ch.basic_publish(
        "".into(),
        reply_to.clone(),
        BasicPublishOptions::default(),
        b"\"done\"",
        BasicProperties::default()
            .with_correlation_id(d.properties.correlation_id().clone().unwrap())
            .with_content_type("application/json".into()),
    )
    .await
    .unwrap();
    d.ack(BasicAckOptions::default()).await.unwrap();
    let doc = gw.json(&format!("/v1/calls/{id}?wait=10")).await;
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(doc["result"]["body"], "done");
    let _ = conn.close(200, "done".into()).await;
    gw.cleanup_with(&["ext"]).await;
}

#[actix_rt::test]
async fn a_store_made_before_progress_gains_its_columns_and_keeps_its_calls() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/calls.db?mode=rwc", dir.path().display());
    sqlx::any::install_default_drivers();
    let mut old = sqlx::AnyConnection::connect(&url).await.unwrap();
    // The table as the first release made it.
    sqlx::query(
        "CREATE TABLE sb_calls (id TEXT PRIMARY KEY, caller TEXT NOT NULL, service TEXT NOT NULL, \
         status TEXT NOT NULL, created_ms BIGINT NOT NULL, completed_ms BIGINT, \
         deadline_ms BIGINT NOT NULL, published BIGINT NOT NULL, idem_key TEXT, body_hash TEXT, \
         traceparent TEXT, result_status BIGINT, result_content_type TEXT, result_body BLOB, \
         callback_url TEXT, callback_state TEXT, callback_attempts BIGINT NOT NULL DEFAULT 0, \
         callback_next_ms BIGINT, callback_error TEXT, callback_event_id TEXT, callback_body BLOB)",
    )
    .execute(&mut old)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sb_calls (id, caller, service, status, created_ms, deadline_ms, published) \
         VALUES ('old-1', 'anonymous', 'echo', 'pending', 1, 9999999999999, 1)",
    )
    .execute(&mut old)
    .await
    .unwrap();
    old.close().await.unwrap();

    let store = switchboard::calls::CallStore::open(&url).await.unwrap();
    let call = store
        .get("old-1")
        .await
        .unwrap()
        .expect("the old call kept");
    assert_eq!(call.progress, None);
    assert!(
        store
            .record_progress("old-1", 0.5, Some("half"), 2)
            .await
            .unwrap()
    );
    let call = store.get("old-1").await.unwrap().unwrap();
    let p = call.progress.unwrap();
    assert_eq!(
        (p.fraction, p.note.as_deref(), p.at_ms),
        (0.5, Some("half"), 2)
    );
    assert!(store.attempts("old-1").await.unwrap().is_empty());
    store.close().await;
    // Opened again: nothing to add, nothing lost.
    let store = switchboard::calls::CallStore::open(&url).await.unwrap();
    assert!(
        store
            .get("old-1")
            .await
            .unwrap()
            .unwrap()
            .progress
            .is_some()
    );
    store.close().await;
}
