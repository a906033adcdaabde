//! RabbitMQ's management HTTP API: what operators see of switchboard, read
//! by `switchboard status` (and by the tests that check the names operators
//! see).
//!
//! [`Management`] is a small client of the few endpoints needed (queues,
//! connections, consumers); [`status`] reads each configured service's queue
//! and dead-letter queue and makes a [`ServiceStatus`] of them.
//!
//! The management plugin refreshes queue statistics every few seconds
//! (`collect_statistics_interval`, 5 s by default), so numbers here lag the
//! broker by that much.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::amqp::Names;
use crate::settings::{Settings, redact_url};

/// How long one request to the management API may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the management API could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagementError {
    /// No answer (not running, wrong URL, the plugin not enabled).
    #[error(
        "cannot reach the RabbitMQ management API at {url}: {reason}. Enable it (`rabbitmq-plugins enable rabbitmq_management`) or set SWITCHBOARD__MANAGEMENT__URL"
    )]
    Unreachable {
        /// Where we looked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The API answered with an error status (401: wrong user or password).
    #[error(
        "the RabbitMQ management API answered {status} for {url}{hint}",
        hint = if *status == 401 { " (check management.user and management.password)" } else { "" }
    )]
    Status {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The answer was not what the API documents.
    #[error("unexpected answer from the RabbitMQ management API at {url}: {reason}")]
    Malformed {
        /// The URL asked.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// A setting is wrong (the URL).
    #[error("management.url: {0}")]
    Settings(String),
}

/// A client of the management API of the broker in the settings. Its
/// `Debug` shows neither the password nor one in the URL.
#[derive(Clone)]
pub struct Management {
    http: reqwest::Client,
    base: Url,
    user: String,
    password: String,
    /// The vhost of `amqp.url`: switchboard's queues live there.
    vhost: String,
}

/// A queue as the management API shows it (the fields switchboard reads).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Messages ready for delivery.
    #[serde(default)]
    pub messages_ready: u64,
    /// Messages delivered and not yet acked.
    #[serde(default)]
    pub messages_unacknowledged: u64,
    /// Messages in all.
    #[serde(default)]
    pub messages: u64,
    /// Consumers.
    #[serde(default)]
    pub consumers: u64,
    /// `classic`, `quorum`, ...
    #[serde(default, rename = "type")]
    pub queue_type: Option<String>,
    /// The queue's arguments (`x-queue-type`, `x-dead-letter-exchange`, ...).
    #[serde(default)]
    pub arguments: serde_json::Map<String, serde_json::Value>,
    /// Message rates; absent until the queue has seen traffic.
    #[serde(default)]
    pub message_stats: MessageStats,
}

/// Rates of a queue, in messages per second.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MessageStats {
    /// Messages published into the queue.
    #[serde(default)]
    pub publish_details: Rate,
    /// Messages delivered to consumers (or fetched).
    #[serde(default)]
    pub deliver_get_details: Rate,
    /// Messages acked by consumers.
    #[serde(default)]
    pub ack_details: Rate,
    /// Messages delivered again.
    #[serde(default)]
    pub redeliver_details: Rate,
}

/// One rate.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Rate {
    /// Per second, over the last sampling interval.
    #[serde(default)]
    pub rate: f64,
}

/// A connection as the management API shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct ConnectionInfo {
    /// The broker's name for it (peer addresses).
    pub name: String,
    /// The name the client gave (`switchboard/<instance>/<role>`), if any.
    #[serde(default)]
    pub user_provided_name: Option<String>,
    /// The user it logged in as.
    #[serde(default)]
    pub user: String,
}

/// A consumer as the management API shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerInfo {
    /// Its tag (`switchboard/<instance>/<service>/<id>`).
    pub consumer_tag: String,
    /// The queue it consumes.
    pub queue: QueueRef,
}

/// A queue named by a consumer.
#[derive(Debug, Clone, Deserialize)]
pub struct QueueRef {
    /// The queue's name.
    pub name: String,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base", &redact_url(self.base.as_str()))
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// A client for `settings.management`, in the vhost of `settings.amqp.url`.
    pub fn new(settings: &Settings) -> Result<Self, ManagementError> {
        let mut base = Url::parse(&settings.management.url)
            .map_err(|e| ManagementError::Settings(e.to_string()))?;
        // Credentials come from management.user and .password (settings
        // validation refuses them in the URL): whatever user info the URL
        // has is dropped, so no error can show it.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        // `join` keeps a base path (a proxy prefix) only if it ends in `/`.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let (user, password) = settings.management.credentials(settings.amqp.first_node());
        let vhost = deadpool_lapin::lapin::uri::AMQPUri::from_str(settings.amqp.first_node())
            .map(|u| u.vhost)
            .unwrap_or_else(|_| "/".into());
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ManagementError::Settings(e.to_string()))?;
        Ok(Self {
            http,
            base,
            user,
            password,
            vhost,
        })
    }

    /// The vhost switchboard's queues live in.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// `GET <base>/api/<segments...>` (each segment percent-encoded); `None`
    /// on 404.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        segments: &[&str],
    ) -> Result<Option<T>, ManagementError> {
        let mut url = self
            .base
            .join("api")
            .map_err(|e| ManagementError::Settings(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| ManagementError::Settings("cannot be a base URL".into()))?
            .extend(segments);
        let shown = url.to_string();
        let res = self
            .http
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| ManagementError::Unreachable {
                url: self.base.to_string(),
                // Its URL is the one shown, once.
                reason: e.without_url().to_string(),
            })?;
        let status = res.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ManagementError::Status {
                url: shown,
                status: status.as_u16(),
            });
        }
        res.json()
            .await
            .map(Some)
            .map_err(|e| ManagementError::Malformed {
                url: shown,
                reason: e.without_url().to_string(),
            })
    }

    /// A queue of the vhost; `None` if it does not exist.
    pub async fn queue(&self, name: &str) -> Result<Option<QueueInfo>, ManagementError> {
        self.get(&["queues", &self.vhost, name]).await
    }

    /// Every connection to the broker.
    pub async fn connections(&self) -> Result<Vec<ConnectionInfo>, ManagementError> {
        Ok(self.get(&["connections"]).await?.unwrap_or_default())
    }

    /// Every consumer in the vhost.
    pub async fn consumers(&self) -> Result<Vec<ConsumerInfo>, ManagementError> {
        Ok(self
            .get(&["consumers", &self.vhost])
            .await?
            .unwrap_or_default())
    }
}

