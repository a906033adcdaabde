//! Typed settings: `config/default.toml` (embedded), then an optional file,
//! then `SWITCHBOARD__SECTION__KEY` environment variables.
//!
//! Every key is documented in `config/default.toml`, where its default is
//! defined. Loading fails with a [`SettingsError`] that names the offending
//! key, so a typo stops start-up instead of being silently ignored.
//!
//! Secrets (tokens, the callback secret, the management password, passwords
//! in URLs) never leave this module in clear through `Debug` or an error:
//! the settings types show them through [`redact_url`] and [`REDACTED`],
//! and validation messages name a setting, never its secret value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Source};
use serde::Deserialize;

/// The defaults, compiled in so the binary runs without any file beside it.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// Why the settings could not be loaded; the message names the setting.
#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(pub String);

/// Where the services in effect come from (see [`Settings::load_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServicesSource {
    /// No file and no environment variable names a service of its own: the
    /// demo services of `config/default.toml` (`echo`, `slow`).
    Defaults,
    /// The settings file's `[services]` table, exactly.
    File,
    /// The environment alone: the services its variables name.
    Environment,
}

impl ServicesSource {
    /// Decides from the user's files (`user`), the embedded `defaults` and
    /// the names of the `SWITCHBOARD__*` variables.
    fn of<'a>(
        user: &Config,
        defaults: &config::Map<String, config::Value>,
        vars: impl Iterator<Item = &'a str>,
    ) -> Result<Self, SettingsError> {
        let user = user.collect().map_err(|e| SettingsError(e.to_string()))?;
        if user.contains_key("services") {
            return Ok(Self::File);
        }
        let demos: Vec<String> = defaults
            .get("services")
            .and_then(|v| v.clone().into_table().ok())
            .map(|t| t.into_keys().collect())
            .unwrap_or_default();
        // `SWITCHBOARD__SERVICES__<NAME>__<KEY>`, the name lower-cased as
        // the loader reads it.
        let named_by_env = vars.filter_map(|k| {
            let rest = k.strip_prefix("SWITCHBOARD__SERVICES__")?;
            let (name, _) = rest.split_once("__")?;
            Some(name.to_lowercase())
        });
        let mut adds = false;
        for name in named_by_env {
            adds |= !demos.contains(&name);
        }
        Ok(if adds {
            Self::Environment
        } else {
            Self::Defaults
        })
    }
}

/// An already-read table as a settings source (the defaults, less what the
/// user replaces).
#[derive(Debug, Clone)]
struct Layer(config::Map<String, config::Value>);

impl config::Source for Layer {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// All of switchboard's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The broker and the names used on it.
    pub amqp: AmqpSettings,
    /// The RPC client: reply mode, bounds, default deadline.
    pub rpc: RpcSettings,
    /// The HTTP gateway.
    pub gateway: GatewaySettings,
    /// Callback delivery.
    pub callbacks: CallbackSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
    /// The metrics endpoint of `serve` without the gateway.
    pub metrics: MetricsSettings,
    /// RabbitMQ's management API, for `switchboard status`.
    pub management: ManagementSettings,
    /// Log filter and format.
    pub log: LogSettings,
    /// OpenTelemetry export of spans.
    pub otel: OtelSettings,
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSettings>,
}

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
fn split_nodes(list: &str) -> Vec<&str> {
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
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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

/// `[gateway]`: the HTTP face.
// Debug shows no secret: see the impl below the type.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// Whether `serve` runs the gateway.
    pub enabled: bool,
    /// Listen address.
    pub bind: String,
    /// HTTP worker threads; 0 = one per core.
    pub workers: usize,
    /// Wait of a POST without `Prefer: wait`, s.
    pub default_wait_s: u64,
    /// Cap on every wait, s.
    pub max_wait_s: u64,
    /// Largest request body, bytes.
    pub payload_limit_bytes: usize,
    /// Call store URL (sqlite or postgres).
    pub store_url: String,
    /// Retention of finished calls, s.
    pub retention_s: u64,
    /// Base `Retry-After` of pending calls, s.
    pub retry_after_s: u64,
    /// Bound on SSE + WebSocket sessions.
    pub max_streams: usize,
    /// Events buffered per stream session.
    pub stream_buffer: usize,
    /// Heartbeat period of streams, s.
    pub heartbeat_s: u64,
    /// Events kept in memory for Last-Event-ID resumption (older positions
    /// are read from the events log).
    pub event_history: usize,
    /// Bytes of events kept for resumption (beside `event_history`).
    pub event_history_bytes: usize,
    /// Documents of finished calls kept in memory for polls.
    pub finished_cache_entries: usize,
    /// Bytes of those documents kept at most.
    pub finished_cache_bytes: usize,
    /// A result larger than this is not put into lifecycle events (they
    /// link to `/v1/calls/{id}/result` instead), bytes.
    pub inline_result_max_bytes: usize,
    /// Time allowed for a request's whole body to arrive, ms.
    pub body_timeout_ms: u64,
    /// Time allowed for a request's head (request line and headers), ms.
    pub header_timeout_ms: u64,
    /// Browser origins that may POST and open WebSockets (CORS).
    #[serde(deserialize_with = "list_or_commas")]
    pub allowed_origins: Vec<String>,
    /// What each caller may use (the default of every caller).
    pub limits: CallerLimits,
    /// Bearer tokens by caller name.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenSettings>,
}

