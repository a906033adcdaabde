//! [`Connector`]: how every connection to the broker is opened. `amqp://` is
//! plain TCP; `amqps://` is TLS (rustls, ring), always: the broker's
//! certificate must chain to `amqp.tls_ca_file` (or, without one, to the
//! system's root certificates) and carry the URL's host (or
//! `amqp.tls_server_name`); `amqp.tls_cert_file` and `amqp.tls_key_file` add a
//! client certificate for mutual TLS.
//!
//! Why not lapin's own `amqps://` path: without a TLS backend compiled in, it
//! connects in plain text, silently (credentials in clear, the server not
//! authenticated); with one, it adds a CA file to the system roots instead of
//! trusting it alone, and offers no server name. This module calls rustls
//! itself and does not compile without it, so an `amqps://` URL can never run
//! in plain text.
//!
//! The publishing pool ([`PoolManager`]) and the consumers' dedicated
//! connections ([`super::Broker::dedicated_connection`]) both open through it.
//!
//! # Layout
//! - [`Connector`]: the parsed URL and, for `amqps://`, the TLS client
//!   configuration, built once (files read, certificates parsed) at start-up.
//! - [`PoolManager`]: deadpool's manager of the publishing connections
//!   (deadpool-lapin's own cannot be given a TLS configuration).
//! - [`TlsError`]: what went wrong with TLS: a file of the settings, the
//!   system roots, the client certificate, or the handshake with the broker.

use std::io;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_rs::TokioRuntime;
use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use deadpool_lapin::lapin::{
    self, Connection, ConnectionProperties,
    tcp::{AsyncTcpStream, RustlsConnector, RustlsConnectorConfig},
    uri::{AMQPScheme, AMQPUri},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use tracing::warn;

use super::broker::redact;
use crate::error::{Error, Result, Unreachable};
use crate::settings::{AmqpSettings, SettingsError};

/// Opens connections to the broker of `amqp.url`, with TLS for `amqps://`.
/// With several nodes, a connection goes to the node that answered last,
/// and to the next one in the list when that one does not.
pub(super) struct Connector {
    /// The nodes of `amqp.url`, in its order.
    nodes: Vec<Node>,
    /// The node the next connection tries first.
    next: AtomicUsize,
    /// `Some` for `amqps://`: every connection is TLS.
    tls: Option<RustlsConnector>,
}

/// One node of `amqp.url`.
struct Node {
    /// Its parsed URI.
    uri: AMQPUri,
    /// Its URL with the password hidden, for errors and logs.
    url: String,
    /// `amqps://`: the name its certificate must carry.
    server_name: String,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.nodes.iter().map(|n| n.url.as_str()).collect();
        f.debug_struct("Connector")
            .field("nodes", &urls)
            .field("next", &self.next)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// What went wrong with TLS to the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file named by a setting cannot be read.
    #[error("{setting} = {path:?} cannot be read: {source}")]
    Unreadable {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: String,
        /// Why it cannot be read.
        #[source]
        source: io::Error,
    },
    /// A file named by a setting is not what the setting expects.
    #[error("{setting} = {path:?} holds no usable {what}: {detail}")]
    Unusable {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: String,
        /// What it should hold.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// No CA file is set and the system's root certificates cannot be loaded.
    #[error("the system's root certificates cannot be loaded ({source}); set amqp.tls_ca_file")]
    SystemRoots {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The client certificate and key do not make a usable pair.
    #[error(
        "amqp.tls_cert_file and amqp.tls_key_file cannot be used together ({source}): is the key the certificate's?"
    )]
    ClientCertificate {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake with the broker failed, or the broker ended the
    /// session with an alert (a client certificate it refused).
    #[error("{hint} ({source})")]
    Handshake {
        /// What it most likely means and what to do, for the operator.
        hint: String,
        /// lapin's error, holding rustls's.
        #[source]
        source: lapin::Error,
    },
    /// The broker closed the connection while it was being opened, with no
    /// TLS alert read: with TLS 1.3 a broker that refuses the client's
    /// certificate (or its lack of one) does this when the alert is lost to
    /// the connection's reset. May also be a broker shutting down, so this
    /// one may be tried again.
    #[error(
        "the broker closed the connection while it was being opened; a broker that requires a client certificate does so when it gets none it trusts: set amqp.tls_cert_file and amqp.tls_key_file ({source})"
    )]
    Closed {
        /// lapin's I/O error.
        #[source]
        source: lapin::Error,
    },
}

