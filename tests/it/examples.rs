//! The workers of examples/ (Python with pika, Node.js with amqplib) serve
//! `invoice` behind `switchboard serve --config examples/invoice.toml`, as
//! a user runs them: called over HTTP synchronously and with a 202, with
//! an error reply, the deadline and the trace context checked.
//!
//! Each test owns the processes it starts (killed by pid when it ends, pass
//! or fail) and deletes what it declared.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use deadpool_lapin::lapin::types::AMQPValue;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use switchboard::amqp::{Outgoing, wire};

use crate::common::{Ctx, ctx, eventually};
use crate::toolchains::{npm_project, python_venv, repo};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A process this test started: killed (SIGKILL, by its pid) and reaped
/// when dropped, so that a failing assertion leaves nothing running.
struct Owned {
    child: std::sync::Mutex<Child>,
    /// Where its standard output goes.
    log: PathBuf,
}

impl Owned {
    fn start(cmd: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self {
            child: std::sync::Mutex::new(child),
            log,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the process has ended, showing its output.
    fn assert_running(&self, what: &str) {
        let status = self.child.lock().unwrap().try_wait();
        if let Ok(Some(status)) = status {
            panic!("{what} exited ({status}):\n{}", self.output());
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Consumers of `queue` now.
async fn consumers(c: &Ctx, queue: &str) -> u32 {
    crate::common::queue_consumers(&c.broker, queue)
        .await
        .unwrap_or(0)
}

/// Runs `serve` with examples/invoice.toml, then the worker `worker` (told
/// the broker and prefix by environment), and checks what a user sees.
async fn serves_invoice(name: &str, worker: &mut Command) {
    let c = ctx(name).await;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let serve = Owned::start(
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("--config")
            .arg(repo().join("examples/invoice.toml"))
            .arg("serve")
            .env("SWITCHBOARD__AMQP__URL", crate::common::amqp_url())
            .env("SWITCHBOARD__AMQP__PREFIX", &c.prefix)
            .env(
                "SWITCHBOARD__AMQP__INSTANCE_ID",
                &c.settings.amqp.instance_id,
            )
            .env("SWITCHBOARD__GATEWAY__BIND", format!("127.0.0.1:{port}"))
            .env("SWITCHBOARD__GATEWAY__WORKERS", "1")
            .env(
                "SWITCHBOARD__GATEWAY__STORE_URL",
                format!("sqlite://{}/calls.db?mode=rwc", dir.path().display()),
            )
            .env("SWITCHBOARD__LOG__FORMAT", "json"),
        dir.path().join("serve.log"),
    );
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), "the gateway is ready", || async {
        serve.assert_running("serve");
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let get_json = |path: String| {
        let req = http.get(format!("{base}{path}"));
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let post = |body: &str| {
        http.post(format!("{base}/v1/services/invoice/calls"))
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    let invoice = json!({"customer": "ACME", "currency": "EUR",
        "lines": [{"sku": "W-1", "quantity": 3, "unit_price_cents": 250},
                  {"sku": "G-7", "quantity": 1, "unit_price_cents": 1999}]})
    .to_string();

    // The gateway serves nothing itself: no demo services...
    let res = http
        .post(format!("{base}/v1/services/echo/calls"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // ... and `invoice` is declared before any worker of it runs: a call is
    // accepted (not "no queue on the broker") and waits in its queue.
    let queue = c.broker.names().service_queue("invoice");
    assert_eq!(consumers(&c, &queue).await, 0);
    let early = post(&invoice)
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(early.status(), StatusCode::ACCEPTED);
    let early: Value = early.json().await.unwrap();

    let worker = Owned::start(
        worker
            .env("AMQP_URL", crate::common::amqp_url())
            .env("SWITCHBOARD_PREFIX", &c.prefix)
            .env("SERVICE", "invoice"),
        dir.path().join("worker.log"),
    );
    eventually(
        Duration::from_secs(60),
        "the worker consumes invoice",
        || async {
            worker.assert_running("the worker");
            consumers(&c, &queue).await > 0
        },
    )
    .await;

    // Synchronous: the reply is the answer.
    let res = post(&invoice)
        .header("traceparent", TRACEPARENT)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let call_id = res.headers()["call-id"].to_str().unwrap().to_owned();
    let reply: Value = res.json().await.unwrap();
    assert_eq!(reply["total_cents"], 3 * 250 + 1999, "{reply}");
    assert_eq!(reply["customer"], "ACME");

    // An error reply: the worker's status and problem+json, passed through.
    let res = post(r#"{"customer": "ACME", "lines": [{"quantity": 0}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        wire::CONTENT_PROBLEM
    );
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["status"], 422);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("lines[0].quantity"),
        "{problem}"
    );

    // Asynchronous: the call accepted before the worker ran is answered;
    // long-poll it.
    let doc: Value = http
        .get(format!(
            "{base}/v1/calls/{}?wait=20",
            early["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(doc["result"]["status"], 200);
    assert_eq!(doc["result"]["body"]["total_cents"], 2749);
    // A 202 of a bad invoice: its result is the worker's 422.
    let res = post(r#"{"lines": []}"#)
        .header("prefer", "respond-async")
        .header("traceparent", TRACEPARENT)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let doc = get_json(format!("{location}?wait=20")).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    let res = http
        .get(format!("{base}{location}/result"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // The trace: the HTTP traceparent's trace id reached the worker with
    // the call (its log line for the call names both).
    let line = format!("call_id={call_id} trace_id={TRACE} status=200");
    eventually(
        Duration::from_secs(10),
        "the worker logged the call",
        || async { worker.output().contains(&line) },
    )
    .await;

    // Over AMQP, as any caller: the reply carries the request's
    // traceparent on, and a request past its deadline gets no reply.
    let crate::common::Foreign {
        conn,
        reply_queue,
        mut replies,
        ..
    } = crate::common::foreign_client(&format!("{name}-caller")).await;
    let request = |id: &'static str, deadline: Option<u64>| {
        let mut props = wire::request_properties(
            &wire::RequestMeta {
                service: "invoice",
                correlation_id: id,
                message_id: None,
                reply_to: Some(reply_queue.as_str()),
                content_type: wire::CONTENT_JSON,
                timeout: Some(Duration::from_secs(30)),
                traceparent: Some(TRACEPARENT),
                caller_waits: false,
            },
            false,
        );
        if let Some(ms) = deadline {
            let mut h = props.headers().clone().unwrap_or_default();
            h.insert(
                wire::HEADER_DEADLINE.into(),
                AMQPValue::LongLongInt(ms as i64),
            );
            props = props.with_headers(h);
        }
        props
    };
    let exchange = c.broker.names().requests_exchange();
    for (id, deadline) in [("stale-1", Some(wire::now_ms() - 1_000)), ("fresh-1", None)] {
        c.broker
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: "invoice",
                payload: invoice.as_bytes(),
                properties: request(id, deadline),
                mandatory: true,
            })
            .await
            .unwrap();
    }
    let reply = tokio::time::timeout(Duration::from_secs(20), replies.next())
        .await
        .expect("a reply")
        .unwrap()
        .unwrap();
    let props = &reply.properties;
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.as_str()),
        Some("fresh-1"),
        "the stale request was answered"
    );
    assert_eq!(wire::reply_status(props), Ok(200));
    let back = wire::header_str(props, wire::HEADER_TRACEPARENT).expect("traceparent passed on");
    assert_eq!(switchboard::telemetry::trace_id(back), Some(TRACE));
    eventually(
        Duration::from_secs(10),
        "the stale request dropped",
        || async { worker.output().contains("call_id=stale-1") },
    )
    .await;
    assert!(
        worker.output().contains("expired: dropped"),
        "{}",
        worker.output()
    );
    let _ = conn.close(200, "done".into()).await;

    // Stop both before their queues go, so that nothing declares them again.
    drop(worker);
    drop(serve);
    let ch = c.broker.channel().await.unwrap();
    let deadwatch = c
        .broker
        .names()
        .deadwatch_queue(&c.settings.amqp.instance_id);
    let _ = ch.queue_delete(deadwatch.into(), Default::default()).await;
    let _ = ch.close(200, "cleanup".into()).await;
    c.cleanup(&["invoice"]).await;
}

#[actix_rt::test]
async fn the_python_example_serves_invoice_behind_the_gateway() {
    let python = python_venv(
        "python-example",
        &repo().join("examples/python/requirements.txt"),
    );
    serves_invoice(
        "ex-python",
        Command::new(python).arg(repo().join("examples/python/invoice_worker.py")),
    )
    .await;
}

#[actix_rt::test]
async fn the_node_example_serves_invoice_behind_the_gateway() {
    let src = repo().join("examples/node");
    let project = npm_project("node-example", &src, &["invoice_worker.js"]);
    // The example runs from its own folder, as a user runs it; its
    // dependencies come from the installed copy.
    let check = Command::new("node")
        .arg("--check")
        .arg(src.join("invoice_worker.js"))
        .output()
        .expect("node runs");
    assert!(check.status.success(), "{check:?}");
    serves_invoice(
        "ex-node",
        Command::new("node")
            .arg(project.join("invoice_worker.js"))
            .current_dir(Path::new(&project)),
    )
    .await;
}