/// `[gateway.limits]`: what one caller (a token, or `anonymous`) may use of
/// the gateway at once, so that no caller starves the others. 0 turns a
/// limit off. A token's `[gateway.tokens.<caller>.limits]` replaces any of
/// them for that caller ([`CallerLimitsOverride`]).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerLimits {
    /// Requests per second, sustained (may be below 1: 0.5 is one every 2 s).
    pub rate_per_s: f64,
    /// Requests that may come at once above the rate (0: one second's worth).
    pub burst: u32,
    /// Calls of the caller pending in the store (202s not ended yet).
    pub max_pending: usize,
    /// SSE and WebSocket streams open at once.
    pub max_streams: usize,
    /// Long-polls (`GET /v1/calls/{id}?wait=N`) held at once.
    pub max_long_polls: usize,
}

/// `[gateway.tokens.<caller>.limits]`: the caller's own limits, each
/// replacing the one of `[gateway.limits]` when given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerLimitsOverride {
    /// Replaces `rate_per_s`.
    pub rate_per_s: Option<f64>,
    /// Replaces `burst`.
    pub burst: Option<u32>,
    /// Replaces `max_pending`.
    pub max_pending: Option<usize>,
    /// Replaces `max_streams`.
    pub max_streams: Option<usize>,
    /// Replaces `max_long_polls`.
    pub max_long_polls: Option<usize>,
}

impl CallerLimitsOverride {
    /// `defaults` with what this one gives.
    pub fn over(&self, defaults: CallerLimits) -> CallerLimits {
        CallerLimits {
            rate_per_s: self.rate_per_s.unwrap_or(defaults.rate_per_s),
            burst: self.burst.unwrap_or(defaults.burst),
            max_pending: self.max_pending.unwrap_or(defaults.max_pending),
            max_streams: self.max_streams.unwrap_or(defaults.max_streams),
            max_long_polls: self.max_long_polls.unwrap_or(defaults.max_long_polls),
        }
    }
}

impl CallerLimits {
    /// Why these limits are wrong, if they are (`key` names them).
    fn check(&self, key: &str) -> Result<(), (String, String)> {
        if !self.rate_per_s.is_finite() || self.rate_per_s < 0.0 || self.rate_per_s > 1e6 {
            return Err((
                format!("{key}.rate_per_s"),
                format!("must be 0 (no limit) to 1000000 (got {})", self.rate_per_s),
            ));
        }
        if self.rate_per_s > 0.0 && self.rate_per_s < 1e-3 {
            return Err((
                format!("{key}.rate_per_s"),
                format!(
                    "must be 0 (no limit) or at least 0.001 (got {})",
                    self.rate_per_s
                ),
            ));
        }
        Ok(())
    }
}

/// `[gateway.tokens.<caller>]`: one bearer token, given as the token itself
/// or as its SHA-256 digest (exactly one of the two).
// Debug shows no secret: see the impl below the type.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// The secret the caller sends as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
    /// Or the token's SHA-256 digest, in hex: the settings then hold
    /// nothing a caller could present.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Services it may call; `["*"]` for all. From the environment, where
    /// lists cannot be written, a comma-separated string.
    #[serde(deserialize_with = "list_or_commas")]
    pub services: Vec<String>,
    /// This caller's own limits, over `[gateway.limits]`.
    #[serde(default)]
    pub limits: CallerLimitsOverride,
}

impl TokenSettings {
    /// A caller with `token`, allowed `services`.
    pub fn bearer(token: &str, services: &[&str]) -> Self {
        Self {
            token: Some(token.to_owned()),
            token_sha256: None,
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            limits: CallerLimitsOverride::default(),
        }
    }

    /// A caller known by its token's SHA-256 digest (hex), allowed `services`.
    pub fn digest(sha256_hex: &str, services: &[&str]) -> Self {
        Self {
            token: None,
            token_sha256: Some(sha256_hex.to_owned()),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            limits: CallerLimitsOverride::default(),
        }
    }
}

impl TokenSettings {
    /// The SHA-256 digest the gateway compares presented tokens with: of
    /// `token`, or `token_sha256` decoded. `None` when neither is usable
    /// (validation says which setting is wrong).
    pub fn sha256(&self) -> Option<[u8; 32]> {
        use sha2::Digest;
        match (&self.token, &self.token_sha256) {
            (Some(token), None) => Some(sha2::Sha256::digest(token.as_bytes()).into()),
            (None, Some(hex)) => decode_sha256_hex(hex),
            _ => None,
        }
    }
}

