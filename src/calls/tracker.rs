//! [`Tracker`]: the life of a call that outlives its HTTP request.
//!
//! It finishes stored calls (from a reply awaited in the background, a reply
//! that arrives after a restart through the RPC client's orphan sink, a dead
//! letter, or the deadline), publishes their lifecycle CloudEvents, wakes
//! long-pollers and hands callbacks to the dispatcher. Every way a call ends
//! goes through [`Tracker::complete`], which changes a call only while it is
//! pending, so each call ends exactly once (a cancellation too,
//! [`Tracker::cancel`]). It also records the progress its workers report
//! ([`Tracker::progress_sink`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use deadpool_lapin::lapin::Connection;
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::amqp::consumer::{Consuming, Declare, settle};
use crate::amqp::{Broker, ConsumerSpec, InFlight, Supervisor, topology, wire};
use crate::callbacks::DispatcherHandle;
use crate::calls::document::StatusDocument;
use crate::calls::metrics::Mode;
use crate::calls::{CallRecord, CallStatus, CallStore, StoredResult};
use crate::error::{Error, Result};
use crate::events::{self, CloudEvent};
use crate::rpc::OrphanSink;
use crate::worker::Reply;

/// `type` of the event published when a call is accepted with a 202.
pub(crate) const EVENT_ACCEPTED: &str = crate::amqp::wire::EVENT_CALL_ACCEPTED;
/// `type` of the event published when a call ends.
pub(crate) const EVENT_COMPLETED: &str = crate::amqp::wire::EVENT_CALL_COMPLETED;
/// `type` of the event published when a worker reports progress.
pub(crate) const EVENT_PROGRESS: &str = crate::amqp::wire::EVENT_CALL_PROGRESS;
/// `type` of the event published when a caller cancels a call.
pub(crate) const EVENT_CANCELLED: &str = crate::amqp::wire::EVENT_CALL_CANCELLED;
use crate::amqp::wire::EXT_CALLER;

/// How a call ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The service replied.
    Reply(Reply),
    /// No reply before the service's deadline.
    Expired,
    /// The request was dead-lettered after failing on every delivery.
    DeadLettered,
    /// Its caller cancelled it.
    Cancelled,
}

/// The call lifecycle. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Tracker {
    inner: Arc<Inner>,
}

struct Inner {
    store: CallStore,
    broker: Broker,
    /// CloudEvents `source` of lifecycle events.
    source: String,
    callbacks: Option<DispatcherHandle>,
    /// Long-pollers waiting for a call to end, by call id.
    watchers: Mutex<Watchers>,
    /// Bound on the watches held ([`Watch::hold`]).
    max_watchers: usize,
    /// Watches held now.
    watcher_count: AtomicUsize,
    /// Documents of finished calls, served without a store read.
    finished: super::finished::FinishedDocs,
    /// Calls accepted here and not ended yet ([`Tracker::note_accepted`]).
    here: super::here::PendingHere,
    /// `gateway.inline_result_max_bytes`: larger results are left out of
    /// lifecycle events.
    inline_result_max_bytes: usize,
    /// Calls whose `accepted` event is being published
    /// ([`Tracker::publish_accepted`]): their end waits for it. Each
    /// receiver's sender is dropped once the publish is over.
    accepting: Mutex<HashMap<String, tokio::sync::watch::Receiver<()>>>,
    /// Calls whose end event could not be published here: published when
    /// their reply or dead letter comes back ([`Tracker::end`]).
    unpublished: Mutex<std::collections::HashSet<String>>,
}

