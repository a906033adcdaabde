//! The reference of `bench rpc`: the same workload written directly on
//! lapin, the most straightforward way, to give switchboard's cost as a
//! ratio measured in the same run.
//!
//! Client: one connection, one confirm-mode channel that both publishes the
//! requests (each awaited until its confirm) and consumes the replies; a
//! `HashMap` from correlation id to a oneshot waiter behind a mutex; one task
//! that routes replies to the waiters. Server: one connection, one
//! confirm-mode channel that consumes the service queue with the same
//! prefetch as switchboard's worker, and for each request (in a task of its
//! own) publishes the reply, awaits its confirm, and only then acks.
//!
//! Both use the same message properties as switchboard
//! ([`wire::request_properties`], [`wire::reply_properties`]), the same queue
//! declarations ([`topology`]) and therefore the same queue type and
//! guarantees. What they leave out is what switchboard adds: an actor
//! mailbox, a connection pool, tracing spans, deadline checks, panic
//! isolation, the bookkeeping of late and unknown replies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use rand::Rng;
use switchboard::amqp::{topology, wire};
use switchboard::lapin::{
    Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
        BasicQosOptions, ConfirmSelectOptions,
    },
    types::FieldTable,
};
use switchboard::settings::{ReplyMode, ServiceSettings};
use tokio::sync::oneshot;

use crate::env::{Target, check_reply};
use crate::error::Result;
use crate::load::{Measured, Stop, drive};
use crate::progress::Tally;

/// Correlation id to the task waiting for that reply.
type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Delivery>>>>;

/// The raw client and, unless the service is external, the raw echo server.
pub(crate) struct RawRpc {
    client: RawClient,
    client_conn: Connection,
    server_conn: Option<Connection>,
}

#[derive(Clone)]
struct RawClient {
    channel: Channel,
    waiters: Waiters,
    exchange: Arc<str>,
    service: Arc<str>,
    reply_to: Arc<str>,
    payload: Bytes,
    persistent: bool,
    timeout: Duration,
}

fn connect_props(instance: &str, role: &str) -> ConnectionProperties {
    ConnectionProperties::default()
        .with_connection_name(wire::connection_name(instance, role).into())
}

