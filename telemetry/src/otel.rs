//! OpenTelemetry traces over OTLP/gRPC, opt-in (`--otlp-endpoint`): the
//! `tracing` spans that mark where a scan's trace enters or leaves a
//! process are exported, with W3C trace context carried between them.
//!
//! - Off (no endpoint): no exporter, no OpenTelemetry layer, no global
//!   propagator or tracer provider - nothing is ever sent anywhere, and
//!   [`trace_span!`](crate::trace_span) makes no span at all.
//! - On: a batch span processor exports to the endpoint over tonic (the
//!   tonic 0.14 and rustls/ring the binaries already link), sampled
//!   parent-based, always on; [`TelemetryGuard::shutdown`] flushes it.
//! - What is exported: spans that declare `otel.kind` (the points where a
//!   trace enters or leaves a process: an AMQP delivery, a CreateScan call,
//!   an Assign sent, a shard run, a result batch ingested), each parented
//!   on the context it received (or starting a trace), and every portfleet
//!   span and event at INFO or above opened inside one. Other spans - the
//!   scheduler's ticks, sessions that last for days - stay in the logs: as
//!   traces they would be a root per tick.
//! - Context crosses processes as a W3C `traceparent` ([`TraceParent`]):
//!   AMQP headers and gRPC metadata in, a column of the scan, and the agent
//!   protocol's `trace_parent` fields. Without the exporter, a context that
//!   came in is passed on unchanged ([`propagate`]), so a traced agent or
//!   controller further on still joins the caller's trace.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use tracing::{Level, Metadata, Span, Subscriber, subscriber::Interest};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    filter::LevelFilter,
    layer::{Context as LayerContext, Filter},
    registry::LookupSpan,
};

/// Set once the exporter is installed; read on every [`trace_span!`](crate::trace_span).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// How long one export may take (the collector is away: spans wait in
/// the batch queue, bounded, and are dropped past it).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for the last spans to go out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether traces are exported (`--otlp-endpoint` was given).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// An `info_span!` that exists only while traces are exported: without
/// `--otlp-endpoint` it is `Span::none()`, so a span made for traces costs
/// nothing and adds nothing to log lines. Takes `info_span!`'s arguments.
#[macro_export]
macro_rules! trace_span {
    ($($arg:tt)*) => {
        if $crate::otel::enabled() { ::tracing::info_span!($($arg)*) } else { ::tracing::Span::none() }
    };
}

#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("--otlp-endpoint {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("--otlp-endpoint: traces are set up inside a Tokio runtime (a bug)")]
    NoRuntime,
}

/// `--otlp-endpoint`'s parser: an `http://` or `https://` URL of an OTLP/gRPC
/// receiver (an OpenTelemetry Collector, Jaeger: port 4317).
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let uri: tonic::codegen::http::Uri =
        s.parse().map_err(|e| format!("{s:?} is not a URL: {e} (e.g. http://127.0.0.1:4317)"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(s.to_string()),
        _ => Err(format!("{s:?}: give an http:// or https:// URL with a host, e.g. http://127.0.0.1:4317")),
    }
}

/// A W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`), checked: the
/// only form in which trace context is stored or sent on. Values of a later
/// version are read as version 00 (their first four fields), as the
/// specification asks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent(String);

impl TraceParent {
    /// Length of a version-00 `traceparent`.
    pub const LEN: usize = 55;

