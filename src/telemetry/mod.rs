//! Logging set-up, W3C trace context, and OTLP export of spans.
//!
//! # Layout
//! - [`init`]: the process's subscriber (log lines, and OTLP export when
//!   `[otel]` turns it on) and the [`Telemetry`] that flushes it at exit.
//! - `traceparent` helpers: new traces, hops, trace ids ([`hop`] ties them
//!   to exported spans).
//! - [`otlp`]: the exporter, its layer, and the bridge between
//!   `traceparent` strings and OpenTelemetry contexts.

pub mod otlp;

use std::time::Duration;

use rand::Rng;
use tracing::Span;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::settings::{LogFormat, LogSettings, OtelSettings, SettingsError};

/// What [`init`] leaves running: the OTLP exporter, when on.
/// [`Telemetry::shutdown`] sends the spans still queued before the process
/// exits.
#[derive(Debug)]
#[must_use = "shut it down at exit, or queued spans are lost"]
pub struct Telemetry {
    exporter: Option<otlp::Exporter>,
}

impl Telemetry {
    /// Sends what is queued and stops the export, waiting at most
    /// `timeout`. Blocks the calling thread.
    pub fn shutdown(self, timeout: Duration) {
        if let Some(e) = self.exporter {
            e.shutdown(timeout);
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` if set, else the setting;
/// human or JSON lines on stderr (stdout is the CLI's output); and, when
/// `otel.enabled`, the OTLP export of the same spans. Fails only when the
/// exporter cannot be built (the message names the setting).
pub fn init(log: &LogSettings, otel: &OtelSettings) -> Result<Telemetry, SettingsError> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // lapin logs every returned message in full at WARN; switchboard
        // turns returns into errors the caller sees, so keep them quiet.
        .add_directive(
            "lapin::returned_messages=error"
                .parse()
                .expect("a constant, valid directive"),
        );
    let lines = fmt::layer().with_writer(std::io::stderr);
    let lines = match log.format {
        LogFormat::Human => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    let (export, exporter) = if otel.enabled {
        let (layer, exporter) = otlp::layer(otel)?;
        (Some(layer), Some(exporter))
    } else {
        (None, None)
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(export)
        .try_init();
    Ok(Telemetry { exporter })
}

/// The `traceparent` to send on for a hop that `span` stands for, received
/// with `incoming` (if any, and well formed). With OTLP export on, `span`
/// continues the incoming trace and the result names `span` itself, so the
/// next hop's spans become its children; without export, the incoming trace
/// with a new span id, or a new trace.
pub fn hop(span: &Span, incoming: Option<&str>) -> String {
    let incoming = incoming.filter(|tp| is_traceparent(tp));
    if let Some(tp) = incoming {
        otlp::continue_trace(span, tp);
    }
    otlp::traceparent_of(span).unwrap_or_else(|| match incoming {
        Some(tp) => child_traceparent(tp),
        None => new_traceparent(),
    })
}

/// A new W3C `traceparent` (version 00, sampled).
pub fn new_traceparent() -> String {
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>().max(1);
    let span: u64 = rng.random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// The same trace with a new span id: the context to send on for one hop.
/// A `parent` that is not a well-formed `traceparent` starts a new trace.
pub fn child_traceparent(parent: &str) -> String {
    if !is_traceparent(parent) {
        return new_traceparent();
    }
    let span: u64 = rand::rng().random::<u64>().max(1);
    // In bounds: a well-formed traceparent is 55 ASCII bytes,
    // `vv-<trace:32>-<span:16>-ff`.
    format!("{}-{span:016x}-{}", &parent[..35], &parent[53..])
}

/// The trace id (32 hex digits) of a well-formed `traceparent`: what a log
/// line records as `trace_id` to tie it to the caller's trace.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    if !is_traceparent(traceparent) {
        return None;
    }
    traceparent.get(3..35)
}

/// Whether `s` is a well-formed `traceparent` (version 00).
pub fn is_traceparent(s: &str) -> bool {
    // Checked on every call: split without collecting.
    let mut parts = s.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2)
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_traceparents_are_valid() {
        for _ in 0..100 {
            assert!(super::is_traceparent(&super::new_traceparent()));
        }
        assert!(!super::is_traceparent("00-0000-0000-01"));
        assert_eq!(
            super::trace_id("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(super::trace_id("junk"), None);
    }

    #[test]
    fn a_malformed_parent_starts_a_new_trace() {
        // Found by the property tests: the child of a four-part string kept
        // its (here all-zero, invalid) trace id.
        let bad = "00-00000000000000000000000000000000-0000000000000000-00";
        let child = super::child_traceparent(bad);
        assert!(super::is_traceparent(&child), "{child}");
        assert!(super::is_traceparent(&super::child_traceparent("a-b-c-d")));
    }
}

/// Properties: `is_traceparent` accepts exactly W3C version-00 syntax, and
/// a child keeps the trace.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// The W3C rules, written independently: `vv-t{32}-s{16}-ff`, lowercase
    /// hex, version not `ff`, trace and span ids not all zero.
    fn reference(s: &str) -> bool {
        let b = s.as_bytes();
        let hex = |r: std::ops::Range<usize>| {
            b[r].iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        };
        let zero = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
        b.len() == 55
            && b[2] == b'-'
            && b[35] == b'-'
            && b[52] == b'-'
            && hex(0..2)
            && hex(3..35)
            && hex(36..52)
            && hex(53..55)
            && &b[0..2] != b"ff"
            && !zero(3..35)
            && !zero(36..52)
    }

    fn field(n: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::collection::vec(prop::sample::select(b"0123456789abcdef".to_vec()), n)
                .prop_map(|v| String::from_utf8(v).unwrap_or_default()),
            1 => Just("0".repeat(n)),
            1 => Just("f".repeat(n)),
            1 => prop::collection::vec(prop::sample::select(b"0123456789abcdefABCDEFg-x ".to_vec()), n.saturating_sub(1)..=n + 1)
                .prop_map(|v| String::from_utf8(v).unwrap_or_default()),
            1 => any::<String>(),
        ]
    }

    fn candidate() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (field(2), field(32), field(16), field(2))
                .prop_map(|(v, t, s, f)| format!("{v}-{t}-{s}-{f}")),
            1 => any::<String>(),
            1 => "[0-9a-f-]{50,60}",
        ]
    }

    fn valid() -> impl Strategy<Value = (u8, u128, u64, u8)> {
        (
            (0u8..=254),
            (1u128..=u128::MAX),
            (1u64..=u64::MAX),
            any::<u8>(),
        )
    }

    proptest! {
        #[test]
        fn accepts_exactly_the_w3c_syntax(s in candidate()) {
            prop_assert_eq!(is_traceparent(&s), reference(&s), "{:?}", s);
        }

        #[test]
        fn a_valid_traceparent_parses_and_its_child_keeps_the_trace(
            (version, trace, span, flags) in valid(),
        ) {
            let tp = format!("{version:02x}-{trace:032x}-{span:016x}-{flags:02x}");
            prop_assert!(is_traceparent(&tp), "{}", tp);
            let child = child_traceparent(&tp);
            prop_assert!(is_traceparent(&child), "{}", child);
            prop_assert_eq!(&child[..36], &tp[..36]);
            prop_assert_eq!(&child[52..], &tp[52..]);
        }

        #[test]
        fn a_child_is_always_a_valid_traceparent(s in candidate()) {
            let child = child_traceparent(&s);
            prop_assert!(is_traceparent(&child), "{:?} gave {:?}", s, child);
            if is_traceparent(&s) {
                prop_assert_eq!(&child[..36], &s[..36]);
            }
        }
    }
}
