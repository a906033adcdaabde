//! `[gateway]` and `[callbacks]`: the HTTP listener, callers' tokens and
//! limits, and how callbacks are sent.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::services::{is_name, name_rule};

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
    pub(super) fn check(&self, key: &str) -> Result<(), (String, String)> {
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
pub(super) fn decode_sha256_hex(hex: &str) -> Option<[u8; 32]> {
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
pub(super) fn list_or_commas<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
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

/// Checks `gateway.allowed_origins` entries: each exactly as a browser
/// sends it in `Origin` (`scheme://host[:port]`, lower case, no path), so
/// that comparing the header with it is comparing origins.
pub(super) fn check_origin(origin: &str) -> Result<(), String> {
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
pub(super) fn check_tokens(
    tokens: &BTreeMap<String, TokenSettings>,
) -> Result<(), (String, String)> {
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
