//! [`CancelWatch`]: what the workers of one process know of cancelled
//! calls.
//!
//! A caller cancels a call through the gateway (`DELETE /v1/calls/{id}`),
//! which publishes `switchboard.call.cancelled` (`subject` = call id) on
//! the events exchange, with its type as routing key. The watch is one
//! temporary queue per process bound to `<prefix>.events.types` (which the
//! events fanout passes every event to) for that key only, so it is not
//! sent the other events (shared by its workers through
//! [`Broker::shared_part`]): it remembers the last [`RECENT_CANCELLED`]
//! cancelled ids, so a request delivered later is dropped unprocessed, and
//! it cancels the token of a handler running for one now.
//!
//! Best effort, by design: a cancellation published while the watch's
//! consumer is being re-established is not heard, and the handler runs to
//! its end; its reply is then dropped by the gateway (the call has ended),
//! and counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use deadpool_lapin::lapin::Connection;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use crate::amqp::consumer::Declare;
use crate::amqp::{Broker, close_channel, topology, wire};
use crate::error::Result;
use crate::events::Subscription;

/// How many cancelled call ids a process remembers. Bounded: a request
/// cancelled longer ago than that many cancellations runs (and its reply is
/// dropped by the gateway).
pub(super) const RECENT_CANCELLED: usize = 16_384;

/// The watch's queue, declared on each (re-)open of its consumer: a
/// temporary queue bound to `<prefix>.events.types` with the key
/// `switchboard.call.cancelled` (and the empty key,
/// [`topology::declare_typed_subscription`]), so that the process is not
/// sent every event of the fanout to keep the cancellations. A user whose
/// permissions do not cover `<prefix>.events.types` (refused: 403) gets a
/// queue bound to the whole fanout instead, as before that exchange
/// existed: cancellations are heard either way.
struct CancellationsQueue {
    filtered: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Declare for CancellationsQueue {
    async fn declare(&self, broker: &Broker, conn: &Connection) -> Result<String> {
        let names = broker.names();
        let ch = conn.create_channel().await?;
        let typed =
            topology::declare_typed_subscription(&ch, names, &[wire::EVENT_CALL_CANCELLED]).await;
        match typed {
            Ok(queue) => {
                close_channel(&ch, "declared").await;
                self.filtered.store(true, Ordering::Relaxed);
                Ok(queue)
            }
            Err(e) if topology::is_access_refused(&e) => {
                warn!(
                    exchange = %names.events_types_exchange(),
                    error = %e,
                    "cancellation watch: the exchange of events by type was refused to this user; reading every event of the events exchange instead"
                );
                // The refusal closed that channel.
                let ch = conn.create_channel().await?;
                let queue = topology::declare_subscription(&ch, names, None).await?;
                close_channel(&ch, "declared").await;
                self.filtered.store(false, Ordering::Relaxed);
                Ok(queue)
            }
            Err(e) => Err(e),
        }
    }
}

/// The cancelled calls a process has heard of, and the handlers running.
pub struct CancelWatch {
    state: Arc<Mutex<State>>,
    /// Cancellations heard (for tests and metrics).
    heard: Arc<AtomicU64>,
    /// Events delivered, of any type (for tests).
    received: Arc<AtomicU64>,
    /// Whether the queue is bound for cancellations only.
    filtered: Arc<AtomicBool>,
    /// Stops the subscription's task when the last worker lets go.
    _stop: DropGuard,
}

#[derive(Default)]
struct State {
    recent: HashSet<String>,
    order: VecDeque<String>,
    /// Handlers running now, by call id, each with a number of its own;
    /// bounded by the workers' prefetch.
    running: HashMap<String, Vec<(u64, CancellationToken)>>,
    /// The number of the next registration.
    next: u64,
}

impl State {
    fn hear(&mut self, id: String) {
        if let Some(tokens) = self.running.get(&id) {
            for (_, t) in tokens {
                t.cancel();
            }
        }
        if self.order.len() >= RECENT_CANCELLED
            && let Some(old) = self.order.pop_front()
        {
            self.recent.remove(&old);
        }
        if self.recent.insert(id.clone()) {
            self.order.push_back(id);
        }
    }
}

/// A handler's registration: its token is cancelled when its call is;
/// dropped when the handler ends.
pub struct Running {
    state: Arc<Mutex<State>>,
    id: String,
    number: u64,
    token: CancellationToken,
}

impl Running {
    /// The token the handler watches.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tokens) = st.running.get_mut(&self.id) {
            tokens.retain(|(n, _)| *n != self.number);
            if tokens.is_empty() {
                st.running.remove(&self.id);
            }
        }
    }
}

