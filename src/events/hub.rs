//! [`EventHub`]: the actor that relays everything published on the events
//! fanout to in-process stream sessions (the gateway's SSE and WebSocket
//! clients).
//!
//! Public: an application that serves event streams on routes of its own
//! starts a hub and relays its sessions with [`crate::gateway::streams`]
//! (`tests/it/hub.rs` does exactly that).
//!
//! The hub consumes the events log `<prefix>.events.log` (`events::log`, a
//! stream bound to `<prefix>.events`) from `next`, on a dedicated connection
//! (`switchboard/<instance>/hub`), a supervised consumer
//! ([`crate::amqp::consumer`]): lost, it comes back at the offset after the
//! last one it saw, so it misses nothing the log still holds; and a
//! [`Keeper`] starts a new hub if this one stops or panics (its sessions
//! end; clients resume from their last position). Each valid CloudEvent is
//! kept in a bounded history ring under its offset in the log and offered
//! to every session whose [`EventFilter`] matches it. Messages that are not
//! CloudEvents are skipped and counted (the events exchange is shared with
//! every client of the vhost).
//!
//! # Bounds
//! - sessions: at most [`HubOptions::max_sessions`]; one more is refused with
//!   [`HubError::TooManySessions`];
//! - per session: a channel of [`HubOptions::session_buffer`] events. The hub
//!   never waits for a session: when its channel is full, the session is
//!   dropped (its stream ends, [`HubStats::dropped_slow`] counts it) and the
//!   client may come back with its last position;
//! - history: the last [`HubOptions::history`] events, and at most
//!   [`HubOptions::history_bytes`] of them ([`HubEvent::size`]); an event
//!   larger than that is relayed but not kept, and the history before it is
//!   dropped (whoever resumes from before it is served from the log, as the
//!   history would have a hole);
//! - sessions resumed from the log: a reader each, counted among the
//!   sessions; it waits for its client (a channel of `session_buffer`), and
//!   the broker sends it at most `events::log::READER_PREFETCH` unacked;
//! - broker: a prefetch of [`PREFETCH`] unacked deliveries.
//!
//! # Positions and resuming
//! An event's position is its offset in the events log, in decimal: every
//! instance reads the same log, so every instance gives an event the same
//! position, before and after any restart. A subscriber that gives the
//! position `n` of the last event it saw ([`Subscribe::last_event_id`]) gets
//! exactly the matching events after it, then live ones, with no loss and
//! no repeat, in one of two ways:
//! - the history holds every offset from `n + 1` on (the usual case: a
//!   client that reconnects after a moment, to this instance or another that
//!   has run as long): the events after `n` from the history, then live
//!   ones. The replay and the registration happen in one actor step, so no
//!   live event can slip in between;
//! - else (older than the history, this hub started after it, or ahead of
//!   what this hub has seen yet): a reader of its own
//!   (`events::log::read_from`) consumes the log from offset `n + 1` and
//!   goes on live, so there is no seam to cross. If the log starts after
//!   `n + 1` (retention), the session gets a `switchboard.events.lost` event
//!   first (`events::log::lost`). Such a reader costs a channel and a
//!   consumer on the broker for as long as the session lives: the history
//!   keeps that for clients that come back late.
//!
//! A position that is not a number is unknown: the session starts live with
//! [`Subscribed::gap`] set. If the hub's own consumer finds a hole in the
//! log (it was away longer than the retention), its sessions get a
//! `switchboard.events.lost` event for it.
//!
//! The replay never counts against the session's buffer: the channel of a
//! resumed session holds the replay plus `session_buffer`, so a large
//! history replayed to a small buffer does not drop the session. That is
//! still bounded (at most `history + session_buffer` events per session).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::CloudEvent;
use super::log::LogQueue;
use crate::amqp::consumer::{ActorConsumer, ConsumerStatus, Consumes, Event, Keeper, Link, settle};
use crate::amqp::topology::EventsLog;
use crate::amqp::{Broker, ConsumerSpec, InFlight, Supervisor, wire};
use crate::error::Result;

/// Unacked deliveries the broker may hand the hub at once: bounds what waits
/// in memory between the socket and the actor.
pub const PREFETCH: u16 = 256;

