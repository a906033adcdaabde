//! The library's error type: one enum, each kind saying whether a retry may
//! succeed ([`Error::is_recoverable`]).

use std::time::Duration;

use deadpool_lapin::lapin;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached at start-up or when a connection was
    /// needed. `url` has its password hidden.
    #[error(
        "cannot reach RabbitMQ at {url}: {reason}. Start one (`rabbitmq-server -detached`, or `docker compose -f docker/compose.yml up rabbitmq`) or set SWITCHBOARD__AMQP__URL"
    )]
    BrokerUnavailable {
        /// Where we looked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// TLS with the broker (`amqps://`) failed: a file of the `amqp.tls_*`
    /// settings, or the handshake (a certificate that does not verify, a
    /// port that does not speak TLS, a client certificate refused). `url`
    /// has its password hidden. Not recoverable (trying again fails again),
    /// except [`crate::amqp::TlsError::Closed`].
    #[error("TLS with RabbitMQ at {url} failed: {source}")]
    Tls {
        /// Where we connected.
        url: String,
        /// What went wrong (boxed: it is large, and rare).
        #[source]
        source: Box<crate::amqp::TlsError>,
    },
    /// An AMQP operation failed (channel or connection closed, refused...).
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// A publish was mandatory and nothing was bound to take it.
    #[error("nothing is bound to take a message to exchange {exchange:?} with key {routing_key:?}")]
    NoRoute {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
    },
    /// The broker nacked a publish: it did not take responsibility for it.
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// No reply came before the call's deadline.
    #[error("call {call_id} got no reply within {timeout:?}")]
    Timeout {
        /// The call's correlation id.
        call_id: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// Too many calls are pending; try later.
    #[error("too many calls are pending (limit {limit})")]
    Overloaded {
        /// The configured bound.
        limit: usize,
    },
    /// A call id is already pending (a caller reused a correlation id).
    #[error("call id {0} is already pending")]
    DuplicateCall(String),
    /// The call's reply channel was lost (direct reply-to across a
    /// reconnect): its reply cannot arrive, whether or not it was handled.
    #[error("the reply channel of call {0} was lost; its outcome is unknown")]
    ReplyLost(String),
    /// The broker did not take a delivery's ack, nack or reject in time:
    /// its connection is wedged. The message comes back to the queue once
    /// that connection is closed.
    #[error("the broker did not take the {what} of a delivery within {after:?}")]
    SettleTimeout {
        /// `ack`, `nack` or `reject`.
        what: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// The actor that routes replies has stopped.
    #[error("the reply router has stopped")]
    RouterStopped,
    /// A message could not be decoded.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The call store failed.
    #[error("call store: {0}")]
    Store(String),
    /// A setting is wrong.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// Exchanges or queues exist on the broker with other arguments than
    /// switchboard declares; each names what differs and how to resolve it.
    #[error("{}", .0.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("\n"))]
    Topology(Vec<crate::amqp::topology::Mismatch>),
}

impl Error {
    /// Whether trying again later may succeed.
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            Error::BrokerUnavailable { .. }
                | Error::Amqp(_)
                | Error::Nacked
                | Error::Timeout { .. }
                | Error::Overloaded { .. }
                | Error::SettleTimeout { .. }
        ) || matches!(self, Error::Tls { source, .. } if matches!(**source, crate::amqp::TlsError::Closed { .. }))
    }
}

/// Result with the library's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
