//! Workers: one Actix actor per consumed service queue.
//!
//! The actor consumes the queue through a supervised consumer
//! ([`crate::amqp::consumer`]): its deliveries are the actor's stream, a lost
//! consumer comes back by itself, and a [`Keeper`] starts a new actor if
//! this one stops or panics. Each delivery runs the service's [`Handler`]
//! concurrently (the channel's prefetch, the service's `concurrency`, bounds
//! how many run at once), publishes the reply to `reply_to` with publisher
//! confirms, and only then acks; a request whose caller waits in memory
//! ([`wire::HEADER_CALLER_WAITS`]) gets a transient reply, acked as soon as
//! it is written. A handler that panics or fails transiently
//! leaves the request to be delivered again (`basic.reject`); on its last
//! allowed delivery the worker dead-letters it itself, once, counted and
//! logged. Work handed back unprocessed (prefetched when a drain begins, a
//! reply that could not be published) goes back with `basic.nack`, which
//! RabbitMQ 4.3 and later do not count against the delivery limit.
//!
//! A handler reports progress through [`Request::progress`] (published on
//! the call's `reply_to`, confirmed, as the reply is) and learns of its
//! caller's cancellation through [`Request::cancelled`]; a request whose
//! call was cancelled before it began is acked unprocessed
//! (`cancels`).
//!
//! # Layout
//! - `handler`: [`Request`], [`Reply`], [`HandlerError`], the [`Handler`] trait, `echo`.
//! - `cancels`: the process's watch of cancelled calls.
//! - this file: the [`Worker`] actor and the processing of one delivery.

mod cancels;
mod handler;
pub(crate) mod metrics;

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use deadpool_lapin::lapin::{self, Connection};
use futures_util::FutureExt;
use tokio::sync::oneshot;
use tracing::{Instrument, debug, error, field::Empty, info_span, warn};

pub use cancels::CancelWatch;
pub use handler::{CallControl, Handler, HandlerError, Progress, Reply, Request, echo};

use crate::amqp::consumer::{
    ActorConsumer, ConsumerStatus, Consumes, Declare, Event, Keeper, settle,
};
use crate::amqp::{
    AckBatch, Broker, ConsumerSpec, InFlight, Outgoing, Supervisor, broker::publish_on, topology,
    wire,
};
use crate::error::{Error, Result};
use crate::settings::{QueueType, ServiceSettings};

/// Counters of one worker, readable while it runs (tests, metrics).
#[derive(Debug)]
pub struct WorkerStats {
    /// Requests answered (any status) and acked.
    pub replied: AtomicU64,
    /// Deliveries left for redelivery after a panic or transient failure
    /// (rejected), or handed back because their reply could not be
    /// published (nacked).
    pub requeued: AtomicU64,
    /// Deliveries rejected to the dead-letter queue by the worker itself:
    /// the handler failed on the last delivery the queue allows.
    pub dead_lettered: AtomicU64,
    /// Requests dropped unprocessed because their deadline had passed.
    pub expired: AtomicU64,
    /// Deliveries of a request already answered (or being answered) here,
    /// settled without running the handler again.
    pub duplicates: AtomicU64,
    /// Replies whose handler ran but which could not be published (the
    /// channel and the publishing pool both failed): kept for the copy of
    /// their request, which gets them without running the handler again.
    pub replies_kept: AtomicU64,
    /// The worker's consumer: whether it consumes now, since when it does
    /// not, how often it came back, the poison it dead-lettered.
    pub consumer: Arc<ConsumerStatus>,
    /// Deliveries taken from the queue (duplicates included).
    pub deliveries: AtomicU64,
    /// Deliveries the broker marked as delivered before.
    pub redelivered: AtomicU64,
    /// How long the handler ran, per request.
    pub handler_time: crate::metrics::Histogram,
    /// Requests whose caller cancelled the call: dropped before the
    /// handler began, or whose reply was not sent.
    pub cancelled: AtomicU64,
    /// Progress reports published.
    pub progress: AtomicU64,
}

