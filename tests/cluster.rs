//! A RabbitMQ cluster of three nodes that this test starts beside the shared
//! broker on 5672 (node names, ports and data of its own; `tests/nodes`),
//! and one node stopped mid-load. What a user observes: `amqp.url` lists the
//! three nodes; when the node that every connection of the process is on
//! stops, the connections go to the next node by themselves, the quorum
//! service queue keeps every request it accepted (a confirmed publish), and
//! the worker runs each of them once: 0 lost, 0 run twice.
//!
//! A test binary of its own (`cargo test --test cluster`, about a minute:
//! three nodes boot and join). Needs `rabbitmq-server` and, when run as
//! root, the `rabbitmq` user (the nodes share its Erlang cookie).

#[path = "it/common.rs"]
mod common;
mod nodes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::amqp::Broker;
use switchboard::rpc::{Call, RpcClient, RpcOptions};
use switchboard::settings::{QueueType, ReplyMode, ServiceSettings, Settings};
use switchboard::worker::{Reply, Request, Worker};

use common::eventually;
use nodes::RabbitNode;

/// Calls run before the node stops, calls sent once it is down, and how
/// many are in flight at once.
const BEFORE: usize = 200;
const AFTER: usize = 300;
const IN_FLIGHT: usize = 16;

/// Starts three nodes and joins the second and third to the first.
async fn cluster() -> [RabbitNode; 3] {
    let conf =
        |_: &std::path::Path, port: u16| format!("listeners.tcp.default = 127.0.0.1:{port}\n");
    let (a, b, c) = tokio::join!(
        RabbitNode::start("sbc1", conf),
        RabbitNode::start("sbc2", conf),
        RabbitNode::start("sbc3", conf),
    );
    for node in [&b, &c] {
        node.ctl(&["stop_app"]);
        node.ctl(&["join_cluster", &a.name]);
        node.ctl(&["start_app"]);
        node.wait_until_listening().await;
    }
    a.ctl(&["await_online_nodes", "3"]);
    [a, b, c]
}