/// The least number of lifecycle event ids a hub remembers to drop copies
/// (`RecentIds`); more with a longer history.
pub const RECENT_IDS_MIN: usize = 4096;

/// How often sessions whose receiver is gone are swept out, so that a client
/// that left is not counted against `max_sessions` until the next matching
/// event happens to reach it.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The hub's bounds.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Events kept for resuming with a last event id (0: every client that
    /// resumes is served from the log).
    pub history: usize,
    /// Bytes of events kept for resuming ([`HubEvent::size`]), beside the
    /// count: the oldest go first when either is reached.
    pub history_bytes: usize,
    /// Sessions at once; one more is refused.
    pub max_sessions: usize,
    /// Events queued per session before it is dropped as slow (at least 1).
    pub session_buffer: usize,
    /// The retention the events log is declared with, if the hub is the
    /// first to declare it (`amqp.events_log_*`).
    pub log: EventsLog,
}

/// One event as the hub relays it. Shared by the history and every session
/// (`Arc<HubEvent>`), so relaying to many sessions copies no payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEvent {
    /// Its offset in the events log.
    pub seq: u64,
    /// Resumable position, the offset in decimal: what SSE sends as `id:`
    /// and takes back as `Last-Event-ID`.
    pub position: String,
    /// The CloudEvent type (for filters and the SSE `event:` field).
    pub ty: String,
    /// The CloudEvent subject (for filters).
    pub subject: Option<String>,
    /// The caller a call lifecycle event belongs to (extension
    /// `switchboardcaller`), so streams show each caller only its own calls.
    pub caller: Option<String>,
    /// The CloudEvent as one line of compact JSON.
    pub json: Bytes,
}

impl HubEvent {
    /// The event at `offset` in the log, from a delivery's body; `None` when
    /// the body is not a CloudEvent.
    #[cfg(test)]
    pub(crate) fn parse(offset: u64, body: &[u8]) -> Option<Self> {
        Self::parse_with_id(offset, body).map(|(ev, _)| ev)
    }

    /// The event at `offset`, as `parse` makes it, with the CloudEvent's id.
    pub(crate) fn parse_with_id(offset: u64, body: &[u8]) -> Option<(Self, String)> {
        let event: CloudEvent = serde_json::from_slice(body).ok()?;
        // Re-encoded rather than passed through: compact JSON has no raw
        // newline, so it is one SSE `data:` line and one WebSocket frame.
        let json = serde_json::to_vec(&event).ok()?;
        let id = event.id;
        let ev = Self {
            seq: offset,
            position: offset.to_string(),
            caller: event
                .extensions
                .get(crate::amqp::wire::EXT_CALLER)
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            ty: event.ty,
            subject: event.subject,
            json: Bytes::from(json),
        };
        Some((ev, id))
    }
}

/// The ids of the last call lifecycle events relayed (`switchboard.call.*`),
/// so that a copy of one is dropped: such an event may be published twice
/// with the same id (at least once across a gateway's death, see
/// RELIABILITY.md). Kept as 64-bit hashes, at most a bound of them, the
/// oldest forgotten first.
#[derive(Debug)]
pub(crate) struct RecentIds {
    set: std::collections::HashSet<u64>,
    order: VecDeque<u64>,
    bound: usize,
}

/// The type prefix of the events [`RecentIds`] deduplicates.
const DEDUPLICATED: &str = "switchboard.call.";

impl RecentIds {
    /// Remembers at most `bound` ids (at least one).
    pub(crate) fn new(bound: usize) -> Self {
        let bound = bound.max(1);
        Self {
            set: std::collections::HashSet::with_capacity(bound.min(16_384)),
            order: VecDeque::with_capacity(bound.min(16_384)),
            bound,
        }
    }

    /// False when `ev`, whose CloudEvent id is `id`, is a call lifecycle
    /// event whose id is among the last ones seen (a copy); else true, and
    /// its id is remembered.
    pub(crate) fn first_time(&mut self, ev: &HubEvent, id: &str) -> bool {
        if !ev.ty.starts_with(DEDUPLICATED) {
            return true;
        }
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        let key = h.finish();
        if !self.set.insert(key) {
            return false;
        }
        if self.order.len() >= self.bound
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(key);
        true
    }
}