impl CancelWatch {
    /// The process's watch on `broker`: the one running, or a new one
    /// (subscribed before this returns, so a cancellation published from now
    /// on is heard).
    pub async fn shared(broker: &Broker) -> Result<Arc<Self>> {
        broker.shared_part(|| Self::start(broker)).await
    }

    async fn start(broker: &Broker) -> Result<Self> {
        let filtered = Arc::new(AtomicBool::new(false));
        let queue = CancellationsQueue {
            filtered: filtered.clone(),
        };
        // A temporary subscription (parsing, acks, events not wanted skipped)
        // on a queue bound by type.
        let mut sub = Subscription::start_on(
            broker,
            queue,
            false,
            Some(wire::EVENT_CALL_CANCELLED.into()),
        )
        .await?;
        let state = Arc::new(Mutex::new(State::default()));
        let heard = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (st, count, all, done) = (state.clone(), heard.clone(), received.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = done.cancelled() => break,
                    e = sub.recv() => e,
                };
                all.store(sub.delivered(), Ordering::Relaxed);
                // The subscription's prefix is the whole type: events
                // published without their type as routing key (by other
                // clients, or an older switchboard) are skipped there.
                let Some(Ok(event)) = event else { continue };
                if event.ty != wire::EVENT_CALL_CANCELLED {
                    continue;
                }
                let Some(id) = event.subject else { continue };
                debug!(call_id = %id, "cancellation heard");
                st.lock().unwrap_or_else(|p| p.into_inner()).hear(id);
                count.fetch_add(1, Ordering::Relaxed);
            }
            sub.stop().await;
        });
        Ok(Self {
            state,
            heard,
            received,
            filtered,
            _stop: stop.drop_guard(),
        })
    }

    /// Whether call `id` was cancelled (recently enough to be remembered).
    pub fn is_cancelled(&self, id: &str) -> bool {
        self.lock().recent.contains(id)
    }

    /// Registers a handler starting for call `id`; its token is cancelled
    /// at once if the call already is.
    pub fn running(&self, id: &str) -> Running {
        let token = CancellationToken::new();
        let mut st = self.lock();
        if st.recent.contains(id) {
            token.cancel();
        }
        let number = st.next;
        st.next += 1;
        st.running
            .entry(id.to_owned())
            .or_default()
            .push((number, token.clone()));
        Running {
            state: self.state.clone(),
            id: id.to_owned(),
            number,
            token,
        }
    }

    /// Cancellations heard since the watch started.
    pub fn heard(&self) -> u64 {
        self.heard.load(Ordering::Relaxed)
    }

    /// Events the watch's queue delivered since it started, of any type:
    /// the cancellations, and the events published without their type as
    /// routing key; every event when it reads the whole fanout
    /// ([`CancelWatch::filtered`] false).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Whether the watch's queue (its latest) is bound to
    /// `<prefix>.events.types` for cancellations only; false when the
    /// broker refused that exchange to this user, and the queue is bound to
    /// the whole events fanout instead.
    pub fn filtered(&self) -> bool {
        self.filtered.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_handler_is_told_and_the_set_stays_bounded() {
        let state = Arc::new(Mutex::new(State::default()));
        let token = CancellationToken::new();
        state
            .lock()
            .unwrap()
            .running
            .insert("a".into(), vec![(0, token.clone())]);
        state.lock().unwrap().hear("a".into());
        assert!(token.is_cancelled());
        let mut st = state.lock().unwrap();
        for i in 0..RECENT_CANCELLED + 10 {
            st.hear(format!("id-{i}"));
        }
        assert_eq!(st.recent.len(), RECENT_CANCELLED);
        assert!(!st.recent.contains("a"));
        assert!(st.recent.contains(&format!("id-{}", RECENT_CANCELLED + 9)));
    }
}
