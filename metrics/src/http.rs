//! The metrics endpoint: `GET /metrics` on its own port, apart from the gRPC port,
//! so that scraping never competes with the control plane's connections and the
//! port can be opened to a monitoring network alone.
//!
//! It is unauthenticated on purpose: it exposes only telemetry (counts, durations,
//! losses; no data, no tokens, no job control). Restrict who reaches it with a
//! NetworkPolicy (`k8s/`), or leave it off (the default) or on loopback.
//!
//! The scraper's `Accept` header picks the format: OpenMetrics for Prometheus, the
//! classic text format 0.0.4 otherwise. Any other path is 404, any other method on
//! `/metrics` 405.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

use crate::MetricsError;
use crate::exposition::{
    Exposition, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, openmetrics_to_text,
};

/// The path the metrics are served at.
pub const METRICS_PATH: &str = "/metrics";

/// Binds `address` (`IP:PORT`; port 0 picks a free port).
pub async fn bind(address: &str) -> Result<TcpListener, MetricsError> {
    let parsed: SocketAddr = address.parse().map_err(|_| MetricsError::Address {
        address: address.to_owned(),
    })?;
    TcpListener::bind(parsed)
        .await
        .map_err(|source| MetricsError::Listen {
            address: address.to_owned(),
            source,
        })
}

/// A running metrics endpoint; dropping it (or [`MetricsServer::stop`]) stops it.
#[derive(Debug)]
pub struct MetricsServer {
    address: SocketAddr,
    tls: bool,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Serves `exposition` on `listener` (plain HTTP) on the current tokio runtime.
    pub fn spawn(listener: TcpListener, exposition: Arc<dyn Exposition>) -> MetricsServer {
        Self::spawn_with_tls(listener, exposition, None)
    }

    /// Serves `exposition` on `listener`, over TLS when `tls` is given (the
    /// coordinator passes the certificate of its gRPC port, so a scraper verifies
    /// the same identity; with a client CA in it, scrapers need a certificate too).
    pub fn spawn_with_tls(
        listener: TcpListener,
        exposition: Arc<dyn Exposition>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> MetricsServer {
        let address = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let acceptor = tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(accept_loop(listener, exposition, acceptor));
        MetricsServer {
            address,
            tls: tls.is_some(),
            task,
        }
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://ADDRESS/metrics` (`https://` over TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{METRICS_PATH}", self.address)
    }

    /// Stops accepting scrapes.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    exposition: Arc<dyn Exposition>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %err, "metrics endpoint: cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let exposition = Arc::clone(&exposition);
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let exposition = Arc::clone(&exposition);
                async move { Ok::<_, Infallible>(answer(&request, exposition.as_ref())) }
            });
            let http = http1::Builder::new();
            let served = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => http.serve_connection(TokioIo::new(stream), service).await,
                    Err(err) => {
                        // A plain-HTTP scraper or a client without an accepted
                        // certificate: its connection ends here.
                        tracing::debug!(error = %err, "metrics endpoint: TLS handshake failed");
                        return;
                    }
                },
                None => http.serve_connection(TokioIo::new(stream), service).await,
            };
            if let Err(err) = served {
                tracing::debug!(error = %err, "metrics endpoint: connection ended with an error");
            }
        });
    }
}

/// The response to one request.
fn answer(request: &Request<Incoming>, exposition: &dyn Exposition) -> Response<Full<Bytes>> {
    if request.uri().path() != METRICS_PATH {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET /metrics\n",
        );
    }
    let openmetrics = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    let body = exposition.render();
    let (content_type, body) = if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, body)
    } else {
        (TEXT_CONTENT_TYPE, openmetrics_to_text(&body))
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A blocking `GET http://address/path` with an optional `Accept` header, for tests
/// and tools that scrape without a Prometheus: `(status, content type, body)`.
pub fn get(
    address: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(5))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let accept = accept.map_or_else(String::new, |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((status, content_type, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;

    fn registry() -> Arc<dyn Exposition> {
        let mut registry = Registry::default();
        let gauge = Gauge::<i64>::default();
        gauge.set(7);
        registry.register("hsat_test_value", "A value", gauge);
        Arc::new(registry)
    }

    /// Runs `get` off the runtime's threads (it blocks).
    async fn fetch(
        address: SocketAddr,
        path: &'static str,
        accept: Option<&'static str>,
    ) -> (u16, String, String) {
        tokio::task::spawn_blocking(move || get(address, path, accept))
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn serves_both_formats_and_404_elsewhere() {
        let server = MetricsServer::spawn(bind("127.0.0.1:0").await.unwrap(), registry());
        assert_ne!(server.address().port(), 0);
        let (status, content_type, body) = fetch(server.address(), "/metrics", None).await;
        assert_eq!(status, 200);
        assert_eq!(content_type, TEXT_CONTENT_TYPE);
        assert!(body.contains("hsat_test_value 7"), "{body}");
        assert!(!body.contains("# EOF"), "{body}");
        let (status, content_type, body) = fetch(
            server.address(),
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (status, _, body) = fetch(server.address(), "/", None).await;
        assert_eq!(status, 404);
        assert!(body.contains("/metrics"), "{body}");
    }

    #[tokio::test]
    async fn a_stopped_server_refuses_connections() {
        let server = MetricsServer::spawn(bind("127.0.0.1:0").await.unwrap(), registry());
        let address = server.address();
        server.stop();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let result = tokio::task::spawn_blocking(move || get(address, "/metrics", None))
            .await
            .unwrap();
        assert!(result.is_err(), "{result:?}");
    }

    #[tokio::test]
    async fn an_address_without_a_port_is_refused_with_the_fix() {
        let err = bind("localhost").await.unwrap_err();
        assert!(matches!(err, MetricsError::Address { .. }), "{err:?}");
        assert!(err.to_string().contains("IP:PORT"), "{err}");
    }
}