impl HubEvent {
    /// What the event holds in memory, about: its JSON and its strings.
    pub fn size(&self) -> usize {
        self.json.len()
            + self.position.len()
            + self.ty.len()
            + self.subject.as_ref().map_or(0, String::len)
            + self.caller.as_ref().map_or(0, String::len)
            + std::mem::size_of::<Self>()
    }
}

/// The offset a `Last-Event-ID` names; `None` when it is not one. Takes
/// client input: never panics.
pub fn parse_position(last_event_id: &str) -> Option<u64> {
    let last = last_event_id.trim();
    // `u64::from_str` takes a leading `+`: a position never has one.
    if last.starts_with('+') {
        return None;
    }
    last.parse().ok()
}

/// Which offsets a hub has seen without a hole: every one from `from` to
/// `last` is in its history or was not a CloudEvent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    from: u64,
    last: u64,
}

/// The events of `history` after offset `last`, when `seen` covers every
/// offset after it; `None` when the log must be read instead (older than
/// the history, or ahead of what the hub has seen).
fn replay(
    seen: Option<Seen>,
    history: &VecDeque<Arc<HubEvent>>,
    last: u64,
) -> Option<Vec<Arc<HubEvent>>> {
    let seen = seen?;
    if last > seen.last || last.saturating_add(1) < seen.from {
        return None;
    }
    Some(history.iter().filter(|e| e.seq > last).cloned().collect())
}

/// Which events a session wants. Empty: all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only events whose type starts with this.
    pub type_prefix: Option<String>,
    /// Only events with exactly this subject.
    pub subject: Option<String>,
    /// The viewer: events that belong to a caller (call lifecycle events)
    /// pass only when it is this one; events of no caller always pass.
    pub caller: Option<String>,
}

impl EventFilter {
    /// Whether `ev` passes.
    pub fn matches(&self, ev: &HubEvent) -> bool {
        self.type_prefix
            .as_deref()
            .is_none_or(|p| ev.ty.starts_with(p))
            && self
                .subject
                .as_deref()
                .is_none_or(|s| ev.subject.as_deref() == Some(s))
            && match (&self.caller, &ev.caller) {
                (Some(viewer), Some(owner)) => viewer == owner,
                _ => true,
            }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// `max_sessions` sessions are open already.
    #[error("too many event stream sessions (limit {limit})")]
    TooManySessions {
        /// The configured bound.
        limit: usize,
    },
    /// The hub actor has stopped.
    #[error("the event hub has stopped")]
    Stopped,
}

/// Counters of one hub, readable while it runs (tests, metrics).
#[derive(Debug)]
pub struct HubStats {
    /// Sessions open now.
    pub sessions: AtomicU64,
    /// Valid events taken from the fanout and offered to the sessions.
    pub relayed: AtomicU64,
    /// Sessions dropped because their buffer was full.
    pub dropped_slow: AtomicU64,
    /// Messages on the fanout that were not CloudEvents (skipped).
    pub malformed: AtomicU64,
    /// Sessions served by a reader of the log of their own (resumed from a
    /// position the history did not cover), opened so far.
    pub log_readers: AtomicU64,
    /// Call lifecycle events dropped as copies of one relayed a moment
    /// before (the same CloudEvent id, `RecentIds`).
    pub duplicates: AtomicU64,
    /// The hub's consumer: whether it consumes now, since when it does not,
    /// how often it came back.
    pub consumer: Arc<ConsumerStatus>,
}

impl HubStats {
    /// A counter's value now.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Told of every event the hub relays, in the hub's actor: must not
/// block. Crate-private: how the gateway's tracker learns of calls ended
/// by other gateways of its store (`gateway::start`).
pub(crate) type Observer = Arc<dyn Fn(&HubEvent) + Send + Sync>;

/// A subscription granted by the hub.
#[derive(Debug)]
pub struct Subscribed {
    /// The session's id (for [`Unsubscribe`]).
    pub id: u64,
    /// The session's events: the replay first, then live ones. Ends when the
    /// session is dropped (slow, unsubscribed, hub stopped).
    pub rx: mpsc::Receiver<Arc<HubEvent>>,
    /// Events may have been missed: the last event id given was not a
    /// position.
    pub gap: bool,
}

/// A handle to a running hub.
#[derive(Clone)]
pub struct HubHandle {
    /// The actor (a new one if it stopped or panicked).
    keeper: Keeper<EventHub>,
    /// Its counters.
    pub stats: Arc<HubStats>,
}

impl HubHandle {
    /// Asks for a session ([`Subscribe`]).
    pub async fn subscribe(
        &self,
        filter: EventFilter,
        last_event_id: Option<String>,
    ) -> Result<Subscribed, HubError> {
        self.keeper
            .addr()
            .send(Subscribe {
                filter,
                last_event_id,
            })
            .await
            .map_err(|_| HubError::Stopped)?
    }

