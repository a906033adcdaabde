//! The supervised consumers' metrics, by consumer name: whether they
//! consume, how often they came back, what poison they settled. The
//! statuses are read at scrape time ([`super::Consumers`] is the source).

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::{Values, counters, gauges};

/// The numbers of the supervised consumers of one name: `worker/<service>`,
/// `rpc`, `hub`, `deadwatch`, `subscriber`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Named {
    /// Consumers of that name consuming now.
    pub(crate) up: i64,
    /// Times they were re-established after they were lost.
    pub(crate) reconnects: u64,
    /// Poison messages they settled to a dead-letter queue.
    pub(crate) poisoned: u64,
}

/// Every consumer name's numbers at one scrape.
#[derive(Debug, Default)]
pub(crate) struct ConsumerValues(BTreeMap<String, Named>);

impl ConsumerValues {
    /// The numbers of the consumers named `name`, to add to.
    pub(crate) fn named(&mut self, name: &str) -> &mut Named {
        if !self.0.contains_key(name) {
            self.0.insert(name.to_owned(), Named::default());
        }
        self.0
            .get_mut(name)
            .expect("inserted just above when missing")
    }
}

impl Values for ConsumerValues {
    const PART: &'static str = "consumers";

    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let c = &self.0;
        if c.is_empty() {
            return Ok(());
        }
        let up: Vec<(&str, i64)> = c.iter().map(|(n, v)| (n.as_str(), v.up)).collect();
        gauges(
            enc,
            "switchboard_consumer_up",
            "Consumers of that name (worker/<service>, rpc, hub, deadwatch, subscriber) consuming now; 0 while one is down (lost, re-establishing, its actor or task gone).",
            "consumer",
            &up,
        )?;
        let poisoned: Vec<(&str, u64)> = c.iter().map(|(n, v)| (n.as_str(), v.poisoned)).collect();
        counters(
            enc,
            "switchboard_consumer_poison",
            "Messages a consumer could not decode or handle, settled once to a dead-letter queue (the service's, or <prefix>.poison) so that they never come back.",
            "consumer",
            &poisoned,
        )?;
        // By role: the name up to its first '/' (worker/<service> -> worker).
        let mut by_role: BTreeMap<&str, u64> = BTreeMap::new();
        for (name, v) in c {
            let role = name.split('/').next().unwrap_or(name);
            *by_role.entry(role).or_default() += v.reconnects;
        }
        let reconnects: Vec<(&str, u64)> = by_role.into_iter().collect();
        counters(
            enc,
            "switchboard_broker_reconnects",
            "Consumer connections re-established after they were lost, by role (worker, rpc, hub, deadwatch, subscriber).",
            "role",
            &reconnects,
        )
    }
}
