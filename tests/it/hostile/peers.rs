//! Foreign AMQP peers (over lapin) publishing malformed replies and
//! requests to switchboard's queues.

use super::*;

#[actix_rt::test]
async fn malformed_replies_from_a_foreign_peer_are_counted_and_fail_only_their_call() {
    let gw = gateway("hostile-peer", hostile_settings).await;
    let state = gw.gateway.as_ref().unwrap();
    let broker = &gw.ctx.broker;
    let queue = broker.names().reply_queue(broker.instance_id());
    let ch = broker.channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();

    let bad_status = pending_call(&gw).await;
    let bad_body = pending_call(&gw).await;
    let stats = state.rpc().stats();
    let malformed0 = stats.malformed.load(std::sync::atomic::Ordering::Relaxed);
    let unknown0 = stats.unknown.load(std::sync::atomic::Ordering::Relaxed);
    let dropped0 = stats.dropped();

    let huge = "x".repeat(255);
    let mut table = FieldTable::default();
    table.insert("status".into(), AMQPValue::LongInt(200));
    let garbage: Vec<(Option<&str>, Option<AMQPValue>)> = vec![
        (None, None),
        (None, Some(AMQPValue::LongString("abc".into()))),
        (Some("garbage"), None),
        (Some(""), None),
        (Some(huge.as_str()), Some(AMQPValue::LongInt(200))),
        (
            Some("\u{feff}\u{0}é"),
            Some(AMQPValue::LongString("abc".into())),
        ),
        (Some("not-a-call-1"), Some(AMQPValue::LongInt(-1))),
        (Some("not-a-call-2"), Some(AMQPValue::LongInt(70000))),
        (Some("not-a-call-3"), Some(AMQPValue::Double(200.0))),
        (Some("not-a-call-4"), Some(AMQPValue::FieldTable(table))),
        (
            Some("not-a-call-5"),
            Some(AMQPValue::LongString(LongString::from(vec![0xff, b'2']))),
        ),
        (Some("not-a-call-8"), Some(AMQPValue::Boolean(true))),
        (Some("not-a-call-6"), Some(AMQPValue::Timestamp(200))),
        (
            Some("not-a-call-7"),
            Some(AMQPValue::LongString("2e2".into())),
        ),
    ];
    let sent = garbage.len() as u64;
    let without_id = garbage.iter().filter(|(id, _)| id.is_none()).count() as u64;
    for (id, status) in garbage {
        publish_reply(
            &ch,
            &queue,
            id,
            status,
            "application/json",
            &[0xff, 0xfe, b'{'],
        )
        .await;
    }
    eventually(
        Duration::from_secs(10),
        "every foreign reply counted",
        || async { state.rpc().stats().dropped() >= dropped0 + sent },
    )
    .await;
    let stats = state.rpc().stats();
    assert_eq!(
        stats.malformed.load(std::sync::atomic::Ordering::Relaxed),
        malformed0 + without_id
    );
    assert_eq!(
        stats.unknown.load(std::sync::atomic::Ordering::Relaxed),
        unknown0 + sent - without_id
    );

    // A malformed status for a real call: the call fails with a 502.
    publish_reply(
        &ch,
        &queue,
        Some(&bad_status),
        Some(AMQPValue::LongString("abc".into())),
        "text/plain",
        b"whatever",
    )
    .await;
    let doc = ended(&gw, &bad_status).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert_eq!(doc["result"]["status"], 502, "{doc}");
    assert_eq!(doc["result"]["content_type"], "application/problem+json");
    let res = gw
        .get(&format!("/v1/calls/{bad_status}/result"))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);

    // A non-UTF-8 body that claims to be JSON: kept byte for byte.
    let bytes = [0xff, 0xfe, b'{', 0x00, b'}'];
    publish_reply(
        &ch,
        &queue,
        Some(&bad_body),
        // (RabbitMQ takes no short strings in header tables.)
        Some(AMQPValue::LongString(" 201 ".into())),
        "application/json",
        &bytes,
    )
    .await;
    let doc = ended(&gw, &bad_body).await;
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(doc["result"]["status"], 201, "{doc}");
    assert!(doc["result"].get("body").is_none(), "{doc}");
    let b64 = doc["result"]["body_base64"].as_str().unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        bytes
    );
    let res = gw
        .get(&format!("/v1/calls/{bad_body}/result"))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(&res.bytes().await.unwrap()[..], &bytes);

    // And the gateway serves on.
    still_serving(&gw).await;
    assert!(
        gw.get("/readyz")
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let _ = ch.close(200, "done".into()).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn malformed_requests_from_a_foreign_peer_do_not_stop_the_worker() {
    let gw = gateway("hostile-requests", hostile_settings).await;
    let Foreign {
        conn: foreign,
        channel: ch,
        reply_queue: reply_q,
        mut replies,
    } = foreign_client("hostile").await;
    let service_q = gw.ctx.broker.names().service_queue("echo");
    let mut garbage_headers = FieldTable::default();
    garbage_headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(vec![0xff, 0x00])),
    );
    garbage_headers.insert(
        "x-sb-deadline-ms".into(),
        AMQPValue::LongString("soon".into()),
    );
    let requests: Vec<(&str, BasicProperties)> = vec![
        // A timestamp at the end of time and a TTL: not expired.
        (
            "end-of-time",
            BasicProperties::default()
                .with_timestamp(u64::MAX)
                .with_expiration("60000".into()),
        ),
        (
            "garbage-headers",
            BasicProperties::default()
                .with_timestamp(0)
                .with_headers(garbage_headers),
        ),
        ("bare", BasicProperties::default()),
    ];
    for (id, props) in requests {
        ch.basic_publish(
            "".into(),
            service_q.as_str().into(),
            BasicPublishOptions::default(),
            &[0xff, 0x00],
            props
                .with_correlation_id(id.into())
                .with_reply_to(reply_q.clone()),
        )
        .await
        .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .unwrap_or_else(|_| panic!("{id}: no reply within 10 s"))
            .unwrap()
            .unwrap();
        assert_eq!(
            reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some(id)
        );
        assert_eq!(reply.data, vec![0xff, 0x00], "{id}");
    }
    // No reply wanted, no correlation id: nothing to answer, nothing broken.
    ch.basic_publish(
        "".into(),
        service_q.as_str().into(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    still_serving(&gw).await;
    let _ = foreign.close(200, "done".into()).await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn replies_http_cannot_carry_as_they_are_are_answered_well_formed() {
    let gw = gateway("hostile-carry", hostile_settings).await;
    let broker = &gw.ctx.broker;
    let queue = broker.names().reply_queue(broker.instance_id());
    let ch = broker.channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let cases: Vec<(i32, &str, u16, &str)> = vec![
        // Informational statuses are no final answer: 502.
        (100, "text/plain", 502, "application/problem+json"),
        (101, "text/plain", 502, "application/problem+json"),
        (103, "text/plain", 502, "application/problem+json"),
        // Content types that are no header value: passed as opaque bytes.
        (
            200,
            "text/plain\r\nx-evil: 1",
            200,
            "application/octet-stream",
        ),
        (200, "a\u{0}b", 200, "application/octet-stream"),
        (200, "t\u{e9}xt/plain", 200, "t\u{e9}xt/plain"),
    ];
    for (status, ct, want, want_ct) in cases {
        let id = pending_call(&gw).await;
        publish_reply(
            &ch,
            &queue,
            Some(&id),
            Some(AMQPValue::LongInt(status)),
            ct,
            b"body",
        )
        .await;
        let doc = ended(&gw, &id).await;
        assert_eq!(doc["result"]["status"], status, "{doc}");
        assert_eq!(doc["result"]["content_type"], ct, "{doc}");
        let res = gw
            .get(&format!("/v1/calls/{id}/result"))
            .bearer_auth(BOB)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{status} {ct:?}: {e}"));
        assert_eq!(res.status().as_u16(), want, "{status} {ct:?}");
        assert_eq!(
            res.headers()["content-type"].as_bytes(),
            want_ct.as_bytes(),
            "{status} {ct:?}"
        );
        assert_eq!(res.headers()["call-id"], id.as_str());
        let body = res.bytes().await.unwrap();
        if want == 200 {
            assert_eq!(&body[..], b"body");
        }
    }
    // And random replies: any status value, any content type, any body.
    let mut rng = StdRng::seed_from_u64(SEED);
    for i in 0..40 {
        let status = match rng.random_range(0..6) {
            0 => AMQPValue::LongInt(rng.random_range(-1000..1000)),
            1 => AMQPValue::ShortInt(rng.random()),
            2 => AMQPValue::LongString(random_bytes(&mut rng, 6).into()),
            3 => AMQPValue::Double(rng.random_range(0.0..700.0)),
            4 => AMQPValue::LongString(rng.random_range(90..610).to_string().into()),
            _ => AMQPValue::LongLongInt(rng.random_range(99..601)),
        };
        let ct: String = String::from_utf8_lossy(&random_bytes(&mut rng, 40))
            .chars()
            .take(60)
            .collect();
        let body = random_bytes(&mut rng, 300);
        let id = pending_call(&gw).await;
        let ctx = format!("reply #{i} {status:?} {ct:?}");
        publish_reply(&ch, &queue, Some(&id), Some(status), &ct, &body).await;
        let doc = ended(&gw, &id).await;
        let result = &doc["result"];
        assert!(result["status"].is_u64(), "{ctx}: {doc}");
        assert!(
            result.get("body").is_some() != result.get("body_base64").is_some(),
            "{ctx}: {doc}"
        );
        let res = gw
            .get(&format!("/v1/calls/{id}/result"))
            .bearer_auth(BOB)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let got = res.status();
        let stored = result["status"].as_u64().unwrap_or_default();
        if stored < 200 {
            assert_eq!(got, StatusCode::BAD_GATEWAY, "{ctx}");
            continue;
        }
        // The service's status, whatever it is (a 500 of its own too).
        assert_eq!(u64::from(got.as_u16()), stored, "{ctx}");
        let bytes = res.bytes().await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        // A well-formed reply (its content type kept) comes back byte for
        // byte, but where HTTP allows no body.
        if result["content_type"] == ct.as_str() && ![204, 304].contains(&stored) {
            assert_eq!(&bytes[..], &body[..], "{ctx}");
        }
    }
    let _ = ch.close(200, "done".into()).await;
    gw.cleanup().await;
}
