//! What operators set: `[shutdown]`, `[metrics]`, `[management]`, `[log]`
//! and `[otel]`.

use std::str::FromStr;

use serde::Deserialize;

use super::redact::redact_url;

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
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
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
