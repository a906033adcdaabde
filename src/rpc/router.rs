//! [`ReplyRouter`]: the actor that owns the reply consumer of one RPC client
//! and routes each reply to its waiter in [`PendingCalls`] (correlation id
//! to waiter, with deadlines).
//!
//! Callers register and forget their calls in [`PendingCalls`] directly,
//! under a short lock, rather than through the actor's mailbox: a call costs
//! no round trip through the actor before its request is published.
//!
//! The reply consumer is a supervised consumer
//! ([`crate::amqp::consumer`]): lost, it comes back by itself, and a
//! [`Keeper`](crate::amqp::consumer::Keeper) starts a new router if this one
//! stops or panics (the pending calls, shared, stay).
//!
//! A reply with an unknown correlation id is dropped and counted; a reply
//! for a call whose deadline passed is counted as late. A reply without a
//! correlation id can never reach a call: it is poison, moved once to
//! `<prefix>.poison` (queue mode). A reply that the orphan sink fails to
//! take (the call store is down) is offered again for [`SINK_PATIENCE`],
//! then moved there too.
//!
//! A message with the header `x-sb-progress` is a progress report, never a
//! reply: it goes to its caller's progress channel when the caller asked
//! for one ([`PendingCalls::register_with_progress`]), else to the progress
//! sink (the gateway's stored calls), else it is dropped and counted. A
//! report for a call that has ended (late, after its reply) is dropped the
//! same way: it finds no waiter, and the sink finds the call ended.
//!
//! Nothing a peer sends can make the map grow: entries are added only by
//! [`PendingCalls::register_with_progress`] (bounded by `max_pending`) and removed by the
//! reply, by [`PendingCalls::forget`] (the caller gave up) or by the
//! deadline sweep.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use deadpool_lapin::lapin::{Channel, message::Delivery};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::amqp::consumer::{ActorConsumer, Consumes, Event, Link, settle};
use crate::amqp::delivery::SETTLE_TIMEOUT;
use crate::amqp::{AckBatch, InFlight, wire};
use crate::error::Error;
use crate::message::Reply;
use crate::settings::ReplyMode;

/// How many recently forgotten call ids are remembered to tell a late reply
/// from an unknown one. Bounded: it is only for counting.
const RECENT_FORGOTTEN: usize = 4096;

/// Counters of one RPC client.
#[derive(Debug, Default)]
pub struct RpcStats {
    /// Calls waiting for a reply now.
    pub pending: AtomicU64,
    /// Replies routed to their caller.
    pub routed: AtomicU64,
    /// Replies no caller waited for that the orphan sink took (the
    /// gateway's stored calls).
    pub handed_off: AtomicU64,
    /// Replies for calls whose caller had given up (deadline passed).
    pub late: AtomicU64,
    /// Replies whose correlation id matches no call.
    pub unknown: AtomicU64,
    /// Replies without a usable correlation id.
    pub malformed: AtomicU64,
    /// Calls that reached their deadline without a reply.
    pub timed_out: AtomicU64,
    /// Progress reports handed to their caller or to the progress sink.
    pub progress_routed: AtomicU64,
    /// Progress reports nobody took: for no call followed here, of a call
    /// that has ended, of a caller that does not keep up, or malformed.
    pub progress_dropped: AtomicU64,
}

impl RpcStats {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    /// Replies dropped as late, unknown or malformed.
    pub fn dropped(&self) -> u64 {
        Self::get(&self.late) + Self::get(&self.unknown) + Self::get(&self.malformed)
    }
}

/// Where replies for calls this router does not know go, when set: the
/// gateway uses it to finish calls that outlived the process that made them
/// (the router acks such a reply only after the returned future resolves).
/// The sink's future says whether it took the reply (`Ok(true)`: a stored
/// call ended; `Ok(false)`: no call of its own), or that it failed (`Err`:
/// the store is down), in which case the reply is offered again.
pub type OrphanSink = std::sync::Arc<
    dyn Fn(String, Reply) -> futures_util::future::BoxFuture<'static, crate::error::Result<bool>>
        + Send
        + Sync,
>;

