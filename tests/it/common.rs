//! The test harness: a broker check, a unique prefix per test, helpers.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_lapin::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use switchboard::Error;
use switchboard::amqp::Broker;
use switchboard::settings::{ServiceSettings, Settings};

/// The broker tests use: SWITCHBOARD__AMQP__URL, or the local default.
pub fn amqp_url() -> String {
    std::env::var("SWITCHBOARD__AMQP__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// One test's world: settings with its own prefix and instance id, and a
/// connected broker handle.
pub struct Ctx {
    pub prefix: String,
    pub settings: Settings,
    pub broker: Broker,
    /// Workers and clients started through the context: stopped before
    /// cleanup deletes their queues (they would declare them again).
    workers: Mutex<Vec<switchboard::worker::WorkerHandle>>,
    clients: Mutex<Vec<switchboard::rpc::RpcClient>>,
}

static REPORTED: Mutex<bool> = Mutex::new(false);

/// Settings for a test named `name`: a unique prefix and instance id.
pub fn settings_for(name: &str) -> Settings {
    let prefix = format!(
        "t-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let env = vec![
        ("SWITCHBOARD__AMQP__URL".to_string(), amqp_url()),
        ("SWITCHBOARD__AMQP__PREFIX".to_string(), prefix.clone()),
        (
            "SWITCHBOARD__AMQP__INSTANCE_ID".to_string(),
            format!("{prefix}-i"),
        ),
        (
            "SWITCHBOARD__AMQP__CONNECT_TIMEOUT_MS".to_string(),
            "3000".into(),
        ),
    ];
    Settings::load_from(None, None, env).expect("test settings are valid")
}

/// Connects for the test named `name`. If the broker does not answer, the
/// whole run stops at once with one message saying where it looked.
pub async fn ctx(name: &str) -> Ctx {
    ctx_with(name, |_| {}).await
}

/// [`ctx`], with `tweak` applied to the settings before connecting (another
/// broker URL, a shorter consumer check...).
pub async fn ctx_with(name: &str, tweak: impl FnOnce(&mut Settings)) -> Ctx {
    let mut settings = settings_for(name);
    tweak(&mut settings);
    let broker = match Broker::connect(&settings.amqp).await {
        Ok(b) => b,
        Err(e @ Error::BrokerUnavailable { .. }) => no_broker(&e),
        Err(e) => panic!("broker set-up failed: {e}"),
    };
    Ctx {
        prefix: settings.amqp.prefix.clone(),
        settings,
        broker,
        workers: Mutex::new(Vec::new()),
        clients: Mutex::new(Vec::new()),
    }
}

fn no_broker(e: &Error) -> ! {
    let mut reported = REPORTED.lock().unwrap_or_else(|p| p.into_inner());
    if !*reported {
        *reported = true;
        // Straight to the process's stderr: the test harness captures
        // `eprintln!`, and this message must be seen.
        let msg = format!(
            "\n\nswitchboard tests need a RabbitMQ.\n  {e}\n  Tests looked at {} (set SWITCHBOARD__AMQP__URL to change it).\n\n",
            switchboard::settings::redact_url(&amqp_url())
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
    }
    std::process::exit(1)
}

impl Ctx {
    /// Service settings for tests: quorum by default, as in production.
    pub fn service(&self) -> ServiceSettings {
        test_service()
    }

    /// Starts a worker that cleanup stops.
    pub async fn worker(
        &self,
        service: &str,
        settings: &ServiceSettings,
        handler: std::sync::Arc<dyn switchboard::worker::Handler>,
    ) -> switchboard::Result<switchboard::worker::WorkerHandle> {
        let w =
            switchboard::worker::Worker::start(&self.broker, service, settings, handler).await?;
        self.workers.lock().unwrap().push(w.clone());
        Ok(w)
    }

    /// Starts an RPC client that cleanup closes.
    pub async fn client(
        &self,
        options: switchboard::rpc::RpcOptions,
    ) -> switchboard::Result<switchboard::rpc::RpcClient> {
        let c = switchboard::rpc::RpcClient::start(&self.broker, options).await?;
        self.clients.lock().unwrap().push(c.clone());
        Ok(c)
    }

    /// Stops the workers and clients started through the context, then
    /// deletes what the test declared under its prefix.
    pub async fn cleanup(&self, services: &[&str]) {
        let workers = std::mem::take(&mut *self.workers.lock().unwrap());
        for w in workers {
            w.drain(Duration::ZERO).await;
        }
        let clients = std::mem::take(&mut *self.clients.lock().unwrap());
        for c in clients {
            c.close().await;
        }
        let Ok(ch) = self.broker.channel().await else {
            return;
        };
        let names = self.broker.names();
        let q = QueueDeleteOptions::default();
        for s in services {
            let _ = ch.queue_delete(names.service_queue(s).into(), q).await;
            let _ = ch.queue_delete(names.dead_queue(s).into(), q).await;
        }
        let _ = ch
            .queue_delete(names.reply_queue(self.broker.instance_id()).into(), q)
            .await;
        let _ = ch.queue_delete(names.poison_queue().into(), q).await;
        let _ = ch.queue_delete(names.events_log().into(), q).await;
        for x in [
            names.requests_exchange(),
            names.dead_exchange(),
            names.events_exchange(),
            // Declared by the workers' cancellation watch.
            names.events_types_exchange(),
        ] {
            let _ = ch
                .exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = ch.close(200, "cleanup".into()).await;
    }
}

/// The consumers of `queue` now, `None` if it does not exist (a passive
/// declare, on a channel of its own since a missing queue closes it).
pub async fn queue_consumers(broker: &Broker, queue: &str) -> Option<u32> {
    use deadpool_lapin::lapin::{options::QueueDeclareOptions, types::FieldTable};
    let ch = broker.channel().await.ok()?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map(|q| q.consumer_count())
        .ok();
    let _ = ch.close(200, "checked".into()).await;
    found
}

/// Service settings for tests: quorum by default, as in production.
pub fn test_service() -> ServiceSettings {
    ServiceSettings {
        concurrency: 64,
        timeout_ms: 10_000,
        ..ServiceSettings::default()
    }
}

/// A port nothing listens on now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The pause between two looks of [`poll_until`].
pub const POLL_PAUSE: Duration = Duration::from_millis(20);

/// Looks with `probe` until it gives `Ok(value)`, pausing [`POLL_PAUSE`]
/// between looks, and returns that value; fails after `limit`, naming
/// `what` and what the last look saw (its `Err`). The one poll-with-a-
/// deadline of the tests: for what is observable only by looking
/// (counters, documents, the management API); never a fixed sleep.
pub async fn poll_until<T, E, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// Waits until `cond` holds ([`poll_until`] of a yes or no).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(limit, what, || {
        let looked = cond();
        async move { if looked.await { Ok(()) } else { Err("not yet") } }
    })
    .await
}

/// A gateway under test: in-process workers (`echo`, `slow` gated by
/// `gate`, `fail` answering 422, `count` counting its deliveries), the
/// gateway on 127.0.0.1:0 with an SQLite store in a temporary directory.
pub struct Gw {
    pub ctx: Ctx,
    pub base: String,
    pub http: reqwest::Client,
    pub gateway: Option<switchboard::gateway::RunningGateway>,
    /// Each request to `slow` takes one permit before it answers.
    pub gate: std::sync::Arc<tokio::sync::Semaphore>,
    /// Deliveries seen by `count`.
    pub counted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Times `count`'s handler ran, by message id.
    pub processed: std::sync::Arc<Mutex<std::collections::HashMap<String, u32>>>,
    pub dir: tempfile::TempDir,
    /// The workers, by service.
    pub workers: Vec<(String, switchboard::worker::WorkerHandle)>,
}

pub const GATEWAY_SERVICES: &[&str] = &["echo", "slow", "fail", "count", "poison"];

/// Starts workers and a gateway for the test `name`; `tweak` adjusts the
/// settings first (tokens, limits, callbacks, the broker's URL...).
pub async fn gateway(name: &str, tweak: impl FnOnce(&mut Settings)) -> Gw {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use switchboard::worker::{self, HandlerError, Reply, Request};

    let dir = tempfile::tempdir().unwrap();
    let c = ctx_with(name, |s| {
        s.gateway.store_url = format!("sqlite://{}/calls.db?mode=rwc", dir.path().display());
        s.gateway.workers = 1;
        s.gateway.bind = "127.0.0.1:0".into();
        s.services.clear();
        for svc in GATEWAY_SERVICES {
            s.services.insert((*svc).into(), test_service());
        }
        tweak(s);
    })
    .await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let counted = Arc::new(AtomicU64::new(0));
    let processed = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let g = gate.clone();
    let slow = Arc::new(move |req: Request| {
        let g = g.clone();
        async move {
            let p = g
                .acquire()
                .await
                .map_err(|_| HandlerError::new(500, "gate closed"))?;
            p.forget();
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    let n = counted.clone();
    let per_id = processed.clone();
    let count = Arc::new(move |req: Request| {
        let n = n.clone();
        let per_id = per_id.clone();
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            if let Some(id) = &req.message_id {
                *per_id.lock().unwrap().entry(id.clone()).or_insert(0) += 1;
            }
            Ok(Reply::ok(req.content_type, req.payload))
        }
    });
    let fail = Arc::new(|_req: Request| async move {
        Err::<Reply, _>(HandlerError::new(422, "order rejected").with_detail("no stock"))
    });
    let poison = Arc::new(|_req: Request| async move {
        Err::<Reply, _>(HandlerError::transient("always fails"))
    });
    let handlers: Vec<(&str, Arc<dyn worker::Handler>)> = vec![
        ("echo", worker::echo(Duration::ZERO)),
        ("slow", slow),
        ("fail", fail),
        ("count", count),
        ("poison", poison),
    ];
    let mut workers = Vec::new();
    for (svc, h) in handlers {
        let w = c.worker(svc, &c.settings.services[svc], h).await.unwrap();
        workers.push((svc.to_string(), w));
    }
    let mut gw = Gw {
        ctx: c,
        base: String::new(),
        // Idle connections dropped well before the gateway's keep-alive
        // (actix-web's 5 s) ends them: a request sent on a connection as
        // the server closes it fails with "error sending request" (a race
        // of every HTTP/1.1 client), which is not what these tests test.
        http: reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
        gateway: None,
        gate,
        counted,
        processed,
        dir,
        workers,
    };
    gw.start_gateway().await;
    gw
}

impl Gw {
    /// (Re)starts the gateway on a new port with the same settings and store.
    pub async fn start_gateway(&mut self) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let g = switchboard::gateway::start(
            &self.ctx.settings,
            &self.ctx.broker,
            listener,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap();
        self.base = format!("http://{}", g.addr);
        self.gateway = Some(g);
    }

    /// Stops the gateway (as a shutdown would).
    pub async fn stop_gateway(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST a call.
    pub fn post(&self, service: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(&format!("/v1/services/{service}/calls")))
    }

    /// GET `path` (`/v1/calls/...`, `/metrics`...) of the gateway.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path))
    }

    /// GET `path` of the gateway, its body as JSON (a status document...).
    pub async fn json(&self, path: &str) -> serde_json::Value {
        self.get(path).send().await.unwrap().json().await.unwrap()
    }

    pub async fn cleanup(self) {
        self.cleanup_with(&[]).await;
    }

    /// [`Gw::cleanup`], deleting the queues of `extra` services too (ones
    /// a test added to the settings and serves itself).
    pub async fn cleanup_with(mut self, extra: &[&str]) {
        self.stop_gateway().await;
        let ch = self.ctx.broker.channel().await.unwrap();
        let q = self
            .ctx
            .broker
            .names()
            .deadwatch_queue(self.ctx.broker.instance_id());
        let _ = ch.queue_delete(q.into(), Default::default()).await;
        let mut services = GATEWAY_SERVICES.to_vec();
        services.extend_from_slice(extra);
        self.ctx.cleanup(&services).await;
    }
}

/// The RabbitMQ management API the fault tests use to act as the broker.
pub fn management_url() -> String {
    std::env::var("SWITCHBOARD_TEST_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// Closes, from the broker's side, every connection whose client-provided
/// name starts with `switchboard/<instance>/` (this test's own only).
/// Returns how many it closed.
pub async fn kill_connections(instance: &str) -> usize {
    kill_connections_named(&format!("switchboard/{instance}/")).await
}

/// Closes, from the broker's side, every connection whose name starts with
/// `prefix` (`switchboard/<instance>/<role>`); returns how many.
pub async fn kill_connections_named(prefix: &str) -> usize {
    let http = reqwest::Client::new();
    let list: Vec<serde_json::Value> = http
        .get(format!("{}/api/connections", management_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("the management API answers (rabbitmq-plugins enable rabbitmq_management)")
        .json()
        .await
        .unwrap();
    let mut killed = 0;
    for c in list {
        let named = c["client_properties"]["connection_name"]
            .as_str()
            .is_some_and(|n| n.starts_with(prefix));
        let Some(name) = c["name"].as_str().filter(|_| named) else {
            continue;
        };
        let encoded: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
        let res = http
            .delete(format!(
                "{}/api/connections/{}",
                management_url(),
                encoded.replace('+', "%20")
            ))
            .basic_auth("guest", Some("guest"))
            .header("X-Reason", "fault injected by a switchboard test")
            .send()
            .await
            .unwrap();
        if res.status().is_success() {
            killed += 1;
        }
    }
    killed
}

/// A foreign AMQP client, as a RabbitMQ tutorial-6 program is: its own
/// connection and channel, an exclusive server-named reply queue, and a
/// no-ack consumer of it tagged `tag`.
pub struct Foreign {
    pub conn: deadpool_lapin::lapin::Connection,
    pub channel: deadpool_lapin::lapin::Channel,
    pub reply_queue: deadpool_lapin::lapin::types::ShortString,
    pub replies: deadpool_lapin::lapin::Consumer,
}

/// Connects a [`Foreign`] client.
pub async fn foreign_client(tag: &str) -> Foreign {
    use deadpool_lapin::lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    use deadpool_lapin::lapin::types::FieldTable;

    let conn = deadpool_lapin::lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let replies = channel
        .basic_consume(
            queue.name().clone(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    Foreign {
        conn,
        channel,
        reply_queue: queue.name().clone(),
        replies,
    }
}
