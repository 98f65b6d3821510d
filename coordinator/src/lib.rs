//! hsat-coordinator: owns a distributed job (membership, the data plan, the step
//! ledger, checkpoints) and hands hierarchical batches to workers over gRPC. It
//! never links libtorch: the coordinator image runs anywhere.
//!
//! Stage in the pipeline: dataset index -> sampler -> **scheduler** -> gRPC
//! assignment -> worker ... -> step report -> **scheduler** (commit, ledger).
//!
//! Layout:
//!
//! - [`scheduler`]: the pure state machine (`on_event(Event, now) -> Vec<Action>`):
//!   generations, leases, step issuing, commits, checksum checks. Its invariants
//!   are listed in `src/scheduler/README.md`.
//! - [`cli`]: the coordinator's flags and `run_coordinator`, shared by both binaries.
//! - [`identity`]: the config / dataset / version check of a registering worker.
//! - [`ledger`]: `<out_dir>/coordinator/ledger.jsonl`, fsynced per commit, and its
//!   reader (the job state a restart continues from).
//! - [`durable`]: what a (re)started coordinator does with the job in its
//!   `out_dir`: resume, report finished, refuse another job, archive (`--new-job`).
//! - [`checkpoints`]: the checkpoints under `<out_dir>/checkpoints` as the
//!   coordinator sees them (listing, verification, retention).
//! - [`lock`]: one coordinator per job: the exclusive lock on
//!   `<out_dir>/coordinator/lock`, held for the life of the process.
//! - [`local`]: a whole job on one machine (`hsat run --workers N`): the
//!   coordinator in-process and N supervised worker processes.
//! - [`logging`]: `--log-format text|json`, the level from `HSAT_LOG`/`RUST_LOG`,
//!   colours only on a terminal (both binaries and their worker processes).
//! - [`metrics`]: the coordinator's Prometheus metrics (job, control plane,
//!   checkpoints, robustness telemetry), kept current by the service.
//! - [`recovery_bench`]: `hsat bench recovery`: a small real job whose processes
//!   are killed with SIGKILL, timed to the next committed step.
//! - [`service`]: the async shell: the gRPC handler over the scheduler, leases on
//!   tokio time, long polls, graceful shutdown ([`serve`]).
//! - `sim` (feature `sim`): simulated workers (the worker protocol with fake
//!   training) for the in-process harness and the control-plane benchmark.
//! - `bench` (feature `sim`): the control-plane benchmark (`hsat bench
//!   control-plane`): simulated workers against a coordinator process.
//!
//! Use: `let job = load_job(config)?; serve(job, settings, listener, shutdown).await`.

#[cfg(feature = "sim")]
pub mod bench;
pub mod checkpoints;
pub mod cli;
pub mod durable;
pub mod identity;
pub mod ledger;
pub mod local;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod recovery_bench;
pub mod scheduler;
pub mod service;
#[cfg(feature = "sim")]
pub mod sim;

use std::path::PathBuf;
use std::sync::Arc;

use hsat_core::config::{Config, DataSource};
use hsat_core::dataset::{DatasetError, DatasetIndex, Split, check};
use hsat_core::sampler::{balanced_patients, steps_per_epoch};

pub use durable::StartMode;
pub use scheduler::{ClusterSettings, JobPlan, Scheduler};
pub use service::{JobOutcome, OutcomeKind, serve, serve_job, serve_job_with};

/// Why the coordinator cannot run a job.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// `data.source` is synthetic.
    #[error(
        "distributed runs need a dataset on disk (data.source is \"synthetic\"); make one with \
         `hsat synth` and set data.source to \"opensrh\" or \"manifest\""
    )]
    SyntheticData,
    /// The dataset could not be indexed.
    #[error("cannot index the dataset")]
    Dataset(#[from] DatasetError),
    /// The dataset has errors.
    #[error("the dataset has errors; `hsat data check` gives the full report:\n{0}")]
    DatasetCheck(String),
    /// Invalid cluster settings.
    #[error("invalid cluster settings: {0}")]
    Settings(String),
    /// The ledger cannot be created.
    #[error("cannot open the ledger {} (check that infra.out_dir is writable)", path.display())]
    Ledger {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The ledger could not be written.
    #[error("cannot write the ledger {}: {message} (check free space and permissions)", path.display())]
    LedgerWrite {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The ledger cannot be read back.
    #[error(
        "the ledger {} is damaged: {message}; move it away (or start with --new-job) to start the job again",
        path.display()
    )]
    LedgerCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
    /// `--resume` without a job to resume.
    #[error(
        "nothing to resume: {} does not exist or is empty; start without --resume to begin the job",
        ledger.display()
    )]
    NothingToResume {
        /// The ledger looked for.
        ledger: PathBuf,
    },
    /// The out_dir holds another job.
    #[error(
        "the out_dir holds another job ({}) that differs at {differences}; run with that job's config \
         and dataset to resume it, choose another infra.out_dir, or pass --new-job to archive it \
         and start this one",
        ledger.display()
    )]
    OtherJob {
        /// Its ledger.
        ledger: PathBuf,
        /// Every difference, `key: ledger X, now Y`.
        differences: String,
    },
    /// The old job could not be archived (`--new-job`).
    #[error("cannot archive the previous job to {}: {message}", target.display())]
    Archive {
        /// The archive directory.
        target: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Server(String),
    /// The job's config could not be loaded.
    #[error(transparent)]
    Config(#[from] hsat_core::config::ConfigError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {address} (is the port in use?)")]
    Listen {
        /// The address asked for.
        address: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The metrics endpoint could not be started.
    #[error(transparent)]
    Metrics(hsat_metrics::MetricsError),
    /// No job token and no `--insecure`.
    #[error(
        "no job token: the coordinator authenticates every call. Give one with --token-file PATH, \
         HSAT_TOKEN_FILE, HSAT_TOKEN or security.token_file (e.g. `head -c 32 /dev/urandom | xxd -p -c 64 \
         > token; chmod 600 token`; in Kubernetes mount it from a Secret), or pass --insecure to serve \
         without authentication on an isolated network"
    )]
    NoToken,
    /// The job token could not be read or made.
    #[error(transparent)]
    Token(#[from] hsat_proto::auth::AuthError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] hsat_proto::tls::TlsError),
    /// The listening address could not be printed.
    #[error("cannot print the listening address")]
    Stdout(#[source] std::io::Error),
    /// Another coordinator kept the job's lock for all of `cluster.lock_wait_s`.
    #[error(
        "another coordinator holds this job ({}: {holder}) and kept it for {:.0} s \
         (cluster.lock_wait_s): only one coordinator may write a job's ledger. Stop the other \
         one, or wait for it to exit and start again",
        path.display(),
        waited.as_secs_f64()
    )]
    LockHeld {
        /// The lock file, `<out_dir>/coordinator/lock`.
        path: PathBuf,
        /// Who holds it (pid, host, since), from its note in the file.
        holder: String,
        /// How long this coordinator waited.
        waited: std::time::Duration,
    },
    /// The lock file could not be opened, locked or written.
    #[error("cannot lock {} (check that infra.out_dir is writable)", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
}

