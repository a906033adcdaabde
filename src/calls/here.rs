//! [`PendingHere`]: the calls this gateway answered with a `202` and has
//! not yet seen end, so that a long-poll of one needs no store read to know
//! it is pending.
//!
//! A call is noted before its `202` is sent and forgotten when the tracker
//! ends it, before its long-pollers are woken ([`super::tracker`]); a
//! long-poll takes its watch before it looks here, so an end it does not
//! see here always wakes it. A call ended by another gateway of the same
//! store (cancelled through it, expired by its sweeper) is forgotten when
//! the event hub reads its end event ([`super::tracker::Tracker::end_seen`]);
//! if that event never comes, it stays noted until its deadline, and a
//! long-poll of it here answers when its `wait` runs out (from the store).
//! Past its deadline an entry is not trusted (the store is read) and the
//! sweeper drops it. Bounded: at [`MAX_ENTRIES`] (an entry is the call's id, its
//! caller and its deadline: about 150 bytes), calls are not noted and their
//! long-polls read the store as before.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Calls noted at most.
pub(super) const MAX_ENTRIES: usize = 16_384;

struct Entry {
    caller: String,
    deadline_ms: i64,
}

/// The noted calls, by id.
#[derive(Default)]
pub(super) struct PendingHere {
    calls: Mutex<HashMap<String, Entry>>,
}

impl PendingHere {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes call `id` of `caller`, pending until at most `deadline_ms`.
    pub(super) fn note(&self, id: &str, caller: &str, deadline_ms: i64, now_ms: i64) {
        let mut calls = self.lock();
        if calls.len() >= MAX_ENTRIES {
            calls.retain(|_, e| e.deadline_ms > now_ms);
            if calls.len() >= MAX_ENTRIES {
                return;
            }
        }
        calls.insert(
            id.to_owned(),
            Entry {
                caller: caller.to_owned(),
                deadline_ms,
            },
        );
    }

    /// Whether call `id` of `caller` is noted and within its deadline.
    pub(super) fn is_pending(&self, id: &str, caller: &str, now_ms: i64) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|e| e.caller == caller && e.deadline_ms > now_ms)
    }

    /// Forgets call `id` (it ended).
    pub(super) fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Drops the entries past their deadline.
    pub(super) fn prune(&self, now_ms: i64) {
        self.lock().retain(|_, e| e.deadline_ms > now_ms);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noted_call_is_pending_for_its_caller_until_forgotten_or_past_its_deadline() {
        let here = PendingHere::default();
        here.note("a", "alice", 2_000, 1_000);
        assert!(here.is_pending("a", "alice", 1_500));
        assert!(!here.is_pending("a", "bob", 1_500), "another caller's");
        assert!(!here.is_pending("b", "alice", 1_500), "never noted");
        assert!(!here.is_pending("a", "alice", 2_000), "past its deadline");
        here.forget("a");
        assert!(!here.is_pending("a", "alice", 1_500));
    }

    #[test]
    fn prune_and_the_bound_hold() {
        let here = PendingHere::default();
        here.note("old", "alice", 1_000, 0);
        here.note("new", "alice", 5_000, 0);
        here.prune(2_000);
        assert_eq!(here.len(), 1);
        for i in 0..MAX_ENTRIES + 10 {
            here.note(&i.to_string(), "alice", 10_000, 2_000);
        }
        assert_eq!(here.len(), MAX_ENTRIES);
        assert!(!here.is_pending(&(MAX_ENTRIES + 5).to_string(), "alice", 2_000));
        // Entries past their deadline make room.
        here.note("later", "alice", 20_000, 10_000);
        assert!(here.is_pending("later", "alice", 10_000));
        assert_eq!(here.len(), 1);
    }
}
