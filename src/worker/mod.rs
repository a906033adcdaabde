//! Workers: one Actix actor per consumed service queue.
//!
//! The actor takes the queue's consumer as its stream. Each delivery runs
//! the service's [`Handler`] concurrently (the channel's prefetch, the
//! service's `concurrency`, bounds how many run at once), publishes the reply
//! to `reply_to` with publisher confirms, and only then acks. A handler that
//! panics or fails transiently leaves the request to be delivered again; the
//! queue's delivery limit dead-letters it in the end.
//!
//! # Layout
//! - [`handler`]: [`Request`], [`Reply`], [`HandlerError`], the [`Handler`] trait, `echo`.
//! - this file: the [`Worker`] actor and the processing of one delivery.

pub mod handler;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;
use bytes::Bytes;
use deadpool_lapin::lapin::{
    self, Connection,
    message::Delivery,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use futures_util::FutureExt;
use tracing::{Instrument, debug, error, info_span, warn};

pub use handler::{Handler, HandlerError, Reply, Request, echo};

use crate::amqp::{Broker, InFlight, Outgoing, topology, wire};
use crate::error::{Error, Result};
use crate::settings::{QueueType, ServiceSettings};

/// Counters of one worker, readable while it runs (tests, metrics).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Requests answered (any status) and acked.
    pub replied: AtomicU64,
    /// Deliveries left for redelivery after a panic or transient failure.
    pub requeued: AtomicU64,
    /// Deliveries rejected to the dead-letter queue by the worker itself.
    pub dead_lettered: AtomicU64,
    /// Requests dropped unprocessed because their deadline had passed.
    pub expired: AtomicU64,
}

/// What every in-flight delivery of one worker needs.
struct Shared {
    broker: Broker,
    service: String,
    queue_type: QueueType,
    handler: Arc<dyn Handler>,
    stats: Arc<WorkerStats>,
}

/// The actor consuming one service queue.
pub struct Worker {
    shared: Arc<Shared>,
    /// Handlers running now; bounded by the prefetch.
    in_flight: usize,
    /// The consumer's channel: kept so that it lives as long as the actor.
    _channel: lapin::Channel,
}

impl Actor for Worker {
    type Context = Context<Self>;
}

/// A handle to a running worker.
#[derive(Clone)]
pub struct WorkerHandle {
    /// The actor.
    pub addr: Addr<Worker>,
    /// Its counters.
    pub stats: Arc<WorkerStats>,
}

