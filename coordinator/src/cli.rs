//! The coordinator's command line, shared by `hsat coordinator` and the
//! libtorch-free `hsat-coordinator` binary (and `hsat run --workers`, which reuses
//! the membership flags).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use hsat_core::config::{self, ConfigSources};

use crate::durable::{self, StartMode};
use crate::{ClusterSettings, CoordinatorError, JobOutcome, load_job, serve_job};

/// Membership and lease flags.
#[derive(Debug, Clone, clap::Args)]
pub struct MembershipArgs {
    /// Fewest live workers training may continue with after losing some.
    #[arg(long, default_value_t = 1)]
    pub min_workers: usize,
    /// Milliseconds between worker heartbeats.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Milliseconds without a heartbeat after which a worker is dropped.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u64,
    /// Seconds to wait for workers to get their stop at the end (and on SIGTERM).
    #[arg(long, default_value_t = 30)]
    pub grace_s: u64,
}

impl MembershipArgs {
    /// The cluster settings for a job of `workers` workers.
    pub fn settings(&self, workers: usize) -> ClusterSettings {
        let mut settings = ClusterSettings::new(workers);
        settings.min_workers = self.min_workers;
        settings.heartbeat = Duration::from_millis(self.heartbeat_ms);
        settings.lease = Duration::from_millis(self.lease_ms);
        settings.regroup_wait = settings.lease;
        settings.shutdown_grace = Duration::from_secs(self.grace_s);
        settings
    }
}

/// Flags of a coordinator process.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// TOML config file of the job (workers must use the same one).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set training.num_epochs=2`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub listen: String,
    /// Workers to wait for before training starts.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Membership and lease settings.
    #[command(flatten)]
    pub membership: MembershipArgs,
    /// Archive the job already in infra.out_dir (ledger and checkpoints, to
    /// `<out_dir>/archive/<job id>/`) and start this one; without it the same job
    /// is resumed and a different one is refused.
    #[arg(long)]
    pub new_job: bool,
}

/// Loads the job, decides whether it is new, resumed or finished (see
/// [`durable`]), binds, prints `<name>: listening on ADDR` and serves until the job
/// ends or SIGTERM / Ctrl-C.
pub fn run_coordinator(name: &str, args: CoordinatorArgs) -> Result<JobOutcome, CoordinatorError> {
    let settings = args.membership.settings(args.workers);
    settings.validate().map_err(CoordinatorError::Flags)?;
    let config = config::load(&ConfigSources::from_process_env(args.config, args.set))?;
    let job = load_job(config)?;
    let mode = if args.new_job {
        StartMode::NewJob
    } else {
        StartMode::Auto
    };
    let start = durable::prepare(&job, mode)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CoordinatorError::Runtime)?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|source| CoordinatorError::Listen {
                address: args.listen.clone(),
                source,
            })?;
        let address = listener.local_addr().map_err(CoordinatorError::Stdout)?;
        println!("{name}: listening on {address}");
        std::io::stdout()
            .flush()
            .map_err(CoordinatorError::Stdout)?;
        serve_job(job, start, settings, listener, shutdown_signal()).await
    })
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::warn!("stopping on a signal: draining");
}