    /// Ends a session ([`Unsubscribe`]); nothing if the hub is gone.
    pub async fn unsubscribe(&self, id: u64) {
        let _ = self.keeper.addr().send(Unsubscribe { id }).await;
    }

    /// Stops the hub ([`Stop`]); nothing if it is gone already.
    pub async fn stop(&self) {
        self.keeper.stop_restarting();
        let _ = self.keeper.addr().send(Stop).await;
    }
}

/// One stream client.
struct Session {
    feed: Feed,
    filter: EventFilter,
}

/// Where a session's events come from.
enum Feed {
    /// The hub relays to it.
    Live(mpsc::Sender<Arc<HubEvent>>),
    /// A reader of the log of its own (`events::log::read_from`) holds the
    /// sender; the hub only counts the session, until the reader or the
    /// client is gone, and stops the reader with `stop`.
    Log {
        tx: mpsc::WeakSender<Arc<HubEvent>>,
        stop: CancellationToken,
    },
}

impl Feed {
    /// Whether the session's stream has ended (client or reader gone).
    fn is_closed(&self) -> bool {
        match self {
            Feed::Live(tx) => tx.is_closed(),
            Feed::Log { tx, .. } => tx.upgrade().is_none_or(|tx| tx.is_closed()),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Feed::Log { stop, .. } = &self.feed {
            stop.cancel();
        }
    }
}

/// The actor relaying the events fanout to stream sessions.
pub struct EventHub {
    opts: HubOptions,
    /// The offsets seen without a hole (`None`: none yet).
    seen: Option<Seen>,
    /// Where the consumer starts when it comes back: after the last offset
    /// seen (shared with its [`LogQueue`]).
    resume_at: Arc<Mutex<Option<u64>>>,
    /// Stops the log readers of every session when the hub stops.
    readers: CancellationToken,
    /// The last `opts.history` events, oldest first.
    history: VecDeque<Arc<HubEvent>>,
    /// The sum of [`HubEvent::size`] over `history`.
    history_bytes: usize,
    /// The ids of the last lifecycle events relayed: copies are dropped.
    recent: RecentIds,
    sessions: HashMap<u64, Session>,
    next_session: u64,
    stats: Arc<HubStats>,
    /// The supervised consumer of the hub's queue.
    consumer: ActorConsumer,
    /// Told of each event relayed ([`EventHub::start_observed`]).
    observer: Option<Observer>,
}

impl EventHub {
    /// Declares the events log and consumes it from `next` on a dedicated
    /// connection. Returns once it consumes: every event published (and
    /// confirmed) afterwards reaches the hub. Runs the
    /// actor on the current Actix arbiter, so it must be called inside an
    /// Actix system (`actix_rt`, `#[actix_web::main]`).
    pub async fn start(broker: &Broker, opts: HubOptions) -> Result<HubHandle> {
        Self::start_observed(broker, opts, None).await
    }