impl WorkerStats {
    fn new(consumer: Arc<ConsumerStatus>) -> Self {
        Self {
            replied: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            replies_kept: AtomicU64::new(0),
            consumer,
            deliveries: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            handler_time: Default::default(),
            cancelled: AtomicU64::new(0),
            progress: AtomicU64::new(0),
        }
    }
}

/// How many answered message ids a worker remembers to spot redeliveries.
pub(crate) const DEDUP_WINDOW: usize = 16_384;

/// What every in-flight delivery of one worker needs.
struct Shared {
    broker: Broker,
    service: String,
    settings: ServiceSettings,
    handler: Arc<dyn Handler>,
    stats: Arc<WorkerStats>,
    /// The process's cancelled calls.
    cancels: Arc<cancels::CancelWatch>,
}

/// How many replies a worker keeps whose handler ran but which it could
/// not publish (see [`Outcome::Unsent`]).
const UNSENT_WINDOW: usize = 1_024;

/// What became of one delivery.
#[derive(Debug, Clone)]
enum Outcome {
    /// Answered (the reply is confirmed, or nobody wanted one).
    Answered,
    /// Left for redelivery or dead-lettered; not answered, and the handler
    /// did not finish with a reply (it failed, or never ran).
    GivenBack,
    /// The handler ran, but its reply could not be published (the
    /// connection went with the channel and the pool failed too): the
    /// request went back to the queue, and the reply is kept so that its
    /// copy is answered with it instead of running the handler twice.
    Unsent(Arc<UnsentReply>),
}

/// A reply kept for the redelivered copy of its request.
#[derive(Debug)]
struct UnsentReply {
    reply_to: String,
    body: bytes::Bytes,
    properties: lapin::BasicProperties,
    mandatory: bool,
}

impl UnsentReply {
    fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            exchange: "",
            routing_key: &self.reply_to,
            payload: &self.body,
            properties: self.properties.clone(),
            mandatory: self.mandatory,
        }
    }
}

/// Message ids answered recently, those being answered now with the
/// redelivered copies that wait for them, and those whose handler ran but
/// whose reply is still to be published. Bounded by [`DEDUP_WINDOW`], by
/// the prefetch and by [`UNSENT_WINDOW`].
#[derive(Default)]
struct Dedup {
    done: HashSet<String>,
    order: VecDeque<String>,
    running: HashMap<String, Vec<InFlight>>,
    unsent: HashMap<String, Arc<UnsentReply>>,
    unsent_order: VecDeque<String>,
}

impl Dedup {
    fn remember(&mut self, id: String) {
        self.unsent.remove(&id);
        if self.order.len() >= DEDUP_WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.done.remove(&old);
        }
        if self.done.insert(id.clone()) {
            self.order.push_back(id);
        }
    }

    fn keep_unsent(&mut self, id: String, reply: Arc<UnsentReply>) {
        // Ids answered since stay in the order until it is swept here, or
        // skipped as they come out of it.
        if self.unsent_order.len() >= 2 * UNSENT_WINDOW {
            let unsent = &self.unsent;
            self.unsent_order.retain(|id| unsent.contains_key(id));
        }
        while self.unsent.len() >= UNSENT_WINDOW
            && let Some(old) = self.unsent_order.pop_front()
        {
            self.unsent.remove(&old);
        }
        if self.unsent.insert(id.clone(), reply).is_none() {
            self.unsent_order.push_back(id);
        }
    }
}

