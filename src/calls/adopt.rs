//! A gateway's liveness in the store, and the adoption of the queues of a
//! gateway that died (see [`super::instances`] for the why).
//!
//! [`spawn`] starts one task per gateway: every [`HEARTBEAT`] it refreshes
//! the gateway's row and, while it drains fewer than [`MAX_ADOPTED`]
//! gateways' queues, claims one silent for [`SILENT_AFTER`]. Each claimed
//! gateway gets a task of its own (`adopt`) that consumes its reply queue
//! and its dead-letter watch queue with supervised consumers and hands
//! every reply to the tracker, as the gateway's own reply router would
//! have (the stored call completes, its event goes out, its callback is
//! scheduled). Once both queues are empty and the dead gateway has no
//! pending call left, its row and queues are deleted. If the gateway comes
//! back meanwhile (its heartbeat withdraws the claim), the adopter lets go.
//! On a graceful stop, the gateway marks itself silent at once, so that its
//! queues are adopted without waiting.
//!
//! # Layout
//! - [`spawn`]: the liveness task; `adopt`: draining one dead gateway.
//! - [`AdoptStats`] and its metrics source (`switchboard_rpc_adopted_queues`,
//!   `switchboard_rpc_adopted_replies_total`).

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use deadpool_lapin::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use deadpool_lapin::lapin::{Connection, types::FieldTable};
use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::instances::{HEARTBEAT, SILENT_AFTER, Silent};
use super::tracker::{Outcome, Tracker};
use crate::amqp::consumer::{Consuming, Declare, settle};
use crate::amqp::{Broker, ConsumerSpec, InFlight, Supervisor, topology, wire};
use crate::error::Result;
use crate::metrics::{Collected, Source};

/// How many dead gateways one gateway drains at once: a bound on the
/// connections adoption opens (two per dead gateway); others wait for a
/// later round, or for another gateway.
pub(crate) const MAX_ADOPTED: usize = 4;

/// How often an adopter looks at the dead gateway's queues and calls (and
/// whether it still holds the claim) while nothing arrives.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Adoption's numbers.
#[derive(Debug, Default)]
pub(crate) struct AdoptStats {
    /// Dead gateways drained now.
    queues: AtomicI64,
    /// Replies taken from their reply queues and handed to the tracker.
    replies: AtomicU64,
}

impl AdoptStats {
    /// Dead gateways drained now.
    pub(crate) fn queues(&self) -> i64 {
        self.queues.load(Ordering::Relaxed)
    }

    /// Replies taken from dead gateways' reply queues.
    pub(crate) fn replies(&self) -> u64 {
        self.replies.load(Ordering::Relaxed)
    }
}

/// [`AdoptStats`] as a metrics source, read at scrape time.
struct AdoptSource(Arc<AdoptStats>);

impl Source for AdoptSource {
    fn collect(&self, out: &mut Collected) {
        let v = out.values::<crate::rpc::metrics::RpcValues>();
        v.adopted_queues += self.0.queues();
        v.adopted_replies += self.0.replies();
    }
}

/// Starts the liveness task of the gateway whose tracker is `tracker` (its
/// store must be [`super::CallStore::for_instance`] the broker's
/// instance). It runs until `cancel`, then marks the gateway gone; await
/// the handle before closing the store.
pub(crate) fn spawn(
    tracker: Tracker,
    cancel: CancellationToken,
) -> (Arc<AdoptStats>, JoinHandle<()>) {
    let broker = tracker.broker().clone();
    let stats = Arc::new(AdoptStats::default());
    broker.metrics().register(AdoptSource(stats.clone()));
    let me = broker.instance_id().to_owned();
    let reply_queue = broker.names().reply_queue(&me);
    let deadwatch_queue = broker.names().deadwatch_queue(&me);
    let adopting: Arc<Mutex<HashSet<String>>> = Arc::default();
    let task_stats = stats.clone();
    let handle = tokio::spawn(async move {
        let store = tracker.store().clone();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = store.heartbeat(&reply_queue, &deadwatch_queue).await {
                warn!(error = %e, "instance heartbeat not recorded");
                continue;
            }
            let busy = lock(&adopting).len();
            if busy >= MAX_ADOPTED {
                continue;
            }
            let silent = match store.claim_silent(SILENT_AFTER).await {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    warn!(error = %e, "cannot look for silent instances");
                    continue;
                }
            };
            if !lock(&adopting).insert(silent.id.clone()) {
                continue;
            }
            info!(dead = %silent.id, reply_queue = %silent.reply_queue, "adopting the queues of a silent instance");
            let (tracker, stats, cancel, adopting) = (
                tracker.clone(),
                task_stats.clone(),
                cancel.clone(),
                adopting.clone(),
            );
            tokio::spawn(async move {
                stats.queues.fetch_add(1, Ordering::Relaxed);
                let run = AssertUnwindSafe(adopt(&tracker, &silent, &stats, &cancel))
                    .catch_unwind()
                    .await;
                if run.is_err() {
                    // Its consumers were dropped with it (their deliveries
                    // go back to the queue): let it be claimed again.
                    warn!(dead = %silent.id, "adoption panicked; withdrawn");
                    if let Err(e) = tracker.store().withdraw(&silent.id).await {
                        warn!(dead = %silent.id, error = %e, "adoption not withdrawn");
                    }
                }
                stats.queues.fetch_sub(1, Ordering::Relaxed);
                lock(&adopting).remove(&silent.id);
            });
        }
        if let Err(e) = store.mark_gone().await {
            warn!(error = %e, "could not mark this instance gone; others adopt its queues once it is silent");
        }
    });
    (stats, handle)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A dead gateway's queue, declared as its owner declared it (the same