    /// [`EventHub::start`], telling `observer` of each event it relays,
    /// those this process published included.
    pub(crate) async fn start_observed(
        broker: &Broker,
        opts: HubOptions,
        observer: Option<Observer>,
    ) -> Result<HubHandle> {
        let resume_at = Arc::new(Mutex::new(None));
        let supervisor = Supervisor::new(
            broker,
            ConsumerSpec {
                name: "hub".into(),
                tag: "hub".into(),
                // Bounds the deliveries held in memory before the actor
                // handles them.
                prefetch: Some(PREFETCH),
                confirm: false,
            },
            LogQueue {
                log: opts.log.clone(),
                resume_at: resume_at.clone(),
            },
        );
        let link = match supervisor.open().await {
            Ok(link) => link,
            Err(e) => {
                supervisor.status().set_stopped();
                return Err(e);
            }
        };
        let stats = Arc::new(HubStats {
            sessions: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            dropped_slow: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            log_readers: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            consumer: supervisor.status().clone(),
        });
        broker.metrics().register(stats.clone());
        info!(queue = %link.queue(), history = opts.history, max_sessions = opts.max_sessions, session_buffer = opts.session_buffer, "event hub started");
        let hub_stats = stats.clone();
        let keeper = Keeper::start(supervisor, link, move |consumer| {
            EventHub {
                opts: HubOptions {
                    // A channel of 0 does not exist; 1 is the least bound.
                    session_buffer: opts.session_buffer.max(1),
                    ..opts.clone()
                },
                seen: None,
                resume_at: resume_at.clone(),
                readers: CancellationToken::new(),
                history: VecDeque::with_capacity(opts.history.min(4096)),
                history_bytes: 0,
                recent: RecentIds::new(opts.history.max(RECENT_IDS_MIN)),
                sessions: HashMap::new(),
                next_session: 1,
                stats: hub_stats.clone(),
                consumer,
                observer: observer.clone(),
            }
            .start()
        });
        Ok(HubHandle { keeper, stats })
    }

    /// Takes note of offset `offset` from the log: moves [`Self::seen`] and
    /// where the consumer resumes on. Returns the offsets lost before it (a
    /// hole: the consumer was away longer than the log's retention), and
    /// `None` for an offset seen already (a re-established consumer gets
    /// the whole chunk it resumes in).
    fn arrived(&mut self, offset: u64) -> Option<Option<(u64, u64)>> {
        let mut hole = None;
        match self.seen {
            Some(s) if offset <= s.last => return None,
            Some(s) if offset > s.last + 1 => {
                hole = Some((s.last + 1, offset - 1));
                // The history before the hole resumes no one: drop it.
                self.history.clear();
                self.history_bytes = 0;
                self.seen = Some(Seen {
                    from: offset,
                    last: offset,
                });
            }
            Some(s) => self.seen = Some(Seen { last: offset, ..s }),
            None => {
                // A hub started again by its keeper resumes where the one
                // before it stopped: the earlier offsets of that chunk were
                // relayed already.
                let resume_at = *self.resume_at.lock().unwrap_or_else(|p| p.into_inner());
                if resume_at.is_some_and(|at| offset < at) {
                    return None;
                }
                self.seen = Some(Seen {
                    from: offset,
                    last: offset,
                })
            }
        }
        *self.resume_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(offset + 1);
        Some(hole)
    }

    /// The history's events must cover every offset from `seen.from` on:
    /// when the oldest go, so does `from`.
    fn forgot_until(&mut self, offset: u64) {
        if let Some(s) = &mut self.seen {
            s.from = s.from.max(offset + 1);
        }
    }

    fn set_sessions_gauge(&self) {
        self.stats
            .sessions
            .store(self.sessions.len() as u64, Ordering::Relaxed);
    }

    /// Removes the sessions whose receiver is gone.
    fn sweep(&mut self) {
        let before = self.sessions.len();
        self.sessions.retain(|_, s| !s.feed.is_closed());
        if self.sessions.len() != before {
            debug!(
                removed = before - self.sessions.len(),
                "closed sessions swept"
            );
            self.set_sessions_gauge();
        }
    }

    /// Keeps `ev` in the history (within both of its bounds, see the
    /// module doc).
    fn keep(&mut self, ev: &Arc<HubEvent>) {
        if self.opts.history == 0 {
            self.forgot_until(ev.seq);
            return;
        }
        let size = ev.size();
        if size > self.opts.history_bytes {
            // Not kept; the events before it are of no use to anyone
            // resuming (they would miss this one): those resume from the
            // log, as for events too old.
            self.history.clear();
            self.history_bytes = 0;
            self.forgot_until(ev.seq);
            debug!(position = %ev.position, size, "event larger than the history's byte bound: not kept");
            return;
        }
        while self.history.len() >= self.opts.history
            || self.history_bytes + size > self.opts.history_bytes
        {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= old.size();
            self.forgot_until(old.seq);
        }
        self.history_bytes += size;
        self.history.push_back(ev.clone());
    }

