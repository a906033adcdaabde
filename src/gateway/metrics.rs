//! The HTTP face's own metrics: event stream sessions open now, by
//! transport, and requests refused by a caller's limits. (The calls it
//! answers are counted by [`crate::calls::metrics`].)

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which stream a session is served on: the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Server-Sent Events.
    Sse,
    /// WebSocket.
    WebSocket,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::WebSocket => "websocket",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    caller: String,
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

/// The gateway's families, declared once per registry.
#[derive(Debug)]
pub(crate) struct GatewayMetrics {
    /// Requests refused by a caller's limit, by caller (callers come from
    /// the settings, so the labels are bounded) and limit.
    limited: Family<LimitLabels, Counter>,
    sessions: Family<TransportLabels, Gauge>,
}

impl GatewayMetrics {
    /// Declares the families in `registry`.
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let limited = Family::<LimitLabels, Counter>::default();
        let sessions = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "switchboard_gateway_limited",
            "Requests refused with 429 because their caller was over one of its limits (gateway.limits), by caller and limit (rate, pending, streams, long_polls)",
            limited.clone(),
        );
        registry.register(
            "switchboard_gateway_stream_sessions",
            "Event stream sessions open now, by transport",
            sessions.clone(),
        );
        // Zero, not absent, before the first session.
        for t in [Transport::Sse, Transport::WebSocket] {
            sessions.get_or_create_owned(&TransportLabels {
                transport: t.as_str(),
            });
        }
        Self { limited, sessions }
    }

    /// The counter of requests of `caller` refused by its `limit` (made at
    /// the gateway's start for every configured caller, so it reads 0
    /// before the first refusal).
    pub(crate) fn limited(&self, caller: &str, limit: &'static str) -> Counter {
        self.limited.get_or_create_owned(&LimitLabels {
            caller: caller.to_owned(),
            limit,
        })
    }

    /// Counts an open stream session until the returned guard is dropped.
    pub(crate) fn stream_session(&self, transport: Transport) -> StreamSession {
        let gauge = self.sessions.get_or_create_owned(&TransportLabels {
            transport: transport.as_str(),
        });
        gauge.inc();
        StreamSession(gauge)
    }
}

/// An open stream session, counted while it lives.
#[derive(Debug)]
pub(crate) struct StreamSession(Gauge);

impl Drop for StreamSession {
    fn drop(&mut self) {
        self.0.dec();
    }
}
