//! [`EventHub`]: the actor that relays everything published on the events
//! fanout to in-process stream sessions (the gateway's SSE and WebSocket
//! clients).
//!
//! Public: an application that serves event streams on routes of its own
//! starts a hub and relays its sessions with [`crate::gateway::streams`]
//! (`tests/it/hub.rs` does exactly that).
//!
//! The hub consumes `<prefix>.events` through a queue of its own
//! (server-named, exclusive, auto-delete) on a dedicated connection
//! (`switchboard/<instance>/hub`), a supervised consumer
//! ([`crate::amqp::consumer`]): lost, it comes back with a new queue (events
//! published in between are not relayed: the hub is a live relay), and a
//! [`Keeper`] starts a new hub if this one stops or panics (its sessions
//! end; clients resume with a gap). Each valid CloudEvent is numbered, kept
//! in a bounded history ring and offered to every session whose
//! [`EventFilter`] matches it. Messages that are not CloudEvents are skipped
//! and counted (the events exchange is shared with every client of the
//! vhost, and the hub's queue is temporary: nothing to keep).
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
//!   dropped (whoever resumes from before it gets a gap, as the history
//!   would have a hole);
//! - broker: a prefetch of [`PREFETCH`] unacked deliveries.
//!
//! # Positions and resuming
//! Every event gets a position `<epoch>-<seq>`: `epoch` is random per hub
//! start, `seq` counts from 1. A subscriber that gives the position of the
//! last event it saw ([`Subscribe::last_event_id`]) gets exactly the matching
//! events after it from the history, then live ones, with no loss and no
//! repeat: the replay and the registration happen in one actor step, so no
//! live event can slip in between. A position of another epoch (another
//! process, or this one before a restart), one that is malformed, or one
//! older than the history is unknown: the session starts live with
//! [`Subscribed::gap`] set.
//!
//! The replay never counts against the session's buffer: the channel of a
//! resumed session holds the replay plus `session_buffer`, so a large
//! history replayed to a small buffer does not drop the session. That is
//! still bounded (at most `history + session_buffer` events per session).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tracing::{debug, info, warn};

use super::{CloudEvent, FanoutQueue};
use crate::amqp::consumer::{ActorConsumer, ConsumerStatus, Consumes, Event, Keeper, Link, settle};
use crate::amqp::{Broker, ConsumerSpec, InFlight, Supervisor};
use crate::error::Result;

/// Unacked deliveries the broker may hand the hub at once: bounds what waits
/// in memory between the socket and the actor.
pub const PREFETCH: u16 = 256;

/// How often sessions whose receiver is gone are swept out, so that a client
/// that left is not counted against `max_sessions` until the next matching
/// event happens to reach it.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The hub's bounds.
#[derive(Debug, Clone, Copy)]
pub struct HubOptions {
    /// Events kept for resuming with a last event id (0: only a client that
    /// saw the latest event resumes without a gap).
    pub history: usize,
    /// Bytes of events kept for resuming ([`HubEvent::size`]), beside the
    /// count: the oldest go first when either is reached.
    pub history_bytes: usize,
    /// Sessions at once; one more is refused.
    pub max_sessions: usize,
    /// Events queued per session before it is dropped as slow (at least 1).
    pub session_buffer: usize,
}

