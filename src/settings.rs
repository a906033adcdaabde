//! Typed settings: `config/default.toml` (embedded), then an optional file,
//! then `SWITCHBOARD__SECTION__KEY` environment variables.
//!
//! Every key is documented in `config/default.toml`, where its default is
//! defined. Loading fails with a [`SettingsError`] that names the offending
//! key, so a typo stops start-up instead of being silently ignored.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

/// The defaults, compiled in so the binary runs without any file beside it.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// Why the settings could not be loaded; the message names the setting.
#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(pub String);

/// All of switchboard's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The broker and the names used on it.
    pub amqp: AmqpSettings,
    /// The RPC client: reply mode, bounds, default deadline.
    pub rpc: RpcSettings,
    /// Log filter and format.
    pub log: LogSettings,
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSettings>,
}

/// `[amqp]`: where the broker is and how switchboard names things on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// AMQP URI of the broker.
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
}

/// Where replies come back to an RPC client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyMode {
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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    Human,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// RUST_LOG-style filter.
    pub filter: String,
    /// Output format.
    pub format: LogFormat,
}

/// The queue type of a service queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, counts deliveries (`x-delivery-limit`).
    Quorum,
    /// Single node, faster.
    Classic,
}

/// Built-in handlers that `serve` can run for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinHandler {
    /// Replies with the request's body and content type.
    Echo,
}

/// `[services.<name>]`: one service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Built-in handler that `serve` runs for this service, if any.
    #[serde(default)]
    pub handler: Option<BuiltinHandler>,
    /// Echo only: delay before replying, ms.
    #[serde(default)]
    pub delay_ms: u64,
    /// Prefetch: handlers running at once in one worker.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: u16,
    /// Quorum or classic.
    #[serde(default = "defaults::queue_type")]
    pub queue_type: QueueType,
    /// Deliveries before a request is dead-lettered.
    #[serde(default = "defaults::delivery_limit")]
    pub delivery_limit: u32,
    /// The service's deadline for a call, ms.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

mod defaults {
    use super::QueueType;
    pub fn concurrency() -> u16 {
        64
    }
    pub fn queue_type() -> QueueType {
        QueueType::Quorum
    }
    pub fn delivery_limit() -> u32 {
        5
    }
    pub fn timeout_ms() -> u64 {
        30_000
    }
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            handler: None,
            delay_ms: 0,
            concurrency: defaults::concurrency(),
            queue_type: defaults::queue_type(),
            delivery_limit: defaults::delivery_limit(),
            timeout_ms: defaults::timeout_ms(),
        }
    }
}

impl ServiceSettings {
    /// The service's deadline as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl RpcSettings {
    /// The default deadline as a duration.
    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.default_timeout_ms)
    }
}

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, None, std::env::vars())
    }

    /// Loads defaults, then `file`, then `extra` (TOML text), then the
    /// `SWITCHBOARD__*` variables among `env`. Tests pass their own `env`.
    pub fn load_from(
        file: Option<&Path>,
        extra: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = file {
            if !path.exists() {
                return Err(SettingsError(format!(
                    "settings file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(File::from(path).required(true));
        }
        if let Some(text) = extra {
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        }
        let vars: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SWITCHBOARD__"))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("SWITCHBOARD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars)),
        );
        let settings: Settings = builder
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| SettingsError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot; each message names its setting.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let fail = |key: &str, why: String| Err(SettingsError(format!("{key}: {why}")));
        if let Err(e) = deadpool_lapin::lapin::uri::AMQPUri::from_str(&self.amqp.url) {
            return fail("amqp.url", format!("not an AMQP URI ({e})"));
        }
        if !is_name(&self.amqp.prefix) {
            return fail("amqp.prefix", name_rule(&self.amqp.prefix));
        }
        if !self.amqp.instance_id.is_empty() && !is_name(&self.amqp.instance_id) {
            return fail("amqp.instance_id", name_rule(&self.amqp.instance_id));
        }
        if !(1..=64).contains(&self.amqp.pool_size) {
            return fail(
                "amqp.pool_size",
                format!("must be 1 to 64 (got {})", self.amqp.pool_size),
            );
        }
        if !(1..=256).contains(&self.amqp.publish_channels) {
            return fail(
                "amqp.publish_channels",
                format!("must be 1 to 256 (got {})", self.amqp.publish_channels),
            );
        }
        if self.amqp.connect_timeout_ms == 0 {
            return fail("amqp.connect_timeout_ms", "must be above 0".into());
        }
        if self.rpc.max_pending == 0 {
            return fail("rpc.max_pending", "must be above 0".into());
        }
        if self.rpc.default_timeout_ms == 0 {
            return fail("rpc.default_timeout_ms", "must be above 0".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.filter).is_err() {
            return fail(
                "log.filter",
                format!("not a valid filter: {:?}", self.log.filter),
            );
        }
        for (name, svc) in &self.services {
            let key = |k: &str| format!("services.{name}.{k}");
            if !is_name(name) {
                return fail(&format!("services.{name}"), name_rule(name));
            }
            if !(1..=10_000).contains(&svc.concurrency) {
                return fail(
                    &key("concurrency"),
                    format!("must be 1 to 10000 (got {})", svc.concurrency),
                );
            }
            if svc.delivery_limit == 0 {
                return fail(&key("delivery_limit"), "must be above 0".into());
            }
            if svc.timeout_ms == 0 {
                return fail(&key("timeout_ms"), "must be above 0".into());
            }
        }
        Ok(())
    }

    /// The instance id in force: the setting, or the host name.
    pub fn instance_id(&self) -> String {
        self.amqp.resolved_instance_id()
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
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Names that end up in queue names: ASCII letters, digits, `-`, `_`, `.`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(name_char)
}

fn name_rule(got: &str) -> String {
    format!("must be 1 to 100 of ASCII letters, digits, '-', '_' or '.' (got {got:?})")
}