/// The actor consuming one service queue.
pub struct Worker {
    shared: Arc<Shared>,
    /// The supervised consumer of the service queue.
    consumer: ActorConsumer,
    /// Handlers running now, and deliveries being handed back while
    /// draining; bounded by the prefetch.
    in_flight: usize,
    dedup: Dedup,
    /// Set by [`Drain`]: no new work is taken.
    draining: bool,
    /// While draining: whether the cancelled consumer's stream has ended, so
    /// that every delivery it had prefetched reached the actor (and was
    /// handed back).
    stream_done: bool,
    /// Who waits for the drain to end.
    drained: Vec<oneshot::Sender<()>>,
    /// The acks of the current channel's deliveries, written at the end of
    /// each turn (a contiguous run as one `multiple` ack).
    acks: Option<Arc<AckBatch>>,
}

impl Actor for Worker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ActorConsumer::start(self, ctx);
    }
}

impl Consumes for Worker {
    fn consumer(&mut self) -> &mut ActorConsumer {
        &mut self.consumer
    }
}

/// A handle to a running worker.
#[derive(Clone)]
pub struct WorkerHandle {
    /// The actor (a new one if it stopped or panicked).
    keeper: Keeper<Worker>,
    /// Its counters.
    pub stats: Arc<WorkerStats>,
}

impl WorkerHandle {
    /// The actor running now.
    pub fn addr(&self) -> Addr<Worker> {
        self.keeper.addr()
    }

    /// Stops taking requests and waits (at most `grace`) for the handlers
    /// running now; requests it had prefetched are handed back at once, and
    /// those still running after `grace` go back when the worker's
    /// connection closes.
    pub async fn drain(&self, grace: Duration) {
        self.keeper.stop_restarting();
        let _ = self.keeper.addr().send(Drain { grace }).await;
    }
}

/// `service`'s queues, declared on every (re-)open of its consumer.
struct ServiceQueue {
    service: String,
    settings: ServiceSettings,
}

#[async_trait::async_trait]
impl Declare for ServiceQueue {
    async fn declare(&self, broker: &Broker, conn: &Connection) -> Result<String> {
        let ch = conn.create_channel().await?;
        topology::declare_service(&ch, broker.names(), &self.service, &self.settings).await?;
        crate::amqp::close_channel(&ch, "declared").await;
        Ok(broker.names().service_queue(&self.service))
    }
}

impl Worker {
    /// Declares the service's queues and starts consuming them on a
    /// connection of the worker's own (`switchboard/<instance>/worker/<service>`).
    /// Fails if the broker cannot be reached now; once started, a lost
    /// consumer comes back by itself, and so does a worker actor that
    /// stopped or panicked.
    pub async fn start(
        broker: &Broker,
        service: &str,
        settings: &ServiceSettings,
        handler: Arc<dyn Handler>,
    ) -> Result<WorkerHandle> {
        let supervisor = Supervisor::new(
            broker,
            ConsumerSpec {
                name: format!("worker/{service}"),
                tag: service.to_owned(),
                // Manual acks (a request is done only once its reply is
                // confirmed), and prefetch = concurrency: the broker never
                // hands this worker more unacked requests than it will run
                // at once.
                prefetch: Some(settings.concurrency),
                // Replies are published on this channel too, confirmed.
                confirm: true,
            },
            ServiceQueue {
                service: service.to_owned(),
                settings: settings.clone(),
            },
        );
        let link = match supervisor.open().await {
            Ok(link) => link,
            Err(e) => {
                supervisor.status().set_stopped();
                return Err(e);
            }
        };
        let cancels = match cancels::CancelWatch::shared(broker).await {
            Ok(c) => c,
            Err(e) => {
                supervisor.status().set_stopped();
                return Err(e);
            }
        };
        let stats = Arc::new(WorkerStats::new(supervisor.status().clone()));
        broker
            .metrics()
            .register(metrics::WorkerSource::new(service, stats.clone()));
        let shared = Arc::new(Shared {
            broker: broker.clone(),
            service: service.to_owned(),
            settings: settings.clone(),
            handler,
            stats: stats.clone(),
            cancels,
        });
        let keeper = Keeper::start(supervisor, link, move |consumer| {
            Worker {
                shared: shared.clone(),
                consumer,
                in_flight: 0,
                dedup: Dedup::default(),
                draining: false,
                stream_done: false,
                drained: Vec::new(),
                acks: None,
            }
            .start()
        });
        Ok(WorkerHandle { keeper, stats })
    }