/// One event as the hub relays it. Shared by the history and every session
/// (`Arc<HubEvent>`), so relaying to many sessions copies no payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEvent {
    /// Order of arrival at this hub, from 1.
    pub seq: u64,
    /// Opaque, resumable position: what SSE sends as `id:` and takes back as
    /// `Last-Event-ID`.
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
    /// The event numbered `seq` of epoch `epoch`, from a delivery's body;
    /// `None` when the body is not a CloudEvent.
    fn parse(epoch: &str, seq: u64, body: &[u8]) -> Option<Self> {
        let event: CloudEvent = serde_json::from_slice(body).ok()?;
        // Re-encoded rather than passed through: compact JSON has no raw
        // newline, so it is one SSE `data:` line and one WebSocket frame.
        let json = serde_json::to_vec(&event).ok()?;
        Some(Self {
            seq,
            position: position(epoch, seq),
            caller: event
                .extensions
                .get(crate::amqp::wire::EXT_CALLER)
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            ty: event.ty,
            subject: event.subject,
            json: Bytes::from(json),
        })
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

/// `<epoch>-<seq>`.
fn position(epoch: &str, seq: u64) -> String {
    format!("{epoch}-{seq}")
}

/// The events of `history` after the position `last_event_id`, for a hub
/// of epoch `epoch` whose last event is `seq`; `None` when that position is
/// unknown (other epoch, malformed, too old, or ahead). Takes client input:
/// never panics.
fn replay(
    epoch: &str,
    seq: u64,
    history: &VecDeque<Arc<HubEvent>>,
    last_event_id: &str,
) -> Option<Vec<Arc<HubEvent>>> {
    let (last_epoch, last) = last_event_id.trim().rsplit_once('-')?;
    if last_epoch != epoch {
        return None;
    }
    let last: u64 = last.parse().ok()?;
    if last > seq {
        return None;
    }
    // The event right after `last` must still be in the history (or not
    // have happened yet), else some were lost.
    let oldest = history.front().map_or(seq.saturating_add(1), |e| e.seq);
    if last.saturating_add(1) < oldest {
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

/// A subscription granted by the hub.
#[derive(Debug)]
pub struct Subscribed {
    /// The session's id (for [`Unsubscribe`]).
    pub id: u64,
    /// The session's events: the replay first, then live ones. Ends when the
    /// session is dropped (slow, unsubscribed, hub stopped).
    pub rx: mpsc::Receiver<Arc<HubEvent>>,
    /// Events may have been missed: the last event id given was unknown or
    /// older than the history.
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
    tx: mpsc::Sender<Arc<HubEvent>>,
    filter: EventFilter,
}

/// The actor relaying the events fanout to stream sessions.
pub struct EventHub {
    opts: HubOptions,
    /// Random per start: positions of another epoch are unknown here.
    epoch: String,
    /// The last seq given out (0: none yet).
    seq: u64,
    /// The last `opts.history` events, oldest first.
    history: VecDeque<Arc<HubEvent>>,
    /// The sum of [`HubEvent::size`] over `history`.
    history_bytes: usize,
    sessions: HashMap<u64, Session>,
    next_session: u64,
    stats: Arc<HubStats>,
    /// The supervised consumer of the hub's queue.
    consumer: ActorConsumer,
}

impl EventHub {
    /// Binds a queue of its own to the events fanout on a dedicated
    /// connection and starts relaying. Returns once the queue is bound: every
    /// event published (and confirmed) afterwards reaches the hub. Runs the
    /// actor on the current Actix arbiter, so it must be called inside an
    /// Actix system (`actix_rt`, `#[actix_web::main]`).
    pub async fn start(broker: &Broker, opts: HubOptions) -> Result<HubHandle> {
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
            // A temporary queue: the hub is a live relay, nothing should
            // pile up while it is gone.
            FanoutQueue { durable_name: None },
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
            consumer: supervisor.status().clone(),
        });
        broker.metrics().register(stats.clone());
        info!(queue = %link.queue(), history = opts.history, max_sessions = opts.max_sessions, session_buffer = opts.session_buffer, "event hub started");
        let hub_stats = stats.clone();
        let keeper = Keeper::start(supervisor, link, move |consumer| {
            let epoch = format!("{:016x}", rand::random::<u64>());
            EventHub {
                opts: HubOptions {
                    // A channel of 0 does not exist; 1 is the least bound.
                    session_buffer: opts.session_buffer.max(1),
                    ..opts
                },
                epoch,
                seq: 0,
                history: VecDeque::with_capacity(opts.history.min(4096)),
                history_bytes: 0,
                sessions: HashMap::new(),
                next_session: 1,
                stats: hub_stats.clone(),
                consumer,
            }
            .start()
        });
        Ok(HubHandle { keeper, stats })
    }

    /// The events to replay after `last_event_id`, or `None` when that
    /// position is unknown here (other epoch, malformed, too old, or ahead).
    fn replay_after(&self, last_event_id: &str) -> Option<Vec<Arc<HubEvent>>> {
        replay(&self.epoch, self.seq, &self.history, last_event_id)
    }

    fn set_sessions_gauge(&self) {
        self.stats
            .sessions
            .store(self.sessions.len() as u64, Ordering::Relaxed);
    }

    /// Removes the sessions whose receiver is gone.
    fn sweep(&mut self) {
        let before = self.sessions.len();
        self.sessions.retain(|_, s| !s.tx.is_closed());
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
            return;
        }
        let size = ev.size();
        if size > self.opts.history_bytes {
            // Not kept; the events before it are of no use to anyone
            // resuming (they would miss this one): a gap, as for events too
            // old.
            self.history.clear();
            self.history_bytes = 0;
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
        }
        self.history_bytes += size;
        self.history.push_back(ev.clone());
    }

    /// Keeps `ev` in the history and offers it to every matching session.
    fn relay(&mut self, ev: HubEvent) {
        let ev = Arc::new(ev);
        self.keep(&ev);
        let stats = &self.stats;
        self.sessions.retain(|id, s| {
            if !s.filter.matches(&ev) {
                return true;
            }
            match s.tx.try_send(ev.clone()) {
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
        self.stats.relayed.fetch_add(1, Ordering::Relaxed);
        self.set_sessions_gauge();
    }
}

impl Actor for EventHub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        info!(epoch = %self.epoch, "event hub relaying");
        // A hub started again after one panicked: its sessions are gone.
        self.set_sessions_gauge();
        ActorConsumer::start(self, ctx);
        ctx.run_interval(SWEEP_EVERY, |act, _| act.sweep());
    }

    fn stopped(&mut self, _: &mut Self::Context) {
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
        let seq = self.seq + 1;
        match HubEvent::parse(&self.epoch, seq, &delivery.data) {
            Some(ev) => {
                self.seq = seq;
                self.relay(ev);
            }
            None => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                debug!(
                    bytes = delivery.data.len(),
                    "message on the events fanout is not a CloudEvent: skipped"
                );
            }
        }
        // Acked once relayed (or skipped): the hub keeps nothing for later.
        let inflight = InFlight::new(delivery);
        ctx.spawn(async move { settle(inflight.ack().await) }.into_actor(self));
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
        let (replay, gap) = match msg.last_event_id.as_deref() {
            None => (Vec::new(), false),
            Some(last) => match self.replay_after(last) {
                Some(events) => (events, false),
                None => (Vec::new(), true),
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
                tx,
                filter: msg.filter,
            },
        );
        self.set_sessions_gauge();
        debug!(session = id, replayed, gap, "event stream session opened");
        Ok(Subscribed { id, rx, gap })
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
        let ev = HubEvent::parse("e", 7, &pretty).unwrap();
        assert!(!ev.json.contains(&b'\n'));
        assert_eq!(ev.position, "e-7");
        assert_eq!(ev.ty, "a.b");
        assert_eq!(ev.subject.as_deref(), Some("s1"));
        let back: CloudEvent = serde_json::from_slice(&ev.json).unwrap();
        assert_eq!(back.data, Some(serde_json::json!({"x": "line\nbreak"})));
    }

    #[test]
    fn non_cloudevents_are_refused() {
        assert!(HubEvent::parse("e", 1, b"not json").is_none());
        assert!(HubEvent::parse("e", 1, br#"{"type": "x"}"#).is_none());
    }

    #[test]
    fn filters_match_type_prefix_and_subject() {
        let ev = HubEvent {
            seq: 1,
            position: "e-1".into(),
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

/// Properties of resuming: any `Last-Event-ID` is safe, and a known position
/// replays exactly the events after it.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    const EPOCH: &str = "00c0ffee00c0ffee";

    /// A hub's history after `seq` events, keeping the last `kept`.
    fn history(seq: u64, kept: u64) -> VecDeque<Arc<HubEvent>> {
        (seq - kept.min(seq) + 1..=seq)
            .map(|n| {
                Arc::new(HubEvent {
                    seq: n,
                    position: position(EPOCH, n),
                    ty: "t".into(),
                    subject: None,
                    caller: None,
                    json: Bytes::new(),
                })
            })
            .collect()
    }

    fn last_event_id() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9a-f]{0,17}-[0-9+-]{0,21}",
            (0u64..80).prop_map(|n| position(EPOCH, n)),
            (0u64..80).prop_map(|n| position("0123456789abcdef", n)),
            (0u64..80).prop_map(|n| format!(" {EPOCH}-{n}\t")),
            Just(format!("{EPOCH}-{}", u64::MAX)),
            Just(format!("{EPOCH}-18446744073709551616")),
        ]
    }

    proptest! {
        #[test]
        fn any_last_event_id_is_safe(seq in 0u64..60, kept in 0u64..40, last in last_event_id()) {
            let h = history(seq, kept);
            if let Some(events) = replay(EPOCH, seq, &h, &last) {
                // Known: this epoch, not ahead, nothing lost in between.
                let (_, n) = last.trim().rsplit_once('-').unwrap_or_default();
                let n: u64 = n.parse().map_err(|_| TestCaseError::fail("known but not a number"))?;
                prop_assert!(n <= seq);
                let want: Vec<u64> = (n + 1..=seq).collect();
                let got: Vec<u64> = events.iter().map(|e| e.seq).collect();
                prop_assert_eq!(got, want, "no loss, no repeat");
            }
        }

        #[test]
        fn a_position_given_out_resumes_unless_too_old(seq in 0u64..60, kept in 0u64..40, at in 0u64..70) {
            let h = history(seq, kept);
            let got = replay(EPOCH, seq, &h, &position(EPOCH, at));
            let oldest = seq - kept.min(seq) + 1;
            let known = at <= seq && at + 1 >= oldest;
            prop_assert_eq!(got.is_some(), known);
            prop_assert_eq!(replay("ffffffffffffffff", seq, &h, &position(EPOCH, at)), None);
        }
    }
}
