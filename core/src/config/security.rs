//! `[security]`: authentication and server limits of the control plane.
//!
//! Per-process settings like `[cluster]` (each machine names its own token file;
//! the section is in the worker-local keys). The token itself is never a config
//! value: the config travels to the coordinator in every registration and is
//! printed in refusals, so only the path of the token file is (`token_file`; the
//! `HSAT_TOKEN` environment variable and `--token-file` are the other sources, see
//! `hsat_proto::auth::resolve_token`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::Problem;

/// `[security]` as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecurity {
    pub token_file: String,
    pub insecure: bool,
    pub max_message_bytes: i64,
    pub request_timeout_s: f64,
    pub max_concurrent_requests: i64,
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_client_ca: String,
    pub tls_ca: String,
}

/// Validated `[security]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityConfig {
    /// File holding the job token (default none: `--token-file`, `HSAT_TOKEN`,
    /// `HSAT_TOKEN_FILE` or, for `hsat run`, a generated one).
    pub token_file: Option<PathBuf>,
    /// Coordinator: serve without authentication (default false); anyone who
    /// reaches the port can then join, act for any worker and read the status.
    pub insecure: bool,
    /// Coordinator: largest gRPC message decoded or encoded, bytes (default
    /// 4 MiB); in `1024..=1 GiB`.
    pub max_message_bytes: usize,
    /// Coordinator: a call running longer is cancelled (default 30 s); more than
    /// the long poll (`cluster.long_poll_s`).
    pub request_timeout: Duration,
    /// Coordinator: calls handled at once (default 4096); more wait. Each worker
    /// holds up to two at a time (a long poll and a heartbeat).
    pub max_concurrent_requests: usize,
    /// PEM certificate chain: the coordinator's (turns on TLS), or a client's own
    /// for mutual TLS (default none).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (default none).
    pub tls_key: Option<PathBuf>,
    /// Coordinator: PEM CA that client certificates must chain to; set, every
    /// client must present one (mutual TLS; default none).
    pub tls_client_ca: Option<PathBuf>,
    /// Client: PEM CA that the coordinator's certificate must chain to; set, the
    /// client speaks TLS (default none).
    pub tls_ca: Option<PathBuf>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            token_file: None,
            insecure: false,
            max_message_bytes: 4 << 20,
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4096,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_ca: None,
        }
    }
}

fn path_text(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn optional_path(text: &str) -> Option<PathBuf> {
    (!text.trim().is_empty()).then(|| PathBuf::from(text))
}

impl From<&SecurityConfig> for RawSecurity {
    fn from(c: &SecurityConfig) -> Self {
        Self {
            token_file: c
                .token_file
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            insecure: c.insecure,
            max_message_bytes: i64::try_from(c.max_message_bytes).unwrap_or(i64::MAX),
            request_timeout_s: c.request_timeout.as_secs_f64(),
            max_concurrent_requests: i64::try_from(c.max_concurrent_requests).unwrap_or(i64::MAX),
            tls_cert: path_text(&c.tls_cert),
            tls_key: path_text(&c.tls_key),
            tls_client_ca: path_text(&c.tls_client_ca),
            tls_ca: path_text(&c.tls_ca),
        }
    }
}

/// Smallest and largest message size accepted.
const MESSAGE_BYTES: (i64, i64) = (1024, 1 << 30);
/// Longest request timeout: an hour.
const MAX_TIMEOUT_S: f64 = 3600.0;

/// Checks every `[security]` value; every problem names its key.
pub(crate) fn validate(
    raw: &RawSecurity,
    long_poll: Duration,
) -> Result<SecurityConfig, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            key: key.to_owned(),
            message,
        })
    };
    let token_file = (!raw.token_file.trim().is_empty()).then(|| PathBuf::from(&raw.token_file));
    let max_message_bytes = if (MESSAGE_BYTES.0..=MESSAGE_BYTES.1).contains(&raw.max_message_bytes)
    {
        raw.max_message_bytes as usize
    } else {
        problem(
            "security.max_message_bytes",
            format!(
                "security.max_message_bytes = {}: must be between {} and {} (bytes)",
                raw.max_message_bytes, MESSAGE_BYTES.0, MESSAGE_BYTES.1
            ),
        );
        0
    };
    let timeout = raw.request_timeout_s;
    let request_timeout = if timeout.is_finite() && timeout > 0.0 && timeout <= MAX_TIMEOUT_S {
        Duration::from_secs_f64(timeout)
    } else {
        problem(
            "security.request_timeout_s",
            format!(
                "security.request_timeout_s = {timeout}: must be a number of seconds > 0 and at most {MAX_TIMEOUT_S}"
            ),
        );
        Duration::ZERO
    };
    if !request_timeout.is_zero() && request_timeout <= long_poll {
        problem(
            "security.request_timeout_s",
            format!(
                "security.request_timeout_s = {timeout} must be more than cluster.long_poll_s = {}: \
                 a held assignment call would be cancelled",
                long_poll.as_secs_f64()
            ),
        );
    }
    let max_concurrent_requests = match usize::try_from(raw.max_concurrent_requests) {
        Ok(n) if n >= 1 => n,
        _ => {
            problem(
                "security.max_concurrent_requests",
                format!(
                    "security.max_concurrent_requests = {}: must be >= 1 (calls handled at once)",
                    raw.max_concurrent_requests
                ),
            );
            0
        }
    };
    let (tls_cert, tls_key) = (optional_path(&raw.tls_cert), optional_path(&raw.tls_key));
    if tls_cert.is_some() != tls_key.is_some() {
        problem(
            "security.tls_cert",
            "security.tls_cert and security.tls_key go together: set both (a certificate and its \
             key) or neither"
                .to_owned(),
        );
    }
    if problems.is_empty() {
        Ok(SecurityConfig {
            tls_cert,
            tls_key,
            tls_client_ca: optional_path(&raw.tls_client_ca),
            tls_ca: optional_path(&raw.tls_ca),
            token_file,
            insecure: raw.insecure,
            max_message_bytes,
            request_timeout,
            max_concurrent_requests,
        })
    } else {
        Err(problems)
    }
}
