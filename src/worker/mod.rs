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
mod metrics;

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use deadpool_lapin::lapin::{
    self, Connection,
    message::Delivery,
    options::{BasicCancelOptions, ConfirmSelectOptions},
};
use futures_util::FutureExt;
use tokio::sync::oneshot;
use tracing::{Instrument, debug, error, field::Empty, info, info_span, warn};

pub use handler::{Handler, HandlerError, Reply, Request, echo};

use crate::amqp::{Broker, InFlight, Outgoing, broker::publish_on, topology, wire};
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
    /// Deliveries of a request already answered (or being answered) here,
    /// settled without running the handler again.
    pub duplicates: AtomicU64,
    /// Times the consumer was re-established after it was lost.
    pub reconnects: AtomicU64,
    /// Whether the worker consumes now.
    pub consuming: std::sync::atomic::AtomicBool,
    /// Deliveries taken from the queue (duplicates included).
    pub deliveries: AtomicU64,
    /// Deliveries the broker marked as delivered before.
    pub redelivered: AtomicU64,
    /// How long the handler ran, per request.
    pub handler_time: crate::metrics::Histogram,
}

/// How many answered message ids a worker remembers to spot redeliveries.
pub const DEDUP_WINDOW: usize = 16_384;

/// What every in-flight delivery of one worker needs.
struct Shared {
    broker: Broker,
    service: String,
    settings: ServiceSettings,
    handler: Arc<dyn Handler>,
    stats: Arc<WorkerStats>,
}

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Answered (the reply is confirmed, or nobody wanted one).
    Answered,
    /// Left for redelivery or dead-lettered; not answered.
    GivenBack,
}

/// Message ids answered recently, and those being answered now with the
/// redelivered copies that wait for them. Bounded by [`DEDUP_WINDOW`] and
/// by the prefetch.
#[derive(Default)]
struct Dedup {
    done: HashSet<String>,
    order: VecDeque<String>,
    running: HashMap<String, Vec<InFlight>>,
}

impl Dedup {
    fn remember(&mut self, id: String) {
        if self.order.len() >= DEDUP_WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.done.remove(&old);
        }
        if self.done.insert(id.clone()) {
            self.order.push_back(id);
        }
    }
}

/// One consumer: its own connection, channel and tag.
struct Link {
    conn: Connection,
    channel: lapin::Channel,
    tag: String,
}

/// The actor consuming one service queue.
pub struct Worker {
    shared: Arc<Shared>,
    /// Handlers running now; bounded by the prefetch.
    in_flight: usize,
    /// The consumer now, if any.
    link: Option<Link>,
    /// Whether a new consumer is being established.
    reconnecting: bool,
    dedup: Dedup,
    /// Set by [`Drain`]: no new work is taken.
    draining: bool,
    /// Who waits for the drain to end.
    drained: Vec<oneshot::Sender<()>>,
}

impl Actor for Worker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // A safety net beside the consumer stream ending: a connection that
        // died without a word is noticed within a second.
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            let dead = act
                .link
                .as_ref()
                .is_some_and(|l| !l.conn.status().connected());
            if dead {
                act.reconnect(ctx);
            }
        });
    }
}

/// A handle to a running worker.
#[derive(Clone)]
pub struct WorkerHandle {
    /// The actor.
    pub addr: Addr<Worker>,
    /// Its counters.
    pub stats: Arc<WorkerStats>,
}

impl WorkerHandle {
    /// Stops taking requests and waits (at most `grace`) for the handlers
    /// running now; what is left is redelivered once the worker's
    /// connection closes.
    pub async fn drain(&self, grace: Duration) {
        let _ = self.addr.send(Drain { grace }).await;
    }
}

/// Opens a consumer of `service`'s queue on a connection of its own
/// (`switchboard/<instance>/worker/<service>`), declaring the topology first.
async fn open(shared: &Shared) -> Result<(Link, lapin::Consumer)> {
    let broker = &shared.broker;
    let names = broker.names();
    let conn = broker
        .dedicated_connection(&format!("worker/{}", shared.service))
        .await?;
    let channel = conn.create_channel().await?;
    topology::declare_service(&channel, names, &shared.service, &shared.settings).await?;
    // Replies are published on this channel too, confirmed (see `reply`).
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // Manual acks (a request is done only once its reply is confirmed), and
    // prefetch = concurrency: the broker never hands this worker more
    // unacked requests than it will run at once.
    let tag = wire::consumer_tag(broker.instance_id(), &shared.service);
    let consumer = crate::amqp::consume(
        broker,
        &channel,
        &names.service_queue(&shared.service),
        &shared.service,
        Some(shared.settings.concurrency),
    )
    .await?;
    Ok((Link { conn, channel, tag }, consumer))
}

