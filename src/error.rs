//! The library's error type: one enum, each kind saying whether a retry may
//! succeed ([`Error::is_recoverable`]). Each variant names what failed and
//! keeps the error underneath as its `source()`; none carries a URL's
//! password (URLs are redacted before they are put in).

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
        /// What went wrong (lapin's or the pool's error as its source).
        #[source]
        reason: Unreachable,
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
    /// A handler reported progress outside 0 to 1
    /// ([`crate::Request::progress`]): a bug in the handler, not in a
    /// message; nothing was published.
    #[error("progress must be a number from 0 to 1, not {fraction}")]
    ProgressOutOfRange {
        /// The fraction given.
        fraction: f64,
    },
    /// A message could not be encoded (serialised) to be published.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A value that travels as an AMQP short string (service name, content
    /// type, call or message id) is too long; refused before lapin, which
    /// would panic on it.
    #[error("the {what} is longer than {limit} bytes")]
    TooLong {
        /// Which value.
        what: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// A listener could not be bound or served (`what` is its setting, or
    /// the server it was for).
    #[error("{what}: cannot listen on {addr}: {source}")]
    Listen {
        /// The setting (`gateway.bind`, `metrics.bind`) or the server.
        what: &'static str,
        /// The address, as given or as bound.
        addr: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The call store failed.
    #[error("call store: {0}")]
    Store(#[source] crate::calls::StoreError),
    /// The call store holds a value this version does not know (a row
    /// written by another version, or edited by hand).
    #[error("the call store holds an unknown {what} {value:?}")]
    UnknownStored {
        /// Which column.
        what: &'static str,
        /// The value found.
        value: String,
    },
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

/// Why the broker could not be reached ([`Error::BrokerUnavailable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unreachable {
    /// lapin could not open a connection (refused, reset, authentication
    /// refused...).
    #[error("{0}")]
    Connect(#[source] lapin::Error),
    /// The connection pool failed other than by a connection failure
    /// (closed, not built).
    #[error("{0}")]
    Pool(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The broker did not answer in time.
    #[error("no {what} within {after:?}")]
    NoAnswer {
        /// What was awaited: `answer`, `channel`, `publisher confirm`.
        what: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// The channel of direct reply-to calls is being re-established.
    #[error("the reply channel is being re-established")]
    ReplyChannelDown,
}

/// Result with the library's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn causes_are_kept_as_sources_and_recoverability_is_by_kind() {
        let refused =
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = Error::BrokerUnavailable {
            url: "amqp://guest:***@127.0.0.1:1/%2f".into(),
            reason: Unreachable::Connect(refused),
        };
        assert!(e.is_recoverable());
        let reason = e.source().expect("the reason is the source");
        let lapin_error = reason.source().expect("lapin's error under it");
        assert!(lapin_error.downcast_ref::<lapin::Error>().is_some());
        assert!(
            e.to_string()
                .starts_with("cannot reach RabbitMQ at amqp://guest:***@")
        );

        let e = Error::Listen {
            what: "gateway.bind",
            addr: "127.0.0.1:80".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(!e.is_recoverable());
        assert!(
            e.to_string()
                .starts_with("gateway.bind: cannot listen on 127.0.0.1:80: "),
            "{e}"
        );
        let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(|e| e.kind()),
            Some(std::io::ErrorKind::PermissionDenied)
        );

        let e = Error::Store(crate::calls::StoreError::Query(sqlx::Error::PoolTimedOut));
        assert!(!e.is_recoverable());
        let sqlx_error = e.source().and_then(|s| s.source());
        assert!(sqlx_error.is_some_and(|s| s.downcast_ref::<sqlx::Error>().is_some()));
        assert!(e.to_string().starts_with("call store: "), "{e}");
    }
}