/// 64 hex digits (either case) as 32 bytes.
fn decode_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// A list of strings, or one string of comma-separated items.
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCommas {
        List(Vec<String>),
        Commas(String),
    }
    Ok(match ListOrCommas::deserialize(d)? {
        ListOrCommas::List(v) => v,
        ListOrCommas::Commas(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// `[callbacks]`: delivery of results to callback URLs.
// Debug shows no secret: see the impl below the type.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackSettings {
    /// Standard Webhooks secret (`whsec_...`); empty disables callbacks.
    pub secret: String,
    /// Attempts before a dead letter.
    pub max_attempts: u32,
    /// First retry delay, ms.
    pub initial_backoff_ms: u64,
    /// Cap on the retry delay, ms.
    pub max_backoff_ms: u64,
    /// Timeout of one attempt, ms.
    pub timeout_ms: u64,
    /// Allow loopback/private/link-local targets.
    pub allow_private: bool,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Failed attempts in a row to one host (`host:port`) after which its
    /// circuit opens: its callbacks wait `circuit_pause_ms` instead of
    /// being tried; 0: never.
    pub circuit_failures: u32,
    /// How long an open circuit pauses a host's callbacks, ms; then one
    /// attempt tries it again.
    pub circuit_pause_ms: u64,
}

/// `[shutdown]`: what a SIGTERM or Ctrl-C waits for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long running handlers and HTTP requests may take to finish, ms.
    pub grace_ms: u64,
}

/// `[metrics]`: where `serve` exposes its metrics when the gateway is off
/// (with the gateway, `GET /metrics` is on the gateway's address).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Listen address of `GET /metrics`, `GET /healthz` and `GET /readyz` when
    /// `gateway.enabled` is false; empty: no metrics endpoint.
    pub bind: String,
}

/// `[management]`: RabbitMQ's management HTTP API, which `switchboard
/// status` reads.
// Debug shows no secret: see the impl below the type.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementSettings {
    /// Base URL of the management API (`http://host:15672`).
    pub url: String,
    /// User; empty: the user of `amqp.url`.
    pub user: String,
    /// Password; empty: the password of `amqp.url`.
    pub password: String,
}

impl ManagementSettings {
    /// The user and password in force: these settings, or where they are
    /// empty, those of `amqp_url` (`guest`/`guest` when it has none).
    pub fn credentials(&self, amqp_url: &str) -> (String, String) {
        let uri = deadpool_lapin::lapin::uri::AMQPUri::from_str(amqp_url).ok();
        let from_amqp = |f: fn(&deadpool_lapin::lapin::uri::AMQPUserInfo) -> &String| {
            uri.as_ref()
                .map(|u| f(&u.authority.userinfo).clone())
                .unwrap_or_else(|| "guest".into())
        };
        let pick = |set: &str, f| {
            if set.is_empty() {
                from_amqp(f)
            } else {
                set.to_owned()
            }
        };
        (
            pick(&self.user, |u| &u.username),
            pick(&self.password, |u| &u.password),
        )
    }
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

/// The OTLP transport of `[otel]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtelProtocol {
    /// OTLP over HTTP with binary protobuf bodies (collectors' port 4318).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// `[otel]`: export of spans over OTLP, off by default.
// Debug shows no secret: see the impl below the type.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtelSettings {
    /// Whether spans are exported.
    pub enabled: bool,
    /// The collector's OTLP/HTTP base URL; `/v1/traces` is appended.
    pub endpoint: String,
    /// The transport.
    pub protocol: OtelProtocol,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Time allowed for one export, retries included, ms.
    pub timeout_ms: u64,
    /// Bound on ended spans waiting for export.
    pub queue_size: usize,
}

