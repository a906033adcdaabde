//! [`Consuming`]: a supervised consumer for a task that pulls its
//! deliveries one by one (the gateway's dead-letter watch, event
//! subscriptions).

use futures_util::StreamExt;
use tracing::warn;

use super::{Deliveries, Event, Link, Supervisor};
use crate::amqp::InFlight;
use crate::amqp::delivery::{HandedAcks, SETTLE_TIMEOUT};
use crate::error::Result;

/// A supervised consumer pulled by one task. [`Consuming::next`] hides every
/// loss: it re-establishes the consumer (with backoff) and goes on.
/// Dropped, the consumer stops on purpose; dropped by a panic, its status
/// says so. Acks given to [`Consuming::ack`] are on the wire before the
/// connection closes, whether it is stopped or dropped.
#[derive(Debug)]
pub struct Consuming {
    supervisor: Supervisor,
    /// The link now, with its deliveries; `None` while re-establishing.
    link: Option<(Link, Deliveries)>,
    /// Acks handed to lapin on the link's channel, not yet known written.
    acks: HandedAcks,
}

impl Consuming {
    /// Opens the first link now (an error if the broker cannot be reached).
    pub async fn start(supervisor: Supervisor) -> Result<Self> {
        let link = match supervisor.open().await {
            Ok(l) => l,
            Err(e) => {
                supervisor.status().set_stopped();
                return Err(e);
            }
        };
        Ok(Self::with(supervisor, link))
    }

    /// Takes over `link`, opened by `supervisor`.
    pub fn with(supervisor: Supervisor, mut link: Link) -> Self {
        let deliveries = link.take_deliveries();
        Self {
            supervisor,
            link: deliveries.map(|d| (link, d)),
            acks: HandedAcks::default(),
        }
    }

    /// Acks a delivery taken from [`Consuming::next`] without waiting for
    /// the ack to be written (no task or timer per delivery): it is handed
    /// to lapin, and [`Consuming::stop`] (or the drop) waits for it, bounded
    /// by the settle timeout, before closing the connection, so an ack
    /// given here is not lost to a close that overtakes it. An ack lost
    /// with its connection (a lost link) brings the delivery back to its
    /// queue, as for any consumer.
    pub fn ack(&mut self, inflight: InFlight) -> Result<()> {
        self.acks.ack(inflight)
    }

    /// The supervisor (for [`Supervisor::quarantine`]).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The queue consumed now (a temporary queue's name changes with each
    /// link), if a link is open.
    pub fn queue(&self) -> Option<&str> {
        self.link.as_ref().map(|(l, _)| l.queue())
    }

    /// The next delivery. A lost link is dropped (its deliveries not acked
    /// yet go back to the queue with its connection) and a new one opened
    /// first, so this only returns deliveries. Cancel-safe: a delivery is
    /// never taken out of the stream without being returned.
    pub async fn next(&mut self) -> deadpool_lapin::lapin::message::Delivery {
        loop {
            let (link, deliveries) = match &mut self.link {
                Some((link, deliveries)) => (link, deliveries),
                None => {
                    let mut link = self.supervisor.reopen().await;
                    let Some(d) = link.take_deliveries() else {
                        continue;
                    };
                    self.link = Some((link, d));
                    continue;
                }
            };
            let why = match deliveries.next().await {
                Some(Event::Delivery(d)) => return d,
                Some(Event::Lost(why)) => why,
                None => super::Lost::Cancelled,
            };
            warn!(consumer = %self.supervisor.name(), queue = %link.queue(), lost = %why, "consumer lost; re-establishing");
            if let Some((link, _)) = self.link.take() {
                // Its channel's acks are moot now: its unacked deliveries go
                // back to the queue with it.
                self.acks.forget();
                link.lost(why.reason());
            }
        }
    }

    /// Stops consuming on purpose and closes the connection (bounded):
    /// first waits for the acks handed over by [`Consuming::ack`] to be
    /// written (bounded by the settle timeout); deliveries not acked go
    /// back to the queue.
    pub async fn stop(mut self, why: &str) {
        if let Some((link, _)) = self.link.take() {
            flush(&mut self.acks, &self.supervisor).await;
            link.stop(why).await;
        }
        self.supervisor.status().set_stopped();
    }
}

impl Drop for Consuming {
    fn drop(&mut self) {
        // Dropped by its owner: stopped on purpose. Dropped by a panic: the
        // link's own drop says so.
        if !std::thread::panicking() {
            if let Some((link, _)) = &mut self.link {
                link.mark_stopped();
            }
            self.supervisor.status().set_stopped();
            // Acks still on their way: the link (whose drop closes the
            // connection) is dropped once they are written.
            if !self.acks.is_empty()
                && let Ok(rt) = tokio::runtime::Handle::try_current()
                && let Some((link, _)) = self.link.take()
            {
                let mut acks = std::mem::take(&mut self.acks);
                let supervisor = self.supervisor.clone();
                rt.spawn(async move {
                    flush(&mut acks, &supervisor).await;
                    drop(link);
                });
            }
        }
    }
}

/// Waits for `acks` to be written before their connection closes, at most
/// the settle timeout; says so if some were not.
async fn flush(acks: &mut HandedAcks, supervisor: &Supervisor) {
    if acks.is_empty() {
        return;
    }
    let unwritten = acks.flush(SETTLE_TIMEOUT).await;
    if unwritten > 0 {
        warn!(consumer = %supervisor.name(), unwritten, after = ?SETTLE_TIMEOUT, "acks not written before the connection closed; their deliveries come back to the queue");
    }
}