impl Inner {
    fn lock_watchers(&self) -> std::sync::MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The watches on calls' ends ([`Tracker::watch`]).
#[derive(Default)]
struct Watchers {
    by_id: HashMap<String, Vec<Waiter>>,
    /// The key of the last watch made.
    next: u64,
}

/// One watch in [`Watchers`].
struct Waiter {
    key: u64,
    tx: oneshot::Sender<()>,
    /// Counted in `watcher_count` ([`Watch::hold`]).
    held: bool,
}

/// A long-poll's watch on a call's end ([`Tracker::watch`]); removed from
/// the tracker when dropped.
pub(crate) struct Watch {
    inner: Arc<Inner>,
    id: String,
    key: u64,
    /// `None` once given up at the bound.
    rx: Option<oneshot::Receiver<()>>,
}

impl Watch {
    /// Counts the watch among the long-pollers, within their bound
    /// (`gateway.max_streams`); false, and the watch is given up, at the
    /// bound: the caller then answers with the current state.
    pub(crate) fn hold(&mut self) -> bool {
        let mut w = self.inner.lock_watchers();
        let Some(mine) = w
            .by_id
            .get_mut(&self.id)
            .and_then(|v| v.iter_mut().find(|x| x.key == self.key))
        else {
            // Woken already: waiting returns at once.
            return true;
        };
        if mine.held {
            return true;
        }
        if self.inner.watcher_count.load(Ordering::Relaxed) >= self.inner.max_watchers {
            drop(w);
            self.give_up();
            return false;
        }
        mine.held = true;
        self.inner.watcher_count.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Until the call ends or `limit` passes.
    pub(crate) async fn wait(&mut self, limit: Duration) {
        if let Some(rx) = self.rx.as_mut() {
            let _ = tokio::time::timeout(limit, rx).await;
        }
    }

    /// Removes the watch from the tracker (if its call has not ended yet).
    fn give_up(&mut self) {
        self.rx = None;
        let mut w = self.inner.lock_watchers();
        let Some(v) = w.by_id.get_mut(&self.id) else {
            return;
        };
        if let Some(pos) = v.iter().position(|x| x.key == self.key) {
            if v.swap_remove(pos).held {
                self.inner.watcher_count.fetch_sub(1, Ordering::Relaxed);
            }
            if v.is_empty() {
                w.by_id.remove(&self.id);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.give_up();
    }
}

impl Tracker {
    /// A tracker over `store` that publishes on `broker`, with the bounds of
    /// `g` (`max_streams` long-pollers, the finished-call cache, results
    /// inlined in events).
    pub(crate) fn new(
        store: CallStore,
        broker: Broker,
        callbacks: Option<DispatcherHandle>,
        g: &crate::settings::GatewaySettings,
    ) -> Self {
        let source = format!("/switchboard/{}", broker.instance_id());
        Self {
            inner: Arc::new(Inner {
                store,
                broker,
                source,
                callbacks,
                watchers: Mutex::new(Watchers::default()),
                max_watchers: g.max_streams,
                watcher_count: AtomicUsize::new(0),
                finished: super::finished::FinishedDocs::new(
                    g.finished_cache_entries,
                    g.finished_cache_bytes,
                ),
                here: super::here::PendingHere::default(),
                inline_result_max_bytes: g.inline_result_max_bytes,
                accepting: Mutex::new(HashMap::new()),
                unpublished: Mutex::new(std::collections::HashSet::new()),
            }),
        }
    }

    /// The store.
    pub(crate) fn store(&self) -> &CallStore {
        &self.inner.store
    }

    /// The kept document of a finished call (see [`super::finished`]).
    pub(crate) fn finished(&self, id: &str) -> Option<Arc<super::finished::FinishedDoc>> {
        self.inner.finished.get(id, wire::now_ms() as i64)
    }

    /// Notes call `id` of `caller`, about to be answered with a `202`, as
    /// pending here until the tracker ends it (or `deadline_ms` passes): a
    /// long-poll of it then reads no store ([`Tracker::pending_here`]).
    pub(crate) fn note_accepted(&self, id: &str, caller: &str, deadline_ms: i64) {
        self.inner
            .here
            .note(id, caller, deadline_ms, wire::now_ms() as i64);
    }

    /// Whether call `id` of `caller` was accepted here and has not ended
    /// (as far as this gateway knows: see [`super::here`]). Asked after
    /// taking a [`Watch`] on it: an end not seen here wakes that watch.
    pub(crate) fn pending_here(&self, id: &str, caller: &str) -> bool {
        self.inner
            .here
            .is_pending(id, caller, wire::now_ms() as i64)
    }

    /// Told by the event hub of a lifecycle event of type `ty` about call
    /// `subject`: an end, made by any gateway of the store, forgets the call
    /// here and wakes its long-polls, which read it from the store (written
    /// before its event is published). An end made here comes back too:
    /// its watchers are gone already, so that costs two map lookups.
    pub(crate) fn end_seen(&self, ty: &str, subject: Option<&str>) {
        if let (EVENT_COMPLETED | EVENT_CANCELLED, Some(id)) = (ty, subject) {
            self.wake_watchers(id);
        }
    }

    /// Keeps `doc`, `call`'s document, if it can no longer change.
    pub(crate) fn remember_finished(&self, call: &CallRecord, doc: &StatusDocument) {
        self.inner.finished.remember(call, doc);
    }

    /// `event`, a lifecycle event about `call`, as it may be published: with
    /// the document of [`StatusDocument::for_events`] when the result is
    /// over `gateway.inline_result_max_bytes` (same id, same attributes).
    pub(crate) fn inline_bounded(&self, mut event: CloudEvent, call: &CallRecord) -> CloudEvent {
        let doc = StatusDocument::for_events(call, self.inner.inline_result_max_bytes);
        if doc.result_omitted {
            event.data = Some(serde_json::to_value(&doc).unwrap_or(Value::Null));
        }
        event
    }

    /// The document of `call` as lifecycle events carry it
    /// ([`StatusDocument::for_events`]).
    pub(crate) fn event_document(&self, call: &CallRecord) -> StatusDocument {
        StatusDocument::for_events(call, self.inner.inline_result_max_bytes)
    }

    /// A lifecycle CloudEvent about `doc`.
    pub(crate) fn lifecycle_event(
        &self,
        ty: &str,
        doc: &StatusDocument,
        caller: &str,
        traceparent: Option<&str>,
    ) -> CloudEvent {
        let data = serde_json::to_value(doc).unwrap_or(Value::Null);
        let mut event = CloudEvent::new(ty, self.inner.source.clone(), data).with_subject(&doc.id);
        // A call's `accepted` and its end happen once each: their id and
        // time are the call's, so that an event published again (by the
        // adopter of a gateway killed before its publish was confirmed) is
        // the same event, and consumers drop the copy by id.
        let at = match ty {
            EVENT_ACCEPTED => Some(doc.created_at.as_str()),
            EVENT_COMPLETED | EVENT_CANCELLED => doc.completed_at.as_deref(),
            _ => None,
        };
        if let Some(at) = at {
            event.id = events::lifecycle_event_id(&doc.id, ty);
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(at) {
                event.time = Some(t.with_timezone(&chrono::Utc));
            }
        }
        event
            .extensions
            .insert(EXT_CALLER.into(), Value::String(caller.to_owned()));
        if let Some(tp) = traceparent {
            event
                .extensions
                .insert("traceparent".into(), Value::String(tp.to_owned()));
        }
        event
    }

    /// Publishes a lifecycle event; a failure is logged, not returned: the
    /// call itself is already safe in the store. Whether it was confirmed.
    pub(crate) async fn publish_event(&self, event: &CloudEvent) -> bool {
        match events::publish(&self.inner.broker, event).await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, event_type = %event.ty, subject = ?event.subject, "lifecycle event not published");
                false
            }
        }
    }

