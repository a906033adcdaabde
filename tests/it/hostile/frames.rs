//! Raw AMQP frames that lapin cannot send, written over a plain socket as
//! any other client could.

use super::*;

/// Publishes `body` to the default exchange with routing key `queue` and a
/// correlation id of raw bytes, speaking AMQP 0-9-1 over a plain socket:
/// lapin cannot send a short string that is not UTF-8, any other client can.
async fn publish_raw(queue: &str, correlation_id: &[u8], body: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn short(b: &[u8]) -> Vec<u8> {
        [&[b.len() as u8][..], b].concat()
    }
    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend(channel.to_be_bytes());
        f.extend((payload.len() as u32).to_be_bytes());
        f.extend(payload);
        f.push(0xce);
        f
    }
    fn method(channel: u16, class: u16, id: u16, args: &[u8]) -> Vec<u8> {
        frame(
            1,
            channel,
            &[&class.to_be_bytes()[..], &id.to_be_bytes(), args].concat(),
        )
    }
    async fn read_frame(s: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).await.unwrap();
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload).await.unwrap();
        payload.truncate(size);
        payload
    }

    let url = url::Url::parse(&crate::common::amqp_url()).unwrap();
    let addr = (
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5672),
    );
    let vhost = url::form_urlencoded::parse(url.path().trim_start_matches('/').as_bytes())
        .map(|(k, _)| k.into_owned())
        .next()
        .unwrap_or_else(|| "/".into());
    let login = format!("\0{}\0{}", url.username(), url.password().unwrap_or(""));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    read_frame(&mut s).await; // connection.start
    let start_ok = [
        &0u32.to_be_bytes()[..],
        &short(b"PLAIN"),
        &(login.len() as u32).to_be_bytes(),
        login.as_bytes(),
        &short(b"en_US"),
    ]
    .concat();
    s.write_all(&method(0, 10, 11, &start_ok)).await.unwrap();
    let tune = read_frame(&mut s).await;
    let tune_ok = [&tune[4..10], &[0, 0]].concat(); // channel-max, frame-max, no heartbeat
    s.write_all(&method(0, 10, 31, &tune_ok)).await.unwrap();
    let open = [short(vhost.as_bytes()), short(b""), vec![0]].concat();
    s.write_all(&method(0, 10, 40, &open)).await.unwrap();
    read_frame(&mut s).await; // connection.open-ok
    s.write_all(&method(1, 20, 10, &short(b""))).await.unwrap();
    read_frame(&mut s).await; // channel.open-ok
    let publish = [&[0, 0][..], &short(b""), &short(queue.as_bytes()), &[0]].concat();
    s.write_all(&method(1, 60, 40, &publish)).await.unwrap();
    // Content header: content-type (flag bit 15) and correlation-id (bit 10).
    let flags: u16 = (1 << 15) | (1 << 10);
    let header = [
        &60u16.to_be_bytes()[..],
        &0u16.to_be_bytes(),
        &(body.len() as u64).to_be_bytes(),
        &flags.to_be_bytes(),
        &short(b"application/json"),
        &short(correlation_id),
    ]
    .concat();
    s.write_all(&frame(2, 1, &header)).await.unwrap();
    s.write_all(&frame(3, 1, body)).await.unwrap();
    let close = [&200u16.to_be_bytes()[..], &short(b"bye"), &[0, 0, 0, 0]].concat();
    s.write_all(&method(1, 20, 40, &close)).await.unwrap();
    read_frame(&mut s).await; // channel.close-ok: the message is in
}

/// Found by this test: lapin (4.12, amq-protocol 10.6) failed to parse a
/// delivery whose correlation id is not UTF-8 and closed the whole
/// connection, so one such message from any client stopped every consumer
/// on it and came back to the next one forever. Fixed by the patched
/// amq-protocol-types in vendor/ (lossy decoding): the request is answered
/// or dropped like any other, the reply is counted as unknown.
#[actix_rt::test]
async fn a_correlation_id_that_is_not_utf8_does_not_stop_consumers() {
    let gw = gateway("hostile-raw", hostile_settings).await;
    let broker = &gw.ctx.broker;
    let pending = pending_call(&gw).await;
    publish_raw(&broker.names().service_queue("echo"), b"\xff\xfe", b"{}").await;
    publish_raw(
        &broker.names().reply_queue(broker.instance_id()),
        b"\xff\xfe",
        b"{}",
    )
    .await;
    // The services still answer...
    for service in ["echo", "count"] {
        let res = gw
            .post(service)
            .bearer_auth(ALICE)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{service}");
    }
    // ...and replies still reach their calls.
    let ch = broker.channel().await.unwrap();
    publish_reply(
        &ch,
        &broker.names().reply_queue(broker.instance_id()),
        Some(&pending),
        None,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(ended(&gw, &pending).await["status"], "succeeded");
    gw.cleanup().await;
}
