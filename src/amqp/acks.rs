//! Batched acks: one `basic.ack(multiple)` for a run of contiguous finished
//! deliveries of one channel, instead of a frame per delivery (on a quorum
//! queue each ack frame is also a settle command in the queue's log: less
//! work for the broker, whose CPU is the rate on a small machine;
//! docs/BENCHMARKS.md, "Against a plain lapin loop").
//!
//! A multiple ack of tag `T` settles *every* tag up to `T` that the broker
//! still counts as unacked on the channel. So it is written only when every
//! tag up to `T` is either finished (to be acked by it) or already settled
//! by a frame written before it on the same channel (a reject, a nack, an
//! ack of its own). A tag still in progress stops the run: it is never
//! covered, so a reject or nack still to come is never swallowed by an ack.
//!
//! Order is what makes that true, so every settlement of a tracked delivery
//! (ack, reject, nack) is written here, on the channel itself, at once,
//! under the tracker's lock: lapin queues a channel's method frames in the
//! order they are called (lapin's own ackers would go through its internal
//! RPC task, in an order of their own). A reject or nack is written when it
//! is decided and marked settled in the same step; no ack written after it
//! can reach the broker before it.
//!
//! When: a finished delivery is acked at once when no other delivery of the
//! channel is in progress (one call in flight: nothing to wait for, no
//! hop); otherwise the tracker's flusher (one task per channel, woken once
//! per burst, not per delivery) acks the run once the deliveries finished in
//! the same turn of the runtime have reported: a batch costs no timer and
//! delays no ack beyond the tasks already queued. Finished deliveries above
//! a tag still in progress (a slow handler) are acked one by one by that
//! flush, so no ack waits for another request's handler.
//!
//! Tags start again at 1 on a new channel: a tracker belongs to one channel
//! (one link), and a delivery is settled through the tracker of the channel
//! it came on, never another; on a channel already closed the write fails
//! harmlessly (the broker has requeued its deliveries). This holds because
//! a lost channel is always replaced by a new link: lapin's own recovery
//! (`ConnectionProperties::enable_auto_recover`, which would restart a
//! channel's tags under the same `Channel`) is never enabled.
//!
//! # Layout
//! - [`Tags`]: the bookkeeping of one channel's tags (pure logic, tested here).
//! - [`AckTracker`]: a channel, its [`Tags`], the flusher.
//! - [`Tracked`]: a delivery settled through an [`AckTracker`].
//! - [`AckCounts`]: ack frames written and deliveries they acked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use deadpool_lapin::lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};
use futures_util::FutureExt;
use tokio::sync::Notify;
use tracing::debug;

use super::InFlight;
use crate::error::{Error, Result};

/// Ack frames written and the deliveries they acked (`acked / frames`:
/// deliveries per ack frame). Read by the worker's metrics and the bench.
#[derive(Debug, Default)]
pub struct AckCounts {
    /// `basic.ack` frames written (single and multiple).
    pub frames: AtomicU64,
    /// Deliveries those frames acked.
    pub acked: AtomicU64,
}

/// An ack to write: `basic.ack(tag, multiple)`, settling `count` deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) tag: u64,
    pub(crate) multiple: bool,
    pub(crate) count: u64,
}

/// The delivery tags of one channel: every tag up to `floor` is settled;
/// above it, those finished (to ack) and those settled alone (kept as
/// ranges: a handler that runs for an hour below thousands of tags acked
/// one by one costs a range, not an entry per tag). Any other tag up to
/// `delivered` is in progress.
#[derive(Debug, Default)]
pub(crate) struct Tags {
    floor: u64,
    delivered: u64,
    finished: BTreeSet<u64>,
    /// First tag to last tag (inclusive) of each range settled alone.
    alone: BTreeMap<u64, u64>,
}

impl Tags {
    /// Tag `tag` was delivered (is in progress).
    pub(crate) fn delivered(&mut self, tag: u64) {
        self.delivered = self.delivered.max(tag);
    }

    fn alone_range(&self, tag: u64) -> Option<(u64, u64)> {
        self.alone
            .range(..=tag)
            .next_back()
            .filter(|(_, last)| **last >= tag)
            .map(|(first, last)| (*first, *last))
    }

    /// Whether `tag` is settled or finished already.
    fn known(&self, tag: u64) -> bool {
        tag <= self.floor || self.finished.contains(&tag) || self.alone_range(tag).is_some()
    }