    /// The ack batch of `channel`: a new one for a new channel (the tags
    /// of the last one's deliveries are not this one's).
    fn ack_batch(&mut self, channel: &Arc<lapin::Channel>) -> &Arc<AckBatch> {
        if !self.acks.as_ref().is_some_and(|b| b.is_for(channel)) {
            self.acks = Some(AckBatch::new(channel.clone()));
        }
        self.acks.as_ref().expect("set above")
    }

    /// Settles what waited for `key` and remembers it when answered.
    fn finish(&mut self, key: Option<String>, outcome: Outcome) {
        self.in_flight -= 1;
        if self.draining
            && let Some(acks) = &self.acks
        {
            // The channel closes once the drain ends: acks written first.
            settle(acks.flush());
        }
        if let Some(key) = key {
            let parked = self.dedup.running.remove(&key).unwrap_or_default();
            let answered = matches!(outcome, Outcome::Answered);
            match outcome {
                Outcome::Answered => self.dedup.remember(key),
                Outcome::Unsent(reply) => {
                    self.shared
                        .stats
                        .replies_kept
                        .fetch_add(1, Ordering::Relaxed);
                    self.dedup.keep_unsent(key, reply)
                }
                Outcome::GivenBack => {}
            }
            for copy in parked {
                actix::spawn(async move {
                    // A copy of an answered request is done; of one given
                    // back, it goes back too, unprocessed (not a failure),
                    // and one whose reply is kept comes back to get it.
                    let settled = if answered {
                        copy.ack().await
                    } else {
                        copy.hand_back().await
                    };
                    settle(settled);
                });
            }
        }
        self.check_drained();
    }

    /// Wakes who waits for the drain once nothing is left in hand.
    fn check_drained(&mut self) {
        if self.draining && self.stream_done && self.in_flight == 0 {
            for tx in self.drained.drain(..) {
                let _ = tx.send(());
            }
        }
    }
}

impl StreamHandler<Event> for Worker {
    fn handle(&mut self, event: Event, ctx: &mut Self::Context) {
        if self.draining && matches!(event, Event::Lost(_)) {
            // The cancelled consumer's stream ended: every delivery it had
            // prefetched has been seen.
            self.stream_done = true;
        }
        let Some(delivery) = ActorConsumer::delivered(self, event, ctx) else {
            self.check_drained();
            return;
        };
        let stats = &self.shared.stats;
        stats.deliveries.fetch_add(1, Ordering::Relaxed);
        if delivery.redelivered {
            stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        // The channel it came on: its reply is published there, and its
        // ack written there directly (InFlight::ack_now), by the channel's
        // ack batch.
        let channel = self.consumer.link().map(|l| l.shared_channel().clone());
        let mut inflight = InFlight::new(delivery).on(channel.as_ref());
        if let Some(channel) = &channel {
            // Its ack written at the end of the turn, with the others
            // finished in it (AckBatch).
            inflight = inflight.batched(self.ack_batch(channel));
        }
        if self.draining {
            // Taken before the cancel reached the broker: back to the queue,
            // unprocessed, for another worker. In flight until the nack is
            // sent, so that the connection closes only after it.
            self.in_flight += 1;
            ctx.spawn(
                async move { settle(inflight.hand_back().await) }
                    .into_actor(self)
                    .map(|(), act, _| act.finish(None, Outcome::GivenBack)),
            );
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
            if let Some(reply) = self.dedup.unsent.get(k).cloned() {
                // Its handler ran here before, and its reply could not be
                // published then: published now, without running it again.
                self.shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                debug!(service = %self.shared.service, message_id = %k, "handled before, its reply unsent: publishing the kept reply");
                self.in_flight += 1;
                let fut = resend(self.shared.clone(), inflight, channel, reply);
                ctx.spawn(
                    fut.into_actor(self)
                        .map(move |outcome, act, _| act.finish(key, outcome)),
                );
                return;
            }
        }
        self.in_flight += 1;
        let fut = process(self.shared.clone(), inflight, channel);
        ctx.spawn(
            fut.into_actor(self)
                .map(move |outcome, act, _| act.finish(key, outcome)),
        );
    }

    fn finished(&mut self, _: &mut Self::Context) {
        // Every stream ends with a `Lost` event, handled above; the default
        // would stop the actor.
    }
}

/// Stop taking requests; resolves when the handlers running now are done,
/// or after `grace`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Drain {
    /// The longest wait for running handlers.
    pub grace: Duration,
}

