//! A full broker restart (`rabbitmqctl stop_app` / `start_app`). It disturbs
//! every user of the broker, so it lives in a test binary of its own, which
//! `cargo test` runs after (never beside) the other test binaries.

#[path = "it/common.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use common::{eventually, gateway};

/// Starts the broker's app again when dropped, so that no failed assertion
/// leaves the machine without a broker.
struct StartOnDrop;

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    }
}

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[actix_rt::test]
async fn after_a_broker_restart_everything_comes_back_and_no_accepted_call_is_lost() {
    if !rabbitmqctl(&["status"]) {
        // Not the broker's host (a remote SWITCHBOARD__AMQP__URL): nothing to restart.
        println!("skipped: rabbitmqctl cannot reach the local broker");
        return;
    }
    const PENDING: usize = 10;
    // Deadlines longer than the outage: the calls must survive it, not expire.
    let gw = gateway("restart", |s| {
        for svc in s.services.values_mut() {
            svc.timeout_ms = 120_000;
        }
    })
    .await;
    let mut accepted = Vec::new();
    for i in 0..PENDING {
        let res = gw
            .post("slow")
            .header("prefer", "respond-async")
            .body(format!("{{\"i\":{i}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        accepted.push(
            res.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }

    // A client without kept-alive connections: the gateway closes idle ones
    // while the broker restarts, and a POST must not race that close.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let post_echo = |wait: &str| {
        fresh
            .post(gw.url("/v1/services/echo/calls"))
            .header("prefer", format!("wait={wait}"))
            .body("{}")
            .send()
    };
    let restart_guard = StartOnDrop;
    assert!(rabbitmqctl(&["stop_app"]), "rabbitmqctl stop_app failed");
    let restarted = async {
        // While the broker is away, callers get errors at once, never a hang.
        let started = Instant::now();
        let res = post_echo("5").await.unwrap();
        let refused_in = started.elapsed();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().contains_key("retry-after"));
        assert!(
            refused_in < Duration::from_secs(15),
            "refusal took {refused_in:?}"
        );
        let ready = fresh.get(gw.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        refused_in
    }
    .await;
    // Starts the broker again.
    drop(restart_guard);
    let back = Instant::now();

    // Everything comes back by itself: a synchronous call succeeds again.
    eventually(
        Duration::from_secs(90),
        "a synchronous call succeeds again",
        || async {
            post_echo("5")
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        },
    )
    .await;
    let recovered_in = back.elapsed();
    // Readiness follows once every consumer has consumed again (each
    // reconnects on its own, a moment apart from the one that served the call).
    eventually(
        Duration::from_secs(30),
        "/readyz answers 200 again",
        || async {
            fresh
                .get(gw.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        },
    )
    .await;

    // The calls accepted before the restart all complete.
    gw.gate.add_permits(PENDING);
    for (i, id) in accepted.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let doc: Value = fresh
                .get(gw.url(&format!("/v1/calls/{id}?wait=5")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if doc["status"] == "succeeded" {
                assert_eq!(doc["result"]["body"]["i"], i);
                break;
            }
            assert_eq!(doc["status"], "pending", "accepted call {id}: {doc}");
            assert!(Instant::now() < deadline, "accepted call {id} never ended");
        }
    }
    let reconnects: u64 = gw
        .workers
        .iter()
        .map(|(_, w)| w.stats.consumer.reconnects())
        .sum();
    assert!(
        reconnects >= gw.workers.len() as u64,
        "not every worker came back"
    );
    let state = gw.gateway.as_ref().unwrap();
    eventually(
        Duration::from_secs(30),
        "the event hub consumes again",
        || async move { state.hub().stats.consumer.is_up() },
    )
    .await;
    println!(
        "FAULT-REPORT broker-restart accepted_before={PENDING} lost=0 refused_while_down_in_ms={} recovered_in_ms={} worker_reconnects={reconnects}",
        restarted.as_millis(),
        recovered_in.as_millis()
    );
    gw.cleanup().await;
}