impl OtelSettings {
    /// Where spans are sent: the endpoint with `/v1/traces`.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.endpoint.trim_end_matches('/'))
    }

    /// Checks what types alone cannot; the error is the setting and why.
    fn check(&self) -> Result<(), (&'static str, String)> {
        match url::Url::parse(&self.endpoint) {
            // The exporter drops user info: it would not authenticate.
            Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                return Err((
                    "otel.endpoint",
                    "must not hold a user or password (the OTLP exporter sends no credentials from the URL)".into(),
                ));
            }
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err((
                    "otel.endpoint",
                    format!("not an http(s) URL: {:?}", redact_url(&self.endpoint)),
                ));
            }
        }
        if self.service_name.trim().is_empty() {
            return Err(("otel.service_name", "must not be empty".into()));
        }
        if self.timeout_ms == 0 {
            return Err(("otel.timeout_ms", "must be above 0".into()));
        }
        if !(1..=1_000_000).contains(&self.queue_size) {
            return Err((
                "otel.queue_size",
                format!("must be 1 to 1000000 (got {})", self.queue_size),
            ));
        }
        Ok(())
    }
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
    /// Lifecycle events for synchronously answered calls too.
    #[serde(default)]
    pub sync_events: bool,
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
            sync_events: false,
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
    ///
    /// The services in effect are named in one place: when `file` or
    /// `extra` has a `[services]` table, or the environment names a service
    /// the defaults do not have, the default (demo) services are dropped and
    /// only the named ones are in effect. Environment
    /// variables then adjust those services, and add any they name.
    pub fn load_from(
        file: Option<&Path>,
        extra: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let invalid = |e: config::ConfigError| SettingsError(e.to_string());
        let mut user = Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(SettingsError(format!(
                    "settings file {} does not exist",
                    path.display()
                )));
            }
            user = user.add_source(File::from(path).required(true));
        }
        if let Some(text) = extra {
            user = user.add_source(File::from_str(text, FileFormat::Toml));
        }
        let user = user.build().map_err(invalid)?;
        let vars: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SWITCHBOARD__"))
            .collect();
        let mut defaults = File::from_str(DEFAULTS, FileFormat::Toml)
            .collect()
            .map_err(invalid)?;
        let source = ServicesSource::of(&user, &defaults, vars.keys().map(String::as_str))?;
        if source != ServicesSource::Defaults {
            defaults.remove("services");
        }
        let settings: Settings = Config::builder()
            .add_source(Layer(defaults))
            .add_source(user)
            .add_source(
                Environment::with_prefix("SWITCHBOARD")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(vars)),
            )
            .build()
            .and_then(Config::try_deserialize)
            .map_err(invalid)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot; each message names its setting.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let fail = |key: &str, why: String| Err(SettingsError(format!("{key}: {why}")));
        let nodes = self.amqp.nodes();
        if nodes.is_empty() {
            return fail("amqp.url", "names no broker".into());
        }
        let mut first: Option<deadpool_lapin::lapin::uri::AMQPUri> = None;
        for (i, node) in nodes.iter().enumerate() {
            let which = if nodes.len() == 1 {
                String::new()
            } else {
                format!("node {} of {}: ", i + 1, nodes.len())
            };
            let uri = match deadpool_lapin::lapin::uri::AMQPUri::from_str(node) {
                Ok(uri) => uri,
                // The parser's message may quote the URL, password and all.
                Err(e) => {
                    return fail(
                        "amqp.url",
                        format!("{which}not an AMQP URI ({})", redact_url(&e)),
                    );
                }
            };
            match &first {
                None => first = Some(uri),
                Some(f) if f.scheme != uri.scheme => {
                    return fail(
                        "amqp.url",
                        format!("{which}mixes amqp:// and amqps:// (every node must be the same)"),
                    );
                }
                Some(f) if f.vhost != uri.vhost => {
                    return fail(
                        "amqp.url",
                        format!(
                            "{which}names vhost {:?}, the first node {:?} (every node must be the same)",
                            uri.vhost, f.vhost
                        ),
                    );
                }
                Some(_) => {}
            }
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
        if self.amqp.confirm_timeout_ms == 0 {
            return fail("amqp.confirm_timeout_ms", "must be above 0".into());
        }
        if !(100..=600_000).contains(&self.amqp.consumer_check_ms) {
            return fail(
                "amqp.consumer_check_ms",
                format!(
                    "must be 100 to 600000 (got {})",
                    self.amqp.consumer_check_ms
                ),
            );
        }
        if let Some(why) = self.instance_queue_expiry_conflict() {
            return fail("amqp.instance_queue_expires_s", why);
        }
        if !crate::amqp::topology::EventsLog::valid_age(&self.amqp.events_log_max_age) {
            return fail(
                "amqp.events_log_max_age",
                format!(
                    "must be a number above 0 and one of the units Y, M, D, h, m, s, as \"7D\" (got {:?})",
                    self.amqp.events_log_max_age
                ),
            );
        }
        if self.amqp.events_log_max_bytes < 4096 {
            return fail(
                "amqp.events_log_max_bytes",
                format!(
                    "must be at least 4096 (got {})",
                    self.amqp.events_log_max_bytes
                ),
            );
        }
        if let Err((key, why)) = self.amqp.check_tls() {
            return fail(key, why);
        }
        if self.rpc.max_pending == 0 {
            return fail("rpc.max_pending", "must be above 0".into());
        }
        if self.rpc.default_timeout_ms == 0 {
            return fail("rpc.default_timeout_ms", "must be above 0".into());
        }
        if !self.metrics.bind.is_empty()
            && self.metrics.bind.parse::<std::net::SocketAddr>().is_err()
        {
            return fail(
                "metrics.bind",
                format!(
                    "not an IP:port address (or empty for none): {:?}",
                    self.metrics.bind
                ),
            );
        }
        match url::Url::parse(&self.management.url) {
            Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                return fail(
                    "management.url",
                    "must not hold a user or password: set management.user and management.password"
                        .into(),
                );
            }
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return fail(
                    "management.url",
                    format!("not an http(s) URL: {:?}", redact_url(&self.management.url)),
                );
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.filter).is_err() {
            return fail(
                "log.filter",
                format!("not a valid filter: {:?}", self.log.filter),
            );
        }
        if let Err((key, why)) = self.otel.check() {
            return fail(key, why);
        }
        let g = &self.gateway;
        let bind: std::net::SocketAddr = match g.bind.parse() {
            Ok(a) => a,
            Err(_) => {
                return fail(
                    "gateway.bind",
                    format!("not an IP:port address: {:?}", g.bind),
                );
            }
        };
        if g.enabled && g.tokens.is_empty() && !bind.ip().is_loopback() {
            return fail(
                "gateway.bind",
                format!(
                    "{bind} is not a loopback address, and no gateway.tokens are set: an unauthenticated gateway only serves loopback"
                ),
            );
        }
        if g.max_wait_s == 0 || g.max_wait_s > 3600 {
            return fail(
                "gateway.max_wait_s",
                format!("must be 1 to 3600 (got {})", g.max_wait_s),
            );
        }
        if g.default_wait_s > g.max_wait_s {
            return fail(
                "gateway.default_wait_s",
                format!(
                    "must not exceed gateway.max_wait_s ({} > {})",
                    g.default_wait_s, g.max_wait_s
                ),
            );
        }
        if g.payload_limit_bytes == 0 || g.payload_limit_bytes > 128 * 1024 * 1024 {
            return fail(
                "gateway.payload_limit_bytes",
                "must be 1 byte to 128 MiB".into(),
            );
        }
        if !(g.store_url.starts_with("sqlite:")
            || g.store_url.starts_with("postgres:")
            || g.store_url.starts_with("postgresql:"))
        {
            return fail(
                "gateway.store_url",
                format!(
                    "must start with sqlite: or postgres: (got {:?})",
                    redact_url(&g.store_url)
                ),
            );
        }
        if g.max_streams == 0 || g.stream_buffer == 0 || g.event_history == 0 {
            return fail(
                "gateway.max_streams",
                "max_streams, stream_buffer and event_history must be above 0".into(),
            );
        }
        if g.heartbeat_s == 0 {
            return fail("gateway.heartbeat_s", "must be above 0".into());
        }
        if !(1..=3_600_000).contains(&g.body_timeout_ms) {
            return fail(
                "gateway.body_timeout_ms",
                format!("must be 1 to 3600000 (got {})", g.body_timeout_ms),
            );
        }
        if !(1..=3_600_000).contains(&g.header_timeout_ms) {
            return fail(
                "gateway.header_timeout_ms",
                format!("must be 1 to 3600000 (got {})", g.header_timeout_ms),
            );
        }
        for origin in &g.allowed_origins {
            if let Err(why) = check_origin(origin) {
                return fail("gateway.allowed_origins", why);
            }
        }
        if let Err((key, why)) = check_tokens(&g.tokens) {
            return fail(&key, why);
        }
        if let Err((key, why)) = g.limits.check("gateway.limits") {
            return fail(&key, why);
        }
        for (caller, t) in &g.tokens {
            let key = format!("gateway.tokens.{caller}.limits");
            if let Err((key, why)) = t.limits.over(g.limits).check(&key) {
                return fail(&key, why);
            }
        }
        if g.event_history_bytes == 0 || g.finished_cache_bytes == 0 {
            return fail(
                "gateway.event_history_bytes",
                "event_history_bytes and finished_cache_bytes must be above 0".into(),
            );
        }
        let c = &self.callbacks;
        if !c.secret.is_empty() && standardwebhooks::Webhook::new(&c.secret).is_err() {
            return fail(
                "callbacks.secret",
                "must be \"whsec_\" followed by base64".into(),
            );
        }
        if c.max_attempts == 0 {
            return fail("callbacks.max_attempts", "must be above 0".into());
        }
        if c.initial_backoff_ms == 0 || c.max_backoff_ms < c.initial_backoff_ms {
            return fail(
                "callbacks.initial_backoff_ms",
                "must be above 0 and at most callbacks.max_backoff_ms".into(),
            );
        }
        if c.timeout_ms == 0 || c.concurrency == 0 {
            return fail(
                "callbacks.timeout_ms",
                "timeout_ms and concurrency must be above 0".into(),
            );
        }
        if c.circuit_failures > 0 && c.circuit_pause_ms == 0 {
            return fail(
                "callbacks.circuit_pause_ms",
                "must be above 0 while callbacks.circuit_failures is".into(),
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

    /// Why `amqp.instance_queue_expires_s` is too short, if it is: a reply
    /// queue must outlive every call deadline, or an instance away for
    /// longer than the expiry but shorter than a deadline would lose the
    /// reply of a call that is still owed one.
    fn instance_queue_expiry_conflict(&self) -> Option<String> {
        let expires_ms = self.amqp.instance_queue_expires_s.checked_mul(1000)?;
        if expires_ms == 0 {
            return None;
        }
        let mut longest = (
            "rpc.default_timeout_ms".to_owned(),
            self.rpc.default_timeout_ms,
        );
        for (name, svc) in &self.services {
            if svc.timeout_ms > longest.1 {
                longest = (format!("services.{name}.timeout_ms"), svc.timeout_ms);
            }
        }
        (expires_ms <= longest.1).then(|| {
            format!(
                "must be 0 (never) or longer than every call deadline, but {} is {} ms",
                longest.0, longest.1
            )
        })
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

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks `gateway.allowed_origins` entries: each exactly as a browser
/// sends it in `Origin` (`scheme://host[:port]`, lower case, no path), so
/// that comparing the header with it is comparing origins.
fn check_origin(origin: &str) -> Result<(), String> {
    let parsed = url::Url::parse(origin)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    let Some(parsed) = parsed else {
        return Err(format!(
            "{origin:?} is not an http(s) origin such as \"https://app.example.com\" (each origin is listed; \"*\" and \"null\" are not accepted)"
        ));
    };
    let serialized = parsed.origin().ascii_serialization();
    if serialized != origin {
        return Err(format!(
            "{origin:?} is not written as a browser sends it: {serialized:?} (scheme and host in lower case, the port only when not the scheme's, no path)"
        ));
    }
    Ok(())
}

/// Checks `gateway.tokens`: caller names, exactly one of `token` and
/// `token_sha256` each, and no token shared by two callers (given plain or
/// as a digest, or a token that is another caller's digest). The error is
/// the setting (or settings) and why; never a token.
fn check_tokens(tokens: &BTreeMap<String, TokenSettings>) -> Result<(), (String, String)> {
    let mut digests: Vec<(&str, [u8; 32])> = Vec::new();
    for (caller, t) in tokens {
        let key = format!("gateway.tokens.{caller}");
        if !is_name(caller) {
            return Err((key, format!("the caller's name {}", name_rule(caller))));
        }
        match (&t.token, &t.token_sha256) {
            (Some(token), None) if token.len() < 16 => {
                return Err((
                    format!("{key}.token"),
                    "must be at least 16 characters".into(),
                ));
            }
            (None, Some(hex)) if decode_sha256_hex(hex).is_none() => {
                return Err((
                    format!("{key}.token_sha256"),
                    "must be 64 hex digits: the SHA-256 digest of the token (`printf %s \"$TOKEN\" | sha256sum`)".into(),
                ));
            }
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err((key, "set exactly one of token and token_sha256".into()));
            }
        }
        if t.services.is_empty() {
            return Err((
                format!("{key}.services"),
                "must name at least one service, or \"*\"".into(),
            ));
        }
        let digest = t
            .sha256()
            .ok_or_else(|| (key.clone(), "no usable token".to_owned()))?;
        if let Some((other, _)) = digests.iter().find(|(_, d)| *d == digest) {
            return Err((
                format!("gateway.tokens.{other} and {key}"),
                "have the same token: each caller needs a token of its own (one would silently be taken for the other)".into(),
            ));
        }
        digests.push((caller, digest));
    }
    for (caller, t) in tokens {
        let Some(token) = &t.token else { continue };
        for (other, o) in tokens {
            if o.token_sha256
                .as_ref()
                .is_some_and(|d| d.eq_ignore_ascii_case(token))
            {
                return Err((
                    format!("gateway.tokens.{caller}.token and gateway.tokens.{other}.token_sha256"),
                    "are the same text: a token must not be a digest written in the settings (whoever reads the digest could present it)".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Names that end up in queue names: ASCII letters, digits, `-`, `_`, `.`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(name_char)
}

fn name_rule(got: &str) -> String {
    format!("must be 1 to 100 of ASCII letters, digits, '-', '_' or '.' (got {got:?})")
}

/// What stands in for a secret wherever settings are shown.
pub const REDACTED: &str = "***";

/// `url` as it may be shown in a log line or an error: the password of its
/// user info, and the value of any query parameter that names a secret
/// (`password=`, `sslpassword=`, `secret=`, `token=`...), become
/// [`REDACTED`]. The user name and the rest stay, to tell where it points.
/// Everything between `://` and the last `@` is taken as user info, so a
/// password with unescaped `/`, `?` or `@` is hidden too (at the price of
/// hiding more when a path or query holds an `@`).
pub fn redact_url(url: &str) -> String {
    // Several nodes (`amqp.url`): each its own.
    let nodes = split_nodes(url);
    if nodes.len() > 1 {
        return nodes
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_query(url);
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => {
                format!("{scheme}://{user}:{REDACTED}@{}", redact_query(host))
            }
            None => format!("{scheme}://{userinfo}@{}", redact_query(host)),
        },
        None => format!("{scheme}://{}", redact_query(rest)),
    }
}

/// `s` with the value of every query parameter that names a secret
/// replaced by [`REDACTED`].
fn redact_query(s: &str) -> String {
    let Some((path, query)) = s.split_once('?') else {
        return s.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if names_a_secret(key) => format!("{key}={REDACTED}"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{path}?{}", params.join("&"))
}

/// Whether a URL query parameter's name says its value is a secret.
fn names_a_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "apikey", "api_key"]
        .iter()
        .any(|s| key.contains(s))
}

/// Shows a URL setting through [`redact_url`].
struct ShownUrl<'a>(&'a str);

impl fmt::Debug for ShownUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(self.0), f)
    }
}

/// Shows whether a secret setting is set, never its value.
struct Hidden<'a>(Option<&'a str>);

impl fmt::Debug for Hidden<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("None"),
            Some("") => f.write_str("\"\""),
            Some(_) => fmt::Debug::fmt(REDACTED, f),
        }
    }
}