impl actix::Handler<Drain> for Worker {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Drain, ctx: &mut Self::Context) -> Self::Result {
        self.draining = true;
        let link = ActorConsumer::stop(self, ctx);
        // No link (being re-established): nothing is prefetched.
        self.stream_done = link.is_none();
        let (tx, rx) = oneshot::channel();
        self.drained.push(tx);
        self.check_drained();
        let grace = msg.grace;
        Box::pin(async move {
            if let Some(link) = &link {
                // Deliveries already sent still arrive, and are handed back.
                link.cancel().await;
            }
            let _ = tokio::time::timeout(grace, rx).await;
            if let Some(link) = link {
                // Unacked deliveries (handlers past the grace) go back to the queue.
                link.stop("shutdown").await;
            }
        })
    }
}

/// Handles one delivery: expiry check, handler, reply, settlement.
async fn process(
    shared: Arc<Shared>,
    mut inflight: InFlight,
    channel: Option<Arc<lapin::Channel>>,
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
        if !call_id.is_empty() && shared.cancels.is_cancelled(&call_id) {
            debug!("the call was cancelled before work began: dropped");
            shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            settle(inflight.ack().await);
            return Outcome::Answered;
        }
        let running = shared.cancels.running(&call_id);
        let reporter: Option<Arc<dyn handler::Reporter>> = match props.reply_to().as_ref() {
            Some(reply_to) if wire::accepts_progress(props) => Some(Arc::new(ProgressReporter {
                shared: shared.clone(),
                channel: channel.as_deref().cloned(),
                reply_to: reply_to.to_string(),
                correlation_id: props.correlation_id().clone(),
                traceparent: wire::header_str(props, wire::HEADER_TRACEPARENT).map(str::to_owned),
            })),
            _ => None,
        };
        let request = Request {
            service: shared.service.clone(),
            payload,
            content_type: wire::content_type(props).to_owned(),
            correlation_id: props.correlation_id().as_ref().map(|c| c.to_string()),
            message_id: props.message_id().as_ref().map(|c| c.to_string()),
            traceparent: wire::header_str(props, wire::HEADER_TRACEPARENT).map(str::to_owned),
            redelivered: d.redelivered,
            control: CallControl::new(reporter, running.token()),
        };
        let traceparent = request.traceparent.clone();
        let handler = shared.handler.clone();
        let started = std::time::Instant::now();
        let outcome = AssertUnwindSafe(async move { handler.handle(request).await })
            .catch_unwind()
            .await;
        shared.stats.handler_time.observe(started.elapsed());
        if running.token().is_cancelled() {
            // Whatever the handler answered, nobody wants it: the call ended.
            debug!("the call was cancelled while its handler ran: no reply");
            shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            settle(inflight.ack().await);
            return Outcome::Answered;
        }
        drop(running);
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
        let caller_waits = wire::caller_waits(&d.properties);
        if let Some(reply_to) = d.properties.reply_to().clone() {
            // Owned: the delivery goes to whoever settles it.
            let reply_to = reply_to.as_str();
            let correlation_id = d.properties.correlation_id().clone();
            let props = || {
                wire::reply_properties_for(
                    correlation_id.as_ref(),
                    reply.status,
                    &reply.content_type,
                    traceparent.as_deref(),
                    caller_waits,
                )
            };
            // Kept only if it cannot be published now.
            let unsent = |mandatory| {
                Arc::new(UnsentReply {
                    reply_to: reply_to.to_owned(),
                    body: reply.body.clone(),
                    properties: props(),
                    mandatory,
                })
            };
            if caller_waits
                && let Some(channel) = channel.as_ref().filter(|c| c.status().connected())
            {
                let written = reply_unconfirmed(
                    &shared,
                    inflight,
                    channel,
                    reply_to,
                    &reply.body,
                    &props,
                    reply.status,
                )
                .await;
                return written.unwrap_or_else(|()| Outcome::Unsent(unsent(false)));
            }
            // RabbitMQ returns mandatory publishes to direct reply-to
            // addresses even when it delivers them: only ask for returns
            // where they mean "the caller's queue is gone".
            let mandatory = !reply_to.starts_with(wire::DIRECT_REPLY_TO);
            let msg = Outgoing {
                exchange: "",
                routing_key: reply_to,
                payload: &reply.body,
                properties: props(),
                mandatory,
            };
            let published = publish_to_caller(&shared.broker, channel.as_deref(), msg).await;
            match published {
                Ok(()) => {}
                Err(Error::NoRoute { .. }) => {
                    debug!(%reply_to, "the caller's reply queue is gone: reply dropped")
                }
                Err(e) => {
                    // Not the request's fault: handed back, not rejected,
                    // and the reply kept for the copy that comes back.
                    warn!(error = %e, "reply not published: request handed back, reply kept for its copy");
                    shared.stats.requeued.fetch_add(1, Ordering::Relaxed);
                    let kept = unsent(mandatory);
                    settle(inflight.hand_back().await);
                    return Outcome::Unsent(kept);
                }
            }
        }
        shared.stats.replied.fetch_add(1, Ordering::Relaxed);
        debug!(status = reply.status, "replied");
        // Not awaited: the reply is confirmed, and a copy of a request lost
        // with its ack is settled by the `message_id` memory.
        settle(inflight.ack_now());
        Outcome::Answered
    }
    .instrument(span)
    .await
}

