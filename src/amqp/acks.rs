//! Batched acks: one `basic.ack` with `multiple` for a run of contiguous
//! finished deliveries of one channel, instead of one frame per delivery
//! (less work for the broker, whose CPU is the rate on a small machine:
//! docs/BENCHMARKS.md, "Against a plain lapin loop").
//!
//! Deliveries of one channel finish out of order (handlers run
//! concurrently), and a multiple ack of tag `T` acks *every* unacked tag up
//! to `T` on that channel. So a finished delivery is held until every lower
//! tag is settled too: finished (held as well) or settled on its own (a
//! reject or nack, awaited until lapin wrote it, before it is marked; an
//! individual ack). Then the highest finished tag of the run is acked with
//! `multiple`. A tag nobody reported stops the run: it is never covered,
//! so a reject or nack still to come is never swallowed by an ack.
//!
//! A run is acked when it holds `max_batch` finished deliveries, or when
//! nothing delivered is left unfinished (nobody to wait for: at one call in
//! flight every ack goes at once), or at the latest [`FLUSH_AFTER`] after
//! the first delivery was held; then finished deliveries above a gap (a
//! lower tag still running) are acked one by one, so nothing waits longer
//! than that for its ack, whatever runs below it.
//!
//! The acks are written through the channel itself, under the batch's lock:
//! lapin's ackers hand each ack to a task of its own, and two multiple acks
//! that reach the broker in the wrong order close the channel ("unknown
//! delivery tag"). A new channel (a re-established consumer) starts again at
//! tag 1: [`AckBatch::relink`] starts a new generation, and a delivery of an
//! older one is acked alone through its own acker, on its own channel,
//! never on the new one.
//!
//! # Layout
//! - [`Tags`]: the bookkeeping of one channel's tags (pure logic, tested here).
//! - [`AckBatch`]: the channel consumed now, its [`Tags`], the finished
//!   deliveries held for their ack, the flush timer.
//! - [`Batched`]: a delivery settled through an [`AckBatch`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadpool_lapin::lapin::{Channel, options::BasicAckOptions};
use futures_util::FutureExt;
use tracing::{debug, warn};

use super::InFlight;
use crate::error::Result;

/// The longest a finished delivery waits for its ack.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(5);

/// The most finished deliveries held in one run before it is acked.
const MAX_BATCH: usize = 64;

/// An ack to write: `basic.ack(tag, multiple)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) tag: u64,
    pub(crate) multiple: bool,
}

/// The delivery tags of one channel: every tag up to `floor` is settled;
/// above it, those finished (to ack) and those settled on their own (kept
/// as ranges: a handler that runs for an hour below thousands of settled
/// tags costs a range, not an entry per tag). Finished tags are at most
/// the prefetch.
#[derive(Debug, Default)]
pub(crate) struct Tags {
    floor: u64,
    delivered: u64,
    to_ack: BTreeSet<u64>,
    /// First tag to last tag (inclusive) of each range settled alone.
    settled: BTreeMap<u64, u64>,
}

impl Tags {
    /// Tag `tag` was delivered.
    pub(crate) fn delivered(&mut self, tag: u64) {
        self.delivered = self.delivered.max(tag);
    }

    /// The range settled alone that holds `tag`, if any.
    fn settled_range(&self, tag: u64) -> Option<(u64, u64)> {
        self.settled
            .range(..=tag)
            .next_back()
            .filter(|(_, last)| **last >= tag)
            .map(|(first, last)| (*first, *last))
    }

    fn known(&self, tag: u64) -> bool {
        tag <= self.floor || self.to_ack.contains(&tag) || self.settled_range(tag).is_some()
    }

    /// Tag `tag` finished and is to be acked; false if it was settled or
    /// reported before (it must then not be acked again).
    pub(crate) fn finished(&mut self, tag: u64) -> bool {
        if self.known(tag) {
            return false;
        }
        self.to_ack.insert(tag);
        self.delivered(tag);
        true
    }

    /// Tag `tag` was settled on its own (its frame written); false if it
    /// was known before.
    pub(crate) fn settled(&mut self, tag: u64) -> bool {
        if self.known(tag) {
            return false;
        }
        self.settle_range(tag);
        self.delivered(tag);
        true
    }

    /// Adds `tag` (not known) to the ranges settled alone, merged with its
    /// neighbours.
    fn settle_range(&mut self, tag: u64) {
        let mut first = tag;
        if let Some((&f, &l)) = self.settled.range(..tag).next_back()
            && l + 1 == tag
        {
            first = f;
        }
        let last = match self.settled.remove(&(tag + 1)) {
            Some(l) => l,
            None => tag,
        };
        self.settled.insert(first, last);
    }