    /// Tag `tag` finished and is to be acked; false if it was finished or
    /// settled before (it must not be acked again).
    pub(crate) fn finished(&mut self, tag: u64) -> bool {
        if tag == 0 || self.known(tag) {
            return false;
        }
        self.delivered(tag);
        self.finished.insert(tag);
        true
    }

    /// Tag `tag` was settled alone (its frame written); false if it was
    /// finished or settled before.
    pub(crate) fn settled(&mut self, tag: u64) -> bool {
        if tag == 0 || self.known(tag) {
            return false;
        }
        self.delivered(tag);
        self.add_alone(tag);
        true
    }

    /// Adds `tag` (not known) to the ranges settled alone, merged with its
    /// neighbours.
    fn add_alone(&mut self, tag: u64) {
        let mut first = tag;
        if let Some((&f, &l)) = self.alone.range(..tag).next_back()
            && l + 1 == tag
        {
            first = f;
        }
        let last = self.alone.remove(&(tag + 1)).unwrap_or(tag);
        self.alone.insert(first, last);
    }

    /// Deliveries in progress (delivered, neither finished nor settled).
    pub(crate) fn in_progress(&self) -> u64 {
        let settled_alone: u64 = self.alone.iter().map(|(f, l)| l - f + 1).sum();
        (self.delivered - self.floor)
            .saturating_sub(self.finished.len() as u64)
            .saturating_sub(settled_alone)
    }

    /// Finished deliveries whose ack is not written yet.
    pub(crate) fn held(&self) -> usize {
        self.finished.len()
    }

    /// The acks to write now: one for the contiguous run above the floor
    /// (multiple when it acks more than one delivery), then one of its own
    /// for each finished tag above a tag still in progress. Every finished
    /// tag is covered; the floor moves over the run.
    pub(crate) fn take(&mut self) -> Vec<Ack> {
        let mut acks = Vec::new();
        // The run: finished and settled-alone tags right above the floor.
        let (mut top, mut last, mut count) = (self.floor, None, 0u64);
        loop {
            let next = top + 1;
            if self.finished.remove(&next) {
                top = next;
                last = Some(next);
                count += 1;
            } else if let Some(l) = self.alone.remove(&next) {
                top = l;
            } else {
                break;
            }
        }
        self.floor = top;
        if let Some(tag) = last {
            acks.push(Ack {
                tag,
                multiple: count > 1,
                count,
            });
        }
        // Above a tag in progress: each alone.
        for tag in std::mem::take(&mut self.finished) {
            self.add_alone(tag);
            acks.push(Ack {
                tag,
                multiple: false,
                count: 1,
            });
        }
        acks
    }
}

/// What the tracker's lock guards.
struct State {
    channel: Channel,
    tags: Tags,
    /// The flusher has been woken and has not run yet.
    flush_pending: bool,
    /// Whether a flusher runs (none without a tokio runtime: every ack is
    /// written at once).
    flusher: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the flusher.
    notify: Arc<Notify>,
    counts: Arc<AckCounts>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The flusher holds it weakly: wake it to find it gone and end.
        self.notify.notify_one();
    }
}

/// The settlements of one consuming channel (cheap to clone: one shared
/// state under a short lock, never held across an await).
#[derive(Clone)]
pub(crate) struct AckTracker(Arc<Inner>);

impl std::fmt::Debug for AckTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckTracker")
            .field("channel", &self.lock().channel.id())
            .finish_non_exhaustive()
    }
}