/// Answers a request whose caller waits in memory
/// ([`wire::HEADER_CALLER_WAITS`]): the reply (transient) is written on the
/// request's channel and the request acked at once, before the broker
/// confirms the reply, as a hand-written responder does. Not `mandatory`:
/// a return would say only that the caller is gone, and nobody is left to
/// act on it.
///
/// The confirm is still awaited after the ack (bounded by the confirm
/// timeout), because the request counts as answered only once its reply is
/// known to be out: should the connection drop with both frames unsent,
/// the request comes back, and a copy of a request remembered as answered
/// would be acked without a reply. Until then a redelivered copy waits
/// (parked, [`Dedup`]); without a confirm the reply is published again
/// through the pool, confirmed (a caller that got the first one drops the
/// second as late), so the handler never runs twice for it. `Err` when the
/// reply is not out either way: the caller keeps it for the request's copy.
async fn reply_unconfirmed(
    shared: &Shared,
    inflight: InFlight,
    channel: &lapin::Channel,
    reply_to: &str,
    body: &[u8],
    props: &dyn Fn() -> lapin::BasicProperties,
    status: u16,
) -> std::result::Result<Outcome, ()> {
    let written = channel
        .basic_publish(
            "".into(),
            reply_to.into(),
            lapin::options::BasicPublishOptions {
                mandatory: false,
                immediate: false,
            },
            body,
            props(),
        )
        .await;
    let confirm = match written {
        Ok(confirm) => confirm,
        Err(e) => {
            // Not written: handed back, as a reply that could not be
            // published (the channel is going; another worker answers).
            warn!(error = %e, "reply not written: request handed back, reply kept for its copy");
            shared.stats.requeued.fetch_add(1, Ordering::Relaxed);
            settle(inflight.hand_back().await);
            return Err(());
        }
    };
    // Not awaited: a lost ack brings a copy that waits for this task.
    settle(inflight.ack_now());
    let confirmed = tokio::time::timeout(shared.broker.confirm_timeout(), confirm).await;
    if !matches!(confirmed, Ok(Ok(lapin::Confirmation::Ack(_)))) {
        debug!("no confirm of the reply to a waiting caller; publishing it again through the pool");
        let again = Outgoing {
            exchange: "",
            routing_key: reply_to,
            payload: body,
            // Built again only here: no copy kept per reply for this case.
            properties: props(),
            mandatory: false,
        };
        if let Err(e) = shared.broker.publish(again).await {
            // Acked already: if the ack was lost too, the copy gets the
            // kept reply.
            warn!(error = %e, "reply to a waiting caller not published: kept for a copy of its request");
            return Err(());
        }
    }
    shared.stats.replied.fetch_add(1, Ordering::Relaxed);
    debug!(status, "replied (the caller waits: acked once written)");
    Ok(Outcome::Answered)
}

