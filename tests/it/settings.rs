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

/// A settings file as a user writes it, in a directory of its own.
fn settings_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchboard.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn names(s: &Settings) -> Vec<&str> {
    s.services.keys().map(String::as_str).collect()
}

#[test]
fn without_a_settings_file_the_demo_services_serve() {
    let s = Settings::load_from(None, None, env(&[])).unwrap();
    assert_eq!(names(&s), ["echo", "slow"]);
    assert!(s.services.values().all(|svc| svc.handler.is_some()));
    // A file that names no service keeps them too.
    let (_dir, path) = settings_file("[gateway]\ndefault_wait_s = 5\n");
    let s = Settings::load_from(Some(&path), None, env(&[])).unwrap();
    assert_eq!(names(&s), ["echo", "slow"]);
}

#[test]
fn a_settings_file_with_services_replaces_the_demo_services() {
    let (_dir, path) = settings_file(
        "# served by a worker of our own, in Python\n[services.invoice]\ntimeout_ms = 20000\n\n[services.billing]\nqueue_type = \"classic\"\n",
    );
    let s = Settings::load_from(Some(&path), None, env(&[])).unwrap();
    assert_eq!(names(&s), ["billing", "invoice"]);
    assert!(s.services["invoice"].handler.is_none());
    assert_eq!(s.services["invoice"].timeout_ms, 20_000);
    assert_eq!(s.services["billing"].queue_type, QueueType::Classic);
    // Naming a demo service replaces it too: it keeps only what the file says.
    let (_dir, path) = settings_file("[services.echo]\nconcurrency = 8\n");
    let s = Settings::load_from(Some(&path), None, env(&[])).unwrap();
    assert_eq!(names(&s), ["echo"]);
    assert_eq!(s.services["echo"].concurrency, 8);
    assert!(s.services["echo"].handler.is_none());
    // An empty table: no service at all.
    let (_dir, path) = settings_file("[services]\n");
    let s = Settings::load_from(Some(&path), None, env(&[])).unwrap();
    assert!(s.services.is_empty(), "{:?}", names(&s));
}

#[test]
fn the_example_settings_file_names_only_invoice_without_a_handler() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invoice.toml");
    let s = Settings::load_from(Some(&path), None, env(&[])).unwrap();
    assert_eq!(names(&s), ["invoice"]);
    assert!(s.services["invoice"].handler.is_none());
}

#[test]
fn environment_variables_adjust_the_services_in_effect() {
    // The README's example keeps its meaning without a file...
    let readme = [("SWITCHBOARD__SERVICES__ECHO__CONCURRENCY", "128")];
    let s = Settings::load_from(None, None, env(&readme)).unwrap();
    assert_eq!(names(&s), ["echo", "slow"]);
    assert_eq!(s.services["echo"].concurrency, 128);
    assert!(s.services["echo"].handler.is_some());
    // ... and adjusts a service of the file.
    let (_dir, path) = settings_file("[services.invoice]\ntimeout_ms = 20000\n");
    let s = Settings::load_from(
        Some(&path),
        None,
        env(&[("SWITCHBOARD__SERVICES__INVOICE__CONCURRENCY", "8")]),
    )
    .unwrap();
    assert_eq!(names(&s), ["invoice"]);
    assert_eq!(s.services["invoice"].concurrency, 8);
    assert_eq!(s.services["invoice"].timeout_ms, 20_000);
    // A variable naming another service adds it, beside the file's.
    let s = Settings::load_from(
        Some(&path),
        None,
        env(&[("SWITCHBOARD__SERVICES__AUDIT__TIMEOUT_MS", "500")]),
    )
    .unwrap();
    assert_eq!(names(&s), ["audit", "invoice"]);
    assert!(s.services["audit"].handler.is_none());
}

#[test]
fn environment_variables_alone_can_name_the_services() {
    // No file: a variable that names a service of its own replaces the
    // demo services, as a file would.
    let s = Settings::load_from(
        None,
        None,
        env(&[
            ("SWITCHBOARD__SERVICES__INVOICE__TIMEOUT_MS", "20000"),
            ("SWITCHBOARD__SERVICES__INVOICE__QUEUE_TYPE", "classic"),
        ]),
    )
    .unwrap();
    assert_eq!(names(&s), ["invoice"]);
    assert_eq!(s.services["invoice"].timeout_ms, 20_000);
    assert_eq!(s.services["invoice"].queue_type, QueueType::Classic);
    assert!(s.services["invoice"].handler.is_none());
    // A handler by environment too.
    let s = Settings::load_from(
        None,
        None,
        env(&[("SWITCHBOARD__SERVICES__TWIN__HANDLER", "echo")]),
    )
    .unwrap();
    assert_eq!(names(&s), ["twin"]);
    assert!(s.services["twin"].handler.is_some());
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
            &[("SWITCHBOARD__AMQP__EVENTS_LOG_MAX_AGE", "7 days")],
            None,
            "amqp.events_log_max_age",
        ),
        (
            &[("SWITCHBOARD__AMQP__EVENTS_LOG_MAX_AGE", "0D")],
            None,
            "amqp.events_log_max_age",
        ),
        (
            &[("SWITCHBOARD__AMQP__EVENTS_LOG_MAX_BYTES", "100")],
            None,
            "amqp.events_log_max_bytes",
        ),
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
        // Without tokens, only loopback.
        (
            &[("SWITCHBOARD__GATEWAY__BIND", "0.0.0.0:8080")],
            None,
            "gateway.bind",
        ),
        (
            &[("SWITCHBOARD__GATEWAY__BODY_TIMEOUT_MS", "0")],
            None,
            "gateway.body_timeout_ms",
        ),
        (
            &[("SWITCHBOARD__GATEWAY__HEADER_TIMEOUT_MS", "0")],
            None,
            "gateway.header_timeout_ms",
        ),
        (
            &[(
                "SWITCHBOARD__GATEWAY__ALLOWED_ORIGINS",
                "https://app.example.com, *",
            )],
            None,
            "gateway.allowed_origins",
        ),
        (
            &[(
                "SWITCHBOARD__MANAGEMENT__URL",
                "http://admin:pw@127.0.0.1:15672",
            )],
            None,
            "management.url",
        ),
        (
            &[("SWITCHBOARD__OTEL__ENDPOINT", "http://u:pw@127.0.0.1:4318")],
            None,
            "otel.endpoint",
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
