//! The broker face: fails fast and clearly without a broker; the CLI works
//! end to end.

use std::process::Command;
use std::time::{Duration, Instant};

use switchboard::Error;
use switchboard::amqp::Broker;

use crate::common::{poll_until, settings_for};

#[actix_rt::test]
async fn without_a_broker_connect_fails_at_once_naming_the_url() {
    let mut s = settings_for("nobroker");
    // Port 1 on loopback: nothing listens there.
    s.amqp.url = "amqp://guest:secret@127.0.0.1:1/%2f".into();
    let started = Instant::now();
    let err = Broker::connect(&s.amqp).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, Error::BrokerUnavailable { .. }),
        "got {err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("amqp://guest:***@127.0.0.1:1/%2f"), "{text}");
    assert!(!text.contains("secret"), "the password leaked: {text}");
    assert!(
        text.contains("rabbitmq-server"),
        "no hint how to start one: {text}"
    );
}

#[actix_rt::test]
async fn the_cli_serves_and_calls_echo() {
    let c = crate::common::ctx("cli").await;
    let bin = env!("CARGO_BIN_EXE_switchboard");
    let envs = [
        ("SWITCHBOARD__AMQP__URL", crate::common::amqp_url()),
        ("SWITCHBOARD__AMQP__PREFIX", c.prefix.clone()),
        (
            "SWITCHBOARD__AMQP__INSTANCE_ID",
            format!("{}-srv", c.prefix),
        ),
        // Workers only: the gateway's port and store are not this test's,
        // nor is the metrics port that `serve` opens without the gateway.
        ("SWITCHBOARD__GATEWAY__ENABLED", "false".to_string()),
        ("SWITCHBOARD__METRICS__BIND", String::new()),
    ];
    let mut serve = tokio::process::Command::new(bin)
        .arg("serve")
        .envs(envs.iter().cloned())
        .kill_on_drop(true)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The worker is up once its queue has a consumer: a call succeeds.
    let out = poll_until(Duration::from_secs(30), "a call succeeds", || async {
        let out = Command::new(bin)
            .args(["call", "echo", r#"{"hello":"world"}"#, "--timeout", "5"])
            .envs(envs.iter().cloned())
            .output()
            .unwrap();
        if out.status.success() {
            Ok(out)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"hello":"world"}"#
    );

    let out = Command::new(bin)
        .args(["call", "nobody", "{}", "--timeout", "5"])
        .envs(envs.iter().cloned())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody"));
    serve.kill().await.unwrap();
    // `serve` declared every configured service: echo and the demo `slow`.
    c.cleanup(&["echo", "slow"]).await;
}