impl Connector {
    /// Reads and checks everything `amqps://` needs (CA file, client
    /// certificate and key), so that a missing or unreadable file is an
    /// error at start-up naming its setting, not a failure at each connect.
    pub(super) fn new(settings: &AmqpSettings) -> Result<Self> {
        settings
            .check_tls()
            .map_err(|(key, why)| Error::Settings(SettingsError(format!("{key}: {why}"))))?;
        let mut nodes = Vec::new();
        for node in settings.nodes() {
            let url = redact(node);
            let uri = AMQPUri::from_str(node).map_err(|e| {
                Error::Settings(SettingsError(format!(
                    "amqp.url: {url} is not an AMQP URI ({})",
                    redact(&e)
                )))
            })?;
            let server_name = if settings.tls_server_name.is_empty() {
                uri.authority.host.clone()
            } else {
                settings.tls_server_name.clone()
            };
            nodes.push(Node {
                uri,
                url,
                server_name,
            });
        }
        let Some(first) = nodes.first() else {
            return Err(Error::Settings(SettingsError(
                "amqp.url: names no broker".into(),
            )));
        };
        let tls = match first.uri.scheme {
            AMQPScheme::AMQP => None,
            AMQPScheme::AMQPS => Some(rustls_connector(settings).map_err(|source| Error::Tls {
                url: redact(&settings.url),
                source: Box::new(source),
            })?),
        };
        if nodes.iter().any(|n| n.uri.scheme != first.uri.scheme) {
            return Err(Error::Settings(SettingsError(
                "amqp.url: mixes amqp:// and amqps:// (every node must be the same)".into(),
            )));
        }
        Ok(Self {
            nodes,
            next: AtomicUsize::new(0),
            tls,
        })
    }

    /// Opens a connection whose tasks run on the caller's Tokio runtime. Not
    /// bounded in time here: callers bound it with `amqp.connect_timeout_ms`.
    /// A TLS failure is [`Error::Tls`] with a hint; anything else
    /// [`Error::BrokerUnavailable`]; both name the URL with its password
    /// hidden.
    pub(super) async fn connect(&self, props: ConnectionProperties) -> Result<Connection> {
        self.connect_on(props, TokioRuntime::tokio_current()).await
    }

    /// [`Connector::connect`], the connection's tasks on `runtime`. Tries
    /// each node once, from the one that answered last; the error is the
    /// last node's.
    pub(super) async fn connect_on(
        &self,
        props: ConnectionProperties,
        runtime: TokioRuntime,
    ) -> Result<Connection> {
        let count = self.nodes.len();
        let start = self.next.load(Ordering::Relaxed) % count;
        let mut failure = None;
        for k in 0..count {
            let i = (start + k) % count;
            // Moved on before the attempt: an attempt that hangs until the
            // caller's timeout drops it leaves the next try to the next node.
            self.next.store((i + 1) % count, Ordering::Relaxed);
            match self
                .connect_node(&self.nodes[i], props.clone(), runtime.clone())
                .await
            {
                Ok(conn) => {
                    self.next.store(i, Ordering::Relaxed);
                    return Ok(conn);
                }
                Err(e) => {
                    if count > 1 {
                        warn!(node = %self.nodes[i].url, error = %e, "broker node does not answer; trying the next");
                    }
                    failure = Some(e);
                }
            }
        }
        Err(failure.expect("amqp.url names at least one node"))
    }

    /// Opens a connection to `node`.
    async fn connect_node(
        &self,
        node: &Node,
        props: ConnectionProperties,
        runtime: TokioRuntime,
    ) -> Result<Connection> {
        let opened = match &self.tls {
            None => Connection::connect_uri_with_runtime(node.uri.clone(), props, runtime).await,
            Some(tls) => {
                let tls = tls.clone();
                let server_name = node.server_name.clone();
                Connection::connector(
                    node.uri.clone(),
                    runtime,
                    async move |uri: AMQPUri, runtime| {
                        let host = (uri.authority.host.as_str(), uri.authority.port);
                        let addrs: Vec<std::net::SocketAddr> =
                            tokio::net::lookup_host(host).await?.collect();
                        let plain = AsyncTcpStream::connect(&runtime, addrs).await?;
                        // The only way on from here is TLS: there is no
                        // fallback to the plain stream.
                        Ok(plain.into_rustls(&tls, &server_name).await?)
                    },
                    props,
                )
                .await
            }
        };
        opened.map_err(|e| self.error(e, node))
    }

    /// lapin's error as the library's: TLS failures (rustls's error inside
    /// lapin's I/O error) apart, with what they most likely mean.
    fn error(&self, e: lapin::Error, node: &Node) -> Error {
        let rustls_error = match e.kind() {
            lapin::ErrorKind::IOError(io) => io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            _ => None,
        };
        let closed = matches!(
            e.kind(),
            lapin::ErrorKind::IOError(io) if matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        );
        let tls = |source| Error::Tls {
            url: node.url.clone(),
            source: Box::new(source),
        };
        match (rustls_error, &self.tls) {
            (Some(cause), Some(_)) => tls(TlsError::Handshake {
                hint: hint(cause, &node.server_name),
                source: e,
            }),
            (None, Some(_)) if closed => tls(TlsError::Closed { source: e }),
            _ => Error::BrokerUnavailable {
                url: node.url.clone(),
                reason: Unreachable::Connect(e),
            },
        }
    }
}

