//! [`InFlight`]: a delivery that must be settled exactly once. `ack`,
//! `hand_back`, `retry` and `dead_letter` consume it, so a second settlement
//! does not compile.
//!
//! Two ways of returning a message to its queue exist because RabbitMQ
//! counts them differently against a quorum queue's `x-delivery-limit`:
//!
//! | RabbitMQ | `basic.reject(requeue)` ([`InFlight::retry`]) | `basic.nack(requeue)` ([`InFlight::hand_back`]) | connection closed with the message unacked |
//! | --- | --- | --- | --- |
//! | 3.10 to 3.13 | counts | counts | counts |
//! | 4.0 to 4.2 | counts | counts | counts |
//! | 4.3 and later | counts | **does not count** | counts |
//!
//! So from 4.3 a message handed back unprocessed (at shutdown, or because
//! its reply could not be published) no longer moves towards the dead-letter
//! queue, while one whose handler failed still does. Before 4.3 both count,
//! which is why `delivery_limit` should leave room for a few restarts.

use deadpool_lapin::lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::{AckBatch, wire};
use crate::error::{Error, Result};

/// The longest a settlement may wait for lapin to take it. On a healthy
/// connection it is immediate; on one whose I/O thread died it never
/// completes, and a handler's task must not wait forever (the link's
/// watchdog replaces the connection; the message comes back when the old
/// one is closed).
pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds a settlement by [`SETTLE_TIMEOUT`].
async fn bounded(
    what: &'static str,
    settled: impl Future<Output = deadpool_lapin::lapin::Result<bool>>,
) -> Result<()> {
    match tokio::time::timeout(SETTLE_TIMEOUT, settled).await {
        Ok(done) => done.map(|_| ()).map_err(Error::from),
        Err(_) => Err(Error::SettleTimeout {
            what,
            after: SETTLE_TIMEOUT,
        }),
    }
}

/// A delivery not yet acked or rejected.
#[derive(Debug)]
pub struct InFlight {
    delivery: Delivery,
    /// The channel it came on, when its holder said so ([`InFlight::on`]).
    channel: Option<Arc<Channel>>,
    /// The acks of that channel's deliveries, when its holder batches them
    /// ([`InFlight::batched`]).
    batch: Option<Arc<AckBatch>>,
}

impl InFlight {
    /// Wraps a delivery taken from a consumer with manual acks.
    pub fn new(delivery: Delivery) -> Self {
        Self {
            delivery,
            channel: None,
            batch: None,
        }
    }

    /// Tells `batch` (of the channel the delivery came on, which it must
    /// be) of the delivery: [`InFlight::ack_now`] then asks the batch for
    /// its ack, written at the end of the turn with the others finished
    /// in it, and its other settlements tell the batch once written (so
    /// that no multiple ack covers it before). Every delivery of the
    /// channel must be told to the batch, from its first, for multiples
    /// to be used ([`AckBatch`]).
    pub fn batched(mut self, batch: &Arc<AckBatch>) -> Self {
        batch.register(self.delivery.delivery_tag);
        self.channel = Some(batch.channel().clone());
        self.batch = Some(batch.clone());
        self
    }

    /// After a settlement other than a batched ack: tells the batch, when
    /// written, that the delivery no longer holds back multiples. One that
    /// failed (or timed out: its frame may still be on its way) stays a
    /// hole in the batch.
    fn told(batch: Option<Arc<AckBatch>>, tag: u64, settled: Result<()>) -> Result<()> {
        if let (Some(batch), Ok(())) = (batch, &settled) {
            batch.settled(tag);
        }
        settled
    }

    /// Says which channel the delivery came on (the consumer's, which must
    /// be that very channel), so that [`InFlight::ack_now`] writes its ack
    /// there directly.
    pub fn on(mut self, channel: Option<&Arc<Channel>>) -> Self {
        self.channel = channel.cloned();
        self
    }

    /// The channel it came on, when known ([`InFlight::on`]).
    pub fn channel(&self) -> Option<&Arc<Channel>> {
        self.channel.as_ref()
    }

    /// Takes the body out (without copying it); the delivery keeps the rest.
    pub fn take_payload(&mut self) -> bytes::Bytes {
        bytes::Bytes::from(std::mem::take(&mut self.delivery.data))
    }

