//! No URL password, token or signing secret appears in any output: every
//! failure path a test can provoke is run as a user would (`serve`,
//! `declare`, `status`, `call` as processes, with settings that hold
//! recognisable secrets) and its stdout and stderr are searched; so are the
//! library's errors (`Display` and `Debug`) and the settings' `Debug`.

use std::process::Output;
use std::time::Duration;

use switchboard::Error;
use switchboard::amqp::Broker;
use switchboard::calls::CallStore;
use switchboard::management::Management;
use switchboard::settings::{Settings, TokenSettings};

use crate::common::{Ctx, amqp_url, ctx};

/// Every secret string these tests put in settings; none may be output.
const SECRETS: &[&str] = &[
    "S3cret-store-pw",
    "S3cret-query-pw",
    "S3cret-amqp-pw",
    "S3cret-uri-pw",
    "S3cret-mgmt-pw",
    "S3cret-mgmt-url-pw",
    "S3cret-tok",
    "S3cret-dup-token-0123",
    "S3cret-not-hex",
    "S3cret-cb",
    "S3cret-otel-pw",
    "S3cret-mysql-pw",
    "S3cret-otel-live",
];

fn assert_no_secret(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what}: the secret {s:?} is in:\n{text}");
    }
}

/// Runs `switchboard <args>` with the settings file `toml` (after the
/// test's broker, prefix and instance), as an operator would.
async fn run(c: &Ctx, toml: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchboard.toml");
    let head = format!(
        "[amqp]\nurl = \"{}\"\nprefix = \"{}\"\ninstance_id = \"{}-cli\"\nconnect_timeout_ms = 2000\n\
         [gateway]\nbind = \"127.0.0.1:0\"\nstore_url = \"sqlite://{}/calls.db?mode=rwc\"\n\
         [log]\nfilter = \"debug\"\n\
         [services.svc]\nqueue_type = \"classic\"\n",
        amqp_url(),
        c.prefix,
        c.prefix,
        dir.path().display()
    );
    // Later tables of the same name would be refused: the case's own
    // settings replace keys by dotted names.
    std::fs::write(&file, merge(&head, toml)).unwrap();
    let running = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&file)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("SWITCHBOARD__AMQP__URL")
        // Ended when the deadline below drops it: a failure path that does
        // not fail must not leave a process behind.
        .kill_on_drop(true)
        .output();
    let Ok(out) = tokio::time::timeout(Duration::from_secs(30), running).await else {
        return (Some(0), format!("still running after 30 s: {args:?}"));
    };
    let out: Output = out.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// `base` with the `key = value` lines of `case` (keys written
/// `section.key`) put in place.
fn merge(base: &str, case: &str) -> String {
    let mut table: toml::Table = base.parse().unwrap();
    let case: toml::Table = case.parse().unwrap();
    fn put(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(t)), toml::Value::Table(v)) => put(t, v),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    put(&mut table, case);
    toml::to_string(&table).unwrap()
}