    /// Keeps `ev` in the history and offers it to every matching session.
    fn relay(&mut self, ev: HubEvent) {
        if let Some(observer) = &self.observer {
            observer(&ev);
        }
        let ev = Arc::new(ev);
        self.keep(&ev);
        self.offer(&ev, false);
        self.stats.relayed.fetch_add(1, Ordering::Relaxed);
    }

    /// Offers `ev` to every live session it matches (every one when `all`).
    fn offer(&mut self, ev: &Arc<HubEvent>, all: bool) {
        let stats = &self.stats;
        self.sessions.retain(|id, s| {
            let Feed::Live(tx) = &s.feed else {
                return true;
            };
            if !all && !s.filter.matches(ev) {
                return true;
            }
            match tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    stats.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        session = id,
                        position = %ev.position,
                        "slow session dropped: its buffer is full"
                    );
                    false
                }
                Err(TrySendError::Closed(_)) => {
                    debug!(session = id, "session gone");
                    false
                }
            }
        });
        self.set_sessions_gauge();
    }
}

impl Actor for EventHub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        info!("event hub relaying");
        // A hub started again after one panicked: its sessions are gone.
        self.set_sessions_gauge();
        ActorConsumer::start(self, ctx);
        ctx.run_interval(SWEEP_EVERY, |act, _| act.sweep());
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.readers.cancel();
        self.stats.sessions.store(0, Ordering::Relaxed);
        info!(sessions = self.sessions.len(), "event hub stopped");
    }
}

impl Consumes for EventHub {
    fn consumer(&mut self) -> &mut ActorConsumer {
        &mut self.consumer
    }

    fn linked(&mut self, link: &Link, _: &mut Context<Self>) {
        debug!(queue = %link.queue(), sessions = self.sessions.len(), "event hub consuming");
    }
}

impl StreamHandler<Event> for EventHub {
    fn handle(&mut self, event: Event, ctx: &mut Self::Context) {
        let Some(delivery) = ActorConsumer::delivered(self, event, ctx) else {
            // Sessions stay open (heartbeats go on) while the consumer comes back.
            return;
        };
        let inflight = InFlight::new(delivery);
        let delivery = inflight.delivery();
        let arrived = match wire::stream_offset(&delivery.properties) {
            Some(offset) => self.arrived(offset).map(|hole| (offset, hole)),
            None => {
                // Not from a stream: the log was replaced by another kind of
                // queue under its name, which cannot give positions.
                warn!("a delivery from the events log without an offset: skipped");
                None
            }
        };
        let parsed =
            arrived.map(|(offset, hole)| (hole, HubEvent::parse_with_id(offset, &delivery.data)));
        match parsed {
            // Seen already, or no offset.
            None => {}
            Some((hole, ev)) => {
                if let Some((first, last)) = hole {
                    warn!(
                        first,
                        last, "events lost from the log while the hub was away"
                    );
                    self.offer(&Arc::new(super::log::lost(first, last)), true);
                }
                match ev {
                    Some((ev, id)) if !self.recent.first_time(&ev, &id) => {
                        // A copy (published again across a gateway's death):
                        // its offset is seen, it is neither kept nor relayed.
                        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        debug!(position = %ev.position, event_id = %id, "copy of an event relayed already: dropped");
                    }
                    Some((ev, _)) => self.relay(ev),
                    None => {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        debug!(
                            bytes = delivery.data.len(),
                            "message on the events fanout is not a CloudEvent: skipped"
                        );
                    }
                }
            }
        }
        // Acked once relayed (or skipped): on a stream an ack only moves the
        // consumer's credit on, so it is handed to lapin without a task or a
        // timer per event (InFlight::ack_now).
        settle(inflight.ack_now());
    }

    fn finished(&mut self, _: &mut Self::Context) {
        // Every stream ends with a `Lost` event, handled above; the default
        // would stop the actor.
    }
}

/// Asks for a stream session: the matching events after `last_event_id`
/// from the history, then live ones.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Subscribed, HubError>")]
pub struct Subscribe {
    /// Which events the session wants.
    pub filter: EventFilter,
    /// The position of the last event the client saw (SSE `Last-Event-ID`).
    pub last_event_id: Option<String>,
}

impl Handler<Subscribe> for EventHub {
    type Result = Result<Subscribed, HubError>;

