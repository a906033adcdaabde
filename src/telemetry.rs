//! Logging set-up and W3C trace context.

use rand::Rng;
use tracing_subscriber::{EnvFilter, fmt};

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber: `RUST_LOG` if set, else the setting;
/// human or JSON lines on stderr (stdout is the CLI's output).
pub fn init(log: &LogSettings) {
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
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A new W3C `traceparent` (version 00, sampled).
pub fn new_traceparent() -> String {
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>().max(1);
    let span: u64 = rng.random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// The same trace with a new span id: the context to send on for one hop.
pub fn child_traceparent(parent: &str) -> String {
    let span: u64 = rand::rng().random::<u64>().max(1);
    match parent.split('-').collect::<Vec<_>>().as_slice() {
        [version, trace, _, flags] => format!("{version}-{trace}-{span:016x}-{flags}"),
        _ => new_traceparent(),
    }
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
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
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
}
