//! [`Settings::validate`]: what types alone cannot check, each message
//! naming its setting.

use std::str::FromStr;

use super::gateway::{check_origin, check_tokens};
use super::redact::redact_url;
use super::services::{is_name, name_rule};
use super::{Settings, SettingsError};

impl Settings {
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
}