// The `Debug` of the types that hold secrets. Each lists every field (the
// lint makes a forgotten one an error), secrets through `ShownUrl` or
// `Hidden`.

#[deny(clippy::missing_fields_in_debug)]
impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &ShownUrl(&self.url))
            .field("prefix", &self.prefix)
            .field("instance_id", &self.instance_id)
            .field("pool_size", &self.pool_size)
            .field("publish_channels", &self.publish_channels)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("confirm_timeout_ms", &self.confirm_timeout_ms)
            .field("consumer_check_ms", &self.consumer_check_ms)
            .field("instance_queue_expires_s", &self.instance_queue_expires_s)
            .field("instance_queue_type", &self.instance_queue_type)
            .field("events_log_max_age", &self.events_log_max_age)
            .field("events_log_max_bytes", &self.events_log_max_bytes)
            // Paths, not secrets: the key file's content is never read here.
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_server_name", &self.tls_server_name)
            .finish()
    }
}

#[deny(clippy::missing_fields_in_debug)]
impl fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewaySettings")
            .field("enabled", &self.enabled)
            .field("bind", &self.bind)
            .field("workers", &self.workers)
            .field("default_wait_s", &self.default_wait_s)
            .field("max_wait_s", &self.max_wait_s)
            .field("payload_limit_bytes", &self.payload_limit_bytes)
            .field("store_url", &ShownUrl(&self.store_url))
            .field("retention_s", &self.retention_s)
            .field("retry_after_s", &self.retry_after_s)
            .field("max_streams", &self.max_streams)
            .field("stream_buffer", &self.stream_buffer)
            .field("heartbeat_s", &self.heartbeat_s)
            .field("event_history", &self.event_history)
            .field("event_history_bytes", &self.event_history_bytes)
            .field("finished_cache_entries", &self.finished_cache_entries)
            .field("finished_cache_bytes", &self.finished_cache_bytes)
            .field("inline_result_max_bytes", &self.inline_result_max_bytes)
            .field("limits", &self.limits)
            .field("body_timeout_ms", &self.body_timeout_ms)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("allowed_origins", &self.allowed_origins)
            .field("tokens", &self.tokens)
            .finish()
    }
}