/// What a rustls error at connect most likely means, for an operator.
fn hint(cause: &rustls::Error, server_name: &str) -> String {
    use rustls::Error as E;
    match cause {
        E::InvalidCertificate(_) => format!(
            "the broker's certificate does not verify: it must chain to amqp.tls_ca_file (or, without one, to the system's roots) and name {server_name:?} (or amqp.tls_server_name)"
        ),
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => "the broker did not answer in TLS: is this port a TLS listener? (amqps:// is 5671 by default; 5672 is usually plain AMQP)".into(),
        E::AlertReceived(alert) => format!(
            "the broker refused the TLS session (alert {alert:?}); if it asks for a client certificate, set amqp.tls_cert_file and amqp.tls_key_file to one it trusts"
        ),
        _ => "the TLS handshake with the broker failed".into(),
    }
}

/// rustls's client configuration from the `amqp.tls_*` settings.
fn rustls_connector(settings: &AmqpSettings) -> Result<RustlsConnector, TlsError> {
    let roots = if settings.tls_ca_file.is_empty() {
        RustlsConnectorConfig::new_with_native_certs()
            .map_err(|source| TlsError::SystemRoots { source })?
    } else {
        // The CA file alone: a broker's private CA is not to be mixed with
        // every public one.
        let certs = certificates("amqp.tls_ca_file", &settings.tls_ca_file)?;
        RustlsConnectorConfig::default().with_parsable_certificates(certs)
    };
    if settings.tls_cert_file.is_empty() {
        return roots
            .connector_with_no_client_auth()
            .map_err(|source| unusable_ca(settings, source));
    }
    let chain = certificates("amqp.tls_cert_file", &settings.tls_cert_file)?;
    let key_pem = read("amqp.tls_key_file", &settings.tls_key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Unusable {
        setting: "amqp.tls_key_file",
        path: settings.tls_key_file.clone(),
        what: "PEM private key",
        detail: e.to_string(),
    })?;
    roots
        .connector_with_single_cert(chain, key)
        .map_err(|source| match source.kind() {
            io::ErrorKind::InvalidData => TlsError::ClientCertificate { source },
            _ => unusable_ca(settings, source),
        })
}

/// rustls-connector fails to build when no root certificate parses.
fn unusable_ca(settings: &AmqpSettings, source: io::Error) -> TlsError {
    if settings.tls_ca_file.is_empty() {
        TlsError::SystemRoots { source }
    } else {
        TlsError::Unusable {
            setting: "amqp.tls_ca_file",
            path: settings.tls_ca_file.clone(),
            what: "CA certificate",
            detail: source.to_string(),
        }
    }
}

/// The file named by `setting`.
fn read(setting: &'static str, path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        setting,
        path: path.to_owned(),
        source,
    })
}

/// The PEM certificates of the file named by `setting`: at least one.
fn certificates(
    setting: &'static str,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(setting, path)?;
    let unusable = |detail: String| TlsError::Unusable {
        setting,
        path: path.to_owned(),
        what: "PEM certificate",
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(e.to_string()))?;
    if certs.is_empty() {
        return Err(unusable("no \"BEGIN CERTIFICATE\" section found".into()));
    }
    Ok(certs)
}

/// deadpool's manager of the publishing connections: each is opened by the
/// [`Connector`] (so TLS for `amqps://`) and named
/// `switchboard/<instance>/publish`.
pub(super) struct PoolManager {
    /// How connections are opened.
    pub(crate) connector: Arc<Connector>,
    /// The connection name the broker shows.
    pub(crate) name: String,
    /// The runtime of `Broker::connect`, where every pooled connection's
    /// tasks run, whichever task asks the pool for one: a connection opened
    /// on the runtime of, say, an actix-web worker thread would die with
    /// that thread (deadpool-lapin's manager did the same).
    pub(crate) runtime: TokioRuntime,
}

impl deadpool::managed::Manager for PoolManager {
    type Type = Connection;
    type Error = Error;

    async fn create(&self) -> Result<Connection> {
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        self.connector.connect_on(props, self.runtime.clone()).await
    }

    /// A connection that is no longer open is dropped, and another opened.
    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<Error> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message(format!(
                "publishing connection is no longer open: {:?}",
                conn.status()
            )))
        }
    }
}

/// The publishing pool.
pub(super) type Pool = deadpool::managed::Pool<PoolManager>;