impl RawRpc {
    /// Declares the service and reply queues, starts the echo server (unless
    /// external) and the client.
    pub async fn start(t: &Target) -> Result<Self> {
        let conn = Connection::connect(&t.url, connect_props(&t.instance, "raw-client")).await?;
        let channel = conn.create_channel().await?;
        let server_conn = match &t.service_settings {
            Some(svc) => {
                topology::declare_service(&channel, &t.names, &t.service, svc).await?;
                Some(start_server(t, svc).await?)
            }
            None => None,
        };
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (queue, no_ack) = match t.reply_mode {
            // `auto` is the library's mixed mode: raw stands for `send`.
            ReplyMode::Queue | ReplyMode::Auto => {
                let q = topology::declare_reply_queue(&channel, &t.names, &t.instance).await?;
                // The same bound on unacked replies as switchboard's client.
                channel
                    .basic_qos(4096, BasicQosOptions { global: false })
                    .await?;
                (q, false)
            }
            // Direct reply-to: consumed without acks, on the publishing channel.
            ReplyMode::Direct => (wire::DIRECT_REPLY_TO.to_owned(), true),
        };
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                wire::consumer_tag(&t.instance, "raw-replies").into(),
                BasicConsumeOptions {
                    no_local: false,
                    no_ack,
                    exclusive: false,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await?;
        let waiters: Waiters = Arc::default();
        actix_rt::spawn(route_replies(consumer, waiters.clone(), no_ack));
        Ok(Self {
            client: RawClient {
                channel,
                waiters,
                exchange: t.names.requests_exchange().into(),
                service: t.service.as_str().into(),
                reply_to: queue.into(),
                payload: t.payload.clone(),
                persistent: t.persistent,
                timeout: t.timeout,
            },
            client_conn: conn,
            server_conn,
        })
    }

    /// Measures calls at `concurrency` until `stop`.
    pub async fn drive(&self, concurrency: usize, stop: Stop, tally: Tally) -> Measured {
        let client = self.client.clone();
        drive(concurrency, stop, tally, move || {
            let client = client.clone();
            async move { client.call().await }
        })
        .await
    }

    /// Closes both connections (the server's consumer ends with it).
    pub async fn stop(self) {
        let _ = self.client_conn.close(200, "bench done".into()).await;
        if let Some(conn) = self.server_conn {
            let _ = conn.close(200, "bench done".into()).await;
        }
    }
}

impl RawClient {
    /// One call: register the waiter, publish, await the confirm, await the
    /// reply. Answers when the request was confirmed.
    async fn call(&self) -> Result<Instant, String> {
        let id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id.clone(), tx);
        let traceparent = new_traceparent();
        let meta = wire::RequestMeta {
            service: &self.service,
            correlation_id: &id,
            message_id: None,
            reply_to: Some(&self.reply_to),
            content_type: wire::CONTENT_JSON,
            timeout: Some(self.timeout),
            traceparent: Some(&traceparent),
            // Its echo server confirms every reply anyway.
            caller_waits: false,
        };
        let published = async {
            self.channel
                .basic_publish(
                    self.exchange.as_ref().into(),
                    self.service.as_ref().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &self.payload,
                    wire::request_properties(&meta, self.persistent),
                )
                .await?
                .await
        }
        .await;
        let failed = match published {
            Ok(Confirmation::Ack(None)) => None,
            Ok(Confirmation::Ack(Some(_))) => Some("unroutable".to_owned()),
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
        check_reply(
            wire::reply_status(&reply.properties).unwrap_or(502),
            reply.data.len(),
            self.payload.len(),
        )
        .map(|()| sent)
    }
}

/// A new W3C `traceparent` (version 00, sampled), as switchboard's client
/// sends one with every request.
fn new_traceparent() -> String {
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>().max(1);
    let span: u64 = rng.random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

fn lock(w: &Waiters) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Delivery>>> {
    // Nothing panics while holding the lock; a poisoned one is still consistent.
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands every reply to its waiter, then acks it (queue mode).
async fn route_replies(mut consumer: Consumer, waiters: Waiters, no_ack: bool) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let acker = delivery.acker.clone();
        let waiter = delivery
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|id| lock(&waiters).remove(id.as_str()));
        if let Some(tx) = waiter {
            let _ = tx.send(delivery);
        }
        if !no_ack {
            let _ = acker.ack(BasicAckOptions { multiple: false }).await;
        }
    }
}

/// The raw echo server on a connection of its own.
async fn start_server(t: &Target, svc: &ServiceSettings) -> Result<Connection> {
    let conn = Connection::connect(&t.url, connect_props(&t.instance, "raw-server")).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // The same prefetch as switchboard's worker.
    channel
        .basic_qos(svc.concurrency, BasicQosOptions { global: false })
        .await?;
    let mut consumer = channel
        .basic_consume(
            t.names.service_queue(&t.service).into(),
            wire::consumer_tag(&t.instance, "raw-server").into(),
            BasicConsumeOptions {
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await?;
    actix_rt::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            actix_rt::spawn(echo(channel.clone(), delivery));
        }
    });
    Ok(conn)
}

/// Replies with the request's body, awaits the confirm, then acks.
async fn echo(channel: Channel, delivery: Delivery) {
    let props = &delivery.properties;
    let Some(reply_to) = props.reply_to().as_ref() else {
        let _ = delivery
            .acker
            .ack(BasicAckOptions { multiple: false })
            .await;
        return;
    };
    let reply = wire::reply_properties(
        props.correlation_id().as_ref(),
        200,
        wire::content_type(props),
        wire::header_str(props, wire::HEADER_TRACEPARENT),
    );
    let confirmed = async {
        channel
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions {
                    // As switchboard's worker: returns mean "the caller's queue
                    // is gone", and direct reply-to addresses are always returned.
                    mandatory: !reply_to.as_str().starts_with(wire::DIRECT_REPLY_TO),
                    immediate: false,
                },
                &delivery.data,
                reply,
            )
            .await?
            .await
    }
    .await;
    let _ = match confirmed {
        Ok(Confirmation::Ack(_)) => {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: false })
                .await
        }
        _ => {
            delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
    };
}
