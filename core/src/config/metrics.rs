//! `[metrics]`: where the coordinator and the workers serve their Prometheus
//! metrics, and how often a worker measures the clean-view losses.
//!
//! Per-process settings like `[cluster]`: not part of the job's identity (the
//! section is in the worker-local keys). The `--metrics-listen` flags of `hsat
//! coordinator` and `hsat worker` become `--set metrics.listen=...` /
//! `metrics.worker_listen=...` overrides.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::validate::Problem;

/// `[metrics]` as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub listen: String,
    pub worker_listen: String,
    pub clean_loss_every: i64,
}

/// Validated `[metrics]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Coordinator: `IP:PORT` of its metrics endpoint (port 0 picks a free one);
    /// `None` (an empty string) turns it off (default).
    pub listen: Option<SocketAddr>,
    /// Worker: `IP:PORT` of its metrics endpoint; `None` turns it off (default).
    pub worker_listen: Option<SocketAddr>,
    /// Worker: measure the clean-view losses every this many steps when the
    /// objective does not compute them anyway (an extra forward pass without
    /// gradients); 0 = never (default 1).
    pub clean_loss_every: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            worker_listen: None,
            clean_loss_every: 1,
        }
    }
}

impl MetricsConfig {
    /// Whether the clean-view losses are measured at `step`.
    pub fn clean_loss_at(&self, step: u64) -> bool {
        self.clean_loss_every > 0 && step.is_multiple_of(self.clean_loss_every)
    }
}

fn address_text(address: Option<SocketAddr>) -> String {
    address.map_or_else(String::new, |a| a.to_string())
}

impl From<&MetricsConfig> for RawMetrics {
    fn from(c: &MetricsConfig) -> Self {
        Self {
            listen: address_text(c.listen),
            worker_listen: address_text(c.worker_listen),
            clean_loss_every: i64::try_from(c.clean_loss_every).unwrap_or(i64::MAX),
        }
    }
}

fn address(problems: &mut Vec<Problem>, name: &str, value: &str) -> Option<SocketAddr> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let key = format!("metrics.{name}");
    value.parse().map_or_else(
        |_| {
            problems.push(Problem {
                key: key.clone(),
                message: format!(
                    "{key} = {value:?}: must be IP:PORT (e.g. \"127.0.0.1:0\" for a free local port, \
                     \"0.0.0.0:9464\" for every interface), or \"\" to turn metrics off"
                ),
            });
            None
        },
        Some,
    )
}

/// Checks every `[metrics]` value; every problem names its key.
pub(crate) fn validate(raw: &RawMetrics) -> Result<MetricsConfig, Vec<Problem>> {
    let mut problems = Vec::new();
    let listen = address(&mut problems, "listen", &raw.listen);
    let worker_listen = address(&mut problems, "worker_listen", &raw.worker_listen);
    let clean_loss_every = u64::try_from(raw.clean_loss_every).unwrap_or_else(|_| {
        problems.push(Problem {
            key: "metrics.clean_loss_every".into(),
            message: format!(
                "metrics.clean_loss_every = {}: must be >= 0 (0 = never measure the clean losses)",
                raw.clean_loss_every
            ),
        });
        1
    });
    if problems.is_empty() {
        Ok(MetricsConfig {
            listen,
            worker_listen,
            clean_loss_every,
        })
    } else {
        Err(problems)
    }
}