    fn handle(&mut self, msg: Subscribe, _: &mut Self::Context) -> Self::Result {
        if self.sessions.len() >= self.opts.max_sessions {
            // Clients that left may not have been swept yet.
            self.sweep();
        }
        if self.sessions.len() >= self.opts.max_sessions {
            warn!(
                limit = self.opts.max_sessions,
                "event stream session refused: too many"
            );
            return Err(HubError::TooManySessions {
                limit: self.opts.max_sessions,
            });
        }
        let (replay, gap) = match msg.last_event_id.as_deref().map(parse_position) {
            None => (Vec::new(), false),
            Some(None) => (Vec::new(), true),
            Some(Some(last)) => match replay(self.seen, &self.history, last) {
                Some(events) => (events, false),
                None => return Ok(self.session_from_log(last, msg.filter)),
            },
        };
        let replay: Vec<_> = replay
            .into_iter()
            .filter(|e| msg.filter.matches(e))
            .collect();
        // Room for the whole replay on top of the live buffer (see the
        // module doc): bounded by `history + session_buffer`.
        let (tx, rx) = mpsc::channel(self.opts.session_buffer + replay.len());
        let replayed = replay.len();
        for ev in replay {
            // Cannot fail: the channel was sized for the replay and its
            // receiver is still here.
            let _ = tx.try_send(ev);
        }
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            id,
            Session {
                feed: Feed::Live(tx),
                filter: msg.filter,
            },
        );
        self.set_sessions_gauge();
        debug!(session = id, replayed, gap, "event stream session opened");
        Ok(Subscribed { id, rx, gap })
    }
}

impl EventHub {
    /// A session fed by a reader of the log of its own, from the offset
    /// after `last` (see the module doc), counted among the hub's sessions.
    fn session_from_log(&mut self, last: u64, filter: EventFilter) -> Subscribed {
        let (tx, rx) = mpsc::channel(self.opts.session_buffer);
        let stop = self.readers.child_token();
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            id,
            Session {
                feed: Feed::Log {
                    tx: tx.downgrade(),
                    stop: stop.clone(),
                },
                filter: filter.clone(),
            },
        );
        self.set_sessions_gauge();
        self.stats.log_readers.fetch_add(1, Ordering::Relaxed);
        let broker = self.consumer.supervisor().broker().clone();
        let from = last.saturating_add(1);
        debug!(
            session = id,
            from, "event stream session opened: reading the log"
        );
        // A task of its own, not the actor's: readers wait on their
        // clients, and the hub never waits.
        actix::spawn(super::log::read_from(broker, from, filter, tx, stop));
        Subscribed { id, rx, gap: false }
    }
}

/// Ends a session: its stream ends once it has read what is queued.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    /// The session's id ([`Subscribed::id`]).
    pub id: u64,
}

impl Handler<Unsubscribe> for EventHub {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Self::Context) {
        if self.sessions.remove(&msg.id).is_some() {
            debug!(session = msg.id, "event stream session closed");
            self.set_sessions_gauge();
        }
    }
}