#[actix_rt::test]
async fn no_secret_reaches_the_output_of_any_failure() {
    let c = ctx("sec-secrets").await;
    let no_db = format!("sb_no_such_db_{}", &c.prefix[c.prefix.len() - 8..]);
    // (what, settings, command, what the output must say: the path was taken)
    let cases: Vec<(&str, String, &[&str], &str)> = vec![
        (
            "store URL with a password",
            format!("[gateway]\nstore_url = \"postgres://sbuser:S3cret-store-pw@127.0.0.1:5432/{no_db}\"\n"),
            &["serve"],
            "call store",
        ),
        (
            "store URL with a password in its query",
            "[gateway]\nstore_url = \"postgres://127.0.0.1:1/sb?user=sb&password=S3cret-query-pw\"\n".into(),
            &["serve"],
            "call store",
        ),
        (
            "store URL of another scheme",
            "[gateway]\nstore_url = \"mysql://u:S3cret-mysql-pw@127.0.0.1/x\"\n".into(),
            &["serve"],
            "gateway.store_url",
        ),
        (
            "unreachable broker (serve)",
            "[amqp]\nurl = \"amqp://sbuser:S3cret-amqp-pw@127.0.0.1:1/%2f\"\n".into(),
            &["serve"],
            "cannot reach RabbitMQ",
        ),
        (
            "unreachable broker (declare)",
            "[amqp]\nurl = \"amqp://sbuser:S3cret-amqp-pw@127.0.0.1:1/%2f\"\n".into(),
            &["declare"],
            "cannot reach RabbitMQ",
        ),
        (
            "unreachable broker (call)",
            "[amqp]\nurl = \"amqp://sbuser:S3cret-amqp-pw@127.0.0.1:1/%2f\"\n".into(),
            &["call", "svc", "{}", "--timeout", "2"],
            "cannot reach RabbitMQ",
        ),
        (
            "broker URL that is no AMQP URI",
            "[amqp]\nurl = \"amqp://sbuser:S3cret-uri-pw@127.0.0.1:notaport/%2f\"\n".into(),
            &["declare"],
            "amqp.url",
        ),
        (
            "wrong management password",
            "[management]\nuser = \"guest\"\npassword = \"S3cret-mgmt-pw\"\n".into(),
            &["status"],
            "401",
        ),
        (
            "management URL with a password, unreachable",
            "[management]\nurl = \"http://admin:S3cret-mgmt-url-pw@127.0.0.1:1\"\n".into(),
            &["status"],
            "management.url",
        ),
        (
            "unreachable management API",
            "[management]\nurl = \"http://127.0.0.1:1\"\npassword = \"S3cret-mgmt-pw\"\n".into(),
            &["status"],
            "management API",
        ),
        (
            "management URL of another scheme",
            "[management]\nurl = \"ftp://admin:S3cret-mgmt-url-pw@127.0.0.1:1\"\n".into(),
            &["status"],
            "management.url",
        ),
        (
            "token too short",
            "[gateway.tokens.ops]\ntoken = \"S3cret-tok\"\nservices = [\"*\"]\n".into(),
            &["serve"],
            "gateway.tokens.ops",
        ),
        (
            "one token for two callers",
            "[gateway.tokens.ops]\ntoken = \"S3cret-dup-token-0123\"\nservices = [\"*\"]\n\
             [gateway.tokens.dev]\ntoken = \"S3cret-dup-token-0123\"\nservices = [\"*\"]\n"
                .into(),
            &["serve"],
            "gateway.tokens.dev",
        ),
        (
            "a digest that is no digest",
            "[gateway.tokens.ops]\ntoken_sha256 = \"S3cret-not-hex\"\nservices = [\"*\"]\n".into(),
            &["serve"],
            "gateway.tokens.ops",
        ),
        (
            "callback secret that is no secret",
            "[callbacks]\nsecret = \"whsec_S3cret-cb!!\"\n".into(),
            &["serve"],
            "callbacks.secret",
        ),
        (
            "OTLP endpoint with a password",
            "[otel]\nenabled = true\nendpoint = \"http://u:S3cret-otel-live@127.0.0.1:1\"\n".into(),
            &["declare"],
            "otel.endpoint",
        ),
        (
            "OTLP endpoint of another scheme",
            "[otel]\nenabled = true\nendpoint = \"ftp://u:S3cret-otel-pw@127.0.0.1:1\"\n".into(),
            &["declare"],
            "otel.endpoint",
        ),
    ];
    let mut failures = Vec::new();
    for (what, toml, args, expected) in &cases {
        let (code, text) = run(&c, toml, args).await;
        assert_ne!(code, Some(0), "{what}: it succeeded:\n{text}");
        if !text.contains(expected) {
            failures.push(format!(
                "{what}: the output does not say {expected:?}:\n{text}"
            ));
        }
        assert_no_secret(what, &text);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    c.cleanup(&["svc"]).await;
}

/// The settings with a recognisable secret in every place one can be.
fn settings_full_of_secrets() -> Settings {
    let mut s = Settings::load_from(None, None, Vec::new()).unwrap();
    s.amqp.url = "amqp://sbuser:S3cret-amqp-pw@127.0.0.1:1/%2f".into();
    s.gateway.store_url =
        "postgres://sbuser:S3cret-store-pw@127.0.0.1:1/sb?password=S3cret-query-pw".into();
    s.management.url = "http://admin:S3cret-mgmt-url-pw@127.0.0.1:1".into();
    s.management.password = "S3cret-mgmt-pw".into();
    s.callbacks.secret = "whsec_S3cret-cb".into();
    s.otel.endpoint = "http://u:S3cret-otel-pw@127.0.0.1:1".into();
    s.gateway.tokens.insert(
        "ops".into(),
        TokenSettings::bearer("S3cret-dup-token-0123", &["*"]),
    );
    s.gateway.tokens.insert(
        "dev".into(),
        TokenSettings::digest("S3cret-not-hex", &["*"]),
    );
    s
}

#[test]
fn the_settings_debug_shows_no_secret() {
    let s = settings_full_of_secrets();
    let shown = format!("{s:?}\n{s:#?}");
    assert_no_secret("Settings as Debug", &shown);
    // What is not secret is still shown.
    assert!(shown.contains("127.0.0.1:1"), "{shown}");
    assert!(shown.contains("sbuser"), "{shown}");
    assert!(shown.contains("ops"), "{shown}");
    for part in [
        format!("{:?}", s.amqp),
        format!("{:?}", s.gateway),
        format!("{:?}", s.gateway.tokens["ops"]),
        format!("{:?}", s.callbacks),
        format!("{:?}", s.management),
        format!("{:?}", s.otel),
    ] {
        assert_no_secret("a settings section as Debug", &part);
    }
    // Validation messages name the setting, never its secret.
    let err = s.validate().unwrap_err();
    assert_no_secret("validation", &format!("{err} {err:?}"));
}

#[actix_rt::test]
async fn the_library_errors_show_no_secret() {
    let s = settings_full_of_secrets();
    let mut amqp = s.amqp.clone();
    amqp.connect_timeout_ms = 2000;
    let err: Error = Broker::connect(&amqp).await.unwrap_err();
    assert_no_secret("Broker::connect", &format!("{err} {err:?}"));
    let err = CallStore::open(&s.gateway.store_url).await.unwrap_err();
    assert!(err.to_string().contains("call store"), "{err}");
    assert_no_secret("CallStore::open", &format!("{err} {err:?}"));
    let mgmt = Management::new(&s).unwrap();
    assert_no_secret("Management as Debug", &format!("{mgmt:?}"));
    let err = mgmt.queue("q").await.unwrap_err();
    assert_no_secret("Management::queue", &format!("{err} {err:?}"));
}
