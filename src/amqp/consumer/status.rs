//! What is known of each supervised consumer: whether it consumes now, since
//! when it does not and why, how often it came back, how many poison
//! messages it settled. [`Consumers`] holds those of one broker handle; the
//! gateway's `/readyz`, the metrics-only server's `/readyz` and the metrics
//! read it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::metrics::ConsumerValues;
use crate::metrics::{Collected, Source};

/// Where one consumer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Consuming since then.
    Up { since: SystemTime },
    /// Not consuming since then, for this reason (a short phrase, no
    /// details: readiness answers show it).
    Down { since: SystemTime, why: String },
    /// Stopped on purpose (drain, close, a subscription dropped): not a
    /// failure, so readiness does not count it.
    Stopped,
}

/// One supervised consumer, as readiness and metrics see it.
#[derive(Debug)]
pub struct ConsumerStatus {
    /// `worker/<service>`, `rpc`, `hub`, `deadwatch`, `subscriber`: its
    /// connection's role, readiness's name for it and its metrics label.
    name: String,
    /// The queue it consumes (server-named queues change on each open).
    queue: Mutex<String>,
    state: Mutex<State>,
    /// Whether it consumes now: read without a lock on every scrape.
    up: AtomicBool,
    /// Whether it consumed once: the first consumer is not a reconnect.
    was_up: AtomicBool,
    reconnects: AtomicU64,
    poisoned: AtomicU64,
}

impl ConsumerStatus {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            queue: Mutex::new(String::new()),
            state: Mutex::new(State::Down {
                since: SystemTime::now(),
                why: "starting".into(),
            }),
            up: AtomicBool::new(false),
            was_up: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            poisoned: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its name (see the field).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue it consumes, or consumed last.
    pub fn queue(&self) -> String {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether it consumes now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Times it was re-established after it was lost.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Poison messages it settled (see [`super::Supervisor::quarantine`]).
    pub fn poisoned(&self) -> u64 {
        self.poisoned.load(Ordering::Relaxed)
    }

    /// Since when it has been down and why; `None` when up or stopped.
    pub fn down_since(&self) -> Option<(SystemTime, String)> {
        match &*self.lock() {
            State::Down { since, why } => Some((*since, why.clone())),
            _ => None,
        }
    }

    /// Whether it was stopped on purpose.
    pub fn is_stopped(&self) -> bool {
        *self.lock() == State::Stopped
    }

    /// It consumes `queue` now (also after a stop: a consumer started
    /// again).
    pub(crate) fn set_up(&self, queue: &str) {
        queue.clone_into(&mut self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        let mut state = self.lock();
        *state = State::Up {
            since: SystemTime::now(),
        };
        self.up.store(true, Ordering::Relaxed);
        if self.was_up.swap(true, Ordering::Relaxed) {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// It stopped consuming, for `why`. A consumer already down keeps the
    /// time it went down (and its first reason); a stopped one stays stopped.
    pub(crate) fn set_down(&self, why: &str) {
        let mut state = self.lock();
        if matches!(*state, State::Up { .. }) {
            *state = State::Down {
                since: SystemTime::now(),
                why: why.to_owned(),
            };
        }
        self.up.store(false, Ordering::Relaxed);
    }

    /// It was stopped on purpose: it no longer counts for readiness.
    pub(crate) fn set_stopped(&self) {
        *self.lock() = State::Stopped;
        self.up.store(false, Ordering::Relaxed);
    }

    pub(crate) fn count_poison(&self) {
        self.poisoned.fetch_add(1, Ordering::Relaxed);
    }
}

/// A consumer that is down, as readiness reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Down {
    /// Its name (`worker/echo`, `rpc`, ...).
    pub name: String,
    /// The queue it consumes.
    pub queue: String,
    /// Since when.
    pub since: SystemTime,
    /// Why (a short phrase).
    pub why: String,
}

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = chrono::DateTime::<chrono::Utc>::from(self.since)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        write!(
            f,
            "consumer `{}` (queue {}) is down since {since}: {}",
            self.name, self.queue, self.why
        )
    }
}

/// Every supervised consumer of one broker handle.
#[derive(Debug, Default)]
pub struct Consumers {
    /// Consumers not stopped yet; a stopped one leaves at the next read.
    live: Mutex<Vec<Arc<ConsumerStatus>>>,
    /// Per name, what consumers that stopped had counted (so counters never
    /// go back), and every name ever seen (so a gauge reads 0 rather than
    /// vanishing). Bounded: names are roles and configured services.
    retired: Mutex<BTreeMap<String, Retired>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Retired {
    reconnects: u64,
    poisoned: u64,
}

impl Consumers {
    /// A new consumer named `name`, down ("starting") until it first consumes.
    pub fn register(&self, name: &str) -> Arc<ConsumerStatus> {
        let status = Arc::new(ConsumerStatus::new(name));
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default();
        self.lock_live().push(status.clone());
        status
    }

