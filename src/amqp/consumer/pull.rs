//! [`Consuming`]: a supervised consumer for a task that pulls its
//! deliveries one by one (the gateway's dead-letter watch, event
//! subscriptions).

use futures_util::StreamExt;
use tracing::warn;

use super::{Deliveries, Event, Link, Supervisor};
use crate::error::Result;

/// A supervised consumer pulled by one task. [`Consuming::next`] hides every
/// loss: it re-establishes the consumer (with backoff) and goes on.
/// Dropped, the consumer stops on purpose; dropped by a panic, its status
/// says so.
#[derive(Debug)]
pub struct Consuming {
    supervisor: Supervisor,
    /// The link now, with its deliveries; `None` while re-establishing.
    link: Option<(Link, Deliveries)>,
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
        }
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
                link.lost(why.reason());
            }
        }
    }

    /// Stops consuming on purpose and closes the connection (bounded);
    /// deliveries not acked go back to the queue.
    pub async fn stop(mut self, why: &str) {
        if let Some((link, _)) = self.link.take() {
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
        }
    }
}
