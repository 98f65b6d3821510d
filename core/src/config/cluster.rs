//! `[cluster]`: membership, timing and transport settings of a distributed job.
//!
//! They are per-process settings (the coordinator reads the membership and timing
//! keys, a worker its collective and retry keys), not part of the job's identity:
//! a worker whose `[cluster]` differs from the coordinator's still joins (the
//! section is in the worker-local keys). The command-line flags of `hsat
//! coordinator` / `hsat worker` are turned into `--set cluster.*` overrides, so a
//! flag wins over the file and the environment and is validated with the rest.
//!
//! Why the cross-key rules ([`check`]):
//!
//! - `lease_s` > `SILENT_HEARTBEATS * heartbeat_s`: a worker is only called silent
//!   (and not waited for at a regroup) after missing several heartbeats, and only
//!   dropped after that;
//! - `collective_timeout_s` < `regroup_wait_s`: a survivor whose collective hangs on
//!   a dead peer gives up and checks in before the next generation forms without it;
//! - `regroup_wait_s` < `shutdown_grace_s` and `long_poll_s` < `shutdown_grace_s`:
//!   a shutdown can still drain and checkpoint after a regroup (and a held long poll
//!   answers) within the grace;
//! - `min_workers` <= `workers`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::Problem;

/// Heartbeats a worker may miss before the coordinator stops waiting for it at a
/// regroup (its lease still runs; it is dropped only when the lease expires).
pub const SILENT_HEARTBEATS: u32 = 3;

/// `[cluster]` as written in TOML (seconds as numbers, fractions allowed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub workers: i64,
    pub min_workers: i64,
    pub formation_wait_s: f64,
    pub heartbeat_s: f64,
    pub lease_s: f64,
    pub regroup_wait_s: f64,
    pub long_poll_s: f64,
    pub shutdown_grace_s: f64,
    pub collective_timeout_s: f64,
    pub connect_timeout_s: f64,
    pub rpc_retry_deadline_s: f64,
    pub bucket_mb: i64,
    pub lock_wait_s: f64,
}

/// Validated `[cluster]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Workers the coordinator expects (default 1); the first generation forms as
    /// soon as all of them are checked in. >= 1.
    pub workers: usize,
    /// Fewest workers that may train (default 1): the first generation needs them
    /// (after `formation_wait`), below them the job pauses. In `1..=workers`.
    pub min_workers: usize,
    /// How long after the first registration the first generation may form with
    /// fewer than `workers` (but at least `min_workers`) workers (default 30 s).
    pub formation_wait: Duration,
    /// Interval of worker heartbeats (default 0.5 s); > 0.
    pub heartbeat: Duration,
    /// A worker not heard from for this long is dropped (default 10 s);
    /// > `SILENT_HEARTBEATS * heartbeat`.
    pub lease: Duration,
    /// After a generation breaks, how long to wait for every live worker to check
    /// in before forming the next generation without the missing ones (default
    /// 40 s); > `collective_timeout`, < `shutdown_grace`.
    pub regroup_wait: Duration,
    /// How long a `NextAssignment` call may be held before answering `Wait`
    /// (default 1 s).
    pub long_poll: Duration,
    /// On SIGTERM: the time to drain issued steps, checkpoint the last committed one
    /// and exit; at the end of a job: to get every worker its `Stop` (default 50 s,
    /// under the coordinator pod's `terminationGracePeriodSeconds` of 60).
    pub shutdown_grace: Duration,
    /// Worker: bound on rendezvous and every collective (default 30 s); a dead peer
    /// surfaces in milliseconds, a hung one after this.
    pub collective_timeout: Duration,
    /// Worker: how long to keep trying to reach the coordinator at start-up
    /// (default 120 s).
    pub connect_timeout: Duration,
    /// Worker: how long each call to the coordinator is retried while it is
    /// unreachable, restarting or too slow (default 60 s); 0 = no retries.
    pub rpc_retry_deadline: Duration,
    /// Worker: gradient bucket size in MiB (default 25, PyTorch DDP's); >= 1.
    pub bucket_mb: usize,
    /// Coordinator: how long to wait for the single-instance lock on
    /// `<out_dir>/coordinator/lock` while another coordinator holds it (default
    /// 120 s; 0 = give up at once), then exit 75 (retryable). Covers the moments
    /// where an old coordinator pod is still draining while its replacement starts.
    pub lock_wait: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            min_workers: 1,
            formation_wait: Duration::from_secs(30),
            heartbeat: Duration::from_millis(500),
            lease: Duration::from_secs(10),
            regroup_wait: Duration::from_secs(40),
            long_poll: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(50),
            collective_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(120),
            rpc_retry_deadline: Duration::from_secs(60),
            bucket_mb: 25,
            lock_wait: Duration::from_secs(120),
        }
    }
}

impl ClusterConfig {
    /// How long without a heartbeat before a worker is not waited for at a regroup:
    /// `SILENT_HEARTBEATS * heartbeat`.
    pub fn silent_after(&self) -> Duration {
        self.heartbeat * SILENT_HEARTBEATS
    }

    /// Gradient bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_mb.max(1) << 20
    }
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl From<&ClusterConfig> for RawCluster {
    fn from(c: &ClusterConfig) -> Self {
        Self {
            workers: i64::try_from(c.workers).unwrap_or(i64::MAX),
            min_workers: i64::try_from(c.min_workers).unwrap_or(i64::MAX),
            formation_wait_s: seconds(c.formation_wait),
            heartbeat_s: seconds(c.heartbeat),
            lease_s: seconds(c.lease),
            regroup_wait_s: seconds(c.regroup_wait),
            long_poll_s: seconds(c.long_poll),
            shutdown_grace_s: seconds(c.shutdown_grace),
            collective_timeout_s: seconds(c.collective_timeout),
            connect_timeout_s: seconds(c.connect_timeout),
            rpc_retry_deadline_s: seconds(c.rpc_retry_deadline),
            bucket_mb: i64::try_from(c.bucket_mb).unwrap_or(i64::MAX),
            lock_wait_s: seconds(c.lock_wait),
        }
    }
}