    /// Publishes `event`, the `accepted` event of call `id`, in a task of its
    /// own, waiting at most `limit` for its confirm: the `202` is not held
    /// for it (the call is stored and its request confirmed already). The
    /// call's end, whichever way it comes, publishes its own event only once
    /// this publish is over, so that no subscriber sees a call end before it
    /// began.
    pub(crate) fn publish_accepted(&self, id: &str, event: CloudEvent, limit: Duration) {
        let (done, rx) = tokio::sync::watch::channel(());
        self.lock_accepting().insert(id.to_owned(), rx);
        let tracker = self.clone();
        let id = id.to_owned();
        tokio::spawn(
            async move {
                let _ = tokio::time::timeout(limit, tracker.publish_event(&event)).await;
                tracker.lock_accepting().remove(&id);
                drop(done);
            }
            .instrument(tracing::Span::current()),
        );
    }

    fn lock_accepting(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, tokio::sync::watch::Receiver<()>>> {
        self.inner
            .accepting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Until the `accepted` event of call `id` is published, if it is
    /// being published.
    async fn accepted_out(&self, id: &str) {
        let publishing = self.lock_accepting().get(id).cloned();
        if let Some(mut rx) = publishing {
            // Err once the publishing task dropped its sender: over.
            let _ = rx.changed().await;
        }
    }

    /// Ends a stored call with `outcome`, once: publishes the completed
    /// event, wakes its long-pollers and schedules its callback. Returns
    /// whether this call changed the call (false: unknown or already ended).
    pub(crate) async fn complete(&self, id: &str, outcome: Outcome) -> Result<bool> {
        self.end(id, outcome, false, false).await
    }

    /// [`Tracker::complete`] from a message (a reply, a dead letter) that
    /// the broker delivers `again`: it was delivered before and not acked,
    /// so whoever took it first may have stored the call's end and died
    /// before its event was confirmed (a message is acked only after both).
    /// Then a call found ended with this very outcome gets its end event
    /// published again, rebuilt from the stored call: the same id
    /// ([`events::lifecycle_event_id`]), so a consumer that had it drops
    /// the copy. A reply does so whether redelivered or not (the orphan
    /// sink does not know): a call found ended with exactly that reply was
    /// ended by it, or by a copy of it.
    pub(crate) async fn complete_again(
        &self,
        id: &str,
        outcome: Outcome,
        again: bool,
    ) -> Result<bool> {
        self.end(id, outcome, false, again).await
    }

    /// [`Tracker::complete`] for a call whose reply was the HTTP answer (it
    /// was stored only for its idempotency key): the gateway counted it.
    pub(crate) async fn complete_answered(&self, id: &str, outcome: Outcome) -> Result<bool> {
        self.end(id, outcome, true, false).await
    }

    async fn end(&self, id: &str, outcome: Outcome, answered: bool, again: bool) -> Result<bool> {
        let now = wire::now_ms() as i64;
        let cancelled = matches!(outcome, Outcome::Cancelled);
        let reply = matches!(outcome, Outcome::Reply(_));
        let (status, result) = match outcome {
            Outcome::Reply(r) => (
                CallStatus::of_reply(r.status),
                Some(StoredResult {
                    status: r.status,
                    content_type: r.content_type,
                    body: r.body.to_vec(),
                }),
            ),
            Outcome::Expired => (CallStatus::Expired, None),
            Outcome::DeadLettered => (
                CallStatus::Failed,
                Some(StoredResult {
                    status: 502,
                    content_type: wire::CONTENT_PROBLEM.into(),
                    body: wire::problem_body(
                        502,
                        "Bad Gateway",
                        Some("the request failed on every delivery and was dead-lettered"),
                    ),
                }),
            ),
            Outcome::Cancelled => (CallStatus::Cancelled, None),
        };
        // Most calls have no callback: ended by one statement that returns
        // the call, no read first. `None`: unknown, ended, or with a
        // callback, whose delivery body is made from the call before its
        // end is stored.
        if let Some(call) = self
            .inner
            .store
            .complete_plain(id, status, result.clone(), now)
            .await?
        {
            let doc = StatusDocument::of(&call);
            let event = self.end_event(cancelled, &doc, &call);
            self.ended(&call, &doc, event, cancelled, answered, now)
                .await;
            return Ok(true);
        }
        let Some(mut call) = self.inner.store.get(id).await? else {
            return Ok(false);
        };
        if call.status.is_terminal() {
            // Its end event may not be out: the reply that ended it comes
            // again (a reply is acked only once its call's end is stored and
            // its event published: a gateway killed in between leaves it in
            // the queue, for its adopter or itself once back), a dead
            // letter is redelivered, or its publish failed here. Dead
            // letters only when redelivered: every gateway gets a copy of
            // each, and all but one find the call ended.
            let maybe_unpublished = reply || again || self.take_unpublished(id);
            if maybe_unpublished && call.status == status && call.result == result {
                self.publish_end_again(&call).await;
            }
            if call.status == CallStatus::Cancelled && reply {
                info!(call_id = %id, service = %call.service, "reply of a cancelled call dropped");
                self.inner
                    .broker
                    .metrics()
                    .calls()
                    .reply_after_cancel(&call.service);
            }
            return Ok(false);
        }
        call.status = status;
        call.completed_ms = Some(now);
        call.result = result.clone();
        if let Some(cb) = call.callback.as_mut() {
            cb.state = crate::calls::CallbackState::Pending;
        }
        let doc = StatusDocument::of(&call);
        let event = self.end_event(cancelled, &doc, &call);
        // A callback carries the whole result (it is kept in the store, not
        // in memory); the event on the exchange only up to the inline bound.
        let body = match &call.callback {
            Some(_) => Some(serde_json::to_vec(&event).map_err(|source| Error::Encode {
                what: "a call's completion event",
                source,
            })?),
            None => None,
        };
        let callback = body.as_deref().map(|b| (event.id.as_str(), b));
        if !self
            .inner
            .store
            .complete(id, status, result.as_ref(), now, callback)
            .await?
        {
            return Ok(false);
        }
        self.ended(&call, &doc, event, cancelled, answered, now)
            .await;
        Ok(true)
    }

    /// The event that tells of `call`'s end: completed, or cancelled.
    fn end_event(&self, cancelled: bool, doc: &StatusDocument, call: &CallRecord) -> CloudEvent {
        self.lifecycle_event(
            if cancelled {
                EVENT_CANCELLED
            } else {
                EVENT_COMPLETED
            },
            doc,
            &call.caller,
            call.traceparent.as_deref(),
        )
    }

    /// Publishes the end event of `call`, ended already, again: rebuilt
    /// from the stored call, with the id and time of the first
    /// ([`Tracker::lifecycle_event`]). After its `accepted`, if that is
    /// being published here.
    async fn publish_end_again(&self, call: &CallRecord) -> bool {
        let doc = StatusDocument::of(call);
        let event = self.end_event(call.status == CallStatus::Cancelled, &doc, call);
        let event = self.inline_bounded(event, call);
        self.accepted_out(&call.id).await;
        if self.publish_event(&event).await {
            info!(call_id = %call.id, event_id = %event.id, "end event of a call ended before published again");
            self.inner
                .broker
                .metrics()
                .calls()
                .end_event_republished(&call.service);
            true
        } else {
            self.note_unpublished(&call.id);
            false
        }
    }

    /// Publishes the end events that instance `of` owes (calls it ended in
    /// a way no message tells again, expired or cancelled, and whose event
    /// it did not see confirmed: [`CallStore::owed_end_events`]) of calls
    /// ended before `ended_before_ms`, rebuilt from the stored calls (the
    /// same id and time), each after the call's `accepted` when `of` stored
    /// the call too (it may have died before that one's confirm); then
    /// clears their flag. Run by the adopter of a dead gateway, by a
    /// gateway at its start for its own instance id, and now and then by
    /// a live gateway for its own ends whose publish failed. Returns how
    /// many are still owed (their publish failed, or more than a round).
    pub(crate) async fn publish_owed_ends(&self, of: &str, ended_before_ms: i64) -> Result<usize> {
        let owed = self
            .inner
            .store
            .owed_end_events(of, ended_before_ms, OWED_ROUND)
            .await?;
        let full = owed.len() as i64 >= OWED_ROUND;
        let mut left = usize::from(full);
        for (call, stored_here) in owed {
            if stored_here && let Err(e) = self.publish_accepted_again(&call.id).await {
                warn!(call_id = %call.id, error = %e, "accepted event of a call not published again");
            }
            if self.publish_end_again(&call).await {
                self.inner.store.end_event_published(&call.id).await?;
            } else {
                left += 1;
            }
        }
        Ok(left)
    }

    /// Publishes the end event of ended call `id` again if it is still
    /// owed ([`CallStore::owed_end_events`]: its ender did not see it
    /// confirmed), and clears that: a `DELETE` of a call that has ended
    /// does so (its caller may ask again after a cancellation whose answer
    /// it never got). Nothing when nobody owes it: repeated requests
    /// publish no copies.
    pub(crate) async fn publish_owed_end(&self, id: &str) -> Result<()> {
        if let Some(call) = self.inner.store.owed_end_event(id).await?
            && self.publish_end_again(&call).await
        {
            self.inner.store.end_event_published(id).await?;
        }
        Ok(())
    }

    /// Publishes the `accepted` event of stored call `id` again, as it was
    /// first made (its document when it was accepted; the same id and
    /// time): the adopter of a dead gateway does so before it ends one of
    /// its calls, as that gateway may have died between the `202` and the
    /// event's confirm. Nothing when the call is unknown.
    pub(crate) async fn publish_accepted_again(&self, id: &str) -> Result<()> {
        let Some(mut call) = self.inner.store.get(id).await? else {
            return Ok(());
        };
        call.status = CallStatus::Pending;
        call.completed_ms = None;
        call.result = None;
        call.progress = None;
        if let Some(cb) = call.callback.as_mut() {
            *cb = crate::calls::CallbackRecord::waiting(std::mem::take(&mut cb.url));
        }
        let doc = StatusDocument::of(&call);
        let event = self.lifecycle_event(
            EVENT_ACCEPTED,
            &doc,
            &call.caller,
            call.traceparent.as_deref(),
        );
        self.publish_event(&event).await;
        Ok(())
    }

    /// Remembers that the end event of call `id` could not be published
    /// (bounded: all are forgotten once [`UNPUBLISHED_KEPT`] are held).
    fn note_unpublished(&self, id: &str) {
        let mut u = self
            .inner
            .unpublished
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if u.len() >= UNPUBLISHED_KEPT {
            u.clear();
        }
        u.insert(id.to_owned());
    }

    /// Whether the end event of call `id` could not be published here (and
    /// forgets it).
    fn take_unpublished(&self, id: &str) -> bool {
        let mut u = self
            .inner
            .unpublished
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        !u.is_empty() && u.remove(id)
    }

    /// After `call`'s end is stored (`doc` its document now, `event` the
    /// event that tells of it): counts it, keeps its document, publishes
    /// the event, wakes its long-pollers and its callback's dispatcher.
    async fn ended(
        &self,
        call: &CallRecord,
        doc: &StatusDocument,
        event: CloudEvent,
        cancelled: bool,
        answered: bool,
        now: i64,
    ) {
        let id = call.id.as_str();
        info!(call_id = %id, service = %call.service, status = call.status.as_str(), "call completed");
        self.remember_finished(call, doc);
        if cancelled {
            self.inner.broker.metrics().calls().cancelled(&call.service);
        }
        let event = self.inline_bounded(event, call);
        if !answered {
            count_finished(&self.inner.broker, call, now);
        }
        // The event first: whoever learns of the end by polling can count on
        // it being on the events exchange already; after the call's
        // `accepted`, if that is still being published.
        self.accepted_out(id).await;
        if !self.publish_event(&event).await {
            // Its reply (or dead letter) comes back if its ack is lost too:
            // the event goes out then ([`Tracker::end`]); an end no message
            // tells is flagged in the store ([`Tracker::publish_owed_ends`]).
            self.note_unpublished(id);
        } else if matches!(call.status, CallStatus::Expired | CallStatus::Cancelled)
            && self.inner.store.instance().is_some()
        {
            // Flagged by the end's `UPDATE` (no message tells it again):
            // confirmed, nobody owes it any more.
            if let Err(e) = self.inner.store.end_event_published(id).await {
                warn!(call_id = %id, error = %e, "end event's flag not cleared; it may be published again");
            }
        }
        self.wake_watchers(id);
        if call.callback.is_some()
            && let Some(cb) = &self.inner.callbacks
        {
            cb.wake();
        }
    }

    /// Takes over `pending`, whose HTTP request has been answered with a
    /// 202: the call is detached from the RPC client, so its reply goes to
    /// the orphan sink ([`Tracker::orphan_sink`]) and its deadline to the
    /// sweeper. No task or waiter is held per pending call: a pending call
    /// costs a row in the store (and, within its bound, an entry of
    /// [`super::here`]). A reply that arrived before the detach is stored
    /// here.
    pub(crate) fn adopt(&self, pending: crate::rpc::PendingReply) {
        let id = pending.call_id().to_owned();
        let Some(routed) = pending.detach() else {
            return;
        };
        let tracker = self.clone();
        tokio::spawn(async move {
            // The reply is acked only once stored: a gateway killed before
            // finds it in its reply queue again.
            match tracker
                .complete(&id, Outcome::Reply(routed.reply().clone()))
                .await
            {
                Ok(_) => {
                    routed.done();
                }
                Err(e) => {
                    warn!(call_id = %id, error = %e, "could not store the call's end; its reply goes back to the queue");
                    routed.hand_back().await;
                }
            }
        });
    }

    /// The sink for replies the RPC client does not wait for: the replies of
    /// every call answered with a 202 (and of calls from before a restart)
    /// finish their stored call here. No task or waiter is held per pending
    /// call: a pending call costs a row in the store (and, within its
    /// bound, an entry of [`super::here`]: its id, caller and deadline).
    pub(crate) fn orphan_sink(&self) -> OrphanSink {
        let tracker = self.clone();
        Arc::new(move |id: String, reply: Reply| {
            let tracker = tracker.clone();
            Box::pin(async move { tracker.complete(&id, Outcome::Reply(reply)).await })
        })
    }

    /// Cancels pending call `id` for its caller: it ends as `cancelled`
    /// (event `switchboard.call.cancelled`, which workers watch; its
    /// callback, long-pollers and streams are told as for any end). False
    /// when it had already ended.
    pub(crate) async fn cancel(&self, id: &str) -> Result<bool> {
        self.end(id, Outcome::Cancelled, false, false).await
    }

    /// Records a progress report on its stored call, while it is pending,
    /// and publishes `switchboard.call.progress`; whether a call took it. A
    /// store failure is logged: a report is not worth a retry.
    pub(crate) async fn progress(&self, p: crate::worker::Progress) -> bool {
        let now = wire::now_ms() as i64;
        let recorded = self
            .inner
            .store
            .record_progress(&p.call_id, p.fraction, p.note.as_deref(), now)
            .await;
        match recorded {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                warn!(call_id = %p.call_id, error = %e, "progress not recorded");
                return false;
            }
        }
        match self.inner.store.get(&p.call_id).await {
            Ok(Some(call)) if !call.status.is_terminal() => {
                let doc = StatusDocument::of(&call);
                let event = self.lifecycle_event(
                    EVENT_PROGRESS,
                    &doc,
                    &call.caller,
                    call.traceparent.as_deref(),
                );
                self.publish_event(&event).await;
            }
            Ok(_) => {}
            Err(e) => warn!(call_id = %p.call_id, error = %e, "progress event not published"),
        }
        true
    }

    /// The sink for progress reports of calls the RPC client does not
    /// follow in memory: every call answered with a 202.
    pub(crate) fn progress_sink(&self) -> crate::rpc::ProgressSink {
        let tracker = self.clone();
        Arc::new(move |p: crate::worker::Progress| {
            let tracker = tracker.clone();
            Box::pin(async move { tracker.progress(p).await })
        })
    }

    /// A watch on `id` that fires when it ends from now on. Not counted
    /// among the long-pollers (nor bounded) until [`Watch::hold`]; removed
    /// when dropped. Taken before the call is read, so that an end after the
    /// read always reaches it: a long-poll reads its call once.
    pub(crate) fn watch(&self, id: &str) -> Watch {
        let (tx, rx) = oneshot::channel();
        let mut w = self.lock_watchers();
        w.next += 1;
        let key = w.next;
        w.by_id.entry(id.to_owned()).or_default().push(Waiter {
            key,
            tx,
            held: false,
        });
        Watch {
            inner: self.inner.clone(),
            id: id.to_owned(),
            key,
            rx: Some(rx),
        }
    }

    fn lock_watchers(&self) -> std::sync::MutexGuard<'_, Watchers> {
        self.inner.lock_watchers()
    }

