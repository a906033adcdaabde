//! `[amqp]` and `[rpc]`: the broker's nodes and TLS, the instance's own
//! queues, and how RPC replies come back.

use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::services::{QueueType, name_char};

/// `[amqp]`: where the broker is and how switchboard names things on it.
// Debug shows no secret: see the impl below the type.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// AMQP URI of the broker; several (a cluster's nodes) separated by
    /// commas, or a TOML list: connections go to the first that answers,
    /// and to the next one when that one is lost. See [`Self::nodes`].
    #[serde(deserialize_with = "one_or_many")]
    pub url: String,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// This process's name on the broker; empty means the host name.
    pub instance_id: String,
    /// Connections in the publishing pool.
    pub pool_size: usize,
    /// Confirm-mode channels shared by publishers.
    pub publish_channels: usize,
    /// TCP + AMQP handshake timeout, ms.
    pub connect_timeout_ms: u64,
    /// How long a publish waits for its confirm before sending again, ms.
    pub confirm_timeout_ms: u64,
    /// How often each consumer makes a round trip to the broker (and how
    /// long it waits for the answer) to tell a wedged connection, ms.
    pub consumer_check_ms: u64,
    /// `x-expires` of the per-instance queues (reply, dead-letter watch), s;
    /// 0: they never expire.
    pub instance_queue_expires_s: u64,
    /// Type of the per-instance queues (reply, dead-letter watch): `classic`
    /// (one node, the fastest) or `quorum` (replicated: on a cluster, the
    /// replies of pending calls survive the loss of a node).
    pub instance_queue_type: QueueType,
    /// `x-max-age` of the events log (`<prefix>.events.log`): RabbitMQ's
    /// duration, a number and a unit of Y, M, D, h, m, s (`7D`).
    pub events_log_max_age: String,
    /// `x-max-length-bytes` of the events log, bytes.
    pub events_log_max_bytes: u64,
    /// `amqps://` only: PEM file of the CA certificates that the broker's
    /// certificate must chain to; empty: the system's root certificates.
    pub tls_ca_file: String,
    /// `amqps://` only: PEM file of this client's certificate chain, for a
    /// broker that asks for one (mutual TLS); set with `tls_key_file`.
    pub tls_cert_file: String,
    /// `amqps://` only: PEM file of the client certificate's private key.
    pub tls_key_file: String,
    /// `amqps://` only: the name the broker's certificate must carry; empty:
    /// the host of `url`.
    pub tls_server_name: String,
}

impl AmqpSettings {
    /// The retention of the events log.
    pub fn events_log(&self) -> crate::amqp::topology::EventsLog {
        crate::amqp::topology::EventsLog::new(&self.events_log_max_age, self.events_log_max_bytes)
    }

    /// The broker's nodes, in the order of `amqp.url`.
    pub fn nodes(&self) -> Vec<&str> {
        split_nodes(&self.url)
    }

    /// The first node of `amqp.url`: where the vhost, the user and the
    /// management API's defaults are read (every node has the same).
    pub fn first_node(&self) -> &str {
        self.nodes().first().copied().unwrap_or("")
    }
}

/// The URLs of a list separated by commas. A comma splits only where the
/// next URL begins (`scheme://`): a password may hold a comma.
pub(super) fn split_nodes(list: &str) -> Vec<&str> {
    let starts_url = |rest: &str| {
        let rest = rest.trim_start();
        rest.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
    };
    // A trailing comma ends the list (no node holds it).
    let list = list.trim().trim_end_matches(',');
    let mut nodes = Vec::new();
    let mut start = 0;
    for (i, _) in list.match_indices(',') {
        if starts_url(&list[i + 1..]) {
            nodes.push(list[start..i].trim());
            start = i + 1;
        }
    }
    nodes.push(list[start..].trim());
    nodes.retain(|n| !n.is_empty());
    nodes
}

/// `amqp.url` as one string (nodes separated by commas) from a string or a
/// list of strings.
pub(super) fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s,
        OneOrMany::Many(v) => v.join(","),
    })
}

/// Where replies come back to an RPC client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyMode {
    /// The instance's durable reply queue for calls that may outlive their
    /// caller (`send`), RabbitMQ direct reply-to for calls whose caller
    /// waits in memory (`call`, `send_waiting`): each call pays only for
    /// the durability it can use.
    Auto,
    /// The instance's durable reply queue: replies survive a restart.
    Queue,
    /// RabbitMQ direct reply-to: no queue, replies to a gone caller are lost.
    Direct,
}

/// `[rpc]`: the RPC client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcSettings {
    /// Where replies come back.
    pub reply_mode: ReplyMode,
    /// Bound on calls awaiting a reply.
    pub max_pending: usize,
    /// Deadline of a call that names none, ms.
    pub default_timeout_ms: u64,
}

impl RpcSettings {
    /// The default deadline as a duration.
    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.default_timeout_ms)
    }
}

impl AmqpSettings {
    /// The instance id in force: the setting, or the host name made safe
    /// for AMQP names.
    pub fn resolved_instance_id(&self) -> String {
        if !self.amqp_instance_is_empty() {
            return self.instance_id.clone();
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let safe: String = host
            .chars()
            .map(|c| if name_char(c) { c } else { '-' })
            .collect();
        if safe.is_empty() {
            "switchboard".into()
        } else {
            safe
        }
    }

    fn amqp_instance_is_empty(&self) -> bool {
        self.instance_id.is_empty()
    }

    /// Whether `url` asks for TLS (`amqps://`).
    pub fn is_tls(&self) -> bool {
        use deadpool_lapin::lapin::uri::{AMQPScheme, AMQPUri};
        AMQPUri::from_str(&self.url).is_ok_and(|u| u.scheme == AMQPScheme::AMQPS)
    }

    /// The `tls_*` settings that can be checked without reading a file: a
    /// client certificate comes with its key, a server name is a DNS name or
    /// an IP address, and none of them is set for a plain `amqp://` URL (a
    /// user who names a CA file expects TLS, and would get plain text).
    pub(crate) fn check_tls(&self) -> Result<(), (&'static str, String)> {
        let files = [
            ("amqp.tls_ca_file", &self.tls_ca_file),
            ("amqp.tls_cert_file", &self.tls_cert_file),
            ("amqp.tls_key_file", &self.tls_key_file),
            ("amqp.tls_server_name", &self.tls_server_name),
        ];
        if !self.is_tls()
            && let Some((key, _)) = files.iter().find(|(_, v)| !v.is_empty())
        {
            return Err((
                key,
                "is set, but amqp.url is not amqps://: the connection would not use TLS".into(),
            ));
        }
        match (self.tls_cert_file.is_empty(), self.tls_key_file.is_empty()) {
            (false, true) => {
                return Err((
                    "amqp.tls_key_file",
                    "must be set with amqp.tls_cert_file (the client certificate's private key)"
                        .into(),
                ));
            }
            (true, false) => {
                return Err((
                    "amqp.tls_cert_file",
                    "must be set with amqp.tls_key_file (the client certificate)".into(),
                ));
            }
            _ => {}
        }
        if !self.tls_server_name.is_empty()
            && rustls_pki_types::ServerName::try_from(self.tls_server_name.as_str()).is_err()
        {
            return Err((
                "amqp.tls_server_name",
                format!(
                    "not a DNS name or an IP address: {:?}",
                    self.tls_server_name
                ),
            ));
        }
        Ok(())
    }
}
