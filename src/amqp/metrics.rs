//! The broker connection's metrics: channels opened on the publishing
//! connections, and whether the broker answered at the last scrape.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counted where channels are opened ([`crate::amqp::Broker`]) and where
/// the broker is probed (`/metrics`).
#[derive(Debug)]
pub(crate) struct BrokerMetrics {
    /// Channels opened on the publishing pool's connections.
    channels_opened: Counter,
    /// 1 when the broker answered at the last scrape.
    up: Gauge,
}

impl BrokerMetrics {
    /// Declares the families in `registry`.
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let channels_opened = Counter::default();
        let up = Gauge::default();
        registry.register(
            "switchboard_broker_channels_opened",
            "Channels this process opened on its publishing connections (declarations, reachability probes, publishing channels replaced): the channel churn it causes on the broker",
            channels_opened.clone(),
        );
        registry.register(
            "switchboard_broker_up",
            "Whether the broker answered at the last scrape (1) or not (0)",
            up.clone(),
        );
        Self {
            channels_opened,
            up,
        }
    }

    /// A channel was opened on a publishing connection.
    pub(crate) fn channel_opened(&self) {
        self.channels_opened.inc();
    }

    /// Records whether the broker answered a probe just now.
    pub(crate) fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }
}