    /// The contiguous run above the floor: its highest tag, its highest tag
    /// to ack and how many it has to ack.
    fn run(&self) -> (u64, Option<u64>, usize) {
        let (mut top, mut last, mut n) = (self.floor, None, 0);
        loop {
            let next = top + 1;
            if self.to_ack.contains(&next) {
                top = next;
                last = Some(next);
                n += 1;
            } else if let Some(l) = self.settled.get(&next) {
                top = *l;
            } else {
                return (top, last, n);
            }
        }
    }

    /// Finished tags held (in the run and above gaps).
    pub(crate) fn held(&self) -> usize {
        self.to_ack.len()
    }

    /// Whether the run should be acked now: it holds `max_batch` finished
    /// tags, or every delivered tag is done.
    pub(crate) fn due(&self, max_batch: usize) -> bool {
        let (top, _, n) = self.run();
        n > 0 && (n >= max_batch || top >= self.delivered)
    }

    /// Takes the contiguous run: the floor moves to its top; returns the
    /// ack that settles its finished tags (none if it has none) and those
    /// tags.
    pub(crate) fn take_run(&mut self) -> Option<(Ack, Vec<u64>)> {
        let (top, last, n) = self.run();
        let above = self.to_ack.split_off(&(top + 1));
        let covered: Vec<u64> = std::mem::replace(&mut self.to_ack, above)
            .into_iter()
            .collect();
        let above = self.settled.split_off(&(top + 1));
        self.settled = above;
        self.floor = top;
        last.map(|tag| {
            (
                Ack {
                    tag,
                    multiple: n > 1,
                },
                covered,
            )
        })
    }

    /// Finished tags above a gap (call after [`Tags::take_run`]), to ack
    /// one by one: marked settled.
    pub(crate) fn take_stragglers(&mut self) -> Vec<u64> {
        let tags: Vec<u64> = std::mem::take(&mut self.to_ack).into_iter().collect();
        for &tag in &tags {
            self.settle_range(tag);
        }
        tags
    }
}

/// The channel consumed now and what is held for its acks.
struct State {
    generation: u64,
    channel: Option<Channel>,
    tags: Tags,
    held: HashMap<u64, InFlight>,
    /// A flush is scheduled.
    timer: bool,
}

impl State {
    /// Writes `ack` on the channel now (lapin queues the frame on the first
    /// poll, in the order of the calls); the held deliveries it settles are
    /// dropped.
    fn write(&mut self, ack: Ack, covered: &[u64]) {
        for tag in covered {
            self.held.remove(tag);
        }
        let Some(channel) = &self.channel else { return };
        let sent = channel
            .basic_ack(
                ack.tag,
                BasicAckOptions {
                    multiple: ack.multiple,
                },
            )
            .now_or_never();
        if let Some(Err(e)) = sent {
            // The channel is going: its deliveries go back to the queue.
            debug!(error = %e, tag = ack.tag, "ack not written");
        }
    }

    /// Acks the run if it is due (or `all`), and with `all` the stragglers
    /// one by one.
    fn flush(&mut self, max_batch: usize, all: bool) {
        if (all || self.tags.due(max_batch))
            && let Some((ack, covered)) = self.tags.take_run()
        {
            self.write(ack, &covered);
        }
        if all {
            for tag in self.tags.take_stragglers() {
                let ack = Ack {
                    tag,
                    multiple: false,
                };
                self.write(ack, &[tag]);
            }
        }
    }
}

/// The batched acks of one consumer (cheap to clone: one shared state under
/// a short lock, never held across an await).
#[derive(Clone)]
pub(crate) struct AckBatch(Arc<Inner>);

struct Inner {
    state: Mutex<State>,
    max_batch: usize,
}