    /// Long-pollers waiting now.
    pub(crate) fn watchers(&self) -> usize {
        self.inner.watcher_count.load(Ordering::Relaxed)
    }

    fn wake_watchers(&self, id: &str) {
        // No longer pending here, before anyone is woken: a long-poll that
        // still finds it here has its watch in place already.
        self.inner.here.forget(id);
        let waiters = self.lock_watchers().by_id.remove(id).unwrap_or_default();
        let held = waiters.iter().filter(|w| w.held).count();
        self.inner.watcher_count.fetch_sub(held, Ordering::Relaxed);
        for w in waiters {
            let _ = w.tx.send(());
        }
    }

    /// Resumes after a start: drops calls never confirmed by the broker
    /// (nobody got a 202 for them) and returns how many calls are pending.
    pub(crate) async fn resume(&self) -> Result<usize> {
        self.drop_unsent().await?;
        // Ends this instance id stored before this start (an earlier process,
        // killed) whose events it did not see confirmed.
        if let Some(me) = self.inner.store.instance().map(str::to_owned) {
            match self.publish_owed_ends(&me, wire::now_ms() as i64 + 1).await {
                Ok(0) => {}
                Ok(left) => warn!(
                    left,
                    "end events owed by this instance not all published yet"
                ),
                Err(e) => warn!(error = %e, "end events owed by this instance not published"),
            }
        }
        let pending = self.inner.store.pending().await?;
        if let Some(cb) = &self.inner.callbacks {
            cb.wake();
        }
        Ok(pending.len())
    }

