//! Tracing setup for the binary: `RUST_LOG` filters (default `info`), plain
//! or JSON lines on stderr, caller input escaped (portfleet-telemetry),
//! traces over OTLP with `--otlp-endpoint`; and how gRPC calls are logged.

use std::time::Duration;

use tonic::Code;
use tower_http::{
    classify::{GrpcErrorsAsFailures, GrpcFailureClass, SharedClassifier},
    trace::{self, TraceLayer},
};
use tracing::Span;

use crate::config::LogFormat;

/// Logging, and trace export when `otlp_endpoint` is given (call inside
/// the runtime; keep the guard until the end, then shut it down).
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<portfleet_telemetry::TelemetryGuard, portfleet_telemetry::otel::OtelError> {
    let traces = portfleet_telemetry::Traces { otlp_endpoint, service_name: "portfleet-controller" };
    portfleet_telemetry::init(format, "info", &traces)
}

/// The controller's gRPC trace layer (see [`grpc_trace_layer`]).
pub type GrpcTraceLayer = TraceLayer<
    SharedClassifier<GrpcErrorsAsFailures>,
    trace::DefaultMakeSpan,
    trace::DefaultOnRequest,
    trace::DefaultOnResponse,
    trace::DefaultOnBodyChunk,
    trace::DefaultOnEos,
    OnGrpcFailure,
>;

pub fn grpc_trace_layer() -> GrpcTraceLayer {
    TraceLayer::new_for_grpc().on_failure(OnGrpcFailure)
}

/// Logs each failed gRPC call once, at a level by who must act: a
/// caller's mistake (bad argument, unknown id, no permission) at DEBUG -
/// the caller got the status, and the handler logged anything worth
/// keeping; an overloaded or unavailable server at WARN; only a failure
/// of the server itself at ERROR.
#[derive(Clone, Copy, Debug)]
pub struct OnGrpcFailure;

impl trace::OnFailure<GrpcFailureClass> for OnGrpcFailure {
    fn on_failure(&mut self, class: GrpcFailureClass, latency: Duration, _: &Span) {
        let code = match class {
            GrpcFailureClass::Status(status) => Code::from(status.code_raw()),
            other => {
                tracing::debug!(failure = %other, ?latency, "gRPC call failed in transport");
                return;
            }
        };
        match code {
            Code::Internal | Code::Unknown | Code::DataLoss => {
                tracing::error!(code = ?code, ?latency, "gRPC call failed")
            }
            Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Unimplemented => {
                tracing::warn!(code = ?code, ?latency, "gRPC call failed")
            }
            _ => tracing::debug!(code = ?code, ?latency, "gRPC call refused"),
        }
    }
}
