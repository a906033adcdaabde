//! What operators see in RabbitMQ's management API (and UI): connection
//! names, consumer tags, queue arguments, message properties; and
//! `switchboard status`, against the real management API.
//!
//! The management plugin refreshes its statistics every few seconds, so
//! the tests look again until what they expect shows (never a fixed sleep).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use switchboard::amqp::{Outgoing, topology, wire};
use switchboard::management::{self, Management, ServiceStatus};
use switchboard::rpc::{Call, RpcOptions};
use switchboard::worker;

use crate::common::{Ctx, GATEWAY_SERVICES, ctx, gateway, poll_until};

/// How long the management API may take to show a change.
const STATS_LAG: Duration = Duration::from_secs(30);

/// Calls `f` until it returns `Some` ([`poll_until`]), failing after
/// [`STATS_LAG`].
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(STATS_LAG, what, || {
        let looked = f();
        async move { looked.await.ok_or("not yet") }
    })
    .await
}

#[actix_rt::test]
async fn operators_see_named_connections_tagged_consumers_and_explained_queues() {
    let gw = gateway("mgmt-names", |_| {}).await;
    let api = Management::new(&gw.ctx.settings).unwrap();
    let instance = gw.ctx.broker.instance_id().to_owned();
    let names = gw.ctx.broker.names().clone();

    let mut wanted: BTreeSet<String> = ["publish", "rpc", "hub", "deadwatch"]
        .iter()
        .map(|role| wire::connection_name(&instance, role))
        .collect();
    for svc in GATEWAY_SERVICES {
        wanted.insert(wire::connection_name(&instance, &format!("worker/{svc}")));
    }
    until("every connection, by name", || async {
        let seen: BTreeSet<String> = api
            .connections()
            .await
            .unwrap()
            .into_iter()
            .filter_map(|c| c.user_provided_name)
            .collect();
        wanted.is_subset(&seen).then_some(())
    })
    .await;

    let mut tags: Vec<(String, String)> = GATEWAY_SERVICES
        .iter()
        .map(|svc| {
            (
                names.service_queue(svc),
                format!("switchboard/{instance}/{svc}/"),
            )
        })
        .collect();
    tags.push((
        names.reply_queue(&instance),
        format!("switchboard/{instance}/replies/"),
    ));
    until(
        "a consumer tag naming instance and service on each queue",
        || async {
            let consumers = api.consumers().await.unwrap();
            tags.iter()
                .all(|(queue, tag)| {
                    consumers
                        .iter()
                        .any(|c| &c.queue.name == queue && c.consumer_tag.starts_with(tag))
                })
                .then_some(())
        },
    )
    .await;

    let echo = api
        .queue(&names.service_queue("echo"))
        .await
        .unwrap()
        .expect("the echo queue exists");
    let args = &echo.arguments;
    assert_eq!(args["x-queue-type"], "quorum");
    assert_eq!(
        args["x-dead-letter-exchange"],
        names.dead_exchange().as_str()
    );
    assert_eq!(args["x-dead-letter-routing-key"], "echo");
    assert_eq!(args["x-delivery-limit"], 5);
    let dead = api.queue(&names.dead_queue("echo")).await.unwrap();
    assert!(dead.is_some(), "the dead-letter queue exists");
    gw.cleanup().await;
}

