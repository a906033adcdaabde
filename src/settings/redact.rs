//! Secrets never shown: [`redact_url`], [`REDACTED`], and the `Debug` of
//! every settings type that holds a secret.

use std::fmt;

use super::amqp::{AmqpSettings, split_nodes};
use super::gateway::{CallbackSettings, GatewaySettings, TokenSettings};
use super::ops::{ManagementSettings, OtelSettings};

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
pub(super) fn redact_query(s: &str) -> String {
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
pub(super) fn names_a_secret(key: &str) -> bool {
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