impl Worker {
    /// Declares the service's queues and starts consuming them on `conn`.
    pub async fn start(
        broker: &Broker,
        conn: &Connection,
        service: &str,
        settings: &ServiceSettings,
        handler: Arc<dyn Handler>,
    ) -> Result<WorkerHandle> {
        let names = broker.names();
        let channel = conn.create_channel().await?;
        topology::declare_service(&channel, names, service, settings).await?;
        // Prefetch = concurrency: the broker never hands this worker more
        // unacked requests than it will run at once.
        channel
            .basic_qos(settings.concurrency, BasicQosOptions { global: false })
            .await?;
        let consumer = channel
            .basic_consume(
                names.service_queue(service).into(),
                wire::consumer_tag(broker.instance_id(), service).into(),
                BasicConsumeOptions {
                    no_local: false,
                    // Manual acks: a request is done only once its reply is confirmed.
                    no_ack: false,
                    // Several workers (processes) may share a service queue.
                    exclusive: false,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await?;
        let stats = Arc::new(WorkerStats::default());
        let shared = Arc::new(Shared {
            broker: broker.clone(),
            service: service.to_owned(),
            queue_type: settings.queue_type,
            handler,
            stats: stats.clone(),
        });
        let addr = Worker::create(move |ctx| {
            ctx.add_stream(consumer);
            Worker {
                shared,
                in_flight: 0,
                _channel: channel,
            }
        });
        Ok(WorkerHandle { addr, stats })
    }
}

impl StreamHandler<Result<Delivery, lapin::Error>> for Worker {
    fn handle(&mut self, item: Result<Delivery, lapin::Error>, ctx: &mut Self::Context) {
        match item {
            Ok(delivery) => {
                self.in_flight += 1;
                let fut = process(self.shared.clone(), delivery);
                ctx.spawn(fut.into_actor(self).map(|_, act, _| act.in_flight -= 1));
            }
            Err(e) => error!(service = %self.shared.service, error = %e, "consumer error"),
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        warn!(service = %self.shared.service, in_flight = self.in_flight, "consumer ended");
        ctx.stop();
    }
}

/// Handles one delivery: expiry check, handler, reply, settlement.
async fn process(shared: Arc<Shared>, mut delivery: Delivery) {
    let payload = Bytes::from(std::mem::take(&mut delivery.data));
    let inflight = InFlight::new(delivery);
    let d = inflight.delivery();
    let props = &d.properties;
    let call_id = props
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_owned())
        .unwrap_or_default();
    let span = info_span!("handle", service = %shared.service, %call_id);
    async move {
        let d = inflight.delivery();
        let props = &d.properties;
        if wire::is_expired(props, wire::now_ms()) {
            debug!("deadline passed before work began: dropped");
            shared.stats.expired.fetch_add(1, Ordering::Relaxed);
            settle(inflight.ack().await);
            return;
        }
        let request = Request {
            service: shared.service.clone(),
            payload,
            content_type: wire::content_type(props).to_owned(),
            correlation_id: props.correlation_id().as_ref().map(|c| c.to_string()),
            message_id: props.message_id().as_ref().map(|c| c.to_string()),
            traceparent: wire::header_str(props, wire::HEADER_TRACEPARENT).map(str::to_owned),
            redelivered: d.redelivered,
        };
        let traceparent = request.traceparent.clone();
        let handler = shared.handler.clone();
        let outcome = AssertUnwindSafe(async move { handler.handle(request).await })
            .catch_unwind()
            .await;
        let reply = match outcome {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) if !e.transient => e.to_reply(),
            Ok(Err(e)) => {
                warn!(error = %e, "transient failure: left for redelivery");
                return give_back(&shared, inflight).await;
            }
            Err(_) => {
                error!("handler panicked: left for redelivery");
                return give_back(&shared, inflight).await;
            }
        };
        let d = inflight.delivery();
        if let Some(reply_to) = d.properties.reply_to().as_ref() {
            let props = wire::reply_properties(
                d.properties.correlation_id().as_ref(),
                reply.status,
                &reply.content_type,
                traceparent.as_deref(),
            );
            let published = shared
                .broker
                .publish(Outgoing {
                    exchange: "",
                    routing_key: reply_to.as_str(),
                    payload: &reply.body,
                    properties: props,
                    // RabbitMQ returns mandatory publishes to direct reply-to
                    // addresses even when it delivers them: only ask for
                    // returns where they mean "the caller's queue is gone".
                    mandatory: !reply_to.as_str().starts_with(wire::DIRECT_REPLY_TO),
                })
                .await;
            match published {
                Ok(()) => {}
                Err(Error::NoRoute { .. }) => {
                    debug!(%reply_to, "the caller's reply queue is gone: reply dropped")
                }
                Err(e) => {
                    warn!(error = %e, "reply not published: left for redelivery");
                    shared.stats.requeued.fetch_add(1, Ordering::Relaxed);
                    settle(inflight.requeue().await);
                    return;
                }
            }
        }
        shared.stats.replied.fetch_add(1, Ordering::Relaxed);
        debug!(status = reply.status, "replied");
        settle(inflight.ack().await);
    }
    .instrument(span)
    .await
}

/// After a panic or transient failure: redeliver, or dead-letter where the
/// queue cannot count deliveries itself (classic: a second failure ends it).
async fn give_back(shared: &Shared, inflight: InFlight) {
    let redelivered = inflight.delivery().redelivered;
    if shared.queue_type == QueueType::Classic && redelivered {
        shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        settle(inflight.dead_letter().await);
    } else {
        shared.stats.requeued.fetch_add(1, Ordering::Relaxed);
        settle(inflight.requeue().await);
    }
}

fn settle(result: Result<()>) {
    if let Err(e) = result {
        // The channel is gone; the broker redelivers the message on its own.
        warn!(error = %e, "could not settle a delivery");
    }
}
