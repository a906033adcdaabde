//! Faults injected by the tests themselves: connections closed from the
//! broker's side under load, a gateway process killed with SIGKILL, a worker
//! process killed mid-handler. Each prints a `FAULT-REPORT` line with its
//! figures (run with `--nocapture` to see them); docs/RELIABILITY.md
//! records the last run.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{Gw, eventually, gateway, kill_connections, poll_until};

/// What became of one call under faults.
enum Fate {
    /// Answered at once with the reply.
    Answered,
    /// Accepted with a 202: must end succeeded.
    Accepted(String),
    /// Refused (503): never accepted, so nothing is owed.
    Refused,
}

async fn start_call(gw: &Gw, i: usize) -> Fate {
    let asynchronous = i.is_multiple_of(2);
    let mut req = gw.post("count").body(format!("{{\"i\":{i}}}"));
    req = if asynchronous {
        req.header("prefer", "respond-async")
    } else {
        req.header("prefer", "wait=30")
    };
    let res = match req.send().await {
        Ok(r) => r,
        // The connection to the gateway itself is not what is faulted here.
        Err(e) => panic!("call {i}: the gateway did not answer: {e:?}"),
    };
    match res.status() {
        StatusCode::OK => {
            assert_eq!(res.text().await.unwrap(), format!("{{\"i\":{i}}}"));
            Fate::Answered
        }
        StatusCode::ACCEPTED => {
            let doc: Value = res.json().await.unwrap();
            Fate::Accepted(doc["id"].as_str().unwrap().to_owned())
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            assert!(res.headers().contains_key("retry-after"));
            Fate::Refused
        }
        other => panic!(
            "call {i}: unexpected {other}: {}",
            res.text().await.unwrap_or_default()
        ),
    }
}

/// Sends `call` once the service's queue exists (a `serve` started by the
/// test declares it): until then the call has no route and is sent again,
/// for up to a minute.
async fn send_once_routed(
    client: &switchboard::rpc::RpcClient,
    call: switchboard::rpc::Call,
) -> switchboard::rpc::PendingReply {
    poll_until(
        Duration::from_secs(60),
        "a route to the service",
        || async {
            match client.send(call.clone()).await {
                Ok(p) => Ok(p),
                Err(e @ switchboard::Error::NoRoute { .. }) => Err(e),
                Err(e) => panic!("{e}"),
            }
        },
    )
    .await
}

async fn wait_succeeded(gw: &Gw, id: &str) {
    let what = format!("accepted call {id} ended");
    poll_until(Duration::from_secs(60), &what, || async {
        let res = gw
            .get(&format!("/v1/calls/{id}?wait=5"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "accepted call {id} is lost");
        let doc: Value = res.json().await.unwrap();
        match doc["status"].as_str() {
            Some("succeeded") => Ok(()),
            Some("pending") => Err(doc),
            other => panic!("accepted call {id} ended {other:?}: {doc}"),
        }
    })
    .await
}

#[actix_rt::test]
async fn connections_closed_by_the_broker_under_load_lose_no_call_and_process_none_twice() {
    connections_closed_under_load("fault-kill", "connection-kill", None).await;
}

/// The same with publisher confirms given up on after 50 ms: replies then
/// often fail on the worker's channel and in the publishing pool alike, and
/// their requests go back to the queue. Their copies must get the reply
/// the handler made, not run it again (before the worker kept such
/// replies, this failed in three runs of four).
#[actix_rt::test]
async fn connections_closed_while_confirms_time_out_process_none_twice() {
    connections_closed_under_load("fault-kill-confirm", "connection-kill-confirms", Some(50)).await;
}

async fn connections_closed_under_load(name: &str, report: &str, confirm_timeout_ms: Option<u64>) {
    // Deadlines longer than the outages: calls must survive them, not expire.
    let gw = gateway(name, |s| {
        for svc in s.services.values_mut() {
            svc.timeout_ms = 60_000;
        }
        if let Some(ms) = confirm_timeout_ms {
            s.amqp.confirm_timeout_ms = ms;
        }
    })
    .await;
    let instance = gw.ctx.broker.instance_id().to_owned();
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Calls in batches of 32 in flight, until the faults are over and two
    // batches more have gone through.
    let load = async {
        let mut fates = Vec::new();
        let mut after = 0;
        let mut i = 0;
        while after < 2 {
            if stop.load(Ordering::SeqCst) {
                after += 1;
            }
            let batch = (i..i + 32).map(|n| start_call(&gw, n));
            fates.extend(futures_util::future::join_all(batch).await);
            i += 32;
            done.store(i, Ordering::SeqCst);
        }
        fates
    };
    let faults = async {
        let mut killed = 0;
        for round in 1..=3 {
            // The management API lists new connections with some delay:
            // close them as soon as they show.
            let what = format!("round {round}: a connection to close");
            killed += poll_until(Duration::from_secs(60), &what, || async {
                match kill_connections(&instance).await {
                    0 => Err("none listed yet"),
                    k => Ok(k),
                }
            })
            .await;
            let at = done.load(Ordering::SeqCst) + 64;
            eventually(Duration::from_secs(120), "the load goes on", || {
                let d = done.clone();
                async move { d.load(Ordering::SeqCst) >= at }
            })
            .await;
        }
        stop.store(true, Ordering::SeqCst);
        killed
    };
    let (fates, killed) = tokio::join!(load, faults);
    let calls = fates.len();
    assert!(killed >= 3, "no connection was closed ({killed})");
    let mut answered = 0;
    let mut refused = 0;
    let mut accepted = Vec::new();
    for f in fates {
        match f {
            Fate::Answered => answered += 1,
            Fate::Refused => refused += 1,
            Fate::Accepted(id) => accepted.push(id),
        }
    }
    for id in &accepted {
        wait_succeeded(&gw, id).await;
    }
    let processed = gw.processed.lock().unwrap().clone();
    let twice: Vec<_> = processed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    let duplicates_settled: u64 = gw
        .workers
        .iter()
        .map(|(_, w)| w.stats.duplicates.load(Ordering::Relaxed))
        .sum();
    let reconnects: u64 = gw
        .workers
        .iter()
        .map(|(_, w)| w.stats.consumer.reconnects())
        .sum();
    let replies_kept: u64 = gw
        .workers
        .iter()
        .map(|(_, w)| w.stats.replies_kept.load(Ordering::Relaxed))
        .sum();
    assert!(reconnects >= 1, "the workers never had to reconnect");
    // Still serving normally afterwards.
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    println!(
        "FAULT-REPORT {report} calls={calls} answered={answered} accepted={} refused={refused} connections_closed={killed} worker_reconnects={reconnects} lost=0 processed_twice=0 redeliveries_deduplicated={duplicates_settled} replies_kept={replies_kept}",
        accepted.len()
    );
    gw.cleanup().await;
}

/// A `switchboard serve` process of the test's own.
struct Serve {
    child: tokio::process::Child,
}

impl Serve {
    fn start(env: &[(String, String)]) -> Self {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("serve")
            .envs(env.iter().cloned())
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Serve { child }
    }

    /// SIGKILL: no shutdown of any kind.
    async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }
}