    /// Drops calls whose request was never confirmed by the broker, stored
    /// more than [`super::instances::UNSENT_GRACE`] ago: another gateway
    /// sharing the store may be waiting for the confirm of a younger one.
    async fn drop_unsent(&self) -> Result<()> {
        let grace = super::instances::UNSENT_GRACE.as_millis() as i64;
        let before = wire::now_ms() as i64 - grace;
        let dropped = self.inner.store.drop_unpublished(before).await?;
        if dropped > 0 {
            info!(
                dropped,
                "dropped calls whose request was never confirmed (no 202 was given)"
            );
        }
        Ok(())
    }

    /// The broker it publishes on.
    pub(crate) fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// Every second, ends pending calls past their deadline as expired
    /// (except those of a dead gateway not drained yet: see
    /// [`CallStore::overdue`]); every minute, removes calls finished longer
    /// than `retention` ago and drops calls never sent (a gateway that died
    /// between storing a call and its confirm leaves one).
    pub(crate) fn spawn_sweeper(&self, retention: Duration, cancel: CancellationToken) {
        self.inner
            .finished
            .set_retention_ms(retention.as_millis().min(i64::MAX as u128) as i64);
        let tracker = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                n += 1;
                let now = wire::now_ms() as i64;
                tracker.inner.here.prune(now);
                match tracker.inner.store.overdue(now, 1000).await {
                    Ok(ids) => {
                        for id in ids {
                            if let Err(e) = tracker.complete(&id, Outcome::Expired).await {
                                warn!(call_id = %id, error = %e, "could not expire a call");
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "deadline sweep failed"),
                }
                if n % 60 == 1 {
                    if let Err(e) = tracker.drop_unsent().await {
                        warn!(error = %e, "unsent calls not dropped");
                    }
                    // Its own ends whose event's publish failed here.
                    if let Some(me) = tracker.inner.store.instance().map(str::to_owned)
                        && let Err(e) = tracker
                            .publish_owed_ends(&me, now - OWED_GRACE.as_millis() as i64)
                            .await
                    {
                        warn!(error = %e, "owed end events not published");
                    }
                    let before = now - retention.as_millis() as i64;
                    match tracker.inner.store.purge(before).await {
                        Ok(0) => {}
                        Ok(k) => info!(removed = k, "finished calls past their retention removed"),
                        Err(e) => warn!(error = %e, "retention purge failed"),
                    }
                }
            }
        });
    }