impl AckTracker {
    /// The tracker of `channel` (deliveries of this channel only), counting
    /// into `counts`; its flusher runs on the current tokio runtime (none:
    /// every ack is written at once).
    pub(crate) fn new(channel: Channel, counts: Arc<AckCounts>) -> Self {
        let notify = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                channel,
                tags: Tags::default(),
                flush_pending: false,
                flusher: false,
            }),
            notify: notify.clone(),
            counts,
        });
        let tracker = Self(inner);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(flusher(Arc::downgrade(&tracker.0), notify));
            tracker.lock().flusher = true;
        }
        tracker
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a delivery of this tracker's channel in hand.
    pub(crate) fn track(&self, inflight: InFlight) -> Tracked {
        self.lock().tags.delivered(inflight.delivery().delivery_tag);
        Tracked {
            inflight,
            settled: false,
            tracker: self.clone(),
        }
    }

    /// Writes every ack due now: the run, and finished tags above a gap one
    /// by one (the flusher, and before the channel is closed on purpose).
    pub(crate) fn flush(&self) {
        let mut st = self.lock();
        self.write_acks(&mut st);
    }

    fn write_acks(&self, st: &mut State) {
        for ack in st.tags.take() {
            let sent = st
                .channel
                .basic_ack(
                    ack.tag,
                    BasicAckOptions {
                        multiple: ack.multiple,
                    },
                )
                .now_or_never();
            match sent {
                Some(Err(e)) => {
                    // The channel is gone: the broker requeued its deliveries.
                    debug!(error = %e, tag = ack.tag, "ack not written");
                }
                // Queued (`None`: the frame is on its way; its promise is
                // dropped, not awaited).
                _ => {
                    self.0.counts.frames.fetch_add(1, Ordering::Relaxed);
                    self.0.counts.acked.fetch_add(ack.count, Ordering::Relaxed);
                }
            }
        }
    }

    /// `tag` finished: acked now if nothing else is in progress, else by
    /// the flusher, woken once per burst.
    fn finished(&self, tag: u64) {
        let mut st = self.lock();
        if !st.tags.finished(tag) {
            debug!(tag, "a delivery reported finished twice: not acked again");
            return;
        }
        if st.tags.in_progress() == 0 || !st.flusher {
            self.write_acks(&mut st);
        } else if !st.flush_pending {
            st.flush_pending = true;
            self.0.notify.notify_one();
        }
    }

    /// Writes `frame` for `tag` at once and marks it settled, under the
    /// lock: no ack written after it can be ahead of it on the channel.
    fn settle_alone(
        &self,
        tag: u64,
        what: &'static str,
        frame: impl FnOnce(&Channel) -> Option<deadpool_lapin::lapin::Result<()>>,
    ) -> Result<()> {
        let mut st = self.lock();
        if !st.tags.settled(tag) {
            debug!(tag, what, "a delivery settled twice: not settled again");
            return Ok(());
        }
        let sent = frame(&st.channel);
        if st.tags.in_progress() == 0 && st.tags.held() > 0 {
            // It was the last one in progress: what waited above it goes.
            self.write_acks(&mut st);
        }
        match sent {
            Some(Err(e)) => Err(Error::from(e)),
            _ => Ok(()),
        }
    }
}

/// Acks the runs of a tracker when woken, until the tracker is gone. Woken
/// by `notify_one` (a permit, no allocation); it runs after the tasks
/// already queued, so the deliveries that finish in one burst share a frame.
async fn flusher(tracker: Weak<Inner>, notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        let Some(inner) = tracker.upgrade() else {
            return;
        };
        let t = AckTracker(inner);
        let mut st = t.lock();
        st.flush_pending = false;
        t.write_acks(&mut st);
    }
}

/// A delivery settled through an [`AckTracker`]: acked with its run
/// ([`Tracked::ack`]), or rejected or nacked at once. Dropped unsettled
/// (its task was dropped), it is handed back.
pub(crate) struct Tracked {
    inflight: InFlight,
    settled: bool,
    tracker: AckTracker,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("tag", &self.tag())
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

impl Tracked {
    fn tag(&self) -> u64 {
        self.inflight.delivery().delivery_tag
    }

    /// The delivery, to read.
    pub(crate) fn delivery(&self) -> &Delivery {
        self.inflight.delivery()
    }

    /// [`InFlight::take_payload`].
    pub(crate) fn take_payload(&mut self) -> bytes::Bytes {
        self.inflight.take_payload()
    }

    /// [`InFlight::failed_deliveries`].
    pub(crate) fn failed_deliveries(&self) -> u64 {
        self.inflight.failed_deliveries()
    }

    /// Done: acked with the run it belongs to, not awaited; for acks whose
    /// loss costs only a recognised redelivery (as [`InFlight::ack_now`]).
    pub(crate) fn ack(mut self) {
        self.ack_keeping();
    }

    /// [`Tracked::ack`], keeping the delivery readable (a reply to publish
    /// again). Settles once: a later call, or settlement, does nothing.
    pub(crate) fn ack_keeping(&mut self) {
        if !std::mem::replace(&mut self.settled, true) {
            self.tracker.finished(self.tag());
        }
    }