#[actix_rt::test]
async fn a_request_waiting_in_its_queue_shows_every_property_in_the_management_api() {
    let c = ctx("mgmt-props").await;
    let ch = c.broker.channel().await.unwrap();
    topology::declare_service(&ch, c.broker.names(), "props", &c.service())
        .await
        .unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let pending = client
        .send(
            Call::new("props", &br#"{"x":1}"#[..])
                .call_id("call-props-1")
                .traceparent(tp)
                .timeout(Duration::from_secs(60)),
        )
        .await
        .unwrap();

    // What the UI's "Get messages" shows: the request, requeued after.
    let api_url = format!(
        "{}/api/queues/{}/{}/get",
        c.settings.management.url,
        "%2f",
        c.broker.names().service_queue("props")
    );
    let (user, password) = c
        .settings
        .management
        .credentials(c.settings.amqp.first_node());
    let got: Vec<Value> = reqwest::Client::new()
        .post(api_url)
        .basic_auth(user, Some(password))
        .json(&serde_json::json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    let p = &got[0]["properties"];
    assert_eq!(p["app_id"], "switchboard");
    assert_eq!(p["type"], "props");
    assert_eq!(p["content_type"], "application/json");
    assert_eq!(p["correlation_id"], "call-props-1");
    assert_eq!(p["message_id"], "call-props-1");
    assert_eq!(p["reply_to"], client.reply_to());
    assert_eq!(p["delivery_mode"], 2);
    assert_eq!(p["expiration"], "60000");
    assert!(p["timestamp"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(p["headers"]["traceparent"], tp);
    assert!(p["headers"]["x-sb-deadline-ms"].is_u64());
    drop(pending);
    c.cleanup(&["props"]).await;
}

/// Puts `n` requests in `service`'s queue and one message in its dead
/// letters, with nobody consuming.
async fn fill(c: &Ctx, service: &str, n: usize) {
    let ch = c.broker.channel().await.unwrap();
    let names = c.broker.names();
    topology::declare_service(&ch, names, service, &c.service())
        .await
        .unwrap();
    let props = || {
        wire::request_properties(
            &wire::RequestMeta {
                service,
                correlation_id: "waiting",
                message_id: None,
                reply_to: None,
                content_type: wire::CONTENT_JSON,
                timeout: None,
                traceparent: None,
                caller_waits: false,
            },
            true,
        )
    };
    let requests = names.requests_exchange();
    for _ in 0..n {
        c.broker
            .publish(Outgoing {
                exchange: &requests,
                routing_key: service,
                payload: b"{}",
                properties: props(),
                mandatory: true,
            })
            .await
            .unwrap();
    }
    c.broker
        .publish(Outgoing {
            exchange: &names.dead_exchange(),
            routing_key: service,
            payload: b"{}",
            properties: props(),
            mandatory: true,
        })
        .await
        .unwrap();
}

#[actix_rt::test]
async fn status_shows_depth_consumers_and_dead_letters_of_each_service() {
    let mut c = ctx("mgmt-status").await;
    c.settings.services.clear();
    for svc in ["echo", "idle", "nowhere"] {
        c.settings.services.insert(svc.into(), c.service());
    }
    c.worker("echo", &c.service(), worker::echo(Duration::ZERO))
        .await
        .unwrap();
    fill(&c, "idle", 2).await;

    let rows = until("the queues' statistics", || async {
        let rows = management::status(&c.settings).await.unwrap();
        let by = |s: &str| rows.iter().find(|r| r.service == s).cloned().unwrap();
        let (echo, idle) = (by("echo"), by("idle"));
        (echo.consumers == 1 && idle.ready == 2 && idle.dead_letters == 1).then_some(rows)
    })
    .await;
    let by = |s: &str| -> &ServiceStatus { rows.iter().find(|r| r.service == s).unwrap() };
    assert!(by("echo").is_served());
    assert_eq!(by("echo").queue, c.broker.names().service_queue("echo"));
    assert_eq!(by("idle").consumers, 0);
    assert!(!by("idle").is_served());
    assert!(
        !by("nowhere").exists,
        "a service nobody declared has no queue"
    );
    let table = management::render_table(&rows);
    assert!(table.contains(&format!(
        "{} (missing)",
        c.broker.names().service_queue("nowhere")
    )));
    c.cleanup(&["echo", "idle"]).await;
}

/// Runs `switchboard status` with the test's prefix and `env`.
async fn status_command(c: &Ctx, env: &[(&str, &str)]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("status")
        .env("SWITCHBOARD__AMQP__URL", crate::common::amqp_url())
        .env("SWITCHBOARD__AMQP__PREFIX", &c.prefix)
        .env("SWITCHBOARD__LOG__FILTER", "warn")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap()
}

#[actix_rt::test]
async fn the_status_command_exits_non_zero_when_a_service_has_no_consumer() {
    let c = ctx("mgmt-cmd").await;
    // The default settings name `echo` and `slow`: serve both.
    for svc in ["echo", "slow"] {
        c.worker(svc, &c.service(), worker::echo(Duration::ZERO))
            .await
            .unwrap();
    }
    let out = until("status exits 0 with both services consumed", || async {
        let out = status_command(&c, &[]).await;
        out.status.success().then_some(out)
    })
    .await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("SERVICE"), "{table}");
    assert!(table.contains(&c.broker.names().service_queue("slow")));

    let idle = [("SWITCHBOARD__SERVICES__IDLE__TIMEOUT_MS", "1000")];
    let out = status_command(&c, &idle).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no consumer for: idle"), "{stderr}");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["status", "--json"])
        .env("SWITCHBOARD__AMQP__PREFIX", &c.prefix)
        .env("SWITCHBOARD__AMQP__URL", crate::common::amqp_url())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["service"], "echo");
    assert!(rows[0]["consumers"].as_u64().unwrap() >= 1);

    // The API unreachable, or refusing the credentials: 2, with the reason.
    let out = status_command(
        &c,
        &[("SWITCHBOARD__MANAGEMENT__URL", "http://127.0.0.1:9")],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("management API"));
    let out = status_command(&c, &[("SWITCHBOARD__MANAGEMENT__PASSWORD", "wrong")]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    c.cleanup(&["echo", "slow"]).await;
}
