//! Supervised consumers seen from outside. A consumer whose connection is
//! wedged (a TCP proxy of the test's own, between switchboard and the broker,
//! stops forwarding without closing: what a dead lapin I/O thread looks like
//! from the broker's side), whose queue is deleted, or whose actor panics is
//! noticed, reported (`/readyz` 503 naming it, its gauges at 0) and
//! re-established by itself; calls and events flow again. Poison messages on
//! switchboard's own queues end once in a dead-letter queue an operator can
//! see, and the consumer keeps serving. Per-instance queues carry
//! `x-expires`, and one declared by an earlier version is used as it is.
//!
//! # Layout
//! - [`Proxy`]: the freezing TCP proxy; [`ready`], [`unready`]: readiness
//!   polls (also used by `security::limits`).
//! - wedges: a worker behind the metrics-only server; the reply router,
//!   event hub and dead-letter watch behind the gateway.
//! - cancels: the queues of the reply router and dead-letter watch deleted
//!   (the hub's is exclusive to its connection: nobody else can delete it).
//! - a consumer actor that panics, kept by its `Keeper`.
//! - poison: on the service, reply, dead-letter watch and subscription queues.
//! - per-instance queues: `x-expires`, an upgrade from a queue without it,
//!   the setting's check.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use deadpool_lapin::lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use reqwest::StatusCode;
use serde_json::Value;
use switchboard::amqp::consumer::{ActorConsumer, Consumes, Declare, Event, Keeper};
use switchboard::amqp::{Broker, ConsumerSpec, InFlight, Outgoing, Supervisor, topology, wire};
use switchboard::events::{self, CloudEvent, SubscribeOptions, Subscription};
use switchboard::gateway::MetricsServer;
use switchboard::management::Management;
use switchboard::rpc::{Call, RpcOptions};
use switchboard::worker::{self, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::common::{Ctx, ctx, ctx_with, eventually, gateway, poll_until};
use crate::metrics::scrape_until;

/// How long recovery may take: a wedge is noticed within two checks (300 ms
/// here), then reconnect attempts pause up to 5 s, each bounded by the
/// connect timeout of the tests (3 s).
const RECOVERY: Duration = Duration::from_secs(30);

/// Where the broker of the tests listens.
fn broker_addr() -> SocketAddr {
    let url = url::Url::parse(&crate::common::amqp_url()).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(5672);
    format!("{host}:{port}").parse().unwrap()
}

/// A TCP proxy to the broker that can freeze connections: a frozen one
/// forwards nothing either way but stays open, as a connection whose client
/// I/O thread died (or a network that holds packets) looks. Connections are
/// recognised by the AMQP connection name their client sends
/// (`switchboard/<instance>/<role>`).
pub(crate) struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyShared {
    /// Names whose connections freeze, now and when they connect.
    frozen: Mutex<Vec<String>>,
    pipes: Mutex<Vec<Arc<Pipe>>>,
}

/// One proxied connection.
#[derive(Default)]
struct Pipe {
    /// The first bytes the client sent (its handshake names it).
    hello: Mutex<Vec<u8>>,
    frozen: AtomicBool,
    /// Closes both sides.
    kill: CancellationToken,
}

impl ProxyShared {
    fn freezes(&self, pipe: &Pipe) -> bool {
        let hello = pipe.hello.lock().unwrap();
        let text = String::from_utf8_lossy(&hello);
        self.frozen
            .lock()
            .unwrap()
            .iter()
            .any(|name| text.contains(name.as_str()))
    }
}

impl Proxy {
    pub(crate) async fn start() -> Self {
        let upstream = broker_addr();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(ProxyShared::default());
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let pipe = Arc::new(Pipe::default());
                s.pipes.lock().unwrap().push(pipe.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, pipe.clone(), Some(s.clone())));
                tokio::spawn(pump(sr, cw, pipe, None));
            }
        });
        Proxy {
            addr,
            shared,
            accept,
        }
    }

    /// The broker's URL through the proxy.
    pub(crate) fn url(&self) -> String {
        let mut url = url::Url::parse(&crate::common::amqp_url()).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }

    /// Freezes the connections named `name`, those open now and those that
    /// connect from now on (their handshake then never completes).
    pub(crate) fn freeze(&self, name: &str) {
        self.shared.frozen.lock().unwrap().push(name.to_owned());
        for pipe in self.shared.pipes.lock().unwrap().iter() {
            if self.shared.freezes(pipe) {
                pipe.frozen.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Closes the frozen connections (the broker sees them go and returns
    /// what they held) and lets new ones through again.
    pub(crate) fn thaw(&self) {
        self.shared.frozen.lock().unwrap().clear();
        for pipe in self.shared.pipes.lock().unwrap().iter() {
            if pipe.frozen.load(Ordering::SeqCst) {
                pipe.kill.cancel();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for pipe in self.shared.pipes.lock().unwrap().iter() {
            pipe.kill.cancel();
        }
    }
}

/// Copies `from` to `to` until either side closes or the pipe is killed;
/// while the pipe is frozen, nothing is copied. `inspect`: this is the
/// client's side, whose first bytes name the connection.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    pipe: Arc<Pipe>,
    inspect: Option<Arc<ProxyShared>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            _ = pipe.kill.cancelled() => return,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        if let Some(shared) = &inspect {
            let named = {
                let mut hello = pipe.hello.lock().unwrap();
                if hello.len() < 4096 {
                    hello.extend_from_slice(&buf[..n]);
                    true
                } else {
                    false
                }
            };
            if named && shared.freezes(&pipe) {
                pipe.frozen.store(true, Ordering::SeqCst);
            }
        }
        if pipe.frozen.load(Ordering::SeqCst) {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // Frozen: hold both sides open, forwarding nothing, until killed.
    if pipe.frozen.load(Ordering::SeqCst) {
        pipe.kill.cancelled().await;
    }
}

/// Polls `url` until it answers 200.
pub(crate) async fn ready(http: &reqwest::Client, url: &str) {
    poll_until(RECOVERY, "ready again", || async {
        let res = http.get(url).send().await.unwrap();
        let status = res.status();
        if status == StatusCode::OK {
            return Ok(());
        }
        Err(format!("{status} {}", res.text().await.unwrap_or_default()))
    })
    .await
}

/// Polls `url` until it answers 503 naming `consumer`; returns the problem's
/// detail.
pub(crate) async fn unready(http: &reqwest::Client, url: &str, consumer: &str) -> String {
    let named = format!("consumer `{consumer}`");
    let what = format!("readiness naming {consumer}");
    poll_until(RECOVERY, &what, || async {
        let res = http.get(url).send().await.unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let body = res.text().await.unwrap_or_default();
        if status == StatusCode::SERVICE_UNAVAILABLE && body.contains(&named) {
            assert_eq!(content_type.as_deref(), Some("application/problem+json"));
            let problem: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(problem["status"], 503);
            return Ok(problem["detail"].as_str().unwrap().to_owned());
        }
        Err(format!("{status} {body}"))
    })
    .await
}

/// Settings of a test behind `proxy`, with a short consumer check.
pub(crate) fn behind(proxy: &Proxy) -> impl FnOnce(&mut switchboard::settings::Settings) {
    let url = proxy.url();
    move |s| {
        s.amqp.url = url;
        s.amqp.consumer_check_ms = 300;
    }
}

#[actix_rt::test]
async fn a_worker_whose_connection_is_wedged_is_reported_down_then_comes_back_by_itself() {
    let proxy = Proxy::start().await;
    let c = ctx_with("wedge-worker", behind(&proxy)).await;
    let w = c
        .worker("echo", &c.service(), worker::echo(Duration::ZERO))
        .await
        .unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    assert!(client.call(Call::new("echo", &b"1"[..])).await.is_ok());
    // `serve` without the gateway: readiness and metrics on the metrics server.
    let server = MetricsServer::start(
        &c.broker,
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let http = reqwest::Client::new();
    let readyz = format!("http://{}/readyz", server.addr);
    let metrics = format!("http://{}/metrics", server.addr);
    ready(&http, &readyz).await;

    let instance = c.broker.instance_id().to_owned();
    proxy.freeze(&wire::connection_name(&instance, "worker/echo"));
    let detail = unready(&http, &readyz, "worker/echo").await;
    assert!(detail.contains("is down since"), "{detail}");
    assert!(
        detail.contains(&c.broker.names().service_queue("echo")),
        "{detail}"
    );
    scrape_until(&http, &metrics, "the worker's gauges at 0", |m| {
        m.get(r#"switchboard_worker_consuming{service="echo"}"#) == 0.0
            && m.get(r#"switchboard_consumer_up{consumer="worker/echo"}"#) == 0.0
            && m.get(r#"switchboard_consumer_up{consumer="rpc"}"#) == 1.0
    })
    .await;
    assert!(!w.stats.consumer.is_up());
    // A call made while the worker is wedged waits in the queue (or in the
    // frozen connection's hands, returned when it closes)...
    let during = client
        .send(Call::new("echo", &b"\"during\""[..]).timeout(Duration::from_secs(60)))
        .await
        .unwrap();

    proxy.thaw();
    ready(&http, &readyz).await;
    scrape_until(&http, &metrics, "the worker's gauges at 1", |m| {
        m.get(r#"switchboard_worker_consuming{service="echo"}"#) == 1.0
            && m.get(r#"switchboard_consumer_up{consumer="worker/echo"}"#) == 1.0
            && m.get(r#"switchboard_broker_reconnects_total{role="worker"}"#) >= 1.0
    })
    .await;
    // ...and is answered once the worker is back; so is the next one.
    assert_eq!(&during.wait().await.unwrap().body[..], b"\"during\"");
    let after = client
        .call(Call::new("echo", &b"\"after\""[..]))
        .await
        .unwrap();
    assert_eq!(&after.body[..], b"\"after\"");
    assert!(w.stats.consumer.reconnects() >= 1);
    server.stop().await;
    c.cleanup(&["echo"]).await;
}

#[actix_rt::test]
async fn the_reply_router_hub_and_dead_letter_watch_are_each_reported_when_wedged_and_come_back() {
    let proxy = Proxy::start().await;
    let gw = gateway("wedge-gateway", behind(&proxy)).await;
    let http = &gw.http;
    let readyz = gw.url("/readyz");
    let metrics = gw.url("/metrics");
    let state = gw.gateway.as_ref().unwrap();
    let instance = gw.ctx.broker.instance_id().to_owned();
    ready(http, &readyz).await;
    for role in ["rpc", "hub", "deadwatch"] {
        proxy.freeze(&wire::connection_name(&instance, role));
        let detail = unready(http, &readyz, role).await;
        assert!(
            !detail.contains("worker/"),
            "{role}: only the wedged consumer is down: {detail}"
        );
        let up = format!(r#"switchboard_consumer_up{{consumer="{role}"}}"#);
        scrape_until(
            http,
            &metrics,
            &format!("{role} down in the metrics"),
            |m| m.get(&up) == 0.0,
        )
        .await;
        proxy.thaw();
        ready(http, &readyz).await;
        let reconnects = format!(r#"switchboard_broker_reconnects_total{{role="{role}"}}"#);
        scrape_until(http, &metrics, &format!("{role} back"), |m| {
            m.get(&up) == 1.0 && m.get(&reconnects) >= 1.0
        })
        .await;
    }
    // Calls flow: the reply router routes replies again.
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Events flow: the hub relays a new event.
    let mut sub = state
        .hub()
        .subscribe(Default::default(), None)
        .await
        .unwrap();
    let event = CloudEvent::new("wedge.test", "test", serde_json::json!(1));
    events::publish(&gw.ctx.broker, &event).await.unwrap();
    let got = tokio::time::timeout(RECOVERY, sub.rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&got.json).contains(&event.id));
    // Dead letters are watched: one published to the dead exchange is seen.
    gw.ctx
        .broker
        .publish(Outgoing {
            exchange: &gw.ctx.broker.names().dead_exchange(),
            routing_key: "echo",
            payload: b"{}",
            properties: BasicProperties::default(),
            mandatory: true,
        })
        .await
        .unwrap();
    scrape_until(http, &metrics, "the dead letter counted", |m| {
        m.get(r#"switchboard_dead_letters_total{service="echo"}"#) == 1.0
    })
    .await;
    gw.cleanup().await;
}

#[actix_rt::test]
async fn the_reply_router_and_dead_letter_watch_come_back_when_their_queues_are_deleted() {
    let gw = gateway("cancel-all", |_| {}).await;
    let state = gw.gateway.as_ref().unwrap();
    let broker = gw.ctx.broker.clone();
    let names = broker.names().clone();
    let instance = broker.instance_id().to_owned();
    // As an operator would, through the management API.
    let delete = |queue: String| {
        let http = gw.http.clone();
        async move {
            let encoded: String = url::form_urlencoded::byte_serialize(queue.as_bytes()).collect();
            let res = http
                .delete(format!(
                    "{}/api/queues/%2F/{encoded}",
                    crate::common::management_url()
                ))
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "{queue}: {}", res.status());
        }
    };
    // The reply queue: deleted, its consumer is cancelled by the broker.
    delete(names.reply_queue(&instance)).await;
    eventually(RECOVERY, "the reply consumer is back", || async {
        state.rpc().consumer().reconnects() >= 1 && state.rpc().consumer().is_up()
    })
    .await;
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // (The hub's queue is exclusive to its connection: nobody else can
    // delete it; its wedge is tested above.)
    // The dead-letter watch's queue.
    delete(names.deadwatch_queue(&instance)).await;
    let metrics = gw.url("/metrics");
    scrape_until(&gw.http, &metrics, "the dead-letter watch is back", |m| {
        m.get(r#"switchboard_broker_reconnects_total{role="deadwatch"}"#) >= 1.0
            && m.get(r#"switchboard_consumer_up{consumer="deadwatch"}"#) == 1.0
    })
    .await;
    broker
        .publish(Outgoing {
            exchange: &names.dead_exchange(),
            routing_key: "echo",
            payload: b"{}",
            properties: BasicProperties::default(),
            mandatory: true,
        })
        .await
        .unwrap();
    scrape_until(&gw.http, &metrics, "the dead letter counted", |m| {
        m.get(r#"switchboard_dead_letters_total{service="echo"}"#) == 1.0
    })
    .await;
    let res = gw.get("/readyz").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    gw.cleanup().await;
}

/// A consumer actor of a test's own, built on the public abstraction: it
/// panics on the first message whose body is `panic`, and acks the rest.
struct Fragile {
    consumer: ActorConsumer,
    panicked: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
}

impl Actor for Fragile {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ActorConsumer::start(self, ctx);
    }
}

impl Consumes for Fragile {
    fn consumer(&mut self) -> &mut ActorConsumer {
        &mut self.consumer
    }
}

impl StreamHandler<Event> for Fragile {
    fn handle(&mut self, event: Event, ctx: &mut Self::Context) {
        let Some(delivery) = ActorConsumer::delivered(self, event, ctx) else {
            return;
        };
        if delivery.data == b"panic" && !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("a bug in a consumer actor (injected by the test)");
        }
        let acked = self.acked.clone();
        ctx.spawn(
            async move {
                InFlight::new(delivery).ack().await.unwrap();
                acked.fetch_add(1, Ordering::SeqCst);
            }
            .into_actor(self),
        );
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

/// The test queue `<prefix>.fragile`, classic and durable, declared by the
/// test: the consumer only checks that it exists (passive), so that once
/// the test deletes it no reconnect declares it again (it leaked so).
struct FragileQueue;

fn fragile_queue(broker: &Broker) -> String {
    format!("{}.fragile", broker.names().prefix())
}

#[async_trait::async_trait]
impl Declare for FragileQueue {
    async fn declare(&self, broker: &Broker, conn: &Connection) -> switchboard::Result<String> {
        let queue = fragile_queue(broker);
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        Ok(queue)
    }
}

#[actix_rt::test]
async fn a_consumer_actor_that_panics_is_reported_down_and_started_again_losing_nothing() {
    let c = ctx("actor-panic").await;
    c.broker
        .channel()
        .await
        .unwrap()
        .queue_declare(
            fragile_queue(&c.broker).as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let supervisor = Supervisor::new(
        &c.broker,
        ConsumerSpec {
            name: "fragile".into(),
            tag: "fragile".into(),
            prefetch: Some(4),
            confirm: false,
        },
        FragileQueue,
    );
    let status = supervisor.status().clone();
    let link = supervisor.open().await.unwrap();
    let queue = link.queue().to_owned();
    let panicked = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let (p, a) = (panicked.clone(), acked.clone());
    let keeper = Keeper::start(supervisor, link, move |consumer| {
        Fragile {
            consumer,
            panicked: p.clone(),
            acked: a.clone(),
        }
        .start()
    });
    assert!(status.is_up());
    let publish = |body: &'static [u8]| {
        let broker = c.broker.clone();
        let queue = queue.clone();
        async move {
            broker
                .publish(Outgoing {
                    exchange: "",
                    routing_key: &queue,
                    payload: body,
                    properties: BasicProperties::default(),
                    mandatory: true,
                })
                .await
                .unwrap();
        }
    };
    publish(b"panic").await;
    // The actor is gone: its consumer is down, named, with the reason...
    let down = poll_until(RECOVERY, "the consumer seen down", || async {
        let down = c.broker.consumers().down();
        down.into_iter()
            .find(|d| d.name == "fragile")
            .ok_or("not down")
    })
    .await;
    assert!(down.why.contains("panicked"), "{down}");
    // ...until a new actor consumes again; the message it held comes back.
    eventually(RECOVERY, "a new actor consumes", || async {
        status.is_up() && status.reconnects() >= 1
    })
    .await;
    publish(b"fine").await;
    eventually(RECOVERY, "both messages acked", || async {
        acked.load(Ordering::SeqCst) == 2
    })
    .await;
    assert!(c.broker.consumers().down().is_empty());
    keeper.stop_restarting();
    let ch = c.broker.channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    c.cleanup(&[]).await;
}

/// Takes every message in `queue` (acking them), at once.
async fn drain_queue(
    broker: &Broker,
    queue: &str,
) -> Vec<deadpool_lapin::lapin::message::BasicGetMessage> {
    let ch = broker.channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(m);
    }
    got
}

/// Messages in `queue` now (0 when it does not exist).
async fn depth(broker: &Broker, queue: &str) -> u32 {
    let ch = broker.channel().await.unwrap();
    match ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => q.message_count(),
        Err(_) => 0,
    }
}

fn header<'a>(m: &'a deadpool_lapin::lapin::message::BasicGetMessage, name: &str) -> &'a str {
    wire::header_str(&m.delivery.properties, name).unwrap_or_default()
}

#[actix_rt::test]
async fn a_reply_without_correlation_id_goes_once_to_the_poison_queue_and_replies_go_on() {
    let c = ctx("poison-reply").await;
    c.worker("echo", &c.service(), worker::echo(Duration::ZERO))
        .await
        .unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let names = c.broker.names().clone();
    let reply_queue = names.reply_queue(c.broker.instance_id());
    c.broker
        .publish(Outgoing {
            exchange: "",
            routing_key: &reply_queue,
            payload: b"no call can take me",
            properties: BasicProperties::default().with_message_id("poison-1".into()),
            mandatory: true,
        })
        .await
        .unwrap();
    eventually(RECOVERY, "the reply settled as poison", || async {
        client.consumer().poisoned() == 1
    })
    .await;
    // Replies go on (through the reply queue: `send`, not a waiting `call`).
    let reply = client
        .send(Call::new("echo", &b"1"[..]))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"1");
    assert_eq!(client.stats().malformed.load(Ordering::Relaxed), 1);
    // Once: in the poison queue, with where it came from; not in the reply queue.
    let poison = drain_queue(&c.broker, &names.poison_queue()).await;
    assert_eq!(poison.len(), 1);
    assert_eq!(&poison[0].delivery.data[..], b"no call can take me");
    assert_eq!(header(&poison[0], wire::HEADER_POISON_QUEUE), reply_queue);
    assert_eq!(
        header(&poison[0], wire::HEADER_POISON_INSTANCE),
        c.broker.instance_id()
    );
    assert!(header(&poison[0], wire::HEADER_POISON_REASON).contains("correlation id"));
    assert_eq!(depth(&c.broker, &reply_queue).await, 0);
    assert_eq!(client.consumer().poisoned(), 1);
    c.cleanup(&["echo"]).await;
}

#[actix_rt::test]
async fn a_request_that_always_fails_is_dead_lettered_once_by_the_worker_which_keeps_serving() {
    let c = ctx("poison-request").await;
    let h = Arc::new(|req: Request| async move {
        if &req.payload[..] == b"\"poison\"" {
            panic!("this request always crashes the handler");
        }
        Ok(Reply::ok(req.content_type, req.payload))
    });
    let mut svc = c.service();
    svc.delivery_limit = 2;
    let w = c.worker("fragile", &svc, h).await.unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    let poisoned = client
        .send(Call::new("fragile", &b"\"poison\""[..]).timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    eventually(RECOVERY, "the worker dead-lettered it", || async {
        w.stats.consumer.poisoned() == 1
    })
    .await;
    assert_eq!(w.stats.dead_lettered.load(Ordering::Relaxed), 1);
    let reply = client
        .call(Call::new("fragile", &b"\"fine\""[..]))
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"\"fine\"");
    let dead = drain_queue(&c.broker, &c.broker.names().dead_queue("fragile")).await;
    assert_eq!(dead.len(), 1, "dead-lettered exactly once");
    assert_eq!(&dead[0].delivery.data[..], b"\"poison\"");
    assert_eq!(
        depth(&c.broker, &c.broker.names().service_queue("fragile")).await,
        0
    );
    assert_eq!(w.stats.consumer.poisoned(), 1);
    drop(poisoned);
    c.cleanup(&["fragile"]).await;
}

#[actix_rt::test]
async fn an_event_that_is_not_a_cloudevent_goes_once_from_a_durable_subscription_to_the_poison_queue()
 {
    let c = ctx("poison-sub").await;
    let name = format!("{}-audit", c.prefix);
    let mut sub = Subscription::start(
        &c.broker,
        SubscribeOptions {
            durable_name: Some(name.clone()),
            type_prefix: None,
        },
    )
    .await
    .unwrap();
    let names = c.broker.names().clone();
    c.broker
        .publish(Outgoing {
            exchange: &names.events_exchange(),
            routing_key: "",
            payload: b"<not a cloudevent/>",
            properties: BasicProperties::default().with_message_id("poison-event".into()),
            mandatory: false,
        })
        .await
        .unwrap();
    let good = CloudEvent::new("audit.login", "test", serde_json::json!({"user": "ada"}));
    events::publish(&c.broker, &good).await.unwrap();
    let got = tokio::time::timeout(RECOVERY, sub.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, good, "the subscription skips the poison and serves on");
    let poison = drain_queue(&c.broker, &names.poison_queue()).await;
    assert_eq!(poison.len(), 1);
    assert_eq!(&poison[0].delivery.data[..], b"<not a cloudevent/>");
    assert_eq!(
        header(&poison[0], wire::HEADER_POISON_QUEUE),
        names.subscriber_queue(&name)
    );
    drop(sub);
    let ch = c.broker.channel().await.unwrap();
    let _ = ch
        .queue_delete(
            names.subscriber_queue(&name).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    c.cleanup(&[]).await;
}

#[actix_rt::test]
async fn a_dead_letter_of_no_call_is_counted_and_stays_only_in_the_service_dead_letter_queue() {
    let gw = gateway("poison-deadwatch", |_| {}).await;
    let broker = gw.ctx.broker.clone();
    let names = broker.names().clone();
    broker
        .publish(Outgoing {
            exchange: &names.dead_exchange(),
            routing_key: "echo",
            payload: b"no correlation id",
            properties: BasicProperties::default(),
            mandatory: true,
        })
        .await
        .unwrap();
    scrape_until(&gw.http, &gw.url("/metrics"), "the dead letter seen", |m| {
        m.get(r#"switchboard_dead_letters_total{service="echo"}"#) == 1.0
    })
    .await;
    let deadwatch = names.deadwatch_queue(broker.instance_id());
    eventually(RECOVERY, "the watch's copy settled", || async {
        depth(&broker, &deadwatch).await == 0
    })
    .await;
    let dead = drain_queue(&broker, &names.dead_queue("echo")).await;
    assert_eq!(dead.len(), 1, "kept once where operators look");
    assert_eq!(depth(&broker, &names.poison_queue()).await, 0);
    let res = gw.post("echo").body("{}").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    gw.cleanup().await;
}

#[actix_rt::test]
async fn per_instance_queues_expire_and_one_declared_without_expiry_is_used_as_it_is() {
    let gw = gateway("instance-queues", |s| {
        s.amqp.instance_queue_expires_s = 7200;
    })
    .await;
    let api = Management::new(&gw.ctx.settings).unwrap();
    let names = gw.ctx.broker.names().clone();
    let instance = gw.ctx.broker.instance_id().to_owned();
    for queue in [
        names.reply_queue(&instance),
        names.deadwatch_queue(&instance),
    ] {
        let q = api.queue(&queue).await.unwrap().expect("declared");
        assert_eq!(q.arguments["x-expires"], 7_200_000, "{queue}");
        assert_eq!(q.arguments["x-queue-type"], "classic", "{queue}");
    }
    gw.cleanup().await;

    // An instance upgraded from a version that declared its reply queue
    // without x-expires, with a reply waiting in it.
    let c = ctx("instance-upgrade").await;
    let ch = c.broker.channel().await.unwrap();
    let instance = c.broker.instance_id().to_owned();
    let old = topology::declare_reply_queue(&ch, c.broker.names(), &instance)
        .await
        .unwrap();
    c.worker("echo", &c.service(), worker::echo(Duration::ZERO))
        .await
        .unwrap();
    let client = c.client(RpcOptions::from(&c.settings.rpc)).await.unwrap();
    // Through the reply queue (`send`), the old one.
    let reply = client
        .send(Call::new("echo", &b"2"[..]))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"2");
    let api = Management::new(&c.settings).unwrap();
    let q = api.queue(&old).await.unwrap().expect("still there");
    assert!(q.arguments.get("x-expires").is_none(), "used as it was");
    c.cleanup(&["echo"]).await;
}

#[test]
fn an_instance_queue_expiry_shorter_than_a_deadline_is_refused_naming_both_settings() {
    let env = |extra: &[(&str, &str)]| {
        extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let err = switchboard::settings::Settings::load_from(
        None,
        None,
        env(&[
            ("SWITCHBOARD__AMQP__INSTANCE_QUEUE_EXPIRES_S", "60"),
            ("SWITCHBOARD__SERVICES__SLOW__TIMEOUT_MS", "120000"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("amqp.instance_queue_expires_s"), "{err}");
    assert!(err.contains("services.slow.timeout_ms"), "{err}");
    assert!(
        switchboard::settings::Settings::load_from(
            None,
            None,
            env(&[("SWITCHBOARD__AMQP__INSTANCE_QUEUE_EXPIRES_S", "0")])
        )
        .is_ok(),
        "0: never expires"
    );
}

/// `<prefix>.directack`, declared by the test (passive here, as
/// [`FragileQueue`]).
struct DirectAckQueue;

#[async_trait::async_trait]
impl Declare for DirectAckQueue {
    async fn declare(&self, broker: &Broker, conn: &Connection) -> switchboard::Result<String> {
        let queue = format!("{}.directack", broker.names().prefix());
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        Ok(queue)
    }
}

/// A durable queue `<prefix>.directack` holding `n` messages whose bodies
/// are `0` to `n - 1`, and a channel to delete it with.
async fn numbered_messages(c: &Ctx, n: u32) -> (String, Channel) {
    let queue = format!("{}.directack", c.broker.names().prefix());
    let ch = c.broker.channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..n {
        let body = i.to_string();
        c.broker
            .publish(Outgoing {
                exchange: "",
                routing_key: &queue,
                payload: body.as_bytes(),
                properties: Default::default(),
                mandatory: true,
            })
            .await
            .unwrap();
    }
    (queue, ch)
}

/// `InFlight::ack_now` on the channel a delivery came on (`InFlight::on`,
/// as the worker and the reply router ack) writes the ack there directly:
/// the acked messages are gone once the consumer's connection is closed
/// right after, the others come back; and acking on a channel already
/// closed is no error (its delivery went back to the queue).
#[actix_rt::test]
async fn acks_written_on_the_delivery_channel_settle_exactly_the_acked_messages() {
    use futures_util::StreamExt;
    let c = ctx("direct-ack").await;
    let (queue, ch) = numbered_messages(&c, 20).await;
    let supervisor = Supervisor::new(
        &c.broker,
        ConsumerSpec {
            name: "directack".into(),
            tag: "directack".into(),
            prefetch: Some(50),
            confirm: false,
        },
        DirectAckQueue,
    );
    let mut link = supervisor.open().await.unwrap();
    let mut deliveries = link.take_deliveries().unwrap();
    let mut kept = Vec::new();
    for _ in 0..20 {
        let event = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .expect("20 deliveries within 10 s");
        let Some(Event::Delivery(d)) = event else {
            panic!("the consumer was lost");
        };
        let n: u32 = std::str::from_utf8(&d.data).unwrap().parse().unwrap();
        let inflight = InFlight::new(d).on(Some(link.shared_channel()));
        if n.is_multiple_of(2) {
            inflight.ack_now().unwrap();
        } else {
            kept.push(inflight);
        }
    }
    // Closed right after the acks: they were queued before the close.
    link.stop("test").await;
    // One of the unacked, acked now on the closed channel: not an error.
    let late = kept.pop().unwrap();
    assert!(late.ack_now().is_ok());
    drop(kept);
    eventually(Duration::from_secs(10), "the unacked messages back", || {
        let (broker, queue) = (c.broker.clone(), queue.clone());
        async move { depth(&broker, &queue).await == 10 }
    })
    .await;
    let mut back: Vec<u32> = drain_queue(&c.broker, &queue)
        .await
        .iter()
        .map(|m| {
            std::str::from_utf8(&m.delivery.data)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    back.sort_unstable();
    assert_eq!(
        back,
        (0..20u32)
            .filter(|n| !n.is_multiple_of(2))
            .collect::<Vec<u32>>()
    );
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    c.cleanup(&[]).await;
}

/// Acks batched per channel (`AckBatch`, issue 14), with deliveries
/// finishing out of order, one handed back while its nack is not written
/// yet and two never finished: a contiguous run of finished deliveries
/// from the lowest unsettled one is acked with one `multiple` frame, the
/// others singly in the same flush, and exactly the finished deliveries
/// are settled: once the consumer is gone, the nacked and the unfinished
/// ones are back, and only they. A multiple acking past a delivery not
/// finished (or past the nack not yet written) would lose it here.
#[actix_rt::test]
async fn batched_acks_settle_exactly_the_finished_deliveries() {
    use futures_util::StreamExt;
    use switchboard::amqp::{AckBatch, AckCounts};
    let c = ctx("batch-ack").await;
    let (queue, ch) = numbered_messages(&c, 30).await;
    let supervisor = Supervisor::new(
        &c.broker,
        ConsumerSpec {
            name: "batchack".into(),
            tag: "batchack".into(),
            prefetch: Some(50),
            confirm: false,
        },
        DirectAckQueue,
    );
    let mut link = supervisor.open().await.unwrap();
    let mut deliveries = link.take_deliveries().unwrap();
    let batch = AckBatch::new(link.shared_channel().clone());
    let mut held: Vec<Option<InFlight>> = (0..30).map(|_| None).collect();
    for _ in 0..30 {
        let event = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .expect("30 deliveries within 10 s");
        let Some(Event::Delivery(d)) = event else {
            panic!("the consumer was lost");
        };
        let n: usize = std::str::from_utf8(&d.data).unwrap().parse().unwrap();
        held[n] = Some(InFlight::new(d).batched(&batch));
    }
    fn finish(held: &mut [Option<InFlight>], ns: impl IntoIterator<Item = usize>) {
        for n in ns {
            held[n].take().unwrap().ack_now().unwrap();
        }
    }
    // Out of order, 3 still running: 0 to 2 are one multiple, 4 to 7
    // singles, written by the batch's own flush at the end of the turn.
    finish(&mut held, [7, 6, 5, 4, 2, 1, 0]);
    eventually(Duration::from_secs(10), "the acks flushed", || {
        let pending = batch.pending();
        async move { pending == 0 }
    })
    .await;
    assert_eq!(
        batch.counts(),
        AckCounts {
            acks: 7,
            frames: 5,
            multiples: 1
        }
    );
    // 9 is handed back, its nack not written yet (the future not polled):
    // a hole. 3 and 8 finish (one multiple: 4 to 7 are settled), and every
    // other but 17 and 29 (never finished) singly, out of order.
    let nack = held[9].take().unwrap().hand_back();
    let (n17, n29) = (held[17].take().unwrap(), held[29].take().unwrap());
    finish(
        &mut held,
        [3, 8]
            .into_iter()
            .chain((18..29).rev())
            .chain((10..17).rev()),
    );
    eventually(Duration::from_secs(10), "the acks flushed", || {
        let pending = batch.pending();
        async move { pending == 0 }
    })
    .await;
    assert_eq!(
        batch.counts(),
        AckCounts {
            acks: 27,
            frames: 24,
            multiples: 2
        }
    );
    nack.await.unwrap();
    // A round trip on the channel: every frame before it was taken (an ack
    // of a tag already acked would have closed the channel).
    link.shared_channel()
        .basic_qos(50, Default::default())
        .await
        .expect("the channel still open after the acks");
    drop(n29);
    link.stop("test").await;
    // Finished after the channel closed: no error (it goes back anyway).
    n17.ack_now().unwrap();
    batch.flush().unwrap();
    eventually(
        Duration::from_secs(10),
        "the unsettled messages back",
        || {
            let (broker, queue) = (c.broker.clone(), queue.clone());
            async move { depth(&broker, &queue).await == 3 }
        },
    )
    .await;
    let mut back: Vec<u32> = drain_queue(&c.broker, &queue)
        .await
        .iter()
        .map(|m| {
            std::str::from_utf8(&m.delivery.data)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    back.sort_unstable();
    assert_eq!(back, [9, 17, 29]);
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    c.cleanup(&[]).await;
}
