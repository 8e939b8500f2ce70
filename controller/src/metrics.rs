//! The controller's metrics (docs/operations.md lists every one): the gRPC
//! layer that counts and times every call, the database operation timer,
//! and the sampler that reads fleet-wide gauges from Postgres. Counters of
//! single events (`portfleet_results_ingested_total`, ...) are bumped where
//! the event happens. Without `--metrics-listen` no recorder is installed
//! and all of this costs a few no-op calls.
//!
//! Labels are bounded: gRPC method names come from the services this
//! server has (anything else is `unknown`), operations and states from
//! closed sets in the code; never scan ids, addresses or tokens.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, LazyLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Code, codegen::http};

use crate::store::{Store, StoreError};

/// How often the sampler reads the database's gauges.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// Times a database operation as `portfleet_db_query_duration_seconds{op}`
/// and counts its failures as `portfleet_db_query_errors_total{op}`.
pub async fn timed<T>(op: &'static str, f: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let start = Instant::now();
    let result = f.await;
    metrics::histogram!("portfleet_db_query_duration_seconds", "op" => op).record(start.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("portfleet_db_query_errors_total", "op" => op).increment(1);
    }
    result
}

/// The pools whose connections are sampled, by name.
pub type Pools = Vec<(&'static str, Store)>;

/// Reads the fleet-wide gauges (agents, scans and shards by state, the
/// outbox) and the pools' connections every `SAMPLE_INTERVAL` (10 s) until
/// `cancel`. Every controller samples: the values are the database's, so
/// dashboards take `max` across controllers.
pub async fn sample(store: Store, pools: Pools, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (name, pool) in &pools {
            let (size, idle) = (pool.pool().size(), pool.pool().num_idle() as u32);
            metrics::gauge!("portfleet_db_pool_connections", "pool" => *name, "state" => "in_use")
                .set(f64::from(size.saturating_sub(idle)));
            metrics::gauge!("portfleet_db_pool_connections", "pool" => *name, "state" => "idle").set(f64::from(idle));
        }
        let gauges = tokio::select! {
            _ = cancel.cancelled() => return,
            g = timed("sample_gauges", store.fleet_gauges()) => g,
        };
        match gauges {
            Ok(g) => {
                for (family, rows) in
                    [("portfleet_agents", &g.agents), ("portfleet_scans", &g.scans), ("portfleet_shards", &g.shards)]
                {
                    for (state, n) in rows {
                        metrics::gauge!(family, "state" => *state).set(*n as f64);
                    }
                }
                metrics::gauge!("portfleet_outbox_backlog").set(g.outbox as f64);
            }
            Err(error) => tracing::debug!(%error, "cannot sample the fleet's gauges"),
        }
    }
}

/// The `/package.Service/Method` paths this server answers, for bounded
/// labels, and whether each streams: read from the descriptor sets it
/// serves.
static METHODS: LazyLock<HashMap<String, bool>> = LazyLock::new(|| {
    let mut paths = HashMap::new();
    for set in [portfleet_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let Ok(fds) = prost_types::FileDescriptorSet::decode(set) else { continue };
        for file in fds.file {
            for service in &file.service {
                for method in &service.method {
                    let streams = method.client_streaming() || method.server_streaming();
                    paths.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()), streams);
                }
            }
        }
    }
    for version in ["v1", "v1alpha"] {
        paths.insert(format!("/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"), true);
    }
    paths
});

/// `(service, method, streams)` of a request path, or `unknown` for a path
/// this server does not have (a caller cannot create label values).
fn labels(path: &str) -> (Arc<str>, Arc<str>, bool) {
    let streams = METHODS.get(path).copied();
    match (path.trim_start_matches('/').split_once('/'), streams) {
        (Some((service, method)), Some(streams)) => (service.into(), method.into(), streams),
        _ => ("unknown".into(), "unknown".into(), false),
    }
}

/// gRPC status codes as gRPC's own implementations name them in metrics.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Counts and times every gRPC call: `portfleet_grpc_requests_total{service,
/// method, code}` when it ends, and for unary calls
/// `portfleet_grpc_request_duration_seconds{service, method}` (a stream's
/// lifetime, hours for an agent session, would only blur the latencies).
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<MeteredBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let (service, method, streams) = labels(request.uri().path());
        let call = Call { service, method, streams, start: Instant::now(), done: false };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // A trailers-only response (most errors) has its status here.
            let status = grpc_status(response.headers());
            let mut call = call;
            if let Some(code) = status {
                call.finish(code);
            }
            Ok(response.map(|body| MeteredBody { inner: tonic::body::Body::new(body), call }))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from(v))
}

/// One call, recorded once: at its status, or as `Canceled` when its body
/// is dropped without one (the client went away).
struct Call {
    service: Arc<str>,
    method: Arc<str>,
    streams: bool,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let (service, method) = (self.service.to_string(), self.method.to_string());
        if !self.streams {
            metrics::histogram!("portfleet_grpc_request_duration_seconds", "service" => service.clone(),
                "method" => method.clone())
            .record(self.start.elapsed().as_secs_f64());
        }
        metrics::counter!("portfleet_grpc_requests_total", "service" => service, "method" => method,
            "code" => code_name(code))
        .increment(1);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// A response body that records its call when the trailers pass.
pub struct MeteredBody {
    inner: tonic::body::Body,
    call: Call,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => this.call.finish(status.code()),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_become_labels() {
        let (s, m, streams) = labels("/portfleet.v1.ScanService/CreateScan");
        assert_eq!((&*s, &*m, streams), ("portfleet.v1.ScanService", "CreateScan", false));
        let (s, m, streams) = labels("/portfleet.v1.AgentService/Session");
        assert_eq!((&*s, &*m, streams), ("portfleet.v1.AgentService", "Session", true));
        let (s, m, streams) = labels("/portfleet.v1.ScanService/WatchScan");
        assert_eq!((&*s, &*m, streams), ("portfleet.v1.ScanService", "WatchScan", true));
        let (s, m, streams) = labels("/grpc.health.v1.Health/Check");
        assert_eq!((&*s, &*m, streams), ("grpc.health.v1.Health", "Check", false));
        for junk in ["/portfleet.v1.ScanService/Made-Up", "/x/y", "/", "", "/a/b/c"] {
            let (s, m, _) = labels(junk);
            assert_eq!((&*s, &*m), ("unknown", "unknown"), "{junk}");
        }
    }
}