fn serve_env(
    c: &crate::common::Ctx,
    instance: &str,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("SWITCHBOARD__AMQP__URL".into(), crate::common::amqp_url()),
        ("SWITCHBOARD__AMQP__PREFIX".into(), c.prefix.clone()),
        ("SWITCHBOARD__AMQP__INSTANCE_ID".into(), instance.to_owned()),
        ("SWITCHBOARD__LOG__FILTER".into(), "warn".into()),
        // Without the gateway, `serve` would answer /metrics on the default
        // 127.0.0.1:9464, which two of these tests running at once (or any
        // other process) would contend for: the loser exits at start.
        ("SWITCHBOARD__METRICS__BIND".into(), String::new()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

#[actix_rt::test]
async fn a_gateway_killed_mid_load_finishes_every_accepted_call_and_delivers_its_callback() {
    const CALLS: usize = 120;
    let c = crate::common::ctx("fault-sigkill").await;
    let dir = tempfile::tempdir().unwrap();
    let receiver = crate::callbacks::Receiver::start(&[], 200, Duration::ZERO);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let instance = format!("{}-gw", c.prefix);
    let env = serve_env(
        &c,
        &instance,
        &[
            ("SWITCHBOARD__GATEWAY__BIND", format!("127.0.0.1:{port}")),
            ("SWITCHBOARD__GATEWAY__WORKERS", "1".into()),
            (
                "SWITCHBOARD__GATEWAY__STORE_URL",
                format!("sqlite://{}/calls.db?mode=rwc", dir.path().display()),
            ),
            (
                "SWITCHBOARD__CALLBACKS__SECRET",
                crate::callbacks::SECRET.into(),
            ),
            ("SWITCHBOARD__CALLBACKS__ALLOW_PRIVATE", "true".into()),
            ("SWITCHBOARD__CALLBACKS__INITIAL_BACKOFF_MS", "20".into()),
            ("SWITCHBOARD__CALLBACKS__MAX_BACKOFF_MS", "200".into()),
            // Slow enough that calls are in flight when the process dies.
            ("SWITCHBOARD__SERVICES__ECHO__DELAY_MS", "200".into()),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let ready = |http: reqwest::Client, base: String| async move {
        eventually(Duration::from_secs(60), "the gateway is ready", || {
            let http = http.clone();
            let base = base.clone();
            async move {
                http.get(format!("{base}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
    };
    let mut serve = Serve::start(&env);
    ready(http.clone(), base.clone()).await;

    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = {
        let (http, base, accepted, sent, hook) = (
            http.clone(),
            base.clone(),
            accepted.clone(),
            sent.clone(),
            receiver.url(),
        );
        tokio::spawn(async move {
            futures_util::stream::iter(0..CALLS)
                .for_each_concurrent(16, |i| {
                    let (http, base, accepted, sent, hook) = (
                        http.clone(),
                        base.clone(),
                        accepted.clone(),
                        sent.clone(),
                        hook.clone(),
                    );
                    async move {
                        let res = http
                            .post(format!("{base}/v1/services/echo/calls"))
                            .header("callback-url", hook)
                            .body(format!("{{\"i\":{i}}}"))
                            .send()
                            .await;
                        sent.fetch_add(1, Ordering::SeqCst);
                        // Requests cut off by the kill got no 202: nothing is owed for them.
                        if let Ok(r) = res
                            && r.status() == StatusCode::ACCEPTED
                            && let Ok(doc) = r.json::<Value>().await
                        {
                            accepted
                                .lock()
                                .unwrap()
                                .push(doc["id"].as_str().unwrap().to_owned());
                        }
                    }
                })
                .await;
        })
    };
    eventually(Duration::from_secs(60), "half the load is sent", || {
        let sent = sent.clone();
        async move { sent.load(Ordering::SeqCst) >= CALLS / 2 }
    })
    .await;
    serve.kill().await;
    load.await.unwrap();
    let accepted: BTreeSet<String> = accepted.lock().unwrap().iter().cloned().collect();
    assert!(!accepted.is_empty());

    let mut serve = Serve::start(&env);
    ready(http.clone(), base.clone()).await;
    for id in &accepted {
        let what = format!("accepted call {id} ended");
        poll_until(Duration::from_secs(60), &what, || async {
            let doc: Value = http
                .get(format!("{base}/v1/calls/{id}?wait=5"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if doc["status"] == "succeeded" {
                return Ok(());
            }
            assert_eq!(doc["status"], "pending", "accepted call {id}: {doc}");
            Err(doc)
        })
        .await;
    }
    // Every accepted call's callback arrives (at least once: a delivery cut
    // off by the kill may be repeated, with the same webhook-id).
    eventually(
        Duration::from_secs(60),
        "every accepted call's callback is delivered",
        || {
            let got = receiver.got();
            let accepted = &accepted;
            async move {
                let delivered: BTreeSet<String> = got
                    .iter()
                    .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
                    .filter_map(|e| e["subject"].as_str().map(str::to_owned))
                    .collect();
                accepted.is_subset(&delivered)
            }
        },
    )
    .await;
    println!(
        "FAULT-REPORT gateway-sigkill calls={CALLS} accepted={} lost=0 callbacks_received={}",
        accepted.len(),
        receiver.got().len()
    );
    serve.kill().await;
    receiver.stop().await;
    let ch = c.broker.channel().await.unwrap();
    let names = c.broker.names();
    for q in [
        names.reply_queue(&instance),
        names.deadwatch_queue(&instance),
    ] {
        let _ = ch.queue_delete(q.into(), Default::default()).await;
    }
    c.cleanup(&["echo", "slow"]).await;
}

#[actix_rt::test]
async fn a_worker_killed_mid_handler_leaves_its_request_to_another_worker_answered_once() {
    use switchboard::rpc::{Call, RpcOptions};
    use switchboard::worker::{Reply, Request};
    let c = crate::common::ctx("fault-worker").await;
    // Worker A: another process, whose handler takes a minute.
    let instance_a = format!("{}-a", c.prefix);
    let env = serve_env(
        &c,
        &instance_a,
        &[
            ("SWITCHBOARD__GATEWAY__ENABLED", "false".into()),
            ("SWITCHBOARD__SERVICES__TWIN__HANDLER", "echo".into()),
            ("SWITCHBOARD__SERVICES__TWIN__DELAY_MS", "60000".into()),
            ("SWITCHBOARD__SERVICES__TWIN__TIMEOUT_MS", "120000".into()),
        ],
    );
    let mut a = Serve::start(&env);
    let mut svc = c.service();
    svc.timeout_ms = 120_000;
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    // Until A's queue exists the call has no route: retry until it is sent.
    let pending = send_once_routed(
        &client,
        Call::new("twin", &b"\"once\""[..]).timeout(Duration::from_secs(120)),
    )
    .await;
    // A has the request in hand once the queue shows it unacknowledged.
    let http = reqwest::Client::new();
    let queue = c.broker.names().service_queue("twin");
    let encoded: String = url::form_urlencoded::byte_serialize(queue.as_bytes()).collect();
    eventually(
        Duration::from_secs(60),
        "worker A holds the request",
        || {
            let http = http.clone();
            let url = format!(
                "{}/api/queues/%2F/{encoded}",
                crate::common::management_url()
            );
            async move {
                let Ok(res) = http
                    .get(url)
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                else {
                    return false;
                };
                let q: Value = res.json().await.unwrap_or_default();
                q["messages_unacknowledged"].as_u64() == Some(1)
            }
        },
    )
    .await;
    a.kill().await;
    // Worker B, in this process, counts what it handles.
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let b = c
        .worker(
            "twin",
            &svc,
            Arc::new(move |req: Request| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok(Reply::ok(req.content_type, req.payload))
                }
            }),
        )
        .await
        .unwrap();
    let reply = pending.wait().await.unwrap();
    assert_eq!(&reply.body[..], b"\"once\"");
    assert_eq!(handled.load(Ordering::SeqCst), 1, "answered more than once");
    assert_eq!(client.stats().dropped(), 0);
    println!("FAULT-REPORT worker-sigkill calls=1 redelivered_to_other_worker=1 answered=1 lost=0");
    b.drain(Duration::from_secs(1)).await;
    client.close().await;
    c.cleanup(&["twin", "echo", "slow"]).await;
}

#[actix_rt::test]
async fn sigterm_lets_the_running_handler_finish_and_takes_no_new_work() {
    use switchboard::rpc::{Call, RpcOptions};
    let c = crate::common::ctx("fault-sigterm").await;
    let instance = format!("{}-w", c.prefix);
    let env = serve_env(
        &c,
        &instance,
        &[
            ("SWITCHBOARD__GATEWAY__ENABLED", "false".into()),
            ("SWITCHBOARD__SERVICES__TWIN__HANDLER", "echo".into()),
            // Longer than the management API's 5 s refresh, so the test
            // can see the request in the worker's hands.
            ("SWITCHBOARD__SERVICES__TWIN__DELAY_MS", "8000".into()),
            ("SWITCHBOARD__SERVICES__TWIN__CONCURRENCY", "1".into()),
            ("SWITCHBOARD__SHUTDOWN__GRACE_MS", "20000".into()),
        ],
    );
    let mut serve = Serve::start(&env);
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let first = send_once_routed(
        &client,
        Call::new("twin", &b"\"first\""[..]).timeout(Duration::from_secs(60)),
    )
    .await;
    let http = reqwest::Client::new();
    let queue = c.broker.names().service_queue("twin");
    let encoded: String = url::form_urlencoded::byte_serialize(queue.as_bytes()).collect();
    let queue_url = format!(
        "{}/api/queues/%2F/{encoded}",
        crate::common::management_url()
    );
    eventually(
        Duration::from_secs(60),
        "the worker holds the first request",
        || {
            let http = http.clone();
            let url = queue_url.clone();
            async move {
                let Ok(res) = http
                    .get(url)
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                else {
                    return false;
                };
                let q: Value = res.json().await.unwrap_or_default();
                q["messages_unacknowledged"].as_u64() == Some(1)
            }
        },
    )
    .await;
    let pid = serve.child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The request in hand is answered; the process then exits cleanly.
    let reply = first.wait().await.unwrap();
    assert_eq!(&reply.body[..], b"\"first\"");
    let status = tokio::time::timeout(Duration::from_secs(20), serve.child.wait())
        .await
        .expect("the process exits within the grace period")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // A request sent now waits in the queue for the next worker.
    let second = client
        .send(Call::new("twin", &b"\"second\""[..]).timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    let mut serve = Serve::start(&env);
    assert_eq!(&second.wait().await.unwrap().body[..], b"\"second\"");
    serve.kill().await;
    client.close().await;
    println!("FAULT-REPORT sigterm in_flight_answered=1 exit=0 lost=0");
    c.cleanup(&["twin", "echo", "slow"]).await;
}

#[actix_rt::test]
async fn a_worker_whose_queue_is_deleted_notices_and_consumes_again() {
    use deadpool_lapin::lapin::options::QueueDeleteOptions;
    use switchboard::rpc::{Call, RpcOptions};
    use switchboard::worker::{self};
    let c = crate::common::ctx("fault-cancel").await;
    let w = c
        .worker("echo", &c.service(), worker::echo(Duration::ZERO))
        .await
        .unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    assert!(client.call(Call::new("echo", &b"1"[..])).await.is_ok());
    // An operator deletes the queue: the broker cancels the worker's consumer.
    let ch = c.broker.channel().await.unwrap();
    ch.queue_delete(
        c.broker.names().service_queue("echo").into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(30),
        "the worker re-established its consumer",
        || async { w.stats.consumer.reconnects() >= 1 && w.stats.consumer.is_up() },
    )
    .await;
    let reply = client
        .call(Call::new("echo", &b"2"[..]).timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"2");
    client.close().await;
    c.cleanup(&["echo"]).await;
}
