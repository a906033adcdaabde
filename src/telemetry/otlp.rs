//! OTLP export of spans (`[otel]`): the tracer provider and its batch
//! thread, the `tracing` layer that feeds it, and the bridge between W3C
//! `traceparent` strings and OpenTelemetry contexts.
//!
//! # Layout
//! - [`layer`] builds the layer and the [`Exporter`] from the settings;
//!   [`super::init`] installs it globally, a test may install its own.
//! - [`continue_trace`] makes a received `traceparent` the parent of a span;
//!   [`traceparent_of`] names a span for the next hop.
//! - `BlockingHttp` sends the batches: reqwest's blocking client, because
//!   the SDK's batch thread runs no async runtime.
//!
//! Export never holds up a call: ended spans go to a bounded queue (full:
//! dropped) that a thread of the SDK's own drains; a failing collector costs
//! one warning per run of failures, not one per batch.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use tracing::{Span, Subscriber, info, warn};
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

use crate::settings::{OtelProtocol, OtelSettings, SettingsError};

/// Largest collector answer read: an OTLP answer is a few bytes of partial
/// success at most, and a collector must not make switchboard buffer more.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

/// A running export: the provider whose batch thread sends the spans.
/// [`Exporter::shutdown`] sends what is queued; dropping it does the same.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Sends every span that has ended so far and waits for the answer
    /// (bounded by `otel.timeout_ms` per batch). Blocks the calling thread.
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            warn!(error = %e, "OTLP flush failed: spans may be lost");
        }
    }

    /// Sends what is queued, then stops the batch thread. Blocks the calling
    /// thread for at most `timeout`.
    pub fn shutdown(self, timeout: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(timeout) {
            warn!(error = %e, "OTLP shutdown did not finish: spans may be lost");
        }
    }
}

/// The layer that turns `tracing` spans into OTLP spans, and the exporter
/// behind it. Errors name the setting at fault.
pub fn layer<S>(
    otel: &OtelSettings,
) -> Result<(OpenTelemetryLayer<S, SdkTracer>, Exporter), SettingsError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let timeout = Duration::from_millis(otel.timeout_ms);
    let protocol = match otel.protocol {
        OtelProtocol::HttpProtobuf => Protocol::HttpBinary,
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingHttp::new(timeout)?)
        .with_endpoint(otel.traces_url())
        .with_protocol(protocol)
        .with_timeout(timeout)
        .build()
        .map_err(|e| SettingsError(format!("otel.endpoint: no OTLP exporter: {e}")))?;
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(otel.queue_size)
                .with_max_export_batch_size(otel.queue_size.min(512))
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_resource(
            Resource::builder()
                .with_service_name(otel.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("switchboard");
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok((layer, Exporter { provider }))
}

/// Makes the trace of `traceparent` the parent of `span` in the exported
/// trace, so that the collector joins it to the caller's. Nothing when
/// spans are not exported or `traceparent` is malformed.
pub fn continue_trace(span: &Span, traceparent: &str) {
    let Some(parent) = remote_context(traceparent) else {
        return;
    };
    // Fails without the export layer (export is off) or for a span that is
    // filtered out: there is no exported span to attach then.
    let _ = span.set_parent(parent);
}

/// The `traceparent` that names `span` itself, to send on to the next hop
/// so that its spans become children of this one; `None` when spans are not
/// exported.
pub fn traceparent_of(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The OpenTelemetry context of a remote parent, from a well-formed
/// `traceparent`.
fn remote_context(traceparent: &str) -> Option<Context> {
    if !super::is_traceparent(traceparent) {
        return None;
    }
    // In bounds: a well-formed traceparent is `vv-<trace:32>-<span:16>-ff`.
    let trace = TraceId::from_hex(&traceparent[3..35]).ok()?;
    let span = SpanId::from_hex(&traceparent[36..52]).ok()?;
    let flags = u8::from_str_radix(&traceparent[53..55], 16).ok()?;
    let sc = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    Some(Context::new().with_remote_span_context(sc))
}

/// Sends export batches with reqwest's blocking client and says in the log
/// when the collector stops (or starts again) taking them.
#[derive(Debug)]
struct BlockingHttp {
    client: reqwest::blocking::Client,
    /// Whether the last attempt failed: warn once per run of failures.
    failing: Arc<AtomicBool>,
}

impl BlockingHttp {
    fn new(timeout: Duration) -> Result<Self, SettingsError> {
        // A blocking client owns a runtime of its own; it is built off any
        // async runtime's thread, where building one is not allowed.
        let client = std::thread::spawn(move || {
            reqwest::blocking::Client::builder()
                .timeout(timeout)
                .build()
        })
        .join()
        .map_err(|_| SettingsError("otel: building the OTLP HTTP client panicked".into()))?
        .map_err(|e| SettingsError(format!("otel: no OTLP HTTP client: {e}")))?;
        Ok(Self {
            client,
            failing: Arc::default(),
        })
    }

    fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let answer = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body.to_vec())
            .send()
            // Its URL may hold a password (otel.endpoint): never in a log.
            .map_err(reqwest::Error::without_url)?;
        let mut response = Response::builder().status(answer.status());
        if let Some(headers) = response.headers_mut() {
            *headers = answer.headers().clone();
        }
        let mut bytes = Vec::new();
        answer.take(MAX_ANSWER_BYTES).read_to_end(&mut bytes)?;
        Ok(response.body(Bytes::from(bytes))?)
    }

    fn note(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!("OTLP export works again");
                }
            }
            Err(why) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(error = %why, "OTLP export failed: spans are dropped until the collector takes them");
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for BlockingHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // Runs on the SDK's batch thread (no async runtime): blocking is
        // what that thread is for.
        let result = self.send(request);
        self.note(match &result {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the collector answered {}", r.status())),
            Err(e) => Err(e.to_string()),
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn a_traceparent_becomes_a_remote_parent() {
        let cx = super::remote_context("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("a context");
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            format!("{:032x}", sc.trace_id()),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(format!("{:016x}", sc.span_id()), "b7ad6b7169203331");
        let unsampled =
            super::remote_context("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
                .expect("a context");
        assert!(!unsampled.span().span_context().is_sampled());
        assert!(super::remote_context("junk").is_none());
    }

    #[test]
    fn without_export_a_span_has_no_traceparent_of_its_own() {
        let span = tracing::info_span!("plain");
        super::continue_trace(
            &span,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        assert_eq!(super::traceparent_of(&span), None);
    }
}