#[deny(clippy::missing_fields_in_debug)]
impl fmt::Debug for TokenSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSettings")
            .field("token", &Hidden(self.token.as_deref()))
            .field("token_sha256", &Hidden(self.token_sha256.as_deref()))
            .field("services", &self.services)
            .field("limits", &self.limits)
            .finish()
    }
}

#[deny(clippy::missing_fields_in_debug)]
impl fmt::Debug for CallbackSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackSettings")
            .field("secret", &Hidden(Some(&self.secret)))
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("allow_private", &self.allow_private)
            .field("concurrency", &self.concurrency)
            .field("circuit_failures", &self.circuit_failures)
            .field("circuit_pause_ms", &self.circuit_pause_ms)
            .finish()
    }
}

#[deny(clippy::missing_fields_in_debug)]
impl fmt::Debug for ManagementSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagementSettings")
            .field("url", &ShownUrl(&self.url))
            .field("user", &self.user)
            .field("password", &Hidden(Some(&self.password)))
            .finish()
    }
}

#[deny(clippy::missing_fields_in_debug)]
impl fmt::Debug for OtelSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelSettings")
            .field("enabled", &self.enabled)
            .field("endpoint", &ShownUrl(&self.endpoint))
            .field("protocol", &self.protocol)
            .field("service_name", &self.service_name)
            .field("timeout_ms", &self.timeout_ms)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_passwords_and_keeps_where_it_points() {
        for (url, shown) in [
            (
                "amqp://guest:secret@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("amqp://127.0.0.1:5672", "amqp://127.0.0.1:5672"),
            (
                "postgres://u:p@ss/w?rd@db:5432/x?sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            (
                "postgres://db/x?user=u&password=pw&sslpassword=k",
                "postgres://db/x?user=u&password=***&sslpassword=***",
            ),
            ("sqlite://calls.db?mode=rwc", "sqlite://calls.db?mode=rwc"),
            ("http://user@host/", "http://user@host/"),
            ("not a url", "not a url"),
            // A parser's message that quotes the URL.
            (
                "Invalid URL: 'amqp://u:pw@h:x/'",
                "Invalid URL: 'amqp://u:***@h:x/'",
            ),
            // Several nodes, one password with a comma.
            (
                "amqp://u:p,w@h1:5672/%2f, amqps://v:pw2@h2/v",
                "amqp://u:***@h1:5672/%2f,amqps://v:***@h2/v",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn amqp_url_lists_its_nodes_and_a_comma_in_a_password_stays() {
        let env = |url: &str| [("SWITCHBOARD__AMQP__URL".to_owned(), url.to_owned())];
        let a = Settings::load_from(
            None,
            None,
            env("amqp://u:p,w@h1/%2f,amqp://h2:5673/%2f , amqp://h3/%2f,"),
        )
        .expect("a list in the environment loads")
        .amqp;
        assert_eq!(
            a.nodes(),
            ["amqp://u:p,w@h1/%2f", "amqp://h2:5673/%2f", "amqp://h3/%2f"]
        );
        assert_eq!(a.first_node(), "amqp://u:p,w@h1/%2f");
        let toml = "[amqp]\nurl = [\"amqp://h1/%2f\", \"amqp://h2:5673/%2f\"]\n";
        let a = Settings::load_from(None, Some(toml), std::iter::empty())
            .expect("a TOML list loads")
            .amqp;
        assert_eq!(a.nodes(), ["amqp://h1/%2f", "amqp://h2:5673/%2f"]);
        for (url, says) in [
            (
                "amqp://h1/%2f,amqps://h2/%2f",
                "node 2 of 2: mixes amqp:// and amqps://",
            ),
            (
                "amqp://h1/%2f,amqp://h2/other",
                "node 2 of 2: names vhost \"other\"",
            ),
            (
                "amqp://h1/%2f,amqp://u:secret@h2:x/%2f",
                "node 2 of 2: not an AMQP URI",
            ),
            (" , ", "names no broker"),
        ] {
            let e = Settings::load_from(None, None, env(url)).unwrap_err().0;
            assert!(e.starts_with("amqp.url: "), "{e}");
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn digests_are_64_hex_digits() {
        assert_eq!(decode_sha256_hex(&"0f".repeat(32)), Some([0x0f; 32]));
        assert_eq!(decode_sha256_hex(&"AB".repeat(32)), Some([0xab; 32]));
        for bad in [
            "",
            "0f",
            &"0f".repeat(33),
            &"zz".repeat(32),
            &"é".repeat(32),
        ] {
            assert_eq!(decode_sha256_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn origins_are_written_as_browsers_send_them() {
        for ok in [
            "https://app.example.com",
            "http://127.0.0.1:8080",
            "http://[::1]:3000",
        ] {
            assert_eq!(check_origin(ok), Ok(()), "{ok}");
        }
        for bad in [
            "*",
            "null",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://APP.example.com",
            "https://app.example.com:443",
            "ftp://app.example.com",
            "https://user:pw@app.example.com",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}

/// Properties: whatever a password holds, [`redact_url`] does not show it.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn no_password_survives_redaction(
            scheme in "(amqp|amqps|postgres|http|https)",
            user in "[a-z]{1,8}",
            password in "[!-~]{6,30}",
            host in "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
            path in "(/[a-z0-9%]{0,10})?",
            query_password in prop::option::of("[A-Za-z0-9_-]{6,20}"),
        ) {
            let mut url = format!("{scheme}://{user}:{password}@{host}{path}");
            if let Some(q) = &query_password {
                url.push_str(&format!("?sslmode=require&password={q}"));
            }
            let shown = redact_url(&url);
            // The password (when it is no substring of what stays shown).
            let visible = format!("{scheme}://{user}:@{host}{path}?sslmode=require&password=");
            if !visible.contains(&password) {
                prop_assert!(!shown.contains(&password), "{} -> {}", url, shown);
            }
            if let Some(q) = &query_password
                && !visible.contains(q.as_str())
                && !password.contains(q.as_str())
            {
                prop_assert!(!shown.contains(q.as_str()), "{} -> {}", url, shown);
            }
            prop_assert!(shown.contains(&format!("{user}:***@")), "{}", shown);
        }
    }
}
