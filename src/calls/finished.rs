//! [`FinishedDocs`]: the status documents of recently finished calls, kept
//! in memory so that a poll of a finished call costs no store read.
//!
//! Only documents that can no longer change are kept: a call that ended
//! and has no callback (a callback's delivery state goes on changing in the
//! store). An entry is served until the call's retention passes (the
//! sweeper then removes the call from the store), and the cache is bounded
//! in entries and in bytes (`gateway.finished_cache_entries`,
//! `gateway.finished_cache_bytes`; oldest first out), so it cannot grow with
//! load or with the size of results.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::calls::CallRecord;
use crate::calls::document::StatusDocument;

/// A document larger than this (or than the byte budget) is not kept: it
/// is read from the store.
const MAX_DOC: usize = 64 * 1024;

/// One finished call's document, serialized once.
#[derive(Debug)]
pub(crate) struct FinishedDoc {
    /// Who made the call: only they may read it.
    pub caller: String,
    /// When it ended (ms since the epoch).
    pub completed_ms: i64,
    /// The JSON status document.
    pub body: Bytes,
}

/// The cache. Shared by the gateway's workers; the lock is held for map
/// operations only.
#[derive(Debug)]
pub(super) struct FinishedDocs {
    state: Mutex<State>,
    /// Entries kept at most.
    max_entries: usize,
    /// Bytes of documents kept at most.
    max_bytes: usize,
    /// Calls finished longer ago than this are not served (they are about
    /// to be removed from the store); `i64::MAX` until the sweeper says.
    retention_ms: AtomicI64,
}

#[derive(Debug, Default)]
struct State {
    docs: HashMap<String, Arc<FinishedDoc>>,
    order: VecDeque<String>,
    bytes: usize,
}

impl FinishedDocs {
    /// An empty cache of at most `max_entries` documents and `max_bytes`.
    pub(super) fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_entries,
            max_bytes,
            retention_ms: AtomicI64::new(i64::MAX),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets how long finished calls stay in the store.
    pub(super) fn set_retention_ms(&self, ms: i64) {
        self.retention_ms.store(ms, Ordering::Relaxed);
    }

    /// The document of `id`, if it is kept and within its retention.
    pub(super) fn get(&self, id: &str, now_ms: i64) -> Option<Arc<FinishedDoc>> {
        let doc = self.lock().docs.get(id).cloned()?;
        let age = now_ms.saturating_sub(doc.completed_ms);
        (age < self.retention_ms.load(Ordering::Relaxed)).then_some(doc)
    }

    /// Keeps `doc`, the document of `call`, if it can no longer change.
    pub(super) fn remember(&self, call: &CallRecord, doc: &StatusDocument) {
        let (true, None, Some(completed_ms)) =
            (call.status.is_terminal(), &call.callback, call.completed_ms)
        else {
            return;
        };
        if self.lock().docs.contains_key(&call.id) {
            return;
        }
        let Ok(body) = serde_json::to_vec(doc) else {
            return;
        };
        if body.len() > MAX_DOC.min(self.max_bytes) || self.max_entries == 0 {
            return;
        }
        let doc = Arc::new(FinishedDoc {
            caller: call.caller.clone(),
            completed_ms,
            body: Bytes::from(body),
        });
        let mut st = self.lock();
        if st.docs.contains_key(&call.id) {
            return;
        }
        st.bytes += doc.body.len();
        st.docs.insert(call.id.clone(), doc);
        st.order.push_back(call.id.clone());
        while st.docs.len() > self.max_entries || st.bytes > self.max_bytes {
            let Some(old) = st.order.pop_front() else {
                break;
            };
            if let Some(d) = st.docs.remove(&old) {
                st.bytes -= d.body.len();
            }
        }
    }

    /// Documents kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().docs.len()
    }

    /// Whether none is kept.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls::{CallStatus, StoredResult};

    fn remember(docs: &FinishedDocs, call: &CallRecord) {
        docs.remember(call, &StatusDocument::of(call));
    }

    fn call(id: &str, status: CallStatus, body: usize) -> CallRecord {
        CallRecord {
            id: id.into(),
            caller: "alice".into(),
            service: "echo".into(),
            status,
            created_ms: 1_000,
            completed_ms: status.is_terminal().then_some(2_000),
            deadline_ms: 30_000,
            published: true,
            idem_key: None,
            body_hash: None,
            traceparent: None,
            result: status.is_terminal().then(|| StoredResult {
                status: 200,
                content_type: "application/json".into(),
                body: vec![b'1'; body],
            }),
            callback: None,
            progress: None,
        }
    }

    const MAX_ENTRIES: usize = 1000;

    fn cache() -> FinishedDocs {
        FinishedDocs::new(MAX_ENTRIES, 16 * 1024 * 1024)
    }

    #[test]
    fn keeps_finished_calls_only_and_serves_the_document_the_store_would() {
        let docs = cache();
        remember(&docs, &call("p", CallStatus::Pending, 0));
        assert!(docs.get("p", 2_000).is_none(), "a pending call changes");
        let done = call("d", CallStatus::Succeeded, 10);
        remember(&docs, &done);
        let got = docs.get("d", 2_000).expect("kept");
        assert_eq!(got.caller, "alice");
        assert_eq!(
            got.body,
            serde_json::to_vec(&StatusDocument::of(&done)).unwrap()
        );
    }

    #[test]
    fn a_call_with_a_callback_is_not_kept() {
        let docs = cache();
        let mut c = call("c", CallStatus::Succeeded, 10);
        c.callback = Some(crate::calls::CallbackRecord {
            url: "http://127.0.0.1:1/hook".into(),
            state: crate::calls::CallbackState::Delivered,
            attempts: 1,
            next_ms: None,
            last_error: None,
            event_id: None,
            body: None,
            history: Vec::new(),
        });
        remember(&docs, &c);
        assert!(docs.is_empty());
    }

    #[test]
    fn retention_and_bounds_hold() {
        let docs = cache();
        docs.set_retention_ms(1_000);
        remember(&docs, &call("r", CallStatus::Succeeded, 10));
        assert!(docs.get("r", 2_999).is_some());
        assert!(docs.get("r", 3_000).is_none(), "past its retention");
        remember(&docs, &call("big", CallStatus::Succeeded, MAX_DOC));
        assert!(docs.get("big", 2_000).is_none(), "too large to keep");
        for i in 0..MAX_ENTRIES + 10 {
            remember(&docs, &call(&i.to_string(), CallStatus::Failed, 1));
        }
        assert_eq!(docs.len(), MAX_ENTRIES);
        assert!(docs.get("0", 2_000).is_none(), "oldest out first");
    }

    #[test]
    fn the_byte_budget_evicts_the_oldest() {
        let one = serde_json::to_vec(&StatusDocument::of(&call("a", CallStatus::Succeeded, 1000)))
            .unwrap()
            .len();
        // Room for three such documents, not four.
        let docs = FinishedDocs::new(MAX_ENTRIES, one * 3 + one / 2);
        for id in ["a", "b", "c", "d"] {
            remember(&docs, &call(id, CallStatus::Succeeded, 1000));
        }
        assert_eq!(docs.len(), 3);
        assert!(docs.get("a", 2_000).is_none(), "evicted by bytes");
        assert!(docs.get("d", 2_000).is_some());
    }
}
