//! [`AckBatch`]: the acks of one channel's deliveries, collected during a
//! turn and written at its end, a contiguous run of them as one
//! `basic.ack(multiple = true)` (issue 14).
//!
//! RabbitMQ spends about as much CPU on an ack frame as on a publish, and
//! with a broker on two cores that is the cost that limits a call's rate.
//! When several deliveries of a channel finish within one turn of the task
//! that settles them (the confirms of their replies arrived together), one
//! frame can ack them all: `multiple = true` acks every unsettled delivery
//! of the channel up to its tag. That is only right when each of them is
//! finished, so the batch knows every delivery of its channel from the
//! first ([`InFlight::batched`](super::InFlight::batched)), in tag order:
//!
//! - a delivery still running, or being settled otherwise (a nack, a
//!   reject, an ack through its `Acker`, whose frame goes through lapin's
//!   internal task and may be written after ours), is a hole no multiple
//!   crosses, until its settlement is known to be written
//!   ([`AckBatch::settled`]); one whose settlement failed stays a hole;
//! - the finished deliveries after a hole are acked singly, in the same
//!   flush: an ack never waits for a slow delivery longer than the turn;
//! - a tag that is not the next of the channel (a delivery the batch was
//!   not told of) turns multiples off for good on that channel: singles
//!   only, as before.
//!
//! Tags belong to a channel: a batch has one, and a delivery of another
//! channel (after a reconnect) goes to another batch. On a channel no
//! longer open the acks are dropped, as [`InFlight::ack_now`](super::InFlight::ack_now) does:
//! its deliveries go back to their queue anyway. Nacks and rejects stay
//! single and immediate (they are not batched).
//!
//! The flush is a task spawned once per batch of acks ([`AckBatch::ack`]),
//! which runs when the task that acked yields: after the turn of an actor
//! that completed several handlers at once. A holder about to close the
//! channel flushes first ([`AckBatch::flush`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use deadpool_lapin::lapin::{Channel, options::BasicAckOptions};
use futures_util::FutureExt;
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// The acks of one channel's deliveries, written together at the end of a
/// turn (module doc). Shared (`Arc`) by the deliveries of that channel.
pub struct AckBatch {
    channel: Arc<Channel>,
    state: Mutex<State>,
}

impl std::fmt::Debug for AckBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("AckBatch")
            .field("channel", &self.channel.id())
            .field("outstanding", &s.outstanding.len())
            .field("finished", &s.finished)
            .finish()
    }
}

impl Drop for AckBatch {
    fn drop(&mut self) {
        let s = self.lock();
        if s.counts.acks > 0 {
            debug!(
                channel = self.channel.id(),
                acks = s.counts.acks,
                frames = s.counts.frames,
                multiples = s.counts.multiples,
                "acks of a channel written"
            );
        }
    }
}

/// Counters of a batch: how many acks it wrote, in how many frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckCounts {
    /// Deliveries acked through the batch.
    pub acks: u64,
    /// `basic.ack` frames written for them.
    pub frames: u64,
    /// Of those, frames with `multiple = true`.
    pub multiples: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Deliveries told of and not settled yet (or whose ack is not
    /// written yet), in tag order: `true` once finished (ack requested).
    outstanding: VecDeque<(u64, bool)>,
    /// The last tag told of.
    last: u64,
    /// Whether every tag told of followed the one before (from 1): only
    /// then does the batch know every unsettled delivery below a tag.
    ordered: bool,
    /// Finished, their ack not written yet.
    finished: usize,
    /// A flush task is on its way.
    flushing: bool,
    counts: AckCounts,
}

impl State {
    fn new() -> Self {
        Self {
            ordered: true,
            ..Default::default()
        }
    }

    fn register(&mut self, tag: u64) {
        if tag != self.last.wrapping_add(1) {
            self.ordered = false;
        }
        if tag > self.last {
            self.last = tag;
            self.outstanding.push_back((tag, false));
        } else {
            // Out of order: kept sorted (multiples are off anyway).
            let at = self.outstanding.partition_point(|(t, _)| *t < tag);
            self.outstanding.insert(at, (tag, false));
        }
    }