impl AckBatch {
    /// A batch for a consumer with prefetch `prefetch`: at most a quarter
    /// of it (up to [`MAX_BATCH`]) is held finished, so that held acks never
    /// starve the consumer of deliveries.
    pub(crate) fn new(prefetch: u16) -> Self {
        Self(Arc::new(Inner {
            state: Mutex::new(State {
                generation: 0,
                channel: None,
                tags: Tags::default(),
                held: HashMap::new(),
                timer: false,
            }),
            max_batch: (usize::from(prefetch) / 4).clamp(1, MAX_BATCH),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new channel is consumed: what was held for the old one is acked
    /// there (if it is still open; else its deliveries go back to the queue
    /// with it), and its tags start again.
    pub(crate) fn relink(&self, channel: Channel) {
        let mut st = self.lock();
        st.flush(self.0.max_batch, true);
        st.held.clear();
        st.generation += 1;
        st.channel = Some(channel);
        st.tags = Tags::default();
    }

    /// Acks everything finished now: the run, and the stragglers one by
    /// one (before a channel is closed on purpose).
    pub(crate) fn flush(&self) {
        self.lock().flush(self.0.max_batch, true);
    }

    /// Takes a delivery of the channel consumed now in hand.
    pub(crate) fn track(&self, inflight: InFlight) -> Batched {
        let tag = inflight.delivery().delivery_tag;
        let generation = {
            let mut st = self.lock();
            st.tags.delivered(tag);
            st.generation
        };
        Batched {
            inflight: Some(inflight),
            batch: self.clone(),
            generation,
            tag,
        }
    }

    fn finished(&self, generation: u64, inflight: InFlight) {
        let tag = inflight.delivery().delivery_tag;
        let mut st = self.lock();
        if generation != st.generation {
            drop(st);
            // Of an older channel: acked there, alone.
            crate::amqp::consumer::settle(inflight.ack_now());
            return;
        }
        if !st.tags.finished(tag) {
            warn!(tag, "a delivery reported finished twice: not acked again");
            return;
        }
        st.held.insert(tag, inflight);
        st.flush(self.0.max_batch, false);
        if st.tags.held() > 0 && !st.timer {
            st.timer = self.arm();
            if !st.timer {
                // No runtime to wait on: acked now.
                st.flush(self.0.max_batch, true);
            }
        }
    }

    /// Schedules a flush in [`FLUSH_AFTER`]; false without a runtime.
    fn arm(&self) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let batch = self.clone();
        rt.spawn(async move {
            tokio::time::sleep(FLUSH_AFTER).await;
            let mut st = batch.lock();
            st.timer = false;
            st.flush(batch.0.max_batch, true);
        });
        true
    }

    fn settled(&self, generation: u64, tag: u64) {
        let mut st = self.lock();
        if generation == st.generation {
            st.tags.settled(tag);
            st.flush(self.0.max_batch, false);
        }
    }
}

/// A delivery settled through an [`AckBatch`]: acked in a batch
/// ([`Batched::ack`]), or settled on its own (reject, nack), the batch
/// told once the frame is written. Dropped unsettled, it is handed back
/// (in the background), so that no tag stops the batch for good.
pub(crate) struct Batched {
    inflight: Option<InFlight>,
    batch: AckBatch,
    generation: u64,
    tag: u64,
}

impl std::fmt::Debug for Batched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batched")
            .field("tag", &self.tag)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Batched {
    /// The delivery, to read.
    pub(crate) fn inflight(&self) -> &InFlight {
        self.inflight.as_ref().expect("held until settled")
    }

    /// The delivery, to take its body.
    pub(crate) fn inflight_mut(&mut self) -> &mut InFlight {
        self.inflight.as_mut().expect("held until settled")
    }

    /// Done: acked with the run it belongs to (at the latest after
    /// [`FLUSH_AFTER`]), without waiting for the frame; for acks whose loss
    /// costs only a recognised redelivery, as [`InFlight::ack_now`].
    pub(crate) fn ack(mut self) {
        if let Some(inflight) = self.inflight.take() {
            self.batch.finished(self.generation, inflight);
        }
    }

    /// Settles it on its own with `how` (awaited until lapin wrote the
    /// frame), then tells the batch, so that no multiple ack is written
    /// before it; a settlement that failed leaves the tag a gap (never
    /// covered by a multiple ack).
    pub(crate) async fn settle_alone<F, Fut>(mut self, how: F) -> Result<()>
    where
        F: FnOnce(InFlight) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let inflight = self.inflight.take().expect("held until settled");
        let settled = how(inflight).await;
        if settled.is_ok() {
            self.batch.settled(self.generation, self.tag);
        }
        settled
    }

    /// [`InFlight::hand_back`], settled alone.
    pub(crate) async fn hand_back(self) -> Result<()> {
        self.settle_alone(InFlight::hand_back).await
    }

    /// [`InFlight::retry`], settled alone.
    pub(crate) async fn retry(self) -> Result<()> {
        self.settle_alone(InFlight::retry).await
    }

    /// [`InFlight::dead_letter`], settled alone.
    pub(crate) async fn dead_letter(self) -> Result<()> {
        self.settle_alone(InFlight::dead_letter).await
    }
}

impl Drop for Batched {
    fn drop(&mut self) {
        let Some(inflight) = self.inflight.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (batch, generation, tag) = (self.batch.clone(), self.generation, self.tag);
        rt.spawn(async move {
            if inflight.hand_back().await.is_ok() {
                batch.settled(generation, tag);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(tag: u64, multiple: bool) -> Ack {
        Ack { tag, multiple }
    }

    fn delivered(n: u64) -> Tags {
        let mut t = Tags::default();
        for tag in 1..=n {
            t.delivered(tag);
        }
        t
    }

    #[test]
    fn out_of_order_finishes_are_acked_once_contiguous() {
        let mut t = delivered(5);
        assert!(t.finished(3));
        assert!(t.finished(2));
        // 1 still runs: nothing may be acked.
        assert!(!t.due(1));
        assert_eq!(t.take_run(), None);
        assert!(t.finished(1));
        assert!(t.due(3));
        assert_eq!(t.take_run(), Some((ack(3, true), vec![1, 2, 3])));
        assert_eq!(t.held(), 0);
        assert!(t.finished(5));
        assert_eq!(t.take_run(), None, "4 still runs");
        assert!(t.finished(4));
        // Every delivered tag is done: due even below the batch size.
        assert!(t.due(64));
        assert_eq!(t.take_run(), Some((ack(5, true), vec![4, 5])));
    }

    #[test]
    fn a_single_finished_tag_is_acked_alone() {
        let mut t = delivered(1);
        assert!(t.finished(1));
        assert!(t.due(64), "nothing else delivered: no reason to wait");
        assert_eq!(t.take_run(), Some((ack(1, false), vec![1])));
    }

    #[test]
    fn a_run_waits_for_the_batch_while_others_run() {
        let mut t = delivered(10);
        t.finished(1);
        t.finished(2);
        assert!(!t.due(3), "8 more run, 2 held of a batch of 3");
        t.finished(3);
        assert!(t.due(3));
    }

    #[test]
    fn a_reject_in_the_middle_stops_the_run_until_it_is_settled() {
        let mut t = delivered(4);
        t.finished(1);
        t.finished(3);
        t.finished(4);
        // 2 will be rejected: until its reject is written nothing above 1
        // may be covered.
        assert_eq!(t.take_run(), Some((ack(1, false), vec![1])));
        assert_eq!(t.take_run(), None);
        assert!(t.settled(2));
        assert!(t.due(64));
        // The ack covers 3 and 4; 2, settled alone, is below: a multiple ack
        // does not touch a tag already rejected.
        assert_eq!(t.take_run(), Some((ack(4, true), vec![3, 4])));
    }

    #[test]
    fn the_ack_of_a_run_is_at_its_highest_finished_tag_not_a_settled_one() {
        let mut t = delivered(3);
        t.finished(1);
        t.finished(2);
        t.settled(3);
        assert_eq!(t.take_run(), Some((ack(2, true), vec![1, 2])));
        assert!(!t.finished(3), "3 is below the floor now");
    }

    #[test]
    fn a_run_of_only_settled_tags_moves_the_floor_without_an_ack() {
        let mut t = delivered(2);
        t.settled(1);
        t.settled(2);
        assert!(!t.due(1));
        assert_eq!(t.take_run(), None);
        t.delivered(3);
        t.finished(3);
        assert_eq!(t.take_run(), Some((ack(3, false), vec![3])));
    }

    #[test]
    fn stragglers_above_a_gap_are_acked_alone_and_then_skipped() {
        let mut t = delivered(4);
        t.finished(2);
        t.finished(4);
        assert_eq!(t.take_run(), None);
        assert_eq!(t.take_stragglers(), vec![2, 4]);
        assert_eq!(t.held(), 0);
        t.finished(1);
        // 2, acked alone, is skipped: the run is 1..=2, the ack at 1.
        assert_eq!(t.take_run(), Some((ack(1, false), vec![1])));
        t.finished(3);
        assert_eq!(t.take_run(), Some((ack(3, false), vec![3])));
        assert!(!t.finished(4), "acked alone before");
    }

    #[test]
    fn tags_settled_alone_above_a_long_gap_are_kept_as_one_range() {
        let mut t = delivered(10_001);
        for tag in 2..=10_001 {
            t.finished(tag);
            assert_eq!(t.take_run(), None, "1 runs for an hour");
            assert_eq!(t.take_stragglers(), vec![tag]);
        }
        assert_eq!(
            t.settled.len(),
            1,
            "{:?}",
            t.settled.iter().take(3).collect::<Vec<_>>()
        );
        assert!(!t.finished(5_000), "acked alone before");
        t.finished(1);
        assert_eq!(t.take_run(), Some((ack(1, false), vec![1])));
        assert_eq!(t.floor, 10_001);
        assert!(t.settled.is_empty());
    }

    #[test]
    fn a_tag_is_never_reported_twice() {
        let mut t = delivered(2);
        assert!(t.finished(2));
        assert!(!t.finished(2));
        assert!(!t.settled(2));
        assert_eq!(t.held(), 1);
    }

    #[test]
    fn a_new_channel_starts_again_at_tag_one() {
        // What `AckBatch::relink` does: the old channel's tags are
        // forgotten with it; tag 1 of the new one is a new delivery.
        let mut t = delivered(3);
        t.finished(1);
        t.take_run();
        assert!(!t.finished(1), "tag 1 of this channel is acked");
        let mut t = Tags::default();
        t.delivered(1);
        assert!(t.finished(1), "tag 1 of a new channel");
        assert_eq!(t.take_run(), Some((ack(1, false), vec![1])));
    }
}