    /// The value, or `None` when it is not a valid `traceparent` (which is
    /// then ignored, as W3C trace context says: the trace starts afresh).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let b = s.as_bytes();
        if b.len() < Self::LEN || (b.len() > Self::LEN && (s.starts_with("00") || b[Self::LEN] != b'-')) {
            return None;
        }
        let hex = |r: std::ops::Range<usize>| b[r].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        let zero = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
        let dashes = b[2] == b'-' && b[35] == b'-' && b[52] == b'-';
        if !dashes || !hex(0..2) || &s[..2] == "ff" || !hex(3..35) || !hex(36..52) || !hex(53..55) {
            return None;
        }
        if zero(3..35) || zero(36..52) {
            return None;
        }
        Some(Self(format!("00{}", &s[2..Self::LEN])))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `traceparent` and `tracestate` as a propagator reads them.
struct Carrier<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Catches what a propagator writes; only `traceparent` is kept.
#[derive(Default)]
struct Written(Option<String>);

impl Injector for Written {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// The remote context a `traceparent` (and `tracestate`) name; an empty
/// context (a new trace) when there is none or it is invalid.
fn remote(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let Some(traceparent) = traceparent.and_then(TraceParent::parse) else { return Context::new() };
    let carrier = Carrier { traceparent: traceparent.as_str(), tracestate };
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` continue the caller's trace, from a `traceparent` and
/// `tracestate` as they came (AMQP headers, gRPC metadata), or start a
/// trace of its own when they are absent or invalid. Call before the span
/// is first entered; a no-op when traces are off.
pub fn continue_remote(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if enabled() && !span.is_disabled() {
        let _ = span.set_parent(remote(traceparent, tracestate));
    }
}

/// [`continue_remote`] from a checked, stored or received [`TraceParent`].
pub fn continue_trace(span: &Span, parent: Option<&TraceParent>) {
    continue_remote(span, parent.map(TraceParent::as_str), None);
}

/// The `traceparent` naming `span` (for children in other processes), or
/// `None` when traces are off or the span is not exported.
pub fn traceparent(span: &Span) -> Option<TraceParent> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut written = Written::default();
    TraceContextPropagator::new().inject_context(&cx, &mut written);
    written.0.as_deref().and_then(TraceParent::parse)
}

/// What to pass on as the parent of the next hop: `span`'s context when
/// traces are exported, else the context that came in, unchanged.
pub fn propagate(span: &Span, incoming: Option<&TraceParent>) -> Option<TraceParent> {
    traceparent(span).or_else(|| incoming.cloned())
}

/// Which spans and events go to the exporter (see the module docs):
/// portfleet's, at INFO or above, that declare `otel.kind` or sit inside a
/// span that is exported.
#[derive(Clone, Copy, Debug)]
pub struct ExportFilter;

impl ExportFilter {
    fn ours(meta: &Metadata<'_>) -> bool {
        *meta.level() <= Level::INFO && meta.target().starts_with("portfleet")
    }
}

impl<S> Filter<S> for ExportFilter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &Metadata<'_>, cx: &LayerContext<'_, S>) -> bool {
        if !Self::ours(meta) {
            return false;
        }
        if meta.is_span() && meta.fields().field("otel.kind").is_some() {
            return true;
        }
        // The context is this filter's: the nearest span it enabled.
        cx.lookup_current().is_some()
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::ours(meta) { Interest::sometimes() } else { Interest::never() }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }
}

/// The tracer provider behind the exporter, and the layer that feeds it.
pub(crate) struct Pipeline {
    pub provider: SdkTracerProvider,
    pub tracer: opentelemetry_sdk::trace::SdkTracer,
}

/// Builds the OTLP/gRPC exporter and its batch processor. Must run inside a
/// Tokio runtime: the exporter's channel lives on it.
pub(crate) fn pipeline(endpoint: &str, service_name: &'static str) -> Result<Pipeline, OtelError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(OtelError::NoRuntime);
    }
    let bad = |message: String| OtelError::Exporter { endpoint: endpoint.to_string(), message };
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(parse_endpoint(endpoint).map_err(bad)?)
        .with_timeout(EXPORT_TIMEOUT);
    if endpoint.starts_with("https://") {
        builder = builder.with_tls_config(tonic::transport::ClientTlsConfig::new().with_webpki_roots());
    }
    let exporter = builder.build().map_err(|e| bad(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(service_name)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("portfleet");
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Pipeline { provider, tracer })
}

/// Flushes the exporter when the process ends. Keep it for the process's
/// life; [`TelemetryGuard::shutdown`] (or dropping it) sends what is left,
/// waiting up to five seconds. Call it while the Tokio runtime still runs.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops the trace exporter"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub(crate) fn exporting(provider: SdkTracerProvider) -> Self {
        Self { provider: Some(provider) }
    }

    /// Exports the spans still queued and stops the exporter (blocking:
    /// call it from the main thread, outside `block_on`).
    pub fn shutdown(mut self) {
        self.flush();
    }

    fn flush(&mut self) {
        let Some(provider) = self.provider.take() else { return };
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(error = %e, "could not export the last trace spans");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_are_checked_as_w3c_says() {
        assert_eq!(TraceParent::parse(VALID).unwrap().as_str(), VALID);
        assert_eq!(TraceParent::parse(&format!(" {VALID}\n")).unwrap().as_str(), VALID);
        // A later version: its first four fields, read as version 00.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert_eq!(TraceParent::parse(v1).unwrap().as_str(), VALID);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_remote_context_keeps_the_callers_trace_and_state() {
        let cx = remote(Some(VALID), Some("vendor=abc"));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(format!("{:032x}", sc.trace_id()), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.trace_state().get("vendor"), Some("abc"));
        assert!(!remote(Some("garbage"), None).span().span_context().is_valid());
        assert!(!remote(None, None).has_active_span());
    }

    #[test]
    fn endpoints_are_urls_of_a_host() {
        assert_eq!(parse_endpoint("http://127.0.0.1:4317").unwrap(), "http://127.0.0.1:4317");
        assert!(parse_endpoint("https://collector.example:4317").is_ok());
        for bad in ["127.0.0.1:4317", "ftp://x:1", "http://", "not a url"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    /// Without the exporter, nothing is made and contexts pass through.
    #[test]
    fn off_means_no_spans_and_contexts_passed_on() {
        assert!(!enabled());
        let span = crate::trace_span!("x", otel.kind = "internal");
        assert!(span.is_none());
        let incoming = TraceParent::parse(VALID);
        assert_eq!(traceparent(&span), None);
        assert_eq!(propagate(&span, incoming.as_ref()), incoming);
    }
}
