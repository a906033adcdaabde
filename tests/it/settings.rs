//! Bad settings stop start-up with a message naming the setting.

use std::process::Command;

use switchboard::settings::{QueueType, ReplyMode, Settings};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_load_and_environment_overrides_them() {
    let s = Settings::load_from(
        None,
        None,
        env(&[
            ("SWITCHBOARD__AMQP__PREFIX", "acme"),
            ("SWITCHBOARD__RPC__REPLY_MODE", "direct"),
            ("SWITCHBOARD__SERVICES__ECHO__CONCURRENCY", "7"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(s.amqp.prefix, "acme");
    assert_eq!(s.rpc.reply_mode, ReplyMode::Direct);
    assert_eq!(s.services["echo"].concurrency, 7);
    assert_eq!(s.services["echo"].queue_type, QueueType::Quorum);
}

#[test]
fn a_settings_file_adds_services() {
    let s = Settings::load_from(
        None,
        Some("[services.billing]\nqueue_type = \"classic\"\ntimeout_ms = 500\n"),
        env(&[]),
    )
    .unwrap();
    assert_eq!(s.services["billing"].queue_type, QueueType::Classic);
    assert_eq!(s.services["billing"].timeout_ms, 500);
    assert!(s.services["billing"].handler.is_none());
}

#[test]
fn each_bad_setting_is_named_in_the_error() {
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, &'a str);
    let cases: &[Case] = &[
        (
            &[("SWITCHBOARD__AMQP__POOL_SIZE", "lots")],
            None,
            "amqp.pool_size",
        ),
        (
            &[("SWITCHBOARD__AMQP__POOL_SIZE", "0")],
            None,
            "amqp.pool_size",
        ),
        (&[("SWITCHBOARD__AMQP__URL", "http://x")], None, "amqp.url"),
        (&[("SWITCHBOARD__AMQP__PREFIX", "a b")], None, "amqp.prefix"),
        (
            &[("SWITCHBOARD__RPC__REPLY_MODE", "pigeon")],
            None,
            "rpc.reply_mode",
        ),
        (
            &[("SWITCHBOARD__SERVICES__ECHO__CONCURRENCY", "0")],
            None,
            "services.echo.concurrency",
        ),
        (&[], Some("[amqp]\nprefx = \"x\"\n"), "prefx"),
        (
            &[],
            Some("[services.x]\nhandler = \"telepathy\"\n"),
            "services.x.handler",
        ),
        (
            &[],
            Some("[services.x]\nqueue_type = \"stream\"\n"),
            "services.x.queue_type",
        ),
        (&[], Some("[log]\nfilter = \"[[[\"\n"), "log.filter"),
        (
            &[("SWITCHBOARD__OTEL__ENDPOINT", "127.0.0.1:4318")],
            None,
            "otel.endpoint",
        ),
        (
            &[("SWITCHBOARD__OTEL__PROTOCOL", "grpc")],
            None,
            "otel.protocol",
        ),
        (
            &[("SWITCHBOARD__OTEL__ENABLED", "maybe")],
            None,
            "otel.enabled",
        ),
        (
            &[("SWITCHBOARD__OTEL__SERVICE_NAME", " ")],
            None,
            "otel.service_name",
        ),
        (
            &[("SWITCHBOARD__OTEL__TIMEOUT_MS", "0")],
            None,
            "otel.timeout_ms",
        ),
        (
            &[("SWITCHBOARD__OTEL__QUEUE_SIZE", "0")],
            None,
            "otel.queue_size",
        ),
    ];
    for (vars, file, key) in cases {
        let err = Settings::load_from(None, *file, env(vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "error for {key} does not name it: {err}");
    }
}

#[test]
fn the_binary_refuses_to_start_with_a_bad_setting_and_names_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .env("SWITCHBOARD__SERVICES__ECHO__DELIVERY_LIMIT", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("services.echo.delivery_limit"),
        "stderr: {stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", "/nonexistent/switchboard.toml", "serve"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/switchboard.toml"));
}