/// Longest duration a key accepts: a week (also keeps `Duration` conversions exact).
const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

struct Check {
    problems: Vec<Problem>,
}

impl Check {
    fn problem(&mut self, key: &str, message: String) {
        self.problems.push(Problem {
            key: key.to_owned(),
            message,
        });
    }

    fn duration(&mut self, name: &str, value: f64, allow_zero: bool) -> Duration {
        let key = format!("cluster.{name}");
        let ok = value.is_finite()
            && value <= MAX_SECONDS
            && (value > 0.0 || (allow_zero && value == 0.0));
        if !ok {
            let lower = if allow_zero { ">= 0" } else { "> 0" };
            self.problem(
                &key,
                format!("{key} = {value}: must be a number of seconds {lower} and at most {MAX_SECONDS} (a week)"),
            );
            return Duration::ZERO;
        }
        let duration = Duration::from_secs_f64(value);
        // A positive value below a nanosecond rounds to zero, which the key refuses
        // (a zero heartbeat would make the heartbeat timer panic); found by
        // `fuzz_tests`.
        if duration.is_zero() && !allow_zero {
            self.problem(
                &key,
                format!("{key} = {value}: must be at least 1e-9 (a nanosecond; smaller values round to 0 s)"),
            );
        }
        duration
    }

    fn count(&mut self, name: &str, value: i64, note: &str) -> usize {
        let key = format!("cluster.{name}");
        match usize::try_from(value) {
            Ok(count) if count >= 1 => count,
            _ => {
                self.problem(&key, format!("{key} = {value}: must be >= 1{note}"));
                0
            }
        }
    }

    /// `lower` < `upper`, both named, with why.
    fn below(&mut self, lower: (&str, Duration), upper: (&str, Duration), why: &str) {
        if lower.1.is_zero() || upper.1.is_zero() || lower.1 < upper.1 {
            return;
        }
        let (lower_key, upper_key) = (
            format!("cluster.{}", lower.0),
            format!("cluster.{}", upper.0),
        );
        self.problem(
            &lower_key,
            format!(
                "{lower_key} = {} must be less than {upper_key} = {}: {why}",
                seconds(lower.1),
                seconds(upper.1)
            ),
        );
    }
}

/// Checks every `[cluster]` value and the rules between them (see the module docs);
/// every problem names its keys.
pub(crate) fn validate(raw: &RawCluster) -> Result<ClusterConfig, Vec<Problem>> {
    let mut c = Check {
        problems: Vec::new(),
    };
    let workers = c.count("workers", raw.workers, " (workers the coordinator expects)");
    let min_workers = c.count(
        "min_workers",
        raw.min_workers,
        " (fewest workers that may train)",
    );
    if workers >= 1 && min_workers > workers {
        c.problem(
            "cluster.min_workers",
            format!(
                "cluster.min_workers = {min_workers} must be at most cluster.workers = {workers}: \
                 the job could never start; lower cluster.min_workers or raise cluster.workers"
            ),
        );
    }
    let config = ClusterConfig {
        workers,
        min_workers,
        formation_wait: c.duration("formation_wait_s", raw.formation_wait_s, true),
        heartbeat: c.duration("heartbeat_s", raw.heartbeat_s, false),
        lease: c.duration("lease_s", raw.lease_s, false),
        regroup_wait: c.duration("regroup_wait_s", raw.regroup_wait_s, false),
        long_poll: c.duration("long_poll_s", raw.long_poll_s, false),
        shutdown_grace: c.duration("shutdown_grace_s", raw.shutdown_grace_s, false),
        collective_timeout: c.duration("collective_timeout_s", raw.collective_timeout_s, false),
        connect_timeout: c.duration("connect_timeout_s", raw.connect_timeout_s, true),
        rpc_retry_deadline: c.duration("rpc_retry_deadline_s", raw.rpc_retry_deadline_s, true),
        bucket_mb: c.count("bucket_mb", raw.bucket_mb, " (gradient bucket size in MiB)"),
        lock_wait: c.duration("lock_wait_s", raw.lock_wait_s, true),
    };
    if !config.heartbeat.is_zero()
        && !config.lease.is_zero()
        && config.lease <= config.silent_after()
    {
        c.problem(
            "cluster.lease_s",
            format!(
                "cluster.lease_s = {} must be more than {SILENT_HEARTBEATS} x cluster.heartbeat_s = {}: \
                 a worker is dropped only after it missed several heartbeats",
                seconds(config.lease),
                seconds(config.silent_after())
            ),
        );
    }
    c.below(
        ("collective_timeout_s", config.collective_timeout),
        ("regroup_wait_s", config.regroup_wait),
        "survivors whose collective hangs on a lost peer must give up and check in before \
         the next generation forms without them",
    );
    c.below(
        ("regroup_wait_s", config.regroup_wait),
        ("shutdown_grace_s", config.shutdown_grace),
        "a shutdown during a regroup must still have time to drain and checkpoint",
    );
    c.below(
        ("long_poll_s", config.long_poll),
        ("shutdown_grace_s", config.shutdown_grace),
        "a held assignment call must answer before the coordinator exits",
    );
    if c.problems.is_empty() {
        Ok(config)
    } else {
        Err(c.problems)
    }
}