impl Worker {
    /// Declares the service's queues and starts consuming them on a
    /// connection of the worker's own. Fails if the broker cannot be reached
    /// now; once started, a lost consumer comes back by itself.
    pub async fn start(
        broker: &Broker,
        service: &str,
        settings: &ServiceSettings,
        handler: Arc<dyn Handler>,
    ) -> Result<WorkerHandle> {
        let stats = Arc::new(WorkerStats::default());
        broker
            .metrics()
            .register(metrics::WorkerSource::new(service, stats.clone()));
        let shared = Arc::new(Shared {
            broker: broker.clone(),
            service: service.to_owned(),
            settings: settings.clone(),
            handler,
            stats: stats.clone(),
        });
        let (link, consumer) = open(&shared).await?;
        stats.consuming.store(true, Ordering::Relaxed);
        let addr = Worker::create(move |ctx| {
            ctx.add_stream(consumer);
            Worker {
                shared,
                in_flight: 0,
                link: Some(link),
                reconnecting: false,
                dedup: Dedup::default(),
                draining: false,
                drained: Vec::new(),
            }
        });
        Ok(WorkerHandle { addr, stats })
    }

    /// Drops the current consumer and establishes a new one, with backoff,
    /// until it succeeds or the worker drains or stops.
    fn reconnect(&mut self, ctx: &mut Context<Self>) {
        if self.reconnecting || self.draining {
            return;
        }
        self.reconnecting = true;
        self.shared.stats.consuming.store(false, Ordering::Relaxed);
        if let Some(old) = self.link.take() {
            // Deliveries of the old channel are never acked on the new one:
            // their ackers belong to the old channel, which is closed here.
            actix::spawn(async move {
                crate::amqp::close_connection(&old.conn, "replaced").await;
            });
        }
        warn!(service = %self.shared.service, in_flight = self.in_flight, "consumer lost; re-establishing");
        let shared = self.shared.clone();
        let fut = async move {
            let what = format!("worker {}", shared.service);
            crate::amqp::reopen(&what, || open(&shared)).await
        };
        ctx.spawn(fut.into_actor(self).map(|(link, consumer), act, ctx| {
            act.reconnecting = false;
            if act.draining {
                actix::spawn(async move {
                    crate::amqp::close_connection(&link.conn, "draining").await;
                });
                return;
            }
            act.link = Some(link);
            act.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            act.shared.stats.consuming.store(true, Ordering::Relaxed);
            info!(service = %act.shared.service, "consumer re-established");
            ctx.add_stream(consumer);
        }));
    }

    /// Settles what waited for `key` and remembers it when answered.
    fn finish(&mut self, key: Option<String>, outcome: Outcome) {
        self.in_flight -= 1;
        if let Some(key) = key {
            let parked = self.dedup.running.remove(&key).unwrap_or_default();
            if outcome == Outcome::Answered {
                self.dedup.remember(key);
            }
            for copy in parked {
                actix::spawn(async move {
                    // A copy of an answered request is done; of one given
                    // back, it goes back too.
                    let settled = match outcome {
                        Outcome::Answered => copy.ack().await,
                        Outcome::GivenBack => copy.requeue().await,
                    };
                    settle(settled);
                });
            }
        }
        if self.draining && self.in_flight == 0 {
            for tx in self.drained.drain(..) {
                let _ = tx.send(());
            }
        }
    }
}

impl StreamHandler<Result<Delivery, lapin::Error>> for Worker {
    fn handle(&mut self, item: Result<Delivery, lapin::Error>, ctx: &mut Self::Context) {
        let delivery = match item {
            Ok(d) => d,
            Err(e) => {
                warn!(service = %self.shared.service, error = %e, "consumer error");
                self.reconnect(ctx);
                return;
            }
        };
        let stats = &self.shared.stats;
        stats.deliveries.fetch_add(1, Ordering::Relaxed);
        if delivery.redelivered {
            stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let inflight = InFlight::new(delivery);
        if self.draining {
            // Taken before the cancel reached the broker: back to the queue,
            // for another worker.
            actix::spawn(async move { settle(inflight.requeue().await) });
            return;
        }
        let props = &inflight.delivery().properties;
        let key = props
            .message_id()
            .as_ref()
            .or(props.correlation_id().as_ref())
            .map(|k| k.as_str().to_owned());
        if let Some(k) = &key {
            if self.dedup.done.contains(k) {
                self.shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                debug!(service = %self.shared.service, message_id = %k, "already answered: acked without running again");
                actix::spawn(async move { settle(inflight.ack().await) });
                return;
            }
            if let Some(parked) = self.dedup.running.get_mut(k) {
                self.shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                parked.push(inflight);
                return;
            }
            self.dedup.running.insert(k.clone(), Vec::new());
        }
        self.in_flight += 1;
        let channel = self.link.as_ref().map(|l| l.channel.clone());
        let fut = process(self.shared.clone(), inflight, channel);
        ctx.spawn(
            fut.into_actor(self)
                .map(move |outcome, act, _| act.finish(key, outcome)),
        );
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if !self.draining {
            self.reconnect(ctx);
        }
    }
}

/// Stop taking requests; resolves when the handlers running now are done,
/// or after `grace`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    /// The longest wait for running handlers.
    pub grace: Duration,
}