/// The exit status of each way a coordinator cannot run its job
/// ([`hsat_core::exit`]): the config, flags, credentials, dataset and a different
/// job in the out_dir are refusals (78) that no restart fixes; a damaged ledger
/// fails the job (1) until a person moves it away; the rest (I/O, a port in use,
/// another coordinator still holding the job) may pass with a restart (75).
impl hsat_core::exit::ExitClass for CoordinatorError {
    fn exit(&self) -> hsat_core::exit::Exit {
        use hsat_core::exit::Exit;
        match self {
            CoordinatorError::SyntheticData
            | CoordinatorError::Dataset(_)
            | CoordinatorError::DatasetCheck(_)
            | CoordinatorError::Settings(_)
            | CoordinatorError::NothingToResume { .. }
            | CoordinatorError::OtherJob { .. }
            | CoordinatorError::Config(_)
            | CoordinatorError::NoToken
            | CoordinatorError::Token(_)
            | CoordinatorError::Tls(_) => Exit::Refused,
            CoordinatorError::LedgerCorrupt { .. } => Exit::Failed,
            CoordinatorError::Ledger { .. }
            | CoordinatorError::LedgerWrite { .. }
            | CoordinatorError::Archive { .. }
            | CoordinatorError::Server(_)
            | CoordinatorError::Runtime(_)
            | CoordinatorError::Listen { .. }
            | CoordinatorError::Metrics(_)
            | CoordinatorError::Stdout(_)
            | CoordinatorError::LockHeld { .. }
            | CoordinatorError::Lock { .. } => Exit::Retryable,
        }
    }
}

/// A job: its validated config and data plan.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's config (workers must present an equal one).
    pub config: Config,
    /// What each step trains.
    pub plan: JobPlan,
}

impl Job {
    /// The job over an already loaded index (tests build indexes in memory).
    pub fn from_index(config: Config, index: DatasetIndex) -> Self {
        let balanced = balanced_patients(
            &index,
            Split::Train,
            config.infra.seed,
            config.data.balance_study_per_class,
        );
        let per_epoch = steps_per_epoch(balanced.len(), config.training.batch_size);
        let plan = JobPlan {
            index: Arc::new(index),
            balanced: Arc::new(balanced),
            seed: config.infra.seed,
            batch_size: config.training.batch_size,
            sampling: config.data.hidisc,
            steps_per_epoch: per_epoch,
            total_steps: per_epoch * config.training.num_epochs as u64,
        };
        Self { config, plan }
    }

    /// The dataset fingerprint workers must match.
    pub fn dataset_fingerprint(&self) -> &str {
        &self.plan.index.fingerprint
    }

    /// Where the ledger goes: `<infra.out_dir>/coordinator`.
    pub fn coordinator_dir(&self) -> PathBuf {
        self.config.infra.out_dir.join("coordinator")
    }
}

/// Indexes and checks the config's dataset (as `hsat run` does) and computes the
/// plan: total steps = `steps_per_epoch(balanced, batch_size) * num_epochs`, as the
/// single-process trainer.
pub fn load_job(config: Config) -> Result<Job, CoordinatorError> {
    if config.data.source == DataSource::Synthetic {
        return Err(CoordinatorError::SyntheticData);
    }
    let index = DatasetIndex::load(&config.data)?;
    let report = check::quick_check(&index);
    if !report.is_ok() {
        return Err(CoordinatorError::DatasetCheck(report.render()));
    }
    Ok(Job::from_index(config, index))
}