    /// The delivery, to read.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// How many deliveries of this message failed before this one, as a
    /// quorum queue counts them (`x-delivery-count`); 0 for classic queues
    /// and first deliveries.
    pub fn failed_deliveries(&self) -> u64 {
        wire::header_int(&self.delivery.properties, wire::HEADER_DELIVERY_COUNT)
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Done: the broker forgets the message.
    pub async fn ack(self) -> Result<()> {
        let acker = &self.delivery.acker;
        let acked = bounded("ack", acker.ack(BasicAckOptions { multiple: false })).await;
        Self::told(self.batch, self.delivery.delivery_tag, acked)
    }

    /// Done, without waiting: the ack is handed to lapin at once (as the
    /// first poll of [`InFlight::ack`] does) and its writing is not awaited,
    /// so the hot path pays neither a task nor a timer for it. For acks
    /// whose loss costs nothing but a redelivery that is recognised: a
    /// reply handed to its caller (a copy comes back late and is dropped),
    /// a request whose reply is out (a copy is settled by the worker's
    /// `message_id` memory). A channel already closed is not an error: its
    /// deliveries go back to their queue anyway.
    ///
    /// With the channel the delivery came on ([`InFlight::on`]) the ack
    /// frame is queued on it here, and lapin's I/O thread woken once.
    /// Through the delivery's `Acker` (without it), lapin sends the ack to
    /// its connection's internal task, which spawns a task that queues the
    /// frame: a task, a queue hop and a second wake-up of the I/O thread
    /// per ack (docs/BENCHMARKS.md, "Library calls: acks on the delivery's channel").
    ///
    /// Batched ([`InFlight::batched`]), the ack is written by the batch at
    /// the end of the turn, with those of the channel's other deliveries
    /// finished in it (one `multiple` frame for a contiguous run).
    pub fn ack_now(self) -> Result<()> {
        use futures_util::FutureExt;
        if let Some(batch) = &self.batch
            && batch.ack(self.delivery.delivery_tag)
        {
            return Ok(());
        }
        if let Some(channel) = &self.channel {
            if !channel.status().connected() {
                return Ok(());
            }
            let ack = BasicAckOptions { multiple: false };
            return match channel
                .basic_ack(self.delivery.delivery_tag, ack)
                .now_or_never()
            {
                Some(Err(e)) => Err(Error::from(e)),
                _ => Ok(()),
            };
        }
        match self
            .delivery
            .acker
            .ack(BasicAckOptions { multiple: false })
            .now_or_never()
        {
            Some(Err(e)) => Err(Error::from(e)),
            // Sent (`None`: its promise is dropped, the frame is on its way).
            _ => Ok(()),
        }
    }

    /// Done, without waiting, as [`InFlight::ack_now`], but the ack's
    /// writing is kept to be awaited later ([`HandedAcks`]) when it has not
    /// finished already: for a consumer whose acks must be on the wire
    /// before it closes its channel. One allocation, no task or timer.
    /// Not for batched deliveries: the batch is not told (the delivery
    /// stays a hole in it).
    pub(crate) fn ack_handed(self) -> Result<Option<HandedAck>> {
        let acker = self.delivery.acker;
        let mut ack = HandedAck(Box::pin(async move {
            acker.ack(BasicAckOptions { multiple: false }).await
        }));
        match ack.poll_now() {
            Some(Err(e)) => Err(Error::from(e)),
            Some(Ok(_)) => Ok(None),
            None => Ok(Some(ack)),
        }
    }

    /// Not processed, through no fault of the message: a request prefetched
    /// when the worker began to drain, a request whose reply could not be
    /// published, a redelivered copy parked behind one handed back. Sent as
    /// `basic.nack(requeue = true)`: from RabbitMQ 4.3 a quorum queue does
    /// not count it against `x-delivery-limit`, so rolling restarts never push
    /// healthy requests towards the dead-letter queue (3.x and 4.0 to 4.2
    /// count every return; see the module doc).
    pub async fn hand_back(self) -> Result<()> {
        let nack = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let nacked = bounded("nack", self.delivery.acker.nack(nack)).await;
        Self::told(self.batch, self.delivery.delivery_tag, nacked)
    }

    /// Processing failed (the handler panicked or failed transiently): sent
    /// as `basic.reject(requeue = true)`, which every RabbitMQ version counts
    /// against a quorum queue's `x-delivery-limit`, so a message that always
    /// fails ends in the dead-letter queue instead of looping.
    pub async fn retry(self) -> Result<()> {
        let reject = BasicRejectOptions { requeue: true };
        let rejected = bounded("reject", self.delivery.acker.reject(reject)).await;
        Self::told(self.batch, self.delivery.delivery_tag, rejected)
    }

    /// Given up: the broker dead-letters it to the queue's dead-letter exchange.
    pub async fn dead_letter(self) -> Result<()> {
        let reject = BasicRejectOptions { requeue: false };
        let rejected = bounded("reject", self.delivery.acker.reject(reject)).await;
        Self::told(self.batch, self.delivery.delivery_tag, rejected)
    }
}

/// An ack handed to lapin ([`InFlight::ack_handed`]) whose frame may not be
/// written yet: it completes once lapin has written it (or failed to: the
/// channel is gone, and its deliveries with it).
pub(crate) struct HandedAck(
    Pin<Box<dyn Future<Output = deadpool_lapin::lapin::Result<bool>> + Send + Sync>>,
);

impl HandedAck {
    /// Polls once without a waker to be told: `None` while still on its way.
    fn poll_now(&mut self) -> Option<deadpool_lapin::lapin::Result<bool>> {
        let mut cx = Context::from_waker(Waker::noop());
        match self.0.as_mut().poll(&mut cx) {
            Poll::Ready(done) => Some(done),
            Poll::Pending => None,
        }
    }
}

impl std::fmt::Debug for HandedAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandedAck")
    }
}