    /// [`InFlight::hand_back`]: `basic.nack(requeue)`, written now.
    pub(crate) fn hand_back(mut self) -> Result<()> {
        self.nack()
    }

    fn nack(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.settled, true) {
            return Ok(());
        }
        let tag = self.tag();
        self.tracker.settle_alone(tag, "nack", |ch| {
            let nack = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            ch.basic_nack(tag, nack).now_or_never()
        })
    }

    /// [`InFlight::retry`]: `basic.reject(requeue)`, written now.
    pub(crate) fn retry(self) -> Result<()> {
        self.reject(true)
    }

    /// [`InFlight::dead_letter`]: `basic.reject(requeue = false)`, written now.
    pub(crate) fn dead_letter(self) -> Result<()> {
        self.reject(false)
    }

    fn reject(mut self, requeue: bool) -> Result<()> {
        if std::mem::replace(&mut self.settled, true) {
            return Ok(());
        }
        let tag = self.tag();
        self.tracker.settle_alone(tag, "reject", |ch| {
            ch.basic_reject(tag, BasicRejectOptions { requeue })
                .now_or_never()
        })
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Dropped unsettled (its task was dropped): back to the queue, and
        // its tag no longer stops the run.
        if let Err(e) = self.nack() {
            debug!(error = %e, "a dropped delivery was not handed back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(tag: u64, multiple: bool, count: u64) -> Ack {
        Ack {
            tag,
            multiple,
            count,
        }
    }

    fn delivered(n: u64) -> Tags {
        let mut t = Tags::default();
        for tag in 1..=n {
            t.delivered(tag);
        }
        t
    }

    #[test]
    fn contiguous_finished_tags_share_one_multiple_ack() {
        let mut t = delivered(5);
        assert!(t.finished(1));
        assert!(t.finished(2));
        assert!(t.finished(3));
        assert_eq!(t.in_progress(), 2);
        assert_eq!(t.take(), vec![ack(3, true, 3)]);
        assert_eq!(t.held(), 0);
        assert!(t.finished(4));
        assert!(t.finished(5));
        assert_eq!(t.in_progress(), 0);
        assert_eq!(t.take(), vec![ack(5, true, 2)]);
    }

    #[test]
    fn a_single_finished_tag_is_acked_alone() {
        let mut t = delivered(1);
        assert!(t.finished(1));
        assert_eq!(t.take(), vec![ack(1, false, 1)]);
        assert_eq!(t.take(), vec![]);
    }

    #[test]
    fn a_tag_in_progress_is_never_covered() {
        let mut t = delivered(5);
        t.finished(1);
        t.finished(3);
        t.finished(4);
        // 2 runs (and may yet be rejected): the run stops at 1; 3 and 4 are
        // acked one by one, never by a multiple ack that would cover 2.
        assert_eq!(
            t.take(),
            vec![ack(1, false, 1), ack(3, false, 1), ack(4, false, 1)]
        );
        assert_eq!(t.in_progress(), 2, "2 and 5");
        // 2 is rejected: settled alone, the floor moves over 2..=4.
        assert!(t.settled(2));
        assert_eq!(t.take(), vec![]);
        assert_eq!(t.floor, 4);
        assert!(t.finished(5));
        assert_eq!(t.take(), vec![ack(5, false, 1)]);
    }

    #[test]
    fn a_reject_below_finished_tags_lets_them_share_an_ack_after_it() {
        let mut t = delivered(4);
        t.finished(1);
        t.finished(3);
        t.finished(4);
        // 2 is rejected before the flush: its frame is already written, so
        // an ack of 4 with `multiple` covers 1, 3 and 4 (the broker no
        // longer holds 2).
        assert!(t.settled(2));
        assert_eq!(t.take(), vec![ack(4, true, 3)]);
        assert_eq!(t.floor, 4);
    }

    #[test]
    fn the_ack_of_a_run_is_at_its_highest_finished_tag_not_a_settled_one() {
        let mut t = delivered(3);
        t.finished(1);
        t.finished(2);
        t.settled(3);
        assert_eq!(t.take(), vec![ack(2, true, 2)]);
        assert_eq!(t.floor, 3);
        assert!(!t.finished(3), "3 was settled alone");
    }

    #[test]
    fn a_run_of_rejected_tags_moves_the_floor_without_an_ack() {
        // A request that fails on every delivery: each delivery rejected,
        // nothing to ack; then the worker serves the next one.
        let mut t = Tags::default();
        for tag in 1..=3 {
            t.delivered(tag);
            assert_eq!(t.in_progress(), 1);
            assert!(t.settled(tag));
            assert_eq!(t.in_progress(), 0);
            assert_eq!(t.take(), vec![]);
        }
        assert_eq!(t.floor, 3);
        t.delivered(4);
        assert!(t.finished(4));
        assert_eq!(t.take(), vec![ack(4, false, 1)]);
    }

    /// The tags an ack settles at the broker: up to its tag (only its tag
    /// without `multiple`), those not settled before.
    fn covered(a: &Ack, settled: &BTreeSet<u64>) -> Vec<u64> {
        let lowest = if a.multiple { 1 } else { a.tag };
        (lowest..=a.tag).filter(|x| !settled.contains(x)).collect()
    }

    #[test]
    fn failures_among_successes_are_never_acked() {
        // Tags 1..=64, every fourth rejected, finishing in a scrambled
        // order, flushed at arbitrary points: every ack written covers only
        // finished tags, each finished tag exactly once.
        let mut t = delivered(64);
        let mut order: Vec<u64> = (1..=64).collect();
        // A fixed permutation (37 is prime to 64).
        order.sort_by_key(|n| (n * 37) % 64);
        // Settled at the broker: rejected, or acked.
        let mut settled = BTreeSet::new();
        let mut acked = BTreeSet::new();
        let mut check = |acks: Vec<Ack>, done: &[u64], settled: &mut BTreeSet<u64>| {
            for a in acks {
                let covered = covered(&a, settled);
                assert_eq!(covered.len() as u64, a.count, "{a:?}");
                for c in covered {
                    assert!(c % 4 != 1, "ack {a:?} covers rejected {c}");
                    assert!(done.contains(&c), "ack {a:?} covers {c}, in progress");
                    assert!(acked.insert(c), "{c} acked twice");
                    settled.insert(c);
                }
            }
        };
        for (i, &tag) in order.iter().enumerate() {
            if tag % 4 == 1 {
                assert!(t.settled(tag));
                settled.insert(tag);
            } else {
                assert!(t.finished(tag));
            }
            if i % 5 == 0 {
                check(t.take(), &order[..=i], &mut settled);
            }
        }
        check(t.take(), &order, &mut settled);
        assert_eq!(acked.len(), 48);
        assert_eq!(t.in_progress(), 0);
        assert_eq!(t.held(), 0);
    }

    #[test]
    fn tags_acked_alone_above_a_long_gap_are_kept_as_one_range() {
        let mut t = delivered(10_001);
        for tag in 2..=10_001 {
            t.finished(tag);
            assert_eq!(t.take(), vec![ack(tag, false, 1)], "1 runs for an hour");
        }
        assert_eq!(
            t.alone.len(),
            1,
            "{:?}",
            t.alone.iter().take(3).collect::<Vec<_>>()
        );
        assert!(!t.finished(5_000), "acked before");
        assert_eq!(t.in_progress(), 1);
        t.finished(1);
        assert_eq!(t.take(), vec![ack(1, false, 1)]);
        assert_eq!(t.floor, 10_001);
        assert!(t.alone.is_empty());
    }

    #[test]
    fn a_tag_is_never_settled_twice() {
        let mut t = delivered(2);
        assert!(t.finished(2));
        assert!(!t.finished(2));
        assert!(!t.settled(2));
        assert!(t.settled(1));
        assert!(!t.settled(1));
        assert!(!t.finished(1));
        assert_eq!(t.take(), vec![ack(2, false, 1)]);
        assert!(!t.finished(2));
        assert!(!t.finished(0), "no delivery has tag 0");
    }

    #[test]
    fn a_new_channel_starts_again_at_tag_one() {
        // A tracker per channel: tag 1 of the new one is a new delivery,
        // whatever the old one did with its tag 1.
        let mut old = delivered(3);
        old.finished(1);
        old.take();
        assert!(!old.finished(1));
        let mut new = Tags::default();
        new.delivered(1);
        assert!(new.finished(1));
        assert_eq!(new.take(), vec![ack(1, false, 1)]);
    }
}