/// Where progress reports of calls this router does not follow go, when
/// set: the gateway records them on its stored calls. The future says
/// whether a call took it (false: no pending call of its own); a failure
/// is the sink's to log: a report is not worth a retry.
pub type ProgressSink = std::sync::Arc<
    dyn Fn(crate::worker::Progress) -> futures_util::future::BoxFuture<'static, bool> + Send + Sync,
>;

/// Progress reports a caller may leave unread before later ones are
/// dropped (it sees the newest it has room for; the reply is never lost).
pub const PROGRESS_BUFFER: usize = 32;

/// A reply on its way to its waiting caller, with its delivery when the
/// reply queue is consumed with acks. The caller settles it once it holds
/// the reply for good ([`Routed::done`]: answered, or stored by the
/// gateway), so that a process killed in between leaves the reply in the
/// durable reply queue rather than losing it with the process.
#[derive(Debug)]
pub struct Routed {
    reply: Reply,
    delivery: Option<InFlight>,
}

impl Routed {
    /// The reply.
    pub fn reply(&self) -> &Reply {
        &self.reply
    }

    /// The caller holds the reply for good: the broker may forget it (acked
    /// in the background: no round trip on the caller's path).
    pub fn done(self) -> Reply {
        if let Some(delivery) = self.delivery {
            ack_later(delivery);
        }
        self.reply
    }

    /// The caller could not keep the reply (its store failed): back to the
    /// queue, unprocessed; redelivered, it goes to the orphan sink.
    pub async fn hand_back(self) {
        if let Some(delivery) = self.delivery {
            settle(delivery.hand_back().await);
        }
    }
}

/// Acks `delivery` without waiting for the frame to be written
/// ([`InFlight::ack_now`]): no task or timer per reply. A lost ack brings
/// the reply back, and it is dropped as late.
fn ack_later(delivery: InFlight) {
    settle(delivery.ack_now());
}

struct Waiter {
    tx: oneshot::Sender<Routed>,
    deadline: Instant,
    /// Where the call's progress reports go, when its caller reads them.
    progress: Option<tokio::sync::mpsc::Sender<crate::worker::Progress>>,
}

/// The pending calls of one RPC client, shared by its callers (register,
/// forget) and its router (route, sweep). The lock is never held across an
/// await.
pub(super) struct PendingCalls {
    state: std::sync::Mutex<PendingState>,
    max_pending: usize,
    stats: std::sync::Arc<RpcStats>,
}

#[derive(Default)]
struct PendingState {
    waiters: HashMap<String, Waiter>,
    /// Ids whose caller gave up recently, oldest first (for the `late` count).
    forgotten: VecDeque<String>,
    forgotten_set: HashSet<String>,
}

impl PendingState {
    fn remember_forgotten(&mut self, id: String) {
        if self.forgotten.len() >= RECENT_FORGOTTEN
            && let Some(old) = self.forgotten.pop_front()
        {
            self.forgotten_set.remove(&old);
        }
        self.forgotten_set.insert(id.clone());
        self.forgotten.push_back(id);
    }
}

/// Why a call is forgotten ([`PendingCalls::forget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Forget {
    /// Its caller gave up (deadline, drop): a timeout; a reply is late.
    GaveUp,
    /// Its publish failed: an error to its caller, not a timeout; a reply
    /// (of a request that reached a queue although its confirm was lost)
    /// is late.
    Unsent,
    /// Handed over to the orphan sink: not a timeout, and its reply is not
    /// late.
    Detached,
}