/// arguments: one deployment shares its settings), so that a queue the
/// broker already removed is no error.
struct AdoptedQueue(String);

#[async_trait::async_trait]
impl Declare for AdoptedQueue {
    async fn declare(&self, broker: &Broker, conn: &Connection) -> Result<String> {
        let declared = topology::declare_instance_queue(
            conn,
            &self.0,
            broker.instance_queue_expires(),
            broker.instance_queue_type(),
        )
        .await?;
        crate::amqp::consumer::note_declared(&self.0, declared);
        Ok(self.0.clone())
    }
}

/// Supervised consumers of one dead gateway's reply and dead-letter queues.
struct Drains {
    replies: Consuming,
    dead: Consuming,
}

impl Drains {
    async fn start(broker: &Broker, silent: &Silent) -> Result<Self> {
        let spec = |tag: &str| ConsumerSpec {
            name: "adopted".into(),
            tag: tag.into(),
            // Bounds the replies held in memory at once.
            prefetch: Some(64),
            confirm: false,
        };
        let replies = Consuming::start(Supervisor::new(
            broker,
            spec("adopted-replies"),
            AdoptedQueue(silent.reply_queue.clone()),
        ))
        .await?;
        let dead = Consuming::start(Supervisor::new(
            broker,
            spec("adopted-deadwatch"),
            AdoptedQueue(silent.deadwatch_queue.clone()),
        ))
        .await?;
        Ok(Self { replies, dead })
    }

    async fn stop(self, why: &str) {
        self.replies.stop(why).await;
        self.dead.stop(why).await;
    }
}

/// Drains dead gateway `silent`'s queues into `tracker` until they are
/// empty and it has no pending call left (then deletes them and its row),
/// it comes back, another gateway takes it over, or `cancel`.
async fn adopt(tracker: &Tracker, silent: &Silent, stats: &AdoptStats, cancel: &CancellationToken) {
    let broker = tracker.broker();
    let store = tracker.store();
    let mut drains = None;
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether a message came since the last check: the queues' counts do
    // not include what is on its way to this consumer.
    let mut quiet = false;
    // The end events the dead gateway owed (calls it expired or cancelled,
    // their event not confirmed): published here before it is let go.
    let mut owed_out = publish_owed(tracker, silent).await;
    loop {
        let Some(d) = drains.as_mut() else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = check.tick() => {}
            }
            match store.still_adopted(&silent.id).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    warn!(dead = %silent.id, error = %e, "cannot read the adoption");
                    continue;
                }
            }
            match Drains::start(broker, silent).await {
                Ok(started) => drains = Some(started),
                Err(e) => {
                    warn!(dead = %silent.id, error = %e, "cannot consume an adopted queue yet")
                }
            }
            continue;
        };
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => Next::Stop,
            delivery = d.replies.next() => Next::Reply(delivery),
            delivery = d.dead.next() => Next::DeadLetter(delivery),
            _ = check.tick() => Next::Check,
        };
        match next {
            Next::Stop => {
                stop_drains(&mut drains, "shutdown").await;
                return;
            }
            Next::Reply(delivery) => {
                quiet = false;
                take_reply(tracker, &d.replies, InFlight::new(delivery), stats).await;
            }
            Next::DeadLetter(delivery) => {
                quiet = false;
                tracker
                    .take_dead_letter(&d.dead, InFlight::new(delivery))
                    .await;
            }
            Next::Check => {
                match store.still_adopted(&silent.id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        info!(dead = %silent.id, "adoption withdrawn (the instance came back, or another took it over)");
                        stop_drains(&mut drains, "adoption withdrawn").await;
                        return;
                    }
                    Err(e) => {
                        warn!(dead = %silent.id, error = %e, "cannot read the adoption");
                        continue;
                    }
                }
                if !owed_out {
                    owed_out = publish_owed(tracker, silent).await;
                }
                let was_quiet = std::mem::replace(&mut quiet, true);
                if was_quiet
                    && owed_out
                    && drained(broker, silent).await
                    && let Some(d) = drains.take()
                {
                    drains = finish(tracker, silent, d).await;
                    if drains.is_none() {
                        return;
                    }
                }
            }
        }
    }
}