    fn find(&self, tag: u64) -> Option<usize> {
        self.outstanding
            .binary_search_by_key(&tag, |(t, _)| *t)
            .ok()
    }

    /// Marks `tag` finished; false if the batch does not know it (it then
    /// must be acked on its own).
    fn finish(&mut self, tag: u64) -> bool {
        match self.find(tag) {
            Some(i) if !self.outstanding[i].1 => {
                self.outstanding[i].1 = true;
                self.finished += 1;
                true
            }
            _ => false,
        }
    }

    fn settled(&mut self, tag: u64) {
        if let Some(i) = self.find(tag)
            && let Some((_, finished)) = self.outstanding.remove(i)
            && finished
        {
            self.finished -= 1;
        }
    }

    /// The frames acking every finished delivery, as `(tag, multiple)`:
    /// the finished run at the front (every unsettled delivery up to its
    /// last tag) as one multiple, the others singly. They leave the batch.
    fn plan(&mut self) -> Vec<(u64, bool)> {
        let mut frames = Vec::new();
        if self.finished == 0 {
            return frames;
        }
        if self.ordered {
            let run = self.outstanding.iter().take_while(|(_, f)| *f).count();
            if run > 0 {
                let (last, _) = self.outstanding[run - 1];
                frames.push((last, run > 1));
                self.outstanding.drain(..run);
                self.finished -= run;
                self.counts.acks += run as u64;
            }
        }
        if self.finished > 0 {
            self.outstanding.retain(|&(tag, finished)| {
                if finished {
                    frames.push((tag, false));
                }
                !finished
            });
            self.counts.acks += self.finished as u64;
            self.finished = 0;
        }
        self.counts.frames += frames.len() as u64;
        self.counts.multiples += frames.iter().filter(|(_, m)| *m).count() as u64;
        frames
    }
}

impl AckBatch {
    /// A batch for the deliveries of `channel`, told of each from the
    /// channel's first ([`InFlight::batched`](super::InFlight::batched)).
    pub fn new(channel: Arc<Channel>) -> Arc<Self> {
        Arc::new(Self {
            channel,
            state: Mutex::new(State::new()),
        })
    }

