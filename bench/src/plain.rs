//! The plain references of `bench compare`: an RPC loop on lapin as users
//! write it from the RabbitMQ tutorials (tutorial 6 and the publisher
//! confirms tutorial), in two processes, to give switchboard's cost against
//! what a hand-written program pays.
//!
//! - **requester** (in the bench's process, on its current-thread runtime):
//!   one connection, one channel in confirm mode; each request persistent,
//!   published to the service queue through the default exchange and its
//!   confirm awaited before the call counts as sent; replies matched by
//!   correlation id in a `HashMap` under a `std` mutex.
//! - **responder** (`switchboard-bench plain-responder`, a process of its
//!   own, spawned by the run, on tokio's current-thread runtime): one
//!   connection, one channel, prefetch 64; a task per delivery publishes
//!   the reply and then acks.
//!
//! Two variants:
//! - `plain`: a server-named exclusive reply queue consumed without acks;
//!   the responder publishes its reply persistent, without confirm mode,
//!   and acks right after; a quorum request queue.
//! - `plain-guarantees`: what switchboard guarantees on top: a named
//!   durable reply queue consumed with acks, `x-delivery-limit` 5 on the
//!   quorum queue, an `expiration` on every request, `mandatory` publishes,
//!   and a responder channel in confirm mode that acks a request only once
//!   its reply is confirmed.
//!
//! The responder reads its broker URL from the environment (never from its
//! command line, where `ps` would show the password), prints `ready` on
//! stdout once it consumes, and exits when its stdin closes.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use switchboard::lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::oneshot;

use crate::env::{Target, check_reply};
use crate::error::{BenchError, Result};
use crate::load::{Measured, Stop, drive};
use crate::progress::Tally;

/// The environment variable the responder reads its broker URL from.
const URL_VAR: &str = "SB_PLAIN_RESPONDER_URL";
/// The responder's prefetch, as the plain loop has it.
pub const PREFETCH: u16 = 64;
/// How long the responder may take to start consuming, and to stop.
const PROCESS_LIMIT: Duration = Duration::from_secs(30);

/// Flags of the hidden `switchboard-bench plain-responder`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResponderArgs {
    /// The request queue to consume (declared by the requester).
    #[arg(long)]
    pub queue: String,
    /// Publish replies confirmed (`mandatory`) and ack a request only once
    /// its reply is confirmed.
    #[arg(long)]
    pub guarantees: bool,
}

/// Correlation id to the task waiting for that reply.
type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Delivery>>>>;

fn lock(w: &Waiters) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Delivery>>> {
    // Nothing panics while holding the lock; a poisoned one is still consistent.
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// The requester, and the responder process serving it.
pub(crate) struct PlainRpc {
    requester: Requester,
    conn: Connection,
    responder: tokio::process::Child,
}

#[derive(Clone)]
struct Requester {
    channel: Channel,
    waiters: Waiters,
    queue: Arc<str>,
    reply_to: Arc<str>,
    payload: Bytes,
    guarantees: bool,
    timeout: Duration,
}

impl PlainRpc {
    /// Declares the request and reply queues, starts the responder process
    /// and waits until it consumes.
    pub async fn start(t: &Target, guarantees: bool) -> Result<Self> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("{}/plain-requester", t.instance).into());
        let conn = Connection::connect(&t.url, props).await?;
        let channel = conn.create_channel().await?;
        // The tutorial's request queue, quorum (durable by nature).
        let queue = t.names.service_queue(&t.service);
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if guarantees {
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await?;
        let reply_to = if guarantees {
            // Named and durable: replies wait there for a requester that
            // reconnects.
            let name = t.names.reply_queue(&t.instance);
            channel
                .queue_declare(name.as_str().into(), durable, FieldTable::default())
                .await?;
            name
        } else {
            // Tutorial 6: server-named, exclusive.
            let exclusive = QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare("".into(), exclusive, FieldTable::default())
                .await?
                .name()
                .to_string()
        };
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                reply_to.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: !guarantees,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let waiters: Waiters = Arc::default();
        let routing = waiters.clone();
        actix_rt::spawn(async move {
            let mut consumer = consumer;
            while let Some(Ok(delivery)) = consumer.next().await {
                let acker = guarantees.then(|| delivery.acker.clone());
                let waiter = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| lock(&routing).remove(id.as_str()));
                if let Some(tx) = waiter {
                    let _ = tx.send(delivery);
                }
                if let Some(acker) = acker {
                    let _ = acker.ack(BasicAckOptions::default()).await;
                }
            }
        });
        let responder = spawn_responder(t, &queue, guarantees).await?;
        Ok(Self {
            requester: Requester {
                channel,
                waiters,
                queue: queue.into(),
                reply_to: reply_to.into(),
                payload: t.payload.clone(),
                guarantees,
                timeout: t.timeout,
            },
            conn,
            responder,
        })
    }

    /// Measures calls at `concurrency` until `stop`.
    pub async fn drive(&self, concurrency: usize, stop: Stop, tally: Tally) -> Measured {
        let requester = self.requester.clone();
        drive(concurrency, stop, tally, move || {
            let requester = requester.clone();
            async move { requester.call().await }
        })
        .await
    }

    /// Stops the responder (its stdin closes) and closes the connection.
    pub async fn stop(mut self) {
        drop(self.responder.stdin.take());
        if tokio::time::timeout(PROCESS_LIMIT, self.responder.wait())
            .await
            .is_err()
        {
            tracing::warn!("the plain responder did not stop: killed");
            let _ = self.responder.kill().await;
        }
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}