    /// Consumes the gateway's copy of dead letters (`<p>.deadwatch.<instance>`,
    /// bound to the dead exchange for each of `services`) and fails the
    /// stored calls among them. A supervised consumer: it comes back by
    /// itself after losing its connection, and the task starts it again if
    /// it panics. A dead letter whose call cannot be recorded (the store is
    /// down) is offered again for [`DEAD_LETTER_PATIENCE`], then moved to
    /// `<prefix>.poison`; one without a correlation id is no call of ours:
    /// counted and acked (the original stays in the service's dead-letter
    /// queue).
    pub(crate) async fn start_dead_letter_watch(
        &self,
        services: &[String],
        cancel: CancellationToken,
    ) -> Result<()> {
        let broker = self.inner.broker.clone();
        let supervisor = Supervisor::new(
            &broker,
            ConsumerSpec {
                name: "deadwatch".into(),
                tag: "deadwatch".into(),
                // Bounds the dead letters held in memory at once.
                prefetch: Some(64),
                confirm: false,
            },
            DeadwatchQueue {
                services: services.to_vec(),
            },
        );
        let mut first = Some(Consuming::start(supervisor.clone()).await?);
        let tracker = self.clone();
        tokio::spawn(async move {
            loop {
                let consuming = match first.take() {
                    Some(c) => c,
                    None => Consuming::with(supervisor.clone(), supervisor.reopen().await),
                };
                let run = AssertUnwindSafe(tracker.watch_dead_letters(consuming, &cancel))
                    .catch_unwind()
                    .await;
                if run.is_ok() || cancel.is_cancelled() {
                    return;
                }
                warn!("dead-letter watch panicked; starting it again");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(())
    }

    /// The dead-letter watch's loop, until `cancel`.
    async fn watch_dead_letters(&self, mut consuming: Consuming, cancel: &CancellationToken) {
        loop {
            let delivery = tokio::select! {
                _ = cancel.cancelled() => {
                    consuming.stop("shutdown").await;
                    return;
                }
                d = consuming.next() => d,
            };
            let broker = &self.inner.broker;
            broker
                .metrics()
                .calls()
                .dead_letter(delivery.routing_key.as_str());
            self.take_dead_letter(&consuming, InFlight::new(delivery))
                .await;
        }
    }

    /// Fails the stored call of a dead letter taken from `from` (this
    /// gateway's watch, or an adopted one's), then acks it; one the store
    /// fails to record goes to the poison queue. A dead letter without a
    /// correlation id is no call of a gateway's: acked.
    pub(crate) async fn take_dead_letter(&self, from: &Consuming, inflight: InFlight) {
        let Some(id) = inflight
            .delivery()
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
        else {
            settle(inflight.ack().await);
            return;
        };
        let again = inflight.delivery().redelivered;
        if self.record_end(&id, Outcome::DeadLettered, again).await {
            settle(inflight.ack().await);
        } else {
            from.supervisor()
                .quarantine(inflight, "a dead letter the call store failed to record")
                .await;
        }
    }

    /// Ends call `id` with `outcome` ([`Tracker::complete_again`]: `again`
    /// when the message that tells is a redelivery), trying again while the
    /// store fails, for at most [`DEAD_LETTER_PATIENCE`]; false when it
    /// failed all that time (the message that told is then quarantined by
    /// its consumer).
    pub(crate) async fn record_end(&self, id: &str, outcome: Outcome, again: bool) -> bool {
        let give_up = tokio::time::Instant::now() + DEAD_LETTER_PATIENCE;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.complete_again(id, outcome.clone(), again).await {
                Ok(_) => return true,
                Err(e) if tokio::time::Instant::now() + pause < give_up => {
                    warn!(call_id = %id, error = %e, retry_in = ?pause, "call's end not recorded yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    warn!(call_id = %id, error = %e, "call's end not recorded");
                    return false;
                }
            }
        }
    }
}

/// End events owed by an instance published in one round
/// ([`Tracker::publish_owed_ends`]).
const OWED_ROUND: i64 = 1000;

/// How long ago a live gateway's own end must have been stored for it to
/// publish its owed event again: its first publish is over by then.
const OWED_GRACE: Duration = Duration::from_secs(60);

/// Calls whose end event failed to publish, remembered at most
/// ([`Tracker::note_unpublished`]).
const UNPUBLISHED_KEPT: usize = 4096;

/// How long a dead letter whose call the store fails to record is kept in
/// hand and tried again before it is settled as poison.
pub(crate) const DEAD_LETTER_PATIENCE: Duration = Duration::from_secs(60);

/// The dead-letter watch's queue, declared on every (re-)open of its
/// consumer ([`topology::declare_deadwatch`]).
struct DeadwatchQueue {
    services: Vec<String>,
}

#[async_trait::async_trait]
impl Declare for DeadwatchQueue {
    async fn declare(&self, broker: &Broker, conn: &Connection) -> Result<String> {
        let (queue, declared) = topology::declare_deadwatch(
            conn,
            broker.names(),
            broker.instance_id(),
            &self.services,
            broker.instance_queue_expires(),
            broker.instance_queue_type(),
        )
        .await?;
        crate::amqp::consumer::note_declared(&queue, declared);
        Ok(queue)
    }
}

/// Counts a call answered with a 202 that ended at `now_ms`.
fn count_finished(broker: &Broker, call: &CallRecord, now_ms: i64) {
    let mode = if call.callback.is_some() {
        Mode::Callback
    } else {
        Mode::Async
    };
    // No result: expired, as a 504 would say; cancelled, as the 499 of
    // a client that closed its request.
    let status = match (&call.result, call.status) {
        (Some(r), _) => r.status,
        (None, CallStatus::Cancelled) => 499,
        (None, _) => 504,
    };
    let took = u64::try_from(now_ms - call.created_ms).unwrap_or(0);
    broker.metrics().calls().service(&call.service).finished(
        mode,
        status,
        Duration::from_millis(took),
    );
}