    /// The channel whose deliveries it acks.
    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// Whether it acks the deliveries of `channel`.
    pub fn is_for(&self, channel: &Arc<Channel>) -> bool {
        Arc::ptr_eq(&self.channel, channel)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No panic while it is held (plain bookkeeping); a poisoned lock
        // still holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells of a delivery of its channel, unsettled.
    pub(crate) fn register(&self, tag: u64) {
        self.lock().register(tag);
    }

    /// A delivery settled otherwise, its frame written: it no longer
    /// holds back a multiple.
    pub(crate) fn settled(&self, tag: u64) {
        self.lock().settled(tag);
    }

    /// Asks for the ack of `tag`, written at the end of this turn by a
    /// flush task (spawned once per batch of acks; outside a Tokio runtime,
    /// written at once). False when the batch does not know the tag: the
    /// caller acks it itself.
    pub(crate) fn ack(self: &Arc<Self>, tag: u64) -> bool {
        let mut s = self.lock();
        if !s.finish(tag) {
            return false;
        }
        if !s.flushing {
            s.flushing = true;
            drop(s);
            let batch = self.clone();
            let flush = move || {
                if let Err(e) = batch.flush() {
                    warn!(error = %e, "could not write acks");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(async move { flush() })),
                // Outside a runtime: nothing to wait for, written now.
                Err(_) => flush(),
            }
        }
        true
    }

    /// Writes the acks asked for so far, now: the finished run at the
    /// front of the channel's unsettled deliveries as one
    /// `basic.ack(multiple = true)`, the others singly. Not waiting for
    /// them to be written (as [`InFlight::ack_now`](super::InFlight::ack_now)).
    /// On a channel no longer open they are dropped: no error.
    pub fn flush(&self) -> Result<()> {
        // Frames are queued with the lock held, so that two flushes never
        // write their frames in the other order.
        let mut s = self.lock();
        s.flushing = false;
        let frames = s.plan();
        if frames.is_empty() || !self.channel.status().connected() {
            return Ok(());
        }
        for (tag, multiple) in frames {
            let written = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .now_or_never();
            if let Some(Err(e)) = written {
                if !self.channel.status().connected() {
                    return Ok(());
                }
                return Err(Error::from(e));
            }
        }
        Ok(())
    }

    /// Acks asked for and not written yet.
    pub fn pending(&self) -> usize {
        self.lock().finished
    }

    /// How many acks it wrote, in how many frames.
    pub fn counts(&self) -> AckCounts {
        self.lock().counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(tags: impl IntoIterator<Item = u64>) -> State {
        let mut s = State::new();
        for t in tags {
            s.register(t);
        }
        s
    }

    #[test]
    fn a_finished_run_from_the_lowest_unsettled_tag_is_one_multiple() {
        let mut s = state(1..=5);
        for t in [3, 1, 2] {
            assert!(s.finish(t));
        }
        assert_eq!(s.plan(), vec![(3, true)]);
        assert_eq!(
            s.outstanding.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [4, 5]
        );
        assert!(s.finish(4));
        assert_eq!(s.plan(), vec![(4, false)]);
        assert_eq!(s.plan(), vec![]);
    }

    #[test]
    fn a_delivery_not_finished_is_never_covered() {
        let mut s = state(1..=6);
        for t in [6, 2, 3, 5] {
            assert!(s.finish(t));
        }
        // 1 is still running: every finished one goes singly, at once.
        assert_eq!(
            s.plan(),
            vec![(2, false), (3, false), (5, false), (6, false)]
        );
        assert!(s.finish(1));
        assert_eq!(s.plan(), vec![(1, false)]);
        assert_eq!(
            s.outstanding.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [4]
        );
    }

    #[test]
    fn a_delivery_settled_otherwise_holds_back_multiples_until_written() {
        let mut s = state(1..=4);
        // 2 is being nacked: a hole until its frame is written.
        for t in [1, 3, 4] {
            assert!(s.finish(t));
        }
        assert_eq!(s.plan(), vec![(1, false), (3, false), (4, false)]);
        let mut s = state(1..=4);
        s.settled(2);
        for t in [1, 3, 4] {
            assert!(s.finish(t));
        }
        // Written: a multiple up to 4 acks 1, 3 and 4 only.
        assert_eq!(s.plan(), vec![(4, true)]);
    }

    #[test]
    fn a_tag_out_of_sequence_turns_multiples_off() {
        // The batch was not told of 1: it might be unsettled.
        let mut s = state(2..=4);
        for t in [2, 3, 4] {
            assert!(s.finish(t));
        }
        assert_eq!(s.plan(), vec![(2, false), (3, false), (4, false)]);
        let mut s = state([1, 2, 4, 5]);
        for t in [1, 2, 4, 5] {
            assert!(s.finish(t));
        }
        assert_eq!(
            s.plan(),
            vec![(1, false), (2, false), (4, false), (5, false)]
        );
    }

    #[test]
    fn unknown_or_finished_tags_are_not_taken() {
        let mut s = state(1..=2);
        assert!(!s.finish(3));
        assert!(s.finish(1));
        assert!(!s.finish(1));
        s.settled(1);
        assert_eq!(s.finished, 0);
        assert_eq!(s.plan(), vec![]);
    }

    #[test]
    fn counts_say_how_many_frames_carried_the_acks() {
        let mut s = state(1..=5);
        for t in [1, 2, 3, 5] {
            s.finish(t);
        }
        s.plan();
        assert_eq!(
            s.counts,
            AckCounts {
                acks: 4,
                frames: 2,
                multiples: 1
            }
        );
    }
}