impl actix::Handler<Drain> for Worker {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Drain, ctx: &mut Self::Context) -> Self::Result {
        self.draining = true;
        self.shared.stats.consuming.store(false, Ordering::Relaxed);
        if let Some(link) = &self.link {
            let channel = link.channel.clone();
            let tag = link.tag.clone();
            actix::spawn(async move {
                let _ = channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions { nowait: false })
                    .await;
            });
        }
        let (tx, rx) = oneshot::channel();
        if self.in_flight == 0 {
            let _ = tx.send(());
        } else {
            self.drained.push(tx);
        }
        let link = self.link.take();
        let grace = msg.grace;
        let _ = ctx;
        Box::pin(async move {
            let _ = tokio::time::timeout(grace, rx).await;
            if let Some(link) = link {
                // Unacked deliveries (handlers past the grace) go back to the queue.
                crate::amqp::close_connection(&link.conn, "shutdown").await;
            }
        })
    }
}

/// Handles one delivery: expiry check, handler, reply, settlement.
async fn process(
    shared: Arc<Shared>,
    mut inflight: InFlight,
    channel: Option<lapin::Channel>,
) -> Outcome {
    let payload = inflight.take_payload();
    let d = inflight.delivery();
    let props = &d.properties;
    let call_id = props
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_owned())
        .unwrap_or_default();
    let span = info_span!("handle", service = %shared.service, %call_id, trace_id = Empty);
    if let Some(tp) = wire::header_str(props, wire::HEADER_TRACEPARENT) {
        if let Some(trace_id) = crate::telemetry::trace_id(tp) {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        // The exported handler span is a child of the caller's.
        crate::telemetry::otlp::continue_trace(&span, tp);
    }
    async move {
        let d = inflight.delivery();
        let props = &d.properties;
        if wire::is_expired(props, wire::now_ms()) {
            debug!("deadline passed before work began: dropped");
            shared.stats.expired.fetch_add(1, Ordering::Relaxed);
            settle(inflight.ack().await);
            return Outcome::GivenBack;
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
        let started = std::time::Instant::now();
        let outcome = AssertUnwindSafe(async move { handler.handle(request).await })
            .catch_unwind()
            .await;
        shared.stats.handler_time.observe(started.elapsed());
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
            let msg = Outgoing {
                exchange: "",
                routing_key: reply_to.as_str(),
                payload: &reply.body,
                properties: props,
                // RabbitMQ returns mandatory publishes to direct reply-to
                // addresses even when it delivers them: only ask for
                // returns where they mean "the caller's queue is gone".
                mandatory: !reply_to.as_str().starts_with(wire::DIRECT_REPLY_TO),
            };
            let published = publish_reply(&shared, channel.as_ref(), msg).await;
            match published {
                Ok(()) => {}
                Err(Error::NoRoute { .. }) => {
                    debug!(%reply_to, "the caller's reply queue is gone: reply dropped")
                }
                Err(e) => {
                    warn!(error = %e, "reply not published: left for redelivery");
                    shared.stats.requeued.fetch_add(1, Ordering::Relaxed);
                    settle(inflight.requeue().await);
                    return Outcome::GivenBack;
                }
            }
        }
        shared.stats.replied.fetch_add(1, Ordering::Relaxed);
        debug!(status = reply.status, "replied");
        settle(inflight.ack().await);
        Outcome::Answered
    }
    .instrument(span)
    .await
}

/// Publishes a reply, confirmed: on the channel its request came on (as a
/// hand-written worker would: no other connection's I/O thread to wake), or,
/// when that fails (the connection is going, no confirm in time, a nack),
/// through the broker's publishing pool, with its retries. A reply that made
/// it on the first way as well reaches its caller twice: the second is
/// counted there as late and dropped. The handler never runs twice for it.
async fn publish_reply(
    shared: &Shared,
    channel: Option<&lapin::Channel>,
    msg: Outgoing<'_>,
) -> Result<()> {
    if let Some(channel) = channel.filter(|c| c.status().connected()) {
        let sent =
            tokio::time::timeout(shared.broker.confirm_timeout(), publish_on(channel, &msg)).await;
        match sent {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e @ Error::NoRoute { .. })) => return Err(e),
            Ok(Err(e)) => {
                debug!(error = %e, "reply not confirmed on the request's channel; publishing it through the pool")
            }
            Err(_) => debug!("no confirm of the reply in time; publishing it through the pool"),
        }
    }
    shared.broker.publish(msg).await
}

/// After a panic or transient failure: redeliver, or dead-letter where the
/// queue cannot count deliveries itself (classic: a second failure ends it).
async fn give_back(shared: &Shared, inflight: InFlight) -> Outcome {
    let redelivered = inflight.delivery().redelivered;
    if shared.settings.queue_type == QueueType::Classic && redelivered {
        shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        settle(inflight.dead_letter().await);
    } else {
        shared.stats.requeued.fetch_add(1, Ordering::Relaxed);
        settle(inflight.requeue().await);
    }
    Outcome::GivenBack
}

fn settle(result: Result<()>) {
    if let Err(e) = result {
        // The channel is gone; the broker redelivers the message on its own.
        warn!(error = %e, "could not settle a delivery");
    }
}