/// One service as `switchboard status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    /// The service.
    pub service: String,
    /// Its work queue.
    pub queue: String,
    /// Whether the work queue exists (declared by a worker or a caller).
    pub exists: bool,
    /// Requests waiting.
    pub ready: u64,
    /// Requests being worked on.
    pub unacked: u64,
    /// Workers consuming.
    pub consumers: u64,
    /// Requests published per second.
    pub publish_rate: f64,
    /// Requests delivered to workers per second.
    pub deliver_rate: f64,
    /// Requests acked per second.
    pub ack_rate: f64,
    /// Requests waiting in the service's dead-letter queue.
    pub dead_letters: u64,
}

impl ServiceStatus {
    /// Whether some worker serves the service.
    pub fn is_served(&self) -> bool {
        self.exists && self.consumers > 0
    }
}

/// The status of every configured service, in name order.
pub async fn status(settings: &Settings) -> Result<Vec<ServiceStatus>, ManagementError> {
    let api = Management::new(settings)?;
    let names = Names::new(settings.amqp.prefix.clone());
    let mut out = Vec::with_capacity(settings.services.len());
    for service in settings.services.keys() {
        let queue = names.service_queue(service);
        let info = api.queue(&queue).await?;
        let dead = api.queue(&names.dead_queue(service)).await?;
        let q = info.clone().unwrap_or_default();
        let stats = &q.message_stats;
        out.push(ServiceStatus {
            service: service.clone(),
            queue,
            exists: info.is_some(),
            ready: q.messages_ready,
            unacked: q.messages_unacknowledged,
            consumers: q.consumers,
            publish_rate: stats.publish_details.rate,
            deliver_rate: stats.deliver_get_details.rate,
            ack_rate: stats.ack_details.rate,
            dead_letters: dead.map_or(0, |d| d.messages),
        });
    }
    Ok(out)
}

/// The statuses as a table for a terminal.
pub fn render_table(rows: &[ServiceStatus]) -> String {
    let header = [
        "SERVICE",
        "QUEUE",
        "READY",
        "UNACKED",
        "CONSUMERS",
        "IN/S",
        "OUT/S",
        "ACK/S",
        "DEAD",
    ];
    let mut cells: Vec<[String; 9]> = vec![header.map(str::to_owned)];
    for r in rows {
        if r.exists {
            cells.push([
                r.service.clone(),
                r.queue.clone(),
                r.ready.to_string(),
                r.unacked.to_string(),
                r.consumers.to_string(),
                format!("{:.1}", r.publish_rate),
                format!("{:.1}", r.deliver_rate),
                format!("{:.1}", r.ack_rate),
                r.dead_letters.to_string(),
            ]);
        } else {
            let mut row = [r.service.clone(), format!("{} (missing)", r.queue)]
                .into_iter()
                .chain(std::iter::repeat_n("-".to_owned(), 7));
            cells.push(std::array::from_fn(|_| row.next().unwrap_or_default()));
        }
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // Names left, numbers right.
                if i < 2 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_and_marks_missing_queues() {
        let rows = vec![
            ServiceStatus {
                service: "echo".into(),
                queue: "sb.svc.echo".into(),
                exists: true,
                ready: 12,
                unacked: 3,
                consumers: 2,
                publish_rate: 10.25,
                deliver_rate: 9.0,
                ack_rate: 9.0,
                dead_letters: 1,
            },
            ServiceStatus {
                service: "billing".into(),
                queue: "sb.svc.billing".into(),
                exists: false,
                ready: 0,
                unacked: 0,
                consumers: 0,
                publish_rate: 0.0,
                deliver_rate: 0.0,
                ack_rate: 0.0,
                dead_letters: 0,
            },
        ];
        let t = render_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SERVICE  QUEUE"));
        assert!(lines[1].contains("sb.svc.echo"));
        assert!(lines[1].contains("10.2"));
        assert!(lines[2].contains("sb.svc.billing (missing)"));
        assert!(!rows[1].is_served() && rows[0].is_served());
    }
}
