//! The gateway as a trust boundary (issue 13, docs/SECURITY.md), tried from
//! outside: two callers that must never meet, hostile browsers, slow and
//! malformed HTTP, and secrets that must never reach an output.
//!
//! # Layout
//! - [`callers`]: callers kept apart (idempotency keys, services they may
//!   not call, tokens kept as digests).
//! - [`http_layer`]: body and header timeouts, and problem+json for what
//!   the HTTP layer refuses.
//! - [`browsers`]: `Origin` checks, CORS, and DNS rebinding.
//! - [`broker`]: the vhost permissions per role of docs/SECURITY.md, applied
//!   in a vhost of its own.
//! - [`secrets`]: no password, token or signing secret in any output.
//! - [`limits`]: per-caller limits (rate, pending calls, streams,
//!   long-polls), and readiness probes that do not churn the broker.
//! - [`memory`]: byte bounds on the event history and the finished-call
//!   cache, and large results linked from events rather than carried.

mod broker;
mod browsers;
mod callers;
mod http_layer;
mod limits;
mod memory;
mod secrets;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use switchboard::settings::{Settings, TokenSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const ALICE: &str = "alice-token-0123456789";
pub const BOB: &str = "bob-token-0123456789ab";

/// Two callers: alice may call `echo` and `count`, bob every service.
pub fn two_callers(s: &mut Settings) {
    let mut t = BTreeMap::new();
    t.insert(
        "alice".to_string(),
        TokenSettings::bearer(ALICE, &["echo", "count"]),
    );
    t.insert("bob".to_string(), TokenSettings::bearer(BOB, &["*"]));
    s.gateway.tokens = t;
}

/// Checks a problem+json answer of `status` and returns its document.
pub async fn problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status, "{res:?}");
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{res:?}"
    );
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["status"], status, "{doc}");
    assert!(doc["title"].is_string(), "{doc}");
    doc
}

/// What a raw HTTP/1.1 client read from the gateway: everything until the
/// gateway closed the connection, or until `limit` passed.
pub struct RawAnswer {
    /// The bytes read.
    pub bytes: Vec<u8>,
    /// Whether the gateway closed the connection (EOF) within `limit`.
    pub closed: bool,
}

impl RawAnswer {
    /// The answer as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status code of the answer's first line, if any.
    pub fn status(&self) -> Option<u16> {
        let text = self.text();
        let line = text.lines().next()?;
        line.split(' ').nth(1)?.parse().ok()
    }

    /// The value of header `name` in the answer's head (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The body after the head.
    pub fn body(&self) -> String {
        let text = self.text();
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }
}

/// Writes `request` (raw bytes, as a hostile client would) to `addr` and
/// reads until the gateway closes the connection or `limit` passes.
pub async fn raw_exchange(addr: &str, request: &[u8], limit: Duration) -> RawAnswer {
    raw_drip(addr, request, None, limit).await
}

/// As [`raw_exchange`], then, when `drip` is given, its bytes again every
/// so often for as long as the connection takes them (a slow-loris body).
pub async fn raw_drip(
    addr: &str,
    request: &[u8],
    drip: Option<(Duration, &'static [u8])>,
    limit: Duration,
) -> RawAnswer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write.write_all(request).await.unwrap();
    let writer = tokio::spawn(async move {
        let Some((every, bytes)) = drip else {
            // Keep the writing half open: a closed half could end the request.
            std::future::pending::<()>().await;
            return;
        };
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if write.write_all(bytes).await.is_err() {
                return;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout_at(deadline, read.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    };
    writer.abort();
    RawAnswer { bytes, closed }
}