/// The acks a consumer handed to lapin without waiting
/// ([`InFlight::ack_handed`]) that may not be written yet, so that it can
/// wait for them before it closes its channel or connection
/// ([`HandedAcks::flush`]): lapin hands an ack over to its connection's
/// I/O loop through a queue and a task of its own, so a close issued right
/// after an ack can reach the broker first, and the acked message comes
/// back to the queue for the next consumer. No task or timer per ack:
/// those already written are pruned from the oldest as the next is handed
/// over, up to the first still on its way (lapin writes them in the order
/// they were handed over), so each ack costs a poll or two however many
/// are on their way. When lapin's I/O loop falls behind, a saturated
/// subscriber holds up to its prefetch of them: polling every one on each
/// ack made each ack cost O(prefetch) polls (a lapin promise poll
/// registers a listener), the subscriber's thread then spending several
/// times the CPU of the run per event (docs/BENCHMARKS.md, "Events: a
/// subscriber's acks on their way"). A full prune runs only past
/// [`HANDED_ACKS_PRUNE_ALL`], should an older ack stay on its way while
/// newer ones are written.
#[derive(Debug, Default)]
pub(crate) struct HandedAcks {
    pending: std::collections::VecDeque<HandedAck>,
}

/// Acks on their way past which [`HandedAcks`] polls all of them, not only
/// the oldest: a bound on what it holds, should an old one stay pending.
const HANDED_ACKS_PRUNE_ALL: usize = 4096;

impl HandedAcks {
    /// Hands `inflight`'s ack to lapin and keeps it while it is on its way.
    pub(crate) fn ack(&mut self, inflight: InFlight) -> Result<()> {
        self.prune();
        if let Some(on_its_way) = inflight.ack_handed()? {
            self.pending.push_back(on_its_way);
        }
        Ok(())
    }

    /// Drops the acks written already: from the oldest up to the first
    /// still on its way; all of them once more than
    /// [`HANDED_ACKS_PRUNE_ALL`] are held.
    fn prune(&mut self) {
        if self.pending.len() >= HANDED_ACKS_PRUNE_ALL {
            self.pending.retain_mut(|a| a.poll_now().is_none());
            return;
        }
        while let Some(oldest) = self.pending.front_mut() {
            if oldest.poll_now().is_none() {
                break;
            }
            self.pending.pop_front();
        }
    }

    /// Forgets the acks on their way: their channel is gone (its
    /// deliveries go back to the queue whatever happens to them).
    pub(crate) fn forget(&mut self) {
        self.pending.clear();
    }

    /// Whether any ack may still be on its way.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Waits until every ack handed over is written (or failed with its
    /// channel), at most `within`: the bound for a connection that no
    /// longer writes anything (the acks are lost with it either way).
    /// Returns how many were still on their way when the bound ran out.
    pub(crate) async fn flush(&mut self, within: Duration) -> usize {
        let pending = std::mem::take(&mut self.pending);
        let total = pending.len();
        let mut done = 0;
        let all = async {
            for ack in pending {
                let _ = ack.0.await;
                done += 1;
            }
        };
        let finished = tokio::time::timeout(within, all).await.is_ok();
        if finished { 0 } else { total - done }
    }
}
