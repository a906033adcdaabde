//! The calls' metrics, by service: calls started and finished (by the mode
//! they were asked for or answered in, and the class of their HTTP status),
//! their durations, cancellations, replies after a cancel and dead-lettered
//! requests. Counted where it happens, through handles made once per
//! service ([`CallMetrics`]): an atomic increment and a lock-free
//! [`Histogram`] observation per call. The names keep the gateway's prefix
//! (`switchboard_gateway_calls_*`): the gateway is what answers the calls.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::Histogram;

/// How a call was asked for (`started`) or answered (`finished`): the
/// `mode` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The reply is the HTTP answer (a call whose wait ran out finishes as
    /// `async`).
    Sync,
    /// Answered `202 Accepted`; polled, long-polled or streamed.
    Async,
    /// Answered `202 Accepted`; the result is POSTed to a `Callback-Url`.
    Callback,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Sync, Mode::Async, Mode::Callback];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Callback => "callback",
        }
    }
}

/// The `status` label of a finished call: the class of its HTTP status
/// (an expired call is a 504, a dead-lettered one a 502).
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// The `status` label value of an HTTP status.
#[cfg(test)]
fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[status_class_index(status)]
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    service: String,
    mode: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

/// The calls' families, declared once per registry.
pub(crate) struct CallsMetrics {
    started: Family<CallLabels, Counter>,
    finished: Family<FinishedLabels, Counter>,
    durations: Family<CallLabels, Histogram>,
    /// Handles per service, made once (see [`CallsMetrics::service`]).
    services: RwLock<HashMap<String, Arc<CallMetrics>>>,
    dead_letters: Family<ServiceLabels, Counter>,
    /// Calls cancelled by their caller, by service.
    cancelled: Family<ServiceLabels, Counter>,
    /// Replies that arrived for calls already cancelled, dropped.
    after_cancel: Family<ServiceLabels, Counter>,
    /// End events published again for calls found ended by a redelivered
    /// reply or dead letter.
    end_events_again: Family<ServiceLabels, Counter>,
}

impl fmt::Debug for CallsMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallsMetrics").finish_non_exhaustive()
    }
}

impl CallsMetrics {
    /// Declares the families in `registry`.
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let started = Family::<CallLabels, Counter>::default();
        let finished = Family::<FinishedLabels, Counter>::default();
        let durations = Family::<CallLabels, Histogram>::default();
        let dead_letters = Family::<ServiceLabels, Counter>::default();
        let cancelled = Family::<ServiceLabels, Counter>::default();
        let after_cancel = Family::<ServiceLabels, Counter>::default();
        let end_events_again = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "switchboard_gateway_calls_started",
            "Calls the gateway published, by service and the mode the caller asked for",
            started.clone(),
        );
        registry.register(
            "switchboard_gateway_calls_finished",
            "Calls the gateway saw end, by service, the mode they were answered in and the class of their HTTP status (expired: 5xx)",
            finished.clone(),
        );
        registry.register_with_unit(
            "switchboard_gateway_call_duration",
            "Time from the request to the answer (sync), or from acceptance to completion (async, callback)",
            Unit::Seconds,
            durations.clone(),
        );
        registry.register(
            "switchboard_dead_letters",
            "Requests dead-lettered after failing on every allowed delivery, by service, as the gateway's dead-letter watch sees them",
            dead_letters.clone(),
        );
        registry.register(
            "switchboard_gateway_calls_cancelled",
            "Calls cancelled by their caller (DELETE /v1/calls/{id}), by service",
            cancelled.clone(),
        );
        registry.register(
            "switchboard_gateway_replies_after_cancel",
            "Replies that arrived for calls their caller had cancelled, dropped, by service",
            after_cancel.clone(),
        );
        registry.register(
            "switchboard_gateway_end_events_republished",
            "End events of calls published again (same id), by service: the call was found ended by a redelivered reply or dead letter, or its first publish failed",
            end_events_again.clone(),
        );
        Self {
            started,
            finished,
            durations,
            services: RwLock::new(HashMap::new()),
            dead_letters,
            cancelled,
            after_cancel,
            end_events_again,
        }
    }

    /// The call metrics of `service` (made on first use, then shared).
    pub(crate) fn service(&self, service: &str) -> Arc<CallMetrics> {
        if let Some(c) = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
        {
            return c.clone();
        }
        let mut map = self.services.write().unwrap_or_else(|p| p.into_inner());
        map.entry(service.to_owned())
            .or_insert_with(|| {
                let labels = |mode: Mode| CallLabels {
                    service: service.to_owned(),
                    mode: mode.as_str(),
                };
                Arc::new(CallMetrics {
                    service: service.to_owned(),
                    started: Mode::ALL.map(|m| self.started.get_or_create_owned(&labels(m))),
                    durations: Mode::ALL.map(|m| self.durations.get_or_create_owned(&labels(m))),
                    finished: Default::default(),
                    family: self.finished.clone(),
                })
            })
            .clone()
    }

    /// A request of `service` was dead-lettered. `service` must be one of
    /// the configured services (the dead-letter watch binds only those).
    pub(crate) fn dead_letter(&self, service: &str) {
        self.dead_letters
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// A call of `service` was cancelled by its caller.
    pub(crate) fn cancelled(&self, service: &str) {
        self.cancelled
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// A reply came for a call of `service` its caller had cancelled, and
    /// was dropped.
    pub(crate) fn reply_after_cancel(&self, service: &str) {
        self.after_cancel
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// The end event of a call of `service` was published again.
    pub(crate) fn end_event_republished(&self, service: &str) {
        self.end_events_again
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }
}

/// The counters of one service, made once so that counting a call takes
/// no lock and allocates nothing.
pub(crate) struct CallMetrics {
    service: String,
    started: [Counter; 3],
    durations: [Histogram; 3],
    /// By mode and status class, made on first use (most never happen).
    finished: [[OnceLock<Counter>; 5]; 3],
    family: Family<FinishedLabels, Counter>,
}

impl fmt::Debug for CallMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallMetrics")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl CallMetrics {
    /// A call was published in `mode`.
    pub(crate) fn started(&self, mode: Mode) {
        self.started[mode as usize].inc();
    }

    /// A call ended, answered in `mode` with HTTP `status`, `took` after it
    /// started (sync) or was accepted (async, callback).
    pub(crate) fn finished(&self, mode: Mode, status: u16, took: Duration) {
        let class = status_class_index(status);
        self.finished[mode as usize][class]
            .get_or_init(|| {
                self.family.get_or_create_owned(&FinishedLabels {
                    service: self.service.clone(),
                    mode: mode.as_str(),
                    status: STATUS_CLASSES[class],
                })
            })
            .inc();
        self.durations[mode as usize].observe(took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_are_bounded() {
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(0), "1xx");
        assert_eq!(status_class(504), "5xx");
        assert_eq!(status_class(999), "5xx");
    }
}
