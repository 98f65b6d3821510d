//! gRPC calls by method and status code: a tower layer around a tonic server's
//! routes (`Server::builder().layer(RpcMetrics::layer(..))`), so every call is
//! counted, including those refused before a handler runs (malformed, unknown
//! method, refused by an authentication layer inside it).
//!
//! The code is read from the response's `grpc-status` header: tonic sends a failed
//! unary call as a trailers-only response (status in the headers), a successful one
//! without it (`OK` in the trailers). The duration runs to the response's headers,
//! which for a unary call is the handler's time (for `NextAssignment` it includes
//! its long poll).
//!
//! Labels are bounded: `method` is one of the names given at construction (the
//! last segment of `/package.Service/Method`) or `other`; `code` one of the 17 gRPC
//! codes by name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `method` and `code` of `hsat_rpc_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `Register`, `ReportStep`, ... or `other`.
    pub method: String,
    /// `OK`, `Unauthenticated`, ... (gRPC code names).
    pub code: String,
}

/// `method` of `hsat_rpc_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// As in [`RpcLabels`].
    pub method: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// RPC counts and durations; clones share the metrics.
#[derive(Clone)]
pub struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
    durations: HistogramFamily<MethodLabel>,
    methods: Arc<[&'static str]>,
}

impl std::fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMetrics")
            .field("methods", &self.methods)
            .finish_non_exhaustive()
    }
}

/// 100 µs to about 26 s: a heartbeat takes well under a millisecond, a held long
/// poll about a second.
fn rpc_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

impl RpcMetrics {
    /// Registers `hsat_rpc_requests_total{method,code}` and
    /// `hsat_rpc_duration_seconds{method}`; `methods` are the method names to
    /// count separately (others count as `other`).
    pub fn register(registry: &mut Registry, methods: &[&'static str]) -> RpcMetrics {
        let requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "hsat_rpc_requests",
            "gRPC calls answered, by method and status code",
            requests.clone(),
        );
        let durations: HistogramFamily<MethodLabel> =
            Family::new_with_constructor(rpc_buckets as fn() -> Histogram);
        registry.register(
            "hsat_rpc_duration_seconds",
            "Seconds from a gRPC call's arrival to its response, by method",
            durations.clone(),
        );
        RpcMetrics {
            requests,
            durations,
            methods: methods.into(),
        }
    }

    /// The layer to put around the server's routes.
    pub fn layer(&self) -> RpcMetricsLayer {
        RpcMetricsLayer(self.clone())
    }

    /// Records one call of `path` (`/package.Service/Method`).
    pub fn observe(&self, path: &str, code: &str, seconds: f64) {
        let method = self.method_of(path).to_owned();
        self.requests
            .get_or_create(&RpcLabels {
                method: method.clone(),
                code: code.to_owned(),
            })
            .inc();
        self.durations
            .get_or_create(&MethodLabel { method })
            .observe(seconds);
    }

    fn method_of(&self, path: &str) -> &'static str {
        let name = path.rsplit('/').next().unwrap_or("");
        self.methods
            .iter()
            .find(|m| **m == name)
            .copied()
            .unwrap_or("other")
    }
}

/// The name of gRPC status code `code` (`grpc-status` header value).
pub fn code_name(code: &str) -> &'static str {
    match code.trim() {
        "0" => "OK",
        "1" => "Canceled",
        "2" => "Unknown",
        "3" => "InvalidArgument",
        "4" => "DeadlineExceeded",
        "5" => "NotFound",
        "6" => "AlreadyExists",
        "7" => "PermissionDenied",
        "8" => "ResourceExhausted",
        "9" => "FailedPrecondition",
        "10" => "Aborted",
        "11" => "OutOfRange",
        "12" => "Unimplemented",
        "13" => "Internal",
        "14" => "Unavailable",
        "15" => "DataLoss",
        "16" => "Unauthenticated",
        _ => "Unknown",
    }
}

/// The tower layer of [`RpcMetrics`].
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer(RpcMetrics);

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around a server's routes.
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .map_or("OK", code_name),
                Err(_) => "Unknown",
            };
            metrics.observe(&path, code, started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::{Scrape, encode_openmetrics};
    use std::convert::Infallible;
    use tower_layer::Layer;
    use tower_service::Service;

    /// A stand-in for tonic's routes: fails `/x.S/Bad` the way tonic does (status in
    /// the headers), answers anything else without a status header.
    #[derive(Clone)]
    struct Fake;

    impl Service<http::Request<()>> for Fake {
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            let mut response = http::Response::new(());
            if request.uri().path().ends_with("/Bad") {
                response
                    .headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("16"));
            }
            std::future::ready(Ok(response))
        }
    }

    #[tokio::test]
    async fn calls_are_counted_by_known_method_and_code() {
        let mut registry = Registry::default();
        let metrics = RpcMetrics::register(&mut registry, &["Good", "Bad"]);
        let mut service = metrics.layer().layer(Fake);
        for path in ["/x.S/Good", "/x.S/Good", "/x.S/Bad", "/x.S/Whatever"] {
            let request = http::Request::builder().uri(path).body(()).unwrap();
            service.call(request).await.unwrap();
        }
        let text = crate::exposition::openmetrics_to_text(&encode_openmetrics(&registry));
        let scrape = Scrape::parse(&text).unwrap();
        let count = |method: &str, code: &str| {
            scrape.value(
                "hsat_rpc_requests_total",
                &[("method", method), ("code", code)],
            )
        };
        assert_eq!(count("Good", "OK"), Some(2.0));
        assert_eq!(count("Bad", "Unauthenticated"), Some(1.0));
        // An unknown method does not grow the label set.
        assert_eq!(count("other", "OK"), Some(1.0));
        assert_eq!(count("Whatever", "OK"), None);
        assert_eq!(
            scrape.value("hsat_rpc_duration_seconds_count", &[("method", "Good")]),
            Some(2.0)
        );
    }
}
