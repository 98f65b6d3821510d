//! Comparing configs: which keys may differ between the processes of one job, the
//! leaf-by-leaf differences of two configs, and a fingerprint of what must match.
//!
//! A worker joins a job, and a run resumes a job, only when their configs equal the
//! job's up to [`WORKER_LOCAL_KEYS`]; refusals list [`config_differences`], and
//! ledgers and checkpoints record [`config_fingerprint`].

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Keys (dotted prefixes) that may differ between machines and between the runs of
/// one job: threads, output and logging, where the dataset is mounted (the dataset
/// fingerprint covers its content, whatever the path), the per-process cluster
/// and metrics settings, and checkpoint retention and writing (they do not change what is trained).
pub const WORKER_LOCAL_KEYS: &[&str] = &[
    "data.loader",
    "data.db_root",
    "data.manifest",
    "infra.threads",
    "infra.out_dir",
    "infra.log_every",
    "cluster",
    "metrics",
    "security",
    "training.keep_checkpoints",
    "training.keep_checkpoint_every",
    "training.async_checkpoints",
];

/// One config leaf that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Dotted key, `training.learn_rate`.
    pub key: String,
    /// The newcomer's value (a worker's, a new run's) as JSON text; `missing` when absent.
    pub found: String,
    /// The job's value (the coordinator's, the ledger's).
    pub expected: String,
}

/// Leaf-by-leaf differences of two configs in `Config::to_json_value` form, sorted
/// by key, ignoring [`WORKER_LOCAL_KEYS`].
pub fn config_differences(found: &Value, expected: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    walk("", Some(found), Some(expected), &mut out);
    out
}

/// Hex SHA-256 of the config's leaves outside [`WORKER_LOCAL_KEYS`], one
/// `key=value` line each in key order: equal exactly when [`config_differences`]
/// finds nothing, whatever the key order of the JSON.
pub fn config_fingerprint(config: &Value) -> String {
    let mut leaves = Vec::new();
    collect_leaves("", config, &mut leaves);
    leaves.sort();
    let mut hasher = Sha256::new();
    for (key, value) in leaves {
        hasher.update(key.as_bytes());
        hasher.update(b"=");
        hasher.update(value.as_bytes());
        hasher.update(b"\n");
    }
    compare_hex(&hasher.finalize())
}

/// Lower-case hex of `bytes`.
pub(crate) fn compare_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn is_local(key: &str) -> bool {
    WORKER_LOCAL_KEYS.iter().any(|local| {
        key == *local
            || key
                .strip_prefix(local)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

fn child_key(key: &str, name: &str) -> String {
    if key.is_empty() {
        name.to_owned()
    } else {
        format!("{key}.{name}")
    }
}

fn collect_leaves(key: &str, value: &Value, out: &mut Vec<(String, String)>) {
    if is_local(key) {
        return;
    }
    match value {
        Value::Object(map) => {
            for (name, child) in map {
                collect_leaves(&child_key(key, name), child, out);
            }
        }
        leaf => out.push((key.to_owned(), leaf.to_string())),
    }
}

fn text(value: Option<&Value>) -> String {
    value.map_or_else(|| "missing".to_owned(), Value::to_string)
}

fn walk(key: &str, found: Option<&Value>, expected: Option<&Value>, out: &mut Vec<Difference>) {
    if is_local(key) {
        return;
    }
    match (found, expected) {
        (Some(Value::Object(f)), Some(Value::Object(e))) => {
            let mut keys: Vec<&String> = f.keys().chain(e.keys()).collect();
            keys.sort();
            keys.dedup();
            for name in keys {
                walk(&child_key(key, name), f.get(name), e.get(name), out);
            }
        }
        (f, e) if f != e => out.push(Difference {
            key: key.to_owned(),
            found: text(f),
            expected: text(e),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn json(toml: &str) -> Value {
        Config::from_toml_str(toml).unwrap().to_json_value()
    }

    #[test]
    fn differences_name_the_key_and_both_values_and_skip_local_keys() {
        let expected = json("[training]\nlearn_rate = 0.0001\n");
        let found = json(
            "[training]\nlearn_rate = 0.001\nkeep_checkpoints = 9\n[infra]\nthreads = 7\n[data.loader]\nprefetch = 5\n",
        );
        assert_eq!(
            config_differences(&found, &expected),
            vec![Difference {
                key: "training.learn_rate".into(),
                found: "0.001".into(),
                expected: "0.0001".into(),
            }]
        );
    }

    #[test]
    fn the_fingerprint_changes_exactly_when_a_job_key_differs() {
        let base = config_fingerprint(&json(""));
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            config_fingerprint(&json("[infra]\nthreads = 3\nout_dir = \"elsewhere\"\n")),
            "worker-local keys must not change the fingerprint"
        );
        assert_ne!(
            base,
            config_fingerprint(&json("[training]\nlearn_rate = 0.5\n"))
        );
        assert_ne!(base, config_fingerprint(&json("[infra]\nseed = 99\n")));
    }
}