impl PendingCalls {
    /// An empty map bounded by `max_pending`.
    pub(super) fn new(max_pending: usize, stats: std::sync::Arc<RpcStats>) -> Self {
        Self {
            state: std::sync::Mutex::new(PendingState::default()),
            max_pending,
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_gauge(&self, len: usize) {
        self.stats.pending.store(len as u64, Ordering::Relaxed);
    }

    /// Registers a call before its request is published, so that even the
    /// fastest reply finds its waiter; with a channel for the call's progress
    /// reports (closed when the call is no longer followed: replied,
    /// forgotten or past its deadline).
    pub(super) fn register_with_progress(
        &self,
        id: String,
        deadline: Instant,
        tx: oneshot::Sender<Routed>,
        progress: Option<tokio::sync::mpsc::Sender<crate::worker::Progress>>,
    ) -> Result<(), Error> {
        let mut st = self.lock();
        if st.waiters.len() >= self.max_pending {
            return Err(Error::Overloaded {
                limit: self.max_pending,
            });
        }
        if st.waiters.contains_key(&id) {
            return Err(Error::DuplicateCall(id));
        }
        st.waiters.insert(
            id,
            Waiter {
                tx,
                deadline,
                progress,
            },
        );
        self.set_gauge(st.waiters.len());
        Ok(())
    }

    /// Forgets a call: its caller gave up, its publish failed, or it was
    /// handed over to the orphan sink ([`Forget`] says which, and so
    /// whether it counts as a timeout and whether its reply is late).
    pub(super) fn forget(&self, id: &str, why: Forget) {
        let mut st = self.lock();
        if st.waiters.remove(id).is_some() {
            self.set_gauge(st.waiters.len());
            if why == Forget::GaveUp {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            if why != Forget::Detached {
                st.remember_forgotten(id.to_owned());
            }
        }
    }

    /// Removes every waiter whose deadline passed or whose caller is gone.
    fn sweep(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        let expired: Vec<String> = st
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline <= now || w.tx.is_closed())
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            st.waiters.remove(&id);
            self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            st.remember_forgotten(id);
        }
        self.set_gauge(st.waiters.len());
    }

    /// Drops every waiter (each caller wakes with `ReplyLost`); returns how
    /// many there were.
    fn clear(&self) -> usize {
        let mut st = self.lock();
        let n = st.waiters.len();
        st.waiters.clear();
        self.set_gauge(0);
        n
    }

    /// Calls waiting now.
    pub(super) fn len(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Whether call `id` is followed here, and where its progress goes:
    /// `None` when it is not followed, `Some(None)` when its caller does not
    /// read progress.
    fn progress_of(
        &self,
        id: &str,
    ) -> Option<Option<tokio::sync::mpsc::Sender<crate::worker::Progress>>> {
        self.lock().waiters.get(id).map(|w| w.progress.clone())
    }

    /// The waiter of `id`, taken out, and whether its caller gave up on it
    /// recently.
    fn take(&self, id: &str) -> (Option<Waiter>, bool) {
        let mut st = self.lock();
        let waiter = st.waiters.remove(id);
        if waiter.is_some() {
            self.set_gauge(st.waiters.len());
        }
        let late = waiter.is_none() && st.forgotten_set.contains(id);
        (waiter, late)
    }
}

/// Where the router puts the channel that direct-mode requests must be
/// published on; empty while it is being re-established.
#[derive(Clone, Default)]
pub(super) struct ChannelSlot(std::sync::Arc<std::sync::RwLock<Option<Arc<Channel>>>>);

impl ChannelSlot {
    /// The current channel (shared: a `Channel` clone per call costs a
    /// reference count per field).
    pub(super) fn get(&self) -> Option<Arc<Channel>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(super) fn set(&self, ch: Option<Arc<Channel>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ch;
    }
}

/// How long a reply whose orphan sink fails (the call store is down) is
/// kept in hand and offered again (100 ms, doubling up to 5 s) before it is
/// settled as poison: a store that is briefly away loses nothing, one that
/// never takes it cannot hold a prefetch slot forever.
pub(super) const SINK_PATIENCE: Duration = Duration::from_secs(60);

/// The actor routing replies to waiting callers.
pub struct ReplyRouter {
    pending: std::sync::Arc<PendingCalls>,
    /// Whether the consumer is no-ack (direct reply-to) or must ack.
    no_ack: bool,
    /// Where unknown and late replies go, if anywhere.
    orphans: Option<OrphanSink>,
    /// Where progress reports of calls not followed here go, if anywhere.
    progress: Option<ProgressSink>,
    stats: std::sync::Arc<RpcStats>,
    mode: ReplyMode,
    /// The supervised reply consumer.
    consumer: ActorConsumer,
    /// Direct mode: where publishers find the channel.
    slot: ChannelSlot,
    /// Replies being settled (offered to the sink, quarantined).
    settling: Settling,
    /// The acks of the current channel's replies, written at the end of a
    /// turn of whoever acks them (a contiguous run as one `multiple` ack).
    acks: Option<Arc<AckBatch>>,
}

impl ReplyRouter {
    /// A router over `consumer` (the client's reply consumer).
    pub(super) fn new(
        mode: ReplyMode,
        consumer: ActorConsumer,
        slot: ChannelSlot,
        pending: std::sync::Arc<PendingCalls>,
        stats: std::sync::Arc<RpcStats>,
        orphans: Option<OrphanSink>,
        progress: Option<ProgressSink>,
    ) -> Self {
        ReplyRouter {
            pending,
            // Direct reply-to is consumed without acks.
            no_ack: mode == ReplyMode::Direct,
            orphans,
            progress,
            stats,
            mode,
            consumer,
            slot,
            settling: Settling::default(),
            acks: None,
        }
    }

    /// Hands a progress report to its caller, or to the progress sink; the
    /// delivery is acked once it is handed on (the sink's future bounds how
    /// many are in hand: the prefetch).
    fn route_progress(
        &mut self,
        progress: crate::worker::Progress,
        delivery: Option<InFlight>,
        ctx: &mut Context<Self>,
    ) {
        let stats = self.stats.clone();
        let count = move |taken: bool| {
            let counter = if taken {
                &stats.progress_routed
            } else {
                &stats.progress_dropped
            };
            counter.fetch_add(1, Ordering::Relaxed);
        };
        let sink = match self.pending.progress_of(&progress.call_id) {
            Some(Some(tx)) => {
                // A caller that does not keep up misses reports, never
                // the reply.
                count(tx.try_send(progress).is_ok());
                None
            }
            // Followed here, by a caller that does not read progress.
            Some(None) => {
                count(false);
                None
            }
            None => match self.progress.clone() {
                Some(sink) => Some((sink, progress)),
                None => {
                    debug!(call_id = %progress.call_id, "progress of a call not followed here dropped");
                    count(false);
                    None
                }
            },
        };
        ctx.spawn(
            async move {
                if let Some((sink, progress)) = sink {
                    count(sink(progress).await);
                }
                if let Some(delivery) = delivery {
                    settle(delivery.ack().await);
                }
            }
            .into_actor(self),
        );
    }

    /// Hands a reply with call id `id` (and its delivery, to settle) to its
    /// waiter; returns both when no waiter takes them.
    fn route(
        &mut self,
        id: String,
        reply: Reply,
        delivery: Option<InFlight>,
    ) -> Option<(Orphan, Option<InFlight>)> {
        let (waiter, late) = self.pending.take(&id);
        let Some(waiter) = waiter else {
            return Some((Orphan { id, reply, late }, delivery));
        };
        match waiter.tx.send(Routed { reply, delivery }) {
            Ok(()) => {
                self.stats.routed.fetch_add(1, Ordering::Relaxed);
                None
            }
            // The caller let go in between: the reply is an orphan after all.
            Err(Routed { reply, delivery }) => Some((
                Orphan {
                    id,
                    reply,
                    late: true,
                },
                delivery,
            )),
        }
    }
}

impl ReplyRouter {
    /// A delivery to settle (consumed with acks): told to the ack batch of
    /// the channel it came on (a new batch for a new channel), so that its
    /// ack is written with the others of the same turn.
    fn inflight(&mut self, delivery: Delivery) -> InFlight {
        let Some(channel) = self.consumer.link().map(|l| l.shared_channel().clone()) else {
            return InFlight::new(delivery);
        };
        if !self.acks.as_ref().is_some_and(|b| b.is_for(&channel)) {
            self.acks = Some(AckBatch::new(channel));
        }
        InFlight::new(delivery).batched(self.acks.as_ref().expect("set above"))
    }
}

impl Consumes for ReplyRouter {
    fn consumer(&mut self) -> &mut ActorConsumer {
        &mut self.consumer
    }

    fn linked(&mut self, link: &Link, _: &mut Context<Self>) {
        if self.mode == ReplyMode::Direct {
            self.slot.set(Some(link.shared_channel().clone()));
        }
        info!(pending = self.pending.len(), queue = %link.queue(), "reply consumer ready");
    }

    /// In direct mode the replies of pending calls can no longer arrive (the
    /// pseudo-queue was the old channel's): those calls fail at once.
    fn unlinked(&mut self, _: &mut Context<Self>) {
        self.slot.set(None);
        if self.mode == ReplyMode::Direct {
            // Dropping the senders wakes each caller with ReplyLost.
            let calls = self.pending.clear();
            if calls > 0 {
                warn!(
                    calls,
                    "direct reply-to channel lost: its pending calls fail"
                );
            }
        }
    }
}

/// A reply no caller waits for.
struct Orphan {
    id: String,
    reply: Reply,
    /// Whether its caller waited once and gave up.
    late: bool,
}

impl Orphan {
    /// Counts a reply nobody took.
    fn count_dropped(&self, stats: &RpcStats) {
        if self.late {
            stats.late.fetch_add(1, Ordering::Relaxed);
            debug!(call_id = %self.id, "late reply dropped");
        } else {
            stats.unknown.fetch_add(1, Ordering::Relaxed);
            debug!(call_id = %self.id, "reply for an unknown call dropped");
        }
    }
}

/// The reply as callers see it; a malformed status becomes a 502 problem.
pub(crate) fn to_reply(delivery: &Delivery, body: Bytes, id: &str) -> Reply {
    let props = &delivery.properties;
    {
        match wire::reply_status(props) {
            Ok(status) => Reply {
                status,
                content_type: wire::content_type(props).to_owned(),
                body,
            },
            Err(e) => {
                warn!(call_id = id, "reply with a malformed status");
                let title = e.to_string();
                Reply::problem(502, &title, None)
            }
        }
    }
}

impl Actor for ReplyRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ActorConsumer::start(self, ctx);
        // Deadlines are enforced by the callers' timers; the sweep catches
        // callers that vanished without saying so.
        ctx.run_interval(Duration::from_millis(500), |act, _| act.pending.sweep());
    }
}