/// Answers a copy of a request whose handler ran here before with the
/// reply kept then ([`Outcome::Unsent`]), as [`process`] would have, and
/// without running the handler again.
async fn resend(
    shared: Arc<Shared>,
    inflight: InFlight,
    channel: Option<Arc<lapin::Channel>>,
    reply: Arc<UnsentReply>,
) -> Outcome {
    match publish_to_caller(&shared.broker, channel.as_deref(), reply.outgoing()).await {
        Ok(()) | Err(Error::NoRoute { .. }) => {
            shared.stats.replied.fetch_add(1, Ordering::Relaxed);
            settle(inflight.ack().await);
            Outcome::Answered
        }
        Err(e) => {
            warn!(error = %e, "kept reply not published: request handed back again");
            shared.stats.requeued.fetch_add(1, Ordering::Relaxed);
            settle(inflight.hand_back().await);
            Outcome::Unsent(reply)
        }
    }
}

/// Publishes a reply, confirmed: on the channel its request came on (as a
/// hand-written worker would: no other connection's I/O thread to wake), or,
/// when that fails (the connection is going, no confirm in time, a nack),
/// through the broker's publishing pool, with its retries. A reply that made
/// it on the first way as well reaches its caller twice: the second is
/// counted there as late and dropped. The handler never runs twice for it.
async fn publish_to_caller(
    broker: &Broker,
    channel: Option<&lapin::Channel>,
    msg: Outgoing<'_>,
) -> Result<()> {
    if let Some(channel) = channel.filter(|c| c.status().connected()) {
        let sent = tokio::time::timeout(broker.confirm_timeout(), publish_on(channel, &msg)).await;
        match sent {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e @ Error::NoRoute { .. })) => return Err(e),
            Ok(Err(e)) => {
                debug!(error = %e, "reply not confirmed on the request's channel; publishing it through the pool")
            }
            Err(_) => debug!("no confirm of the reply in time; publishing it through the pool"),
        }
    }
    broker.publish(msg).await
}

/// Publishes a handler's progress reports on its call's `reply_to`, as its
/// reply will be (same channel, confirmed).
struct ProgressReporter {
    shared: Arc<Shared>,
    channel: Option<lapin::Channel>,
    reply_to: String,
    correlation_id: Option<lapin::types::ShortString>,
    traceparent: Option<String>,
}