/// Publishes the end events dead gateway `silent` owes
/// ([`Tracker::publish_owed_ends`]); whether none is left.
async fn publish_owed(tracker: &Tracker, silent: &Silent) -> bool {
    match tracker
        .publish_owed_ends(&silent.id, wire::now_ms() as i64 + 1)
        .await
    {
        Ok(0) => true,
        Ok(left) => {
            warn!(dead = %silent.id, left, "end events owed by the adopted instance not all published yet");
            false
        }
        Err(e) => {
            warn!(dead = %silent.id, error = %e, "end events owed by the adopted instance not published");
            false
        }
    }
}

/// What woke an adopter.
enum Next {
    Stop,
    Reply(deadpool_lapin::lapin::message::Delivery),
    DeadLetter(deadpool_lapin::lapin::message::Delivery),
    Check,
}

async fn stop_drains(drains: &mut Option<Drains>, why: &str) {
    if let Some(d) = drains.take() {
        d.stop(why).await;
    }
}

/// Both queues' ready messages are zero (false if they cannot be read).
async fn drained(broker: &Broker, silent: &Silent) -> bool {
    let Ok(ch) = broker.channel().await else {
        return false;
    };
    let mut empty = true;
    for q in [&silent.reply_queue, &silent.deadwatch_queue] {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match ch
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(queue) if queue.message_count() == 0 => {}
            _ => {
                empty = false;
                break;
            }
        }
    }
    crate::amqp::close_channel(&ch, "adopted queues counted").await;
    empty
}

/// The adopted queues are empty: from now on the dead gateway's calls may
/// be expired here; if none is pending, lets it go (its row, then its
/// queues). Returns the consumers when adoption goes on.
async fn finish(tracker: &Tracker, silent: &Silent, drains: Drains) -> Option<Drains> {
    let store = tracker.store();
    if let Err(e) = store.mark_drained(&silent.id).await {
        warn!(dead = %silent.id, error = %e, "cannot record the adopted queues as drained");
        return Some(drains);
    }
    match store.pending_of(&silent.id).await {
        Ok(0) => {}
        Ok(_) => return Some(drains),
        Err(e) => {
            warn!(dead = %silent.id, error = %e, "cannot count the adopted instance's calls");
            return Some(drains);
        }
    }
    match store.release(&silent.id, SILENT_AFTER).await {
        Ok(true) => {}
        // It came back, or another took it over: the check says which.
        Ok(false) => return Some(drains),
        Err(e) => {
            warn!(dead = %silent.id, error = %e, "cannot let go of the adopted instance");
            return Some(drains);
        }
    }
    // Stopped first: a consumer whose queue is deleted would declare it again.
    drains.stop("adopted queues drained").await;
    delete_queues(tracker.broker(), silent).await;
    info!(dead = %silent.id, "adopted instance drained; its queues and row are deleted");
    None
}

async fn delete_queues(broker: &Broker, silent: &Silent) {
    for q in [&silent.reply_queue, &silent.deadwatch_queue] {
        let deleted = match broker.channel().await {
            Ok(ch) => {
                let r = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
                crate::amqp::close_channel(&ch, "adopted queue deleted").await;
                r.map(|_| ()).map_err(crate::Error::from)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = deleted {
            // Its `x-expires` removes it in the end.
            warn!(queue = %q, error = %e, "adopted queue not deleted");
        }
    }
}

/// Hands a reply (or a progress report) of the dead gateway's reply queue
/// to the tracker, as its reply router would have; acked once recorded.
async fn take_reply(
    tracker: &Tracker,
    from: &Consuming,
    mut inflight: InFlight,
    stats: &AdoptStats,
) {
    let props = inflight.delivery().properties.clone();
    let Some(id) = props.correlation_id().as_ref().map(|c| c.to_string()) else {
        from.supervisor()
            .quarantine(inflight, "a reply without a correlation id")
            .await;
        return;
    };
    if let Some(fraction) = wire::progress_of(&props) {
        // A report is not worth a retry: taken or dropped, it is acked.
        if let Ok(fraction) = fraction {
            let note = wire::progress_note(&inflight.delivery().data);
            tracker
                .progress(crate::worker::Progress {
                    call_id: id,
                    fraction,
                    note,
                })
                .await;
        }
        settle(inflight.ack().await);
        return;
    }
    // The dead gateway may have died between the call's `202` and the
    // confirm of its `accepted` event: published again (the same id)
    // before the call's end, which a subscriber must not see first.
    if let Err(e) = tracker.publish_accepted_again(&id).await {
        warn!(call_id = %id, error = %e, "accepted event of an adopted call not published again");
    }
    let again = inflight.delivery().redelivered;
    let body: Bytes = inflight.take_payload();
    let reply = crate::rpc::to_reply(inflight.delivery(), body, &id);
    if tracker.record_end(&id, Outcome::Reply(reply), again).await {
        stats.replies.fetch_add(1, Ordering::Relaxed);
        settle(inflight.ack().await);
    } else {
        from.supervisor()
            .quarantine(inflight, "a reply the call store failed to take")
            .await;
    }
}