impl StreamHandler<Event> for ReplyRouter {
    fn handle(&mut self, event: Event, ctx: &mut Self::Context) {
        let Some(mut delivery) = ActorConsumer::delivered(self, event, ctx) else {
            return;
        };
        let Some(id) = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned())
        else {
            // No call can be found for it, ever: poison.
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            if self.no_ack {
                // Direct reply-to: nothing to settle, nowhere to keep it.
                warn!("reply without correlation id dropped");
                return;
            }
            let supervisor = self.consumer.supervisor().clone();
            let inflight = self.inflight(delivery);
            let settling = self.settling.start();
            ctx.spawn(
                async move {
                    let _settling = settling;
                    supervisor
                        .quarantine(inflight, "a reply without a correlation id")
                        .await
                }
                .into_actor(self),
            );
            return;
        };
        if let Some(fraction) = wire::progress_of(&delivery.properties) {
            let note = wire::progress_note(&delivery.data);
            let inflight = (!self.no_ack).then(|| self.inflight(delivery));
            let Ok(fraction) = fraction else {
                // A report that says nothing: dropped, never a reply.
                warn!(call_id = %id, "progress report with a malformed x-sb-progress dropped");
                self.stats.progress_dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(inflight) = inflight {
                    ctx.spawn(async move { settle(inflight.ack().await) }.into_actor(self));
                }
                return;
            };
            let progress = crate::worker::Progress {
                call_id: id,
                fraction,
                note,
            };
            self.route_progress(progress, inflight, ctx);
            return;
        }
        let body = Bytes::from(std::mem::take(&mut delivery.data));
        let reply = to_reply(&delivery, body, &id);
        // Acked on the channel it came on (InFlight::ack_now), by its ack
        // batch.
        let inflight = (!self.no_ack).then(|| self.inflight(delivery));
        // Routed: its caller settles it once it holds the reply for good.
        let Some((orphan, inflight)) = self.route(id, reply, inflight) else {
            return;
        };
        let Some(sink) = self.orphans.clone() else {
            orphan.count_dropped(&self.stats);
            if let Some(inflight) = inflight {
                let settling = self.settling.start();
                ctx.spawn(
                    async move {
                        let _settling = settling;
                        settle(inflight.ack().await)
                    }
                    .into_actor(self),
                );
            }
            return;
        };
        let stats = self.stats.clone();
        let Some(inflight) = inflight else {
            // No acks (direct reply-to): the sink takes it or it is dropped.
            ctx.spawn(
                async move {
                    match sink(orphan.id.clone(), orphan.reply.clone()).await {
                        Ok(true) => {
                            stats.handed_off.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => orphan.count_dropped(&stats),
                    }
                }
                .into_actor(self),
            );
            return;
        };
        let supervisor = self.consumer.supervisor().clone();
        let settling = self.settling.start();
        ctx.spawn(
            async move {
                let _settling = settling;
                // An orphan is acked only once its sink has taken it (or
                // said it is no call of its own).
                match offer(&sink, &orphan).await {
                    Ok(true) => {
                        stats.handed_off.fetch_add(1, Ordering::Relaxed);
                        settle(inflight.ack().await);
                    }
                    Ok(false) => {
                        orphan.count_dropped(&stats);
                        settle(inflight.ack().await);
                    }
                    Err(()) => {
                        supervisor
                            .quarantine(inflight, "a reply the call store failed to take")
                            .await
                    }
                }
            }
            .into_actor(self),
        );
    }