impl Requester {
    /// One call: register the waiter, publish, await the confirm, await the
    /// reply. Answers when the request was confirmed.
    async fn call(&self) -> Result<Instant, String> {
        let id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id.clone(), tx);
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(id.as_str().into())
            .with_reply_to(self.reply_to.as_ref().into())
            .with_delivery_mode(2);
        if self.guarantees {
            props = props.with_expiration(self.timeout.as_millis().to_string().into());
        }
        let published = async {
            self.channel
                .basic_publish(
                    "".into(),
                    self.queue.as_ref().into(),
                    BasicPublishOptions {
                        mandatory: self.guarantees,
                        immediate: false,
                    },
                    &self.payload,
                    props,
                )
                .await?
                .await
        }
        .await;
        let failed = match published {
            Ok(Confirmation::Ack(None)) => None,
            Ok(other) => Some(format!("not confirmed: {other:?}")),
            Err(e) => Some(e.to_string()),
        };
        if let Some(reason) = failed {
            lock(&self.waiters).remove(&id);
            return Err(reason);
        }
        let sent = Instant::now();
        let reply = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(reply)) => reply,
            _ => {
                lock(&self.waiters).remove(&id);
                return Err(format!("no reply within {:?}", self.timeout));
            }
        };
        check_reply(200, reply.data.len(), self.payload.len()).map(|()| sent)
    }
}

/// Starts `switchboard-bench plain-responder` on `queue` and waits for its
/// `ready`.
async fn spawn_responder(
    t: &Target,
    queue: &str,
    guarantees: bool,
) -> Result<tokio::process::Child> {
    let me = std::env::current_exe().map_err(BenchError::io("this binary's path"))?;
    // From a test binary (target/<profile>/deps/), the bench is one up.
    let bin = if me.parent().is_some_and(|d| d.ends_with("deps")) {
        me.parent()
            .and_then(|d| d.parent())
            .map(|d| d.join(format!("switchboard-bench{}", std::env::consts::EXE_SUFFIX)))
            .unwrap_or(me)
    } else {
        me
    };
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("plain-responder")
        .arg("--queue")
        .arg(queue)
        .env(URL_VAR, &t.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if guarantees {
        cmd.arg("--guarantees");
    }
    let mut child = cmd
        .spawn()
        .map_err(BenchError::io("the plain responder process"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(setup("the plain responder has no stdout"));
    };
    let mut lines = BufReader::new(stdout).lines();
    match tokio::time::timeout(PROCESS_LIMIT, lines.next_line()).await {
        Ok(Ok(Some(line))) if line == "ready" => Ok(child),
        other => {
            let _ = child.kill().await;
            Err(setup(&format!(
                "the plain responder ({}) did not start: {other:?}",
                bin.display()
            )))
        }
    }
}

fn setup(reason: &str) -> BenchError {
    BenchError::Setup {
        workload: "compare",
        reason: reason.to_owned(),
    }
}

/// `switchboard-bench plain-responder`: serves `queue` until stdin closes,
/// on tokio's current-thread runtime.
pub fn run_responder(args: &ResponderArgs) -> Result<()> {
    let url = std::env::var(URL_VAR)
        .map_err(|_| setup(&format!("{URL_VAR} is not set: the bench sets it")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::io("a tokio runtime"))?;
    rt.block_on(respond(&url, args))
}

async fn respond(url: &str, args: &ResponderArgs) -> Result<()> {
    let props = ConnectionProperties::default()
        .with_connection_name("switchboard-bench/plain-responder".into());
    let conn = Connection::connect(url, props).await?;
    let channel = conn.create_channel().await?;
    if args.guarantees {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!("ready");
    let guarantees = args.guarantees;
    let serve = async {
        while let Some(Ok(delivery)) = consumer.next().await {
            tokio::spawn(reply(channel.clone(), delivery, guarantees));
        }
    };
    // Until the bench closes our stdin (or the consumer ends).
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let closed = async { while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {} };
    tokio::select! {
        () = serve => {}
        () = closed => {}
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Echoes one request to its `reply_to`, then acks it (with guarantees:
/// once the reply is confirmed).
async fn reply(channel: Channel, delivery: Delivery, guarantees: bool) {
    let props = &delivery.properties;
    let Some(reply_to) = props.reply_to().clone() else {
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        return;
    };
    let mut reply = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(id) = props.correlation_id() {
        reply = reply.with_correlation_id(id.clone());
    }
    let published = channel
        .basic_publish(
            "".into(),
            reply_to,
            BasicPublishOptions {
                mandatory: guarantees,
                immediate: false,
            },
            &delivery.data,
            reply,
        )
        .await;
    let confirmed = match published {
        Ok(confirm) if guarantees => matches!(confirm.await, Ok(Confirmation::Ack(_))),
        Ok(_) => true,
        Err(_) => false,
    };
    if confirmed {
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
    }
}