/// Stops the hub: every session's stream ends (so that a graceful shutdown
/// is not held up by endless streams) and the hub's connection closes.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for EventHub {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        self.sessions.clear();
        if let Some(link) = ActorConsumer::stop(self, ctx) {
            actix::spawn(link.stop("shutdown"));
        }
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_stored_as_compact_json() {
        let pretty = serde_json::to_vec_pretty(
            &CloudEvent::new("a.b", "src", serde_json::json!({"x": "line\nbreak"}))
                .with_subject("s1"),
        )
        .unwrap();
        assert!(pretty.contains(&b'\n'));
        let ev = HubEvent::parse(7, &pretty).unwrap();
        assert!(!ev.json.contains(&b'\n'));
        assert_eq!(ev.position, "7");
        assert_eq!(ev.ty, "a.b");
        assert_eq!(ev.subject.as_deref(), Some("s1"));
        let back: CloudEvent = serde_json::from_slice(&ev.json).unwrap();
        assert_eq!(back.data, Some(serde_json::json!({"x": "line\nbreak"})));
    }

    #[test]
    fn non_cloudevents_are_refused() {
        assert!(HubEvent::parse(1, b"not json").is_none());
        assert!(HubEvent::parse(1, br#"{"type": "x"}"#).is_none());
    }

    #[test]
    fn copies_of_call_lifecycle_events_are_known_within_the_bound() {
        let ev = |ty: &str| HubEvent {
            seq: 1,
            position: "1".into(),
            ty: ty.into(),
            subject: None,
            caller: None,
            json: Bytes::new(),
        };
        let completed = ev("switchboard.call.completed");
        let mut recent = RecentIds::new(2);
        assert!(recent.first_time(&completed, "a"));
        assert!(!recent.first_time(&completed, "a"), "a copy");
        // Other types are never copies, whatever their ids.
        assert!(recent.first_time(&ev("orders.created"), "a"));
        assert!(recent.first_time(&ev("orders.created"), "a"));
        assert!(recent.first_time(&completed, "b"));
        assert!(recent.first_time(&completed, "c"));
        // Two remembered: "a" is forgotten, "c" is not.
        assert!(recent.first_time(&completed, "a"));
        assert!(!recent.first_time(&completed, "a"));
        assert!(!recent.first_time(&completed, "c"));
    }

    #[test]
    fn filters_match_type_prefix_and_subject() {
        let ev = HubEvent {
            seq: 1,
            position: "1".into(),
            ty: "orders.created".into(),
            subject: Some("o1".into()),
            caller: None,
            json: Bytes::new(),
        };
        let f = |t: Option<&str>, s: Option<&str>| EventFilter {
            type_prefix: t.map(Into::into),
            subject: s.map(Into::into),
            caller: None,
        };
        assert!(f(None, None).matches(&ev));
        assert!(f(Some("orders."), None).matches(&ev));
        assert!(!f(Some("users."), None).matches(&ev));
        assert!(f(Some("orders"), Some("o1")).matches(&ev));
        assert!(!f(None, Some("o2")).matches(&ev));
    }
}

/// Properties of resuming: any `Last-Event-ID` is safe, and the history
/// replays exactly the events after a position only when it holds all of
/// them (else the log is read).
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// A hub's history after offsets `first..=last`, keeping the last
    /// `kept` (every one a CloudEvent).
    fn history(first: u64, last: u64, kept: u64) -> (Option<Seen>, VecDeque<Arc<HubEvent>>) {
        let from = (last + 1).saturating_sub(kept).max(first);
        let h = (from..=last)
            .map(|n| {
                Arc::new(HubEvent {
                    seq: n,
                    position: n.to_string(),
                    ty: "t".into(),
                    subject: None,
                    caller: None,
                    json: Bytes::new(),
                })
            })
            .collect();
        (Some(Seen { from, last }), h)
    }

    proptest! {
        #[test]
        fn any_last_event_id_is_safe(text in prop_oneof![any::<String>(), "[ +0-9a-f-]{0,24}"]) {
            if let Some(n) = parse_position(&text) {
                let digits = text.trim();
                prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()));
                prop_assert_eq!(digits.parse::<u64>().ok(), Some(n));
            }
        }

        #[test]
        fn the_history_replays_exactly_the_events_after_a_position_it_covers(
            first in 0u64..30, len in 0u64..40, kept in 0u64..40, at in 0u64..90,
        ) {
            let last = first + len;
            let (seen, h) = history(first, last, kept);
            let from = seen.map_or(0, |s| s.from);
            match replay(seen, &h, at) {
                Some(events) => {
                    prop_assert!(at <= last && at + 1 >= from);
                    let want: Vec<u64> = (at + 1..=last).collect();
                    let got: Vec<u64> = events.iter().map(|e| e.seq).collect();
                    prop_assert_eq!(got, want, "no loss, no repeat");
                }
                None => prop_assert!(at > last || at + 1 < from, "covered, yet read from the log"),
            }
            prop_assert_eq!(replay(None, &h, at), None);
        }
    }

    #[test]
    fn positions_are_decimal_offsets() {
        assert_eq!(parse_position(" 42\t"), Some(42));
        assert_eq!(parse_position("0"), Some(0));
        assert_eq!(parse_position("+4"), None);
        assert_eq!(parse_position("-4"), None);
        assert_eq!(parse_position("00c0ffee-3"), None);
        assert_eq!(parse_position("18446744073709551616"), None);
        assert_eq!(parse_position(""), None);
    }
}