impl handler::Reporter for ProgressReporter {
    fn report(
        &self,
        fraction: f64,
        note: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + '_>> {
        let note = wire::progress_note(note.as_bytes()).unwrap_or_default();
        Box::pin(async move {
            let msg = Outgoing {
                exchange: "",
                routing_key: &self.reply_to,
                payload: note.as_bytes(),
                properties: wire::progress_properties(
                    self.correlation_id.as_ref(),
                    fraction,
                    self.traceparent.as_deref(),
                ),
                mandatory: !self.reply_to.starts_with(wire::DIRECT_REPLY_TO),
            };
            match publish_to_caller(&self.shared.broker, self.channel.as_ref(), msg).await {
                Ok(()) => {
                    self.shared.stats.progress.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                // The caller is gone: nobody to tell.
                Err(Error::NoRoute { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

/// After a panic or transient failure: rejected for redelivery (which every
/// RabbitMQ version counts against a quorum queue's delivery limit), or, on
/// the last delivery the queue allows, dead-lettered here, once: counted as
/// poison and logged with its queue and message id. Quorum queues say how
/// many deliveries failed before (`x-delivery-count`; the broker would
/// dead-letter it itself on the next return); classic queues count
/// nothing, so there a request that fails again once redelivered ends.
async fn give_back(shared: &Shared, inflight: InFlight) -> Outcome {
    let d = inflight.delivery();
    let failed_before = inflight.failed_deliveries();
    let last = match shared.settings.queue_type {
        QueueType::Classic => d.redelivered,
        QueueType::Quorum => failed_before >= u64::from(shared.settings.delivery_limit),
    };
    if !last {
        shared.stats.requeued.fetch_add(1, Ordering::Relaxed);
        settle(inflight.retry().await);
        return Outcome::GivenBack;
    }
    let message_id = d.properties.message_id().as_ref().map(|m| m.to_string());
    warn!(
        queue = %shared.broker.names().service_queue(&shared.service),
        ?message_id,
        failed_before,
        to = %shared.broker.names().dead_queue(&shared.service),
        "request dead-lettered: its handler failed on every delivery the queue allows"
    );
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    shared.stats.consumer.count_poison();
    settle(inflight.dead_letter().await);
    Outcome::GivenBack
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(body: &'static str) -> Arc<UnsentReply> {
        Arc::new(UnsentReply {
            reply_to: "sb.reply".into(),
            body: bytes::Bytes::from_static(body.as_bytes()),
            properties: lapin::BasicProperties::default(),
            mandatory: true,
        })
    }

    #[test]
    fn a_kept_reply_is_found_until_its_request_is_answered() {
        let mut d = Dedup::default();
        d.keep_unsent("a".into(), reply("1"));
        assert_eq!(&d.unsent["a"].body[..], b"1");
        assert!(!d.done.contains("a"));
        d.remember("a".into());
        assert!(d.unsent.is_empty());
        assert!(d.done.contains("a"));
    }

    #[test]
    fn kept_replies_are_bounded_and_the_oldest_goes_first() {
        let mut d = Dedup::default();
        for i in 0..UNSENT_WINDOW + 10 {
            d.keep_unsent(i.to_string(), reply("x"));
        }
        assert_eq!(d.unsent.len(), UNSENT_WINDOW);
        assert!(!d.unsent.contains_key("0"));
        assert!(!d.unsent.contains_key("9"));
        assert!(d.unsent.contains_key("10"));
        assert!(d.unsent.contains_key(&(UNSENT_WINDOW + 9).to_string()));
        // Answered ids leave their place in the order behind: skipped.
        for i in 10..20 {
            d.remember(i.to_string());
        }
        d.keep_unsent("new".into(), reply("y"));
        assert!(d.unsent.contains_key("new"));
        assert_eq!(d.unsent.len(), UNSENT_WINDOW - 9);
    }

    #[test]
    fn the_order_of_kept_replies_does_not_grow_with_answered_ones() {
        let mut d = Dedup::default();
        for i in 0..10 * UNSENT_WINDOW {
            d.keep_unsent(i.to_string(), reply("x"));
            d.remember(i.to_string());
        }
        assert!(d.unsent.is_empty());
        assert!(d.unsent_order.len() <= 2 * UNSENT_WINDOW);
    }
}
