//! What a worker must share with the coordinator to join: the same effective
//! config (up to worker-local keys), the same dataset and the same hsat version.

pub use hsat_core::config::{
    Difference, WORKER_LOCAL_KEYS, config_differences, config_fingerprint,
};
use hsat_proto::domain::Registration;
use serde_json::Value;

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
                .map(|d| format!("{}: worker {}, coordinator {}", d.key, d.found, d.expected))
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

#[cfg(test)]
mod tests {
    use super::*;
    use hsat_core::config::Config;

    #[test]
    fn a_differing_config_is_refused_naming_the_key_and_both_values() {
        let coordinator = Config::from_toml_str("[training]\nlearn_rate = 0.0001\n").unwrap();
        let worker = Config::from_toml_str(
            "[training]\nlearn_rate = 0.001\n[infra]\nthreads = 7\n[data.loader]\nprefetch = 5\n\
             [cluster]\ncollective_timeout_s = 5\nbucket_mb = 4\n",
        )
        .unwrap();
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
        let err = identity.check(&registration).unwrap_err();
        assert_eq!(
            err,
            "config differs from the coordinator's at training.learn_rate: worker 0.001, coordinator 0.0001; \
             start the worker with the job's config file"
        );
    }
}
