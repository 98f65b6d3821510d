//! The exit status of `hsat` ([`hsat_core::exit`]): the error a subcommand ends
//! with is classified by the first error in its chain that knows its class (the
//! coordinator's, the worker's, the config's, ...); an outcome that is not an
//! error but not a success either (a job stopped before its end) is an [`Ended`].
//! An error nobody classified keeps the old meaning of a failure, 1.

use hsat_core::exit::{Exit, ExitClass};

/// A command that ran to an end other than success: a cancelled or failed job, a
/// worker drained before the job finished. Its message is what the user reads.
#[derive(Debug)]
pub struct Ended {
    /// The exit status.
    pub exit: Exit,
    /// What happened, and what to do.
    pub message: String,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Ended {}

impl Ended {
    /// An error of `exit` with `message`.
    pub fn with(exit: Exit, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Ended {
            exit,
            message: message.into(),
        })
    }
}

/// The exit status of `err`: the class of the outermost error of its chain that
/// has one, else [`Exit::Failed`].
pub fn classify(err: &anyhow::Error) -> Exit {
    use hsat_coordinator::CoordinatorError;
    use hsat_coordinator::local::LocalClusterError;
    use hsat_worker::cluster::device::DeviceError;
    use hsat_worker::error::WorkerError;

    for cause in err.chain() {
        if let Some(ended) = cause.downcast_ref::<Ended>() {
            return ended.exit;
        }
        if let Some(err) = cause.downcast_ref::<CoordinatorError>() {
            return err.exit();
        }
        if let Some(err) = cause.downcast_ref::<LocalClusterError>() {
            return match err {
                LocalClusterError::Coordinator(err) => err.exit(),
                LocalClusterError::NoWorkers
                | LocalClusterError::Config(_)
                | LocalClusterError::Token(_) => Exit::Refused,
                LocalClusterError::Runtime(_)
                | LocalClusterError::Listen(_)
                | LocalClusterError::Spawn { .. } => Exit::Retryable,
            };
        }
        if let Some(err) = cause.downcast_ref::<WorkerError>() {
            return err.exit();
        }
        if cause.downcast_ref::<DeviceError>().is_some() {
            return Exit::Refused;
        }
        // Another experiment in --out, no seeds or resamples, impossible dataset sizes:
        // nothing to retry until the command changes. Other repro errors are
        // classified by their cause (the next in the chain).
        if let Some(
            hsat_worker::repro::ReproError::OtherExperiment { .. }
            | hsat_worker::repro::ReproError::NoSeeds
            | hsat_worker::repro::ReproError::NoResamples
            | hsat_worker::repro::ReproError::Synth(hsat_data::synth::SynthError::Spec { .. }),
        ) = cause.downcast_ref::<hsat_worker::repro::ReproError>()
        {
            return Exit::Refused;
        }
        if let Some(err) = cause.downcast_ref::<hsat_core::config::ConfigError>() {
            return err.exit();
        }
        if let Some(err) = cause.downcast_ref::<hsat_core::dataset::DatasetError>() {
            return err.exit();
        }
        // A job token that cannot be read: a missing or unreadable Secret.
        if cause
            .downcast_ref::<hsat_proto::auth::AuthError>()
            .is_some()
        {
            return Exit::Refused;
        }
    }
    Exit::Failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outermost_classified_error_decides() {
        let refused = anyhow::Error::new(hsat_worker::error::WorkerError::Rpc {
            action: "register with the coordinator",
            source: hsat_proto::ApiError::Refused("config differs".into()),
        })
        .context("worker w1");
        assert_eq!(classify(&refused), Exit::Refused);
        let ended = Ended::with(Exit::Retryable, "drained").context("worker w1");
        assert_eq!(classify(&ended), Exit::Retryable);
        let lock = anyhow::Error::new(hsat_coordinator::CoordinatorError::LockHeld {
            path: "out/coordinator/lock".into(),
            holder: "pid 1 on a".into(),
            waited: std::time::Duration::from_secs(120),
        });
        assert_eq!(classify(&lock), Exit::Retryable);
        assert_eq!(classify(&anyhow::anyhow!("something else")), Exit::Failed);
    }
}
