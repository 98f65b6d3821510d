//! What a worker must share with the coordinator to join: the same effective
//! config (up to worker-local keys), the same dataset and the same hsat version.

use hsat_proto::domain::Registration;
use serde_json::Value;

/// Keys (dotted prefixes) that may differ between machines: threads, output and
/// logging, and where the dataset is mounted (the dataset fingerprint covers its
/// content, whatever the path).
pub const WORKER_LOCAL_KEYS: &[&str] = &[
    "data.loader",
    "data.db_root",
    "data.manifest",
    "infra.threads",
    "infra.out_dir",
    "infra.log_every",
];

/// The job's identity a registering worker is checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct JobIdentity {
    /// The coordinator's config, `Config::to_json_value`.
    pub config: Value,
    /// The dataset fingerprint.
    pub dataset_fingerprint: String,
    /// The hsat version.
    pub hsat_version: String,
}

impl JobIdentity {
    /// `Err` with every difference, one message, naming what to do.
    pub fn check(&self, registration: &Registration) -> Result<(), String> {
        if registration.hsat_version != self.hsat_version {
            return Err(format!(
                "hsat version differs: worker {}, coordinator {}; run the same hsat build on every machine",
                registration.hsat_version, self.hsat_version
            ));
        }
        let differences = config_differences(&registration.config, &self.config);
        if !differences.is_empty() {
            let listed = differences
                .iter()
                .map(|d| {
                    format!(
                        "{}: worker {}, coordinator {}",
                        d.key, d.worker, d.coordinator
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(format!(
                "config differs from the coordinator's at {listed}; start the worker with the job's config file"
            ));
        }
        if registration.dataset_fingerprint != self.dataset_fingerprint {
            return Err(format!(
                "dataset differs: worker fingerprint {}, coordinator {}; point the worker at the job's dataset \
                 (same files, labels and splits; `hsat data check` prints the fingerprint)",
                registration.dataset_fingerprint, self.dataset_fingerprint
            ));
        }
        Ok(())
    }
}

/// SHA-256 (hex) of the canonical JSON (keys sorted) of `config` without
/// [`WORKER_LOCAL_KEYS`]: equal for two configs exactly when
/// [`config_differences`] finds none.
pub fn config_fingerprint(config: &Value) -> String {
    use sha2::Digest;
    let shared = without_local("", config);
    let digest = sha2::Sha256::digest(shared.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn without_local(key: &str, value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter_map(|(name, child)| {
                    let child_key = if key.is_empty() {
                        name.clone()
                    } else {
                        format!("{key}.{name}")
                    };
                    (!is_local(&child_key))
                        .then(|| (name.clone(), without_local(&child_key, child)))
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// One config leaf that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Dotted key, `training.learn_rate`.
    pub key: String,
    /// The worker's value as JSON text (`missing` when absent).
    pub worker: String,
    /// The coordinator's value.
    pub coordinator: String,
}

/// Leaf-by-leaf differences of two configs in raw JSON form, sorted by key,
/// ignoring [`WORKER_LOCAL_KEYS`].
pub fn config_differences(worker: &Value, coordinator: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    walk("", Some(worker), Some(coordinator), &mut out);
    out
}

fn is_local(key: &str) -> bool {
    WORKER_LOCAL_KEYS.iter().any(|local| {
        key == *local
            || key
                .strip_prefix(local)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

fn text(value: Option<&Value>) -> String {
    value.map_or_else(|| "missing".to_owned(), Value::to_string)
}

fn walk(key: &str, worker: Option<&Value>, coordinator: Option<&Value>, out: &mut Vec<Difference>) {
    if is_local(key) {
        return;
    }
    match (worker, coordinator) {
        (Some(Value::Object(w)), Some(Value::Object(c))) => {
            let mut keys: Vec<&String> = w.keys().chain(c.keys()).collect();
            keys.sort();
            keys.dedup();
            for name in keys {
                let child = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                walk(&child, w.get(name), c.get(name), out);
            }
        }
        (w, c) if w != c => out.push(Difference {
            key: key.to_owned(),
            worker: text(w),
            coordinator: text(c),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsat_core::config::Config;

    #[test]
    fn differences_name_the_key_and_both_values_and_skip_local_keys() {
        let coordinator = Config::from_toml_str("[training]\nlearn_rate = 0.0001\n").unwrap();
        let worker = Config::from_toml_str(
            "[training]\nlearn_rate = 0.001\n[infra]\nthreads = 7\n[data.loader]\nprefetch = 5\n",
        )
        .unwrap();
        let diffs = config_differences(&worker.to_json_value(), &coordinator.to_json_value());
        assert_eq!(
            diffs,
            vec![Difference {
                key: "training.learn_rate".into(),
                worker: "0.001".into(),
                coordinator: "0.0001".into(),
            }]
        );
        let identity = JobIdentity {
            config: coordinator.to_json_value(),
            dataset_fingerprint: "abc".into(),
            hsat_version: "1".into(),
        };
        let registration = Registration {
            worker_name: "w".into(),
            config: worker.to_json_value(),
            dataset_fingerprint: "abc".into(),
            advertise_host: "h".into(),
            hsat_version: "1".into(),
        };
        assert_ne!(
            config_fingerprint(&worker.to_json_value()),
            config_fingerprint(&coordinator.to_json_value())
        );
        let mut same = coordinator.clone();
        same.infra.threads = 3;
        assert_eq!(
            config_fingerprint(&same.to_json_value()),
            config_fingerprint(&coordinator.to_json_value()),
            "worker-local keys do not change the fingerprint"
        );
        let err = identity.check(&registration).unwrap_err();
        assert_eq!(
            err,
            "config differs from the coordinator's at training.learn_rate: worker 0.001, coordinator 0.0001; \
             start the worker with the job's config file"
        );
    }
}
