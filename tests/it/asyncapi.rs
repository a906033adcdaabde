//! The AsyncAPI document of the AMQP side: valid by the AsyncAPI
//! initiative's own parser (`@asyncapi/parser`, run with Node.js), true to
//! what switchboard declares on the broker, the same from the gateway and
//! from the command line.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use switchboard::amqp::wire;
use switchboard::management::Management;
use switchboard::settings::Settings;

use crate::common::ctx;
use crate::toolchains::{npm_project, repo};

/// What the parser said of one document.
#[derive(Debug)]
struct Parsed {
    parsed: bool,
    /// (severity, code, path, message); severity 0 error, 1 warning.
    diagnostics: Vec<(u64, String, String, String)>,
}

impl Parsed {
    fn at_most(&self, severity: u64) -> Vec<&(u64, String, String, String)> {
        self.diagnostics
            .iter()
            .filter(|d| d.0 <= severity)
            .collect()
    }
}

/// Parses each document with @asyncapi/parser (installed once under
/// target/, pinned by tests/asyncapi/package-lock.json).
fn parse(docs: &[(&str, &Value)]) -> Vec<Parsed> {
    let validator = npm_project(
        "asyncapi-parser",
        &repo().join("tests/asyncapi"),
        &["validate.mjs"],
    );
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = docs
        .iter()
        .map(|(name, doc)| {
            let f = dir.path().join(format!("{name}.json"));
            std::fs::write(&f, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
            f
        })
        .collect();
    let out = Command::new("node")
        .arg(validator.join("validate.mjs"))
        .args(&files)
        .output()
        .expect("node runs (Node.js 20)");
    assert!(
        out.status.success(),
        "the validator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), docs.len());
    lines
        .into_iter()
        .map(|l| Parsed {
            parsed: l["parsed"] == true,
            diagnostics: l["diagnostics"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    (
                        d["severity"].as_u64().unwrap(),
                        d["code"].as_str().unwrap().to_owned(),
                        d["path"].as_str().unwrap().to_owned(),
                        d["message"].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
        })
        .collect()
}

fn settings(file: Option<&Path>, env: &[(&str, &str)]) -> Settings {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Settings::load_from(file, None, env).unwrap()
}

#[test]
fn the_asyncapi_document_validates_with_the_asyncapi_parser() {
    let invoice = repo().join("examples/invoice.toml");
    let example = switchboard::asyncapi::document(&settings(Some(&invoice), &[]));
    let other = switchboard::asyncapi::document(&settings(
        None,
        &[
            (
                "SWITCHBOARD__AMQP__URL",
                "amqps://app:pw@rabbit.example:5671/prod",
            ),
            ("SWITCHBOARD__AMQP__PREFIX", "acme.billing"),
            ("SWITCHBOARD__SERVICES__LEDGER__QUEUE_TYPE", "classic"),
            ("SWITCHBOARD__SERVICES__LEDGER__HANDLER", "echo"),
            ("SWITCHBOARD__SERVICES__TAX-RATES__TIMEOUT_MS", "1500"),
        ],
    ));
    // A control the parser must refuse: an operation on a channel that is
    // not there, and a reply message its channel does not have.
    let mut broken = example.clone();
    broken["operations"]["invoice.serve"]["channel"]["$ref"] = "#/channels/nowhere".into();
    broken["operations"]["invoice.call"]["reply"]["messages"][0]["$ref"] =
        "#/channels/replies/messages/nosuch".into();
    let results = parse(&[
        ("invoice", &example),
        ("other", &other),
        ("broken", &broken),
    ]);
    for (name, r) in ["invoice", "other"].iter().zip(&results) {
        assert!(r.parsed, "{name} did not parse: {:#?}", r.diagnostics);
        // Neither errors nor warnings (information, such as a newer
        // AsyncAPI 3.x existing, is allowed).
        assert!(r.at_most(1).is_empty(), "{name}: {:#?}", r.at_most(1));
    }
    assert!(
        !results[2].at_most(0).is_empty(),
        "the parser accepted a broken document: {:#?}",
        results[2].diagnostics
    );
}

#[actix_rt::test]
async fn the_document_says_what_switchboard_declares_on_the_broker() {
    let c = ctx("asyncapi-broker").await;
    let mut s = c.settings.clone();
    s.services.clear();
    let mut invoice = c.service();
    invoice.delivery_limit = 7;
    invoice.timeout_ms = 12_345;
    s.services.insert("invoice".into(), invoice);
    switchboard::app::declare_services(&c.broker, &s)
        .await
        .unwrap();
    let doc = switchboard::asyncapi::document(&s);
    let names = c.broker.names();
    let api = Management::new(&s).unwrap();
    for (channel, queue) in [
        ("invoice.queue", names.service_queue("invoice")),
        ("invoice.deadLetters", names.dead_queue("invoice")),
    ] {
        let binding = &doc["channels"][channel]["bindings"]["amqp"];
        assert_eq!(doc["channels"][channel]["address"], queue.as_str());
        assert_eq!(binding["queue"]["name"], queue.as_str());
        let on_broker = api.queue(&queue).await.unwrap().expect("declared");
        let described = binding["x-arguments"].as_object().unwrap();
        assert_eq!(
            described, &on_broker.arguments,
            "{channel}: the document's arguments are the broker's"
        );
    }
    assert_eq!(
        doc["channels"]["invoice.queue"]["bindings"]["amqp"]["x-arguments"]["x-delivery-limit"],
        7
    );
    assert_eq!(
        doc["channels"]["invoice.requests"]["bindings"]["amqp"]["exchange"]["name"],
        names.requests_exchange()
    );
    assert_eq!(
        doc["operations"]["invoice.call"]["bindings"]["amqp"]["expiration"],
        12_345
    );
    assert_eq!(
        doc["channels"]["events"]["bindings"]["amqp"]["exchange"]["type"],
        "fanout"
    );
    let by_type = &doc["channels"]["eventsByType"];
    assert_eq!(by_type["address"], names.events_types_exchange().as_str());
    assert_eq!(by_type["bindings"]["amqp"]["exchange"]["type"], "direct");
    assert!(by_type["messages"][wire::EVENT_CALL_CANCELLED].is_object());
    // Every header of the wire conventions, where it belongs.
    let messages = &doc["components"]["messages"];
    let request = &messages["invoice.request"]["headers"]["properties"];
    assert_eq!(request[wire::HEADER_DEADLINE]["x-amqp"], "header");
    assert_eq!(request[wire::HEADER_TRACEPARENT]["x-amqp"], "header");
    assert_eq!(request["reply_to"]["x-amqp"], "property");
    assert_eq!(request["type"]["const"], "invoice");
    for reply in ["reply", "errorReply"] {
        let h = &messages[reply]["headers"]["properties"];
        assert_eq!(h[wire::HEADER_STATUS]["x-amqp"], "header", "{reply}");
        assert!(h[wire::HEADER_TRACEPARENT].is_object(), "{reply}");
    }
    for ty in [wire::EVENT_CALL_ACCEPTED, wire::EVENT_CALL_COMPLETED] {
        assert!(messages[ty].is_object(), "{ty}");
        assert!(
            doc["channels"]["events"]["messages"][ty].is_object(),
            "{ty}"
        );
    }
    c.cleanup(&["invoice"]).await;
}

#[actix_rt::test]
async fn the_gateway_serves_the_document_and_the_command_prints_it() {
    let gw = crate::common::gateway("asyncapi-gw", |_| {}).await;
    let served: Value = gw
        .get("/asyncapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, switchboard::asyncapi::document(&gw.ctx.settings));
    assert!(served["channels"]["fail.queue"].is_object());
    gw.cleanup().await;

    let invoice = repo().join("examples/invoice.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(&invoice)
        .arg("asyncapi")
        .env("SWITCHBOARD__AMQP__PREFIX", "printed")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = switchboard::asyncapi::document(&settings(
        Some(&invoice),
        &[("SWITCHBOARD__AMQP__PREFIX", "printed")],
    ));
    assert_eq!(printed, expected);
    assert_eq!(
        printed["channels"]["invoice.queue"]["address"],
        "printed.svc.invoice"
    );
    assert!(printed["channels"].get("echo.queue").is_none());
}