/// Settings as a user writes them: the three nodes in `amqp.url`.
fn settings(nodes: &[RabbitNode]) -> Settings {
    let prefix = format!(
        "t-cluster-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let url: Vec<String> = nodes
        .iter()
        .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", n.port))
        .collect();
    let env = vec![
        ("SWITCHBOARD__AMQP__URL".to_string(), url.join(",")),
        ("SWITCHBOARD__AMQP__PREFIX".to_string(), prefix.clone()),
        (
            "SWITCHBOARD__AMQP__INSTANCE_ID".to_string(),
            format!("{prefix}-i"),
        ),
        (
            "SWITCHBOARD__AMQP__CONNECT_TIMEOUT_MS".to_string(),
            "3000".into(),
        ),
        // Replies of pending calls outlive the node their queue was on.
        (
            "SWITCHBOARD__AMQP__INSTANCE_QUEUE_TYPE".to_string(),
            "quorum".into(),
        ),
    ];
    Settings::load_from(None, None, env).expect("valid settings")
}

/// What the load saw.
#[derive(Debug, Default)]
struct Outcome {
    /// Requests the broker confirmed (accepted calls).
    accepted: usize,
    /// Publishes refused while the node went away (the caller knows: an
    /// error, so it sends again; counted once per refusal).
    refused: usize,
    /// The last refusal, as the caller saw it.
    last_refusal: Option<String>,
    /// Replies received.
    answered: usize,
    /// Calls that ended without their reply (an error to the caller).
    reply_lost: usize,
}

#[actix_rt::test]
async fn a_node_stopped_mid_load_loses_no_accepted_call_and_runs_none_twice() {
    // RUST_LOG=switchboard=info shows the failover.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let nodes = cluster().await;
    let s = settings(&nodes);
    let broker = Broker::connect(&s.amqp)
        .await
        .expect("connects to the cluster");
    // Each request's runs, by its number.
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let svc = ServiceSettings {
        queue_type: QueueType::Quorum,
        timeout_ms: 120_000,
        ..ServiceSettings::default()
    };
    let handler = {
        let runs = runs.clone();
        Arc::new(move |req: Request| {
            let runs = runs.clone();
            async move {
                let n = String::from_utf8_lossy(&req.payload).into_owned();
                *runs.lock().unwrap().entry(n).or_default() += 1;
                Ok(Reply::ok("text/plain", req.payload))
            }
        })
    };
    let worker = Worker::start(&broker, "work", &svc, handler)
        .await
        .expect("the worker starts");
    // `auto`: calls made with `send` come back through the durable reply
    // queue (replicated here), as every call below is.
    assert_eq!(s.rpc.reply_mode, ReplyMode::Auto);
    let client = RpcClient::start(&broker, RpcOptions::from(&s.rpc))
        .await
        .expect("the RPC client starts");

    // The load: each call sent until the broker confirms it (the same
    // message id every time, as a careful caller does), then awaited. It
    // goes on until AFTER calls more than were sent when the node was gone.
    let next = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(AtomicUsize::new(usize::MAX));
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let load: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (client, next, limit, outcome) =
                (client.clone(), next.clone(), limit.clone(), outcome.clone());
            actix_rt::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= limit.load(Ordering::SeqCst) {
                        return;
                    }
                    let body = format!("call-{i}");
                    let pending = loop {
                        let call = Call::new("work", body.clone().into_bytes())
                            .content_type("text/plain")
                            .message_id(body.clone())
                            .timeout(Duration::from_secs(60));
                        match client.send(call).await {
                            Ok(p) => break p,
                            Err(e) => {
                                assert!(e.is_recoverable(), "call {i}: {e}");
                                {
                                    let mut o = outcome.lock().unwrap();
                                    o.refused += 1;
                                    o.last_refusal = Some(e.to_string());
                                }
                                // The pool reconnects in the background.
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    };
                    outcome.lock().unwrap().accepted += 1;
                    let reply = pending.wait().await;
                    let mut o = outcome.lock().unwrap();
                    match reply {
                        Ok(r) => {
                            assert_eq!(&r.body[..], body.as_bytes());
                            o.answered += 1;
                        }
                        Err(_) => o.reply_lost += 1,
                    }
                }
            })
        })
        .collect();

    // Mid-load, the node every connection is on (the first of amqp.url)
    // stops.
    eventually(Duration::from_secs(60), "the first calls run", || async {
        runs.lock().unwrap().len() >= BEFORE
    })
    .await;
    let stopped = nodes[0].name.clone();
    let [first, second, third] = nodes;
    // Off the test's thread, which runs the load.
    let first = tokio::task::spawn_blocking(move || {
        first.stop();
        first
    })
    .await
    .unwrap();
    limit.store(next.load(Ordering::SeqCst) + AFTER, Ordering::SeqCst);
    let finished = tokio::time::timeout(Duration::from_secs(180), async {
        for task in load {
            task.await.unwrap();
        }
    })
    .await;
    if finished.is_err() {
        let down: Vec<String> = broker
            .consumers()
            .down()
            .iter()
            .map(ToString::to_string)
            .collect();
        let (metrics, _) = broker.render_metrics(false);
        let interesting: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("reconnect") || l.contains("consum") || l.contains("rpc_"))
            })
            .collect();
        // The broker's side: the queues' leaders and members, and what
        // the nodes that stayed up logged.
        let queues = second.ctl_output(&[
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "online",
            "messages",
            "state",
        ]);
        panic!(
            "the load did not end: {:?}, {} ran; consumers down: {down:?}\n{}\nqueues:\n{queues}\n{} log:\n{}\n{} log:\n{}",
            outcome.lock().unwrap(),
            runs.lock().unwrap().len(),
            interesting.join("\n"),
            second.name,
            second.log_tail(),
            third.name,
            third.log_tail(),
        );
    }
    let calls = limit.load(Ordering::SeqCst);
    // Every accepted call runs, once, even those whose reply was lost.
    eventually(
        Duration::from_secs(60),
        "every accepted call ran",
        || async { runs.lock().unwrap().len() == calls },
    )
    .await;
    // The connections were lost with the node, and opened again.
    let (metrics, _) = broker.render_metrics(false);
    let reconnects: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("switchboard_broker_reconnects_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    client.close().await;
    worker.drain(Duration::ZERO).await;
    broker.close().await;
    let o = outcome.lock().unwrap();
    let runs = runs.lock().unwrap();
    let twice: Vec<(&String, &usize)> = runs.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "cluster: {calls} calls, node {stopped} stopped after {BEFORE} ran, {AFTER} more sent once it was down: {reconnects} reconnects, {} accepted, {} publishes refused and sent again, {} answered, {} replies lost with the node, {} lost, {} run twice",
        o.accepted,
        o.refused,
        o.answered,
        o.reply_lost,
        calls - runs.len(),
        twice.len()
    );
    assert!(reconnects >= 1.0, "no connection was on the stopped node");
    assert_eq!(o.accepted, calls);
    assert!(twice.is_empty(), "run twice: {twice:?}");
    assert_eq!(o.answered + o.reply_lost, calls);
    // The nodes stop (and their data goes) when dropped.
    drop((first, second, third));
}