    fn finished(&mut self, _: &mut Self::Context) {
        // Every stream ends with a `Lost` event, handled above; the default
        // would stop the actor.
    }
}

/// Offers an orphan to the sink until it answers, for at most
/// [`SINK_PATIENCE`]; `Err` when it failed all that time.
async fn offer(sink: &OrphanSink, orphan: &Orphan) -> Result<bool, ()> {
    let give_up = Instant::now() + SINK_PATIENCE;
    let mut pause = Duration::from_millis(100);
    loop {
        match sink(orphan.id.clone(), orphan.reply.clone()).await {
            Ok(taken) => return Ok(taken),
            Err(e) if Instant::now() + pause < give_up => {
                warn!(call_id = %orphan.id, error = %e, retry_in = ?pause, "reply could not be stored; offered again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                warn!(call_id = %orphan.id, error = %e, "reply could not be stored");
                return Err(());
            }
        }
    }
}

/// Settlements under way. A graceful stop waits (up to
/// [`SETTLE_TIMEOUT`]) until none is left, so that a reply being offered
/// to the store or quarantined is not handed back to the queue half-done.
#[derive(Clone, Default)]
struct Settling(Arc<(AtomicUsize, tokio::sync::Notify)>);

/// One settlement under way; ends when dropped.
struct SettlingOne(Settling);

impl Settling {
    fn start(&self) -> SettlingOne {
        self.0.0.fetch_add(1, Ordering::SeqCst);
        SettlingOne(self.clone())
    }

    /// Returns once no settlement is under way, or after `limit`.
    async fn idle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.0.0.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for SettlingOne {
    fn drop(&mut self) {
        if self.0.0.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.0.1.notify_waiters();
        }
    }
}

/// Stop consuming and close the connection once the replies being settled
/// are (at most [`SETTLE_TIMEOUT`]); replies still on the way stay in the
/// durable reply queue for the next start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;

impl Handler<Close> for ReplyRouter {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Close, ctx: &mut Self::Context) -> Self::Result {
        self.slot.set(None);
        let link = ActorConsumer::stop(self, ctx);
        let settling = self.settling.clone();
        let acks = self.acks.clone();
        Box::pin(async move {
            settling.idle(SETTLE_TIMEOUT).await;
            if let Some(acks) = acks {
                // Acks asked for in this turn, written before the close.
                settle(acks.flush());
            }
            if let Some(link) = link {
                link.stop("shutdown").await;
            }
        })
    }
}