    fn lock_live(&self) -> MutexGuard<'_, Vec<Arc<ConsumerStatus>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The consumers not stopped, after moving the stopped ones' counts to
    /// `retired`.
    fn current(&self) -> Vec<Arc<ConsumerStatus>> {
        let mut live = self.lock_live();
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|c| {
            if !c.is_stopped() {
                return true;
            }
            let r = retired.entry(c.name.clone()).or_default();
            r.reconnects += c.reconnects();
            r.poisoned += c.poisoned();
            false
        });
        live.clone()
    }

    /// The consumers that are down now (not those stopped on purpose),
    /// longest down first.
    pub fn down(&self) -> Vec<Down> {
        let mut down: Vec<Down> = self
            .current()
            .iter()
            .filter_map(|c| {
                let (since, why) = c.down_since()?;
                Some(Down {
                    name: c.name.clone(),
                    queue: c.queue(),
                    since,
                    why,
                })
            })
            .collect();
        down.sort_by_key(|d| d.since);
        down
    }
}

impl Source for Arc<Consumers> {
    fn collect(&self, out: &mut Collected) {
        let live = self.current();
        let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        let out = out.values::<ConsumerValues>();
        for (name, r) in retired.iter() {
            let v = out.named(name);
            v.reconnects += r.reconnects;
            v.poisoned += r.poisoned;
        }
        for c in live {
            let v = out.named(&c.name);
            v.up += i64::from(c.is_up());
            v.reconnects += c.reconnects();
            v.poisoned += c.poisoned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_is_down_until_up_then_down_since_it_was_lost() {
        let all = Consumers::default();
        let c = all.register("worker/echo");
        assert_eq!(all.down().len(), 1, "down while starting");
        c.set_up("q");
        assert!(all.down().is_empty());
        assert_eq!(c.reconnects(), 0, "the first consumer is no reconnect");
        c.set_down("connection lost");
        let first = all.down();
        assert_eq!(first[0].why, "connection lost");
        assert!(
            first[0]
                .to_string()
                .starts_with("consumer `worker/echo` (queue q) is down since ")
        );
        c.set_down("not re-established yet");
        assert_eq!(all.down(), first, "the first reason and time stay");
        c.set_up("q");
        assert_eq!(c.reconnects(), 1);
        c.set_stopped();
        c.set_down("closed");
        assert!(!c.is_up());
        assert!(all.down().is_empty(), "stopped on purpose is not down");
    }

    #[test]
    fn stopped_consumers_leave_but_their_counts_stay() {
        let all = Arc::new(Consumers::default());
        let c = all.register("rpc");
        c.set_up("r");
        c.set_down("x");
        c.set_up("r");
        c.count_poison();
        c.set_stopped();
        let d = all.register("rpc");
        d.set_up("r");
        let mut out = Collected::default();
        all.collect(&mut out);
        let v = out.values::<ConsumerValues>().named("rpc");
        assert_eq!((v.up, v.reconnects, v.poisoned), (1, 1, 1));
        assert_eq!(all.lock_live().len(), 1);
    }
}
