//! The coordinator's command line, shared by `hsat coordinator` and the
//! libtorch-free `hsat-coordinator` binary (and `hsat run --workers`, which reuses
//! the membership flags).
//!
//! What a deployment (the manifests under `k8s/`) relies on:
//!
//! - exit codes: [`hsat_core::exit`] (0 finished, 1 failed, 2 usage, 75 retryable,
//!   78 refused); `podFailurePolicy` fails the Job on 1, 2 and 78;
//! - single instance: the flock on `<out_dir>/coordinator/lock` ([`crate::lock`]),
//!   waited for up to `cluster.lock_wait_s` (`HSAT__CLUSTER__LOCK_WAIT_S`, default
//!   120), then exit 75;
//! - ports: gRPC `--listen` (50051), metrics `--metrics-listen` / `metrics.listen`
//!   (9464); a worker's metrics `--metrics-listen` / `metrics.worker_listen` (9465);
//!   the collective (c10d TCPStore on rank 0, Gloo/NCCL) uses free ports between
//!   workers, bounded in time by `cluster.collective_timeout_s`;
//! - probes: `grpc.health.v1.Health` on the gRPC port, service `""` (or
//!   `hsat.v1.Coordinator`), no token: NOT_SERVING from bind until the dataset is
//!   indexed and the ledger read, SERVING while the job runs, NOT_SERVING while it
//!   drains;
//! - worker devices: `hsat worker --device auto|cpu|cuda|cuda:N`, `HSAT_DEVICE`,
//!   `LOCAL_RANK` (`hsat_worker::cluster::device`);
//! - the job token: `--token-file`, `HSAT_TOKEN_FILE`, `HSAT_TOKEN`,
//!   `security.token_file`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hsat_metrics::MetricsServer;

use hsat_core::config::{self, Config, ConfigSources};
use hsat_proto::auth::{ServerAuth, Token, resolve_token};
use hsat_proto::server::{Limits, ServerOptions};
use hsat_proto::tls::TlsFiles;
use tonic::transport::ClientTlsConfig;

use crate::durable::{self, StartMode};
use crate::metrics::CoordinatorMetrics;
use crate::{ClusterSettings, CoordinatorError, JobOutcome, load_job, serve_job_with};

/// Membership and lease flags: each overrides its `[cluster]` key (shown in
/// brackets; defaults in `docs/config.md`) and is validated with the rest.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MembershipArgs {
    /// Fewest live workers that may train; below it the job pauses
    /// [cluster.min_workers].
    #[arg(long)]
    pub min_workers: Option<usize>,
    /// Seconds after the first registration before training may start with
    /// --min-workers instead of all workers [cluster.formation_wait_s].
    #[arg(long)]
    pub formation_wait_s: Option<f64>,
    /// Milliseconds between worker heartbeats [cluster.heartbeat_s].
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Milliseconds without a heartbeat after which a worker is dropped
    /// [cluster.lease_s].
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Seconds to wait after a generation breaks for every live worker before going
    /// on without the missing ones [cluster.regroup_wait_s].
    #[arg(long)]
    pub regroup_wait_s: Option<f64>,
    /// Seconds to drain, checkpoint and exit on SIGTERM (and to get workers their
    /// stop at the end) [cluster.shutdown_grace_s].
    #[arg(long)]
    pub grace_s: Option<f64>,
}

impl MembershipArgs {
    /// The flags given, as `--set cluster.*` overrides (appended after the user's,
    /// so a flag wins).
    pub fn overrides(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(n) = self.min_workers {
            sets.push(format!("cluster.min_workers={n}"));
        }
        if let Some(s) = self.formation_wait_s {
            sets.push(format!("cluster.formation_wait_s={}", float(s)));
        }
        if let Some(ms) = self.heartbeat_ms {
            sets.push(format!("cluster.heartbeat_s={}", float(ms as f64 / 1000.0)));
        }
        if let Some(ms) = self.lease_ms {
            sets.push(format!("cluster.lease_s={}", float(ms as f64 / 1000.0)));
        }
        if let Some(s) = self.regroup_wait_s {
            sets.push(format!("cluster.regroup_wait_s={}", float(s)));
        }
        if let Some(s) = self.grace_s {
            sets.push(format!("cluster.shutdown_grace_s={}", float(s)));
        }
        sets
    }
}

/// A float as a TOML float (`3` would be read back as an integer, which float keys
/// accept too, but `3.0` keeps the type obvious in messages).
fn float(value: f64) -> String {
    format!("{value:?}")
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
    /// Workers to wait for before training starts [cluster.workers].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Membership and lease settings.
    #[command(flatten)]
    pub membership: MembershipArgs,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (IP:PORT; port 0 picks a
    /// free port, printed on stdout; "" = off) [metrics.listen].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Archive the job already in infra.out_dir (ledger and checkpoints, to
    /// `<out_dir>/archive/<job id>/`) and start this one; without it the same job
    /// is resumed and a different one is refused.
    #[arg(long)]
    pub new_job: bool,
    /// File holding the job token every call must carry (also HSAT_TOKEN_FILE,
    /// HSAT_TOKEN, security.token_file); the workers and `hsat status` use the same.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Serve without authentication [security.insecure]: anyone reaching the port
    /// can join the job, act for any worker and read its status.
    #[arg(long)]
    pub insecure: bool,
}

impl CoordinatorArgs {
    /// Where the job's config comes from: file, `HSAT__` environment, `--set`, then
    /// the cluster flags.
    pub fn sources(&self) -> ConfigSources {
        let mut overrides = self.set.clone();
        if let Some(workers) = self.workers {
            overrides.push(format!("cluster.workers={workers}"));
        }
        overrides.extend(self.membership.overrides());
        if let Some(address) = &self.metrics_listen {
            overrides.push(format!("metrics.listen={address:?}"));
        }
        ConfigSources::from_process_env(self.config.clone(), overrides)
    }
}

/// Runs a coordinator process, in this order:
///
/// 1. loads and validates the config (a bad one ends here, before any port);
/// 2. takes the job's lock, `<out_dir>/coordinator/lock` ([`crate::lock`]),
///    waiting up to `cluster.lock_wait_s` while another coordinator holds it;
/// 3. binds, prints `<name>: listening on ADDR` (and `<name>: metrics on
///    http://ADDR/metrics` when `metrics.listen` is set) and answers
///    `grpc.health.v1` NOT_SERVING ([`crate::service::StartingServer`]) while it
///    indexes the dataset and decides whether the job is new, resumed or finished
///    ([`durable`]);
/// 4. serves the job (health SERVING) until it ends or SIGTERM / Ctrl-C.
///
/// The lock is held until this function returns.
pub fn run_coordinator(name: &str, args: CoordinatorArgs) -> Result<JobOutcome, CoordinatorError> {
    let config = config::load(&args.sources())?;
    let token = if args.insecure || config.security.insecure {
        None
    } else {
        Some(
            resolve_token(
                args.token_file.as_deref(),
                |key| std::env::var(key).ok(),
                config.security.token_file.as_deref(),
            )?
            .ok_or(CoordinatorError::NoToken)?,
        )
    };
    let metrics = Arc::new(CoordinatorMetrics::new());
    let server = server_options(&config, token, &metrics)?;
    let settings = ClusterSettings::from_config(&config.cluster);
    let metrics_listen = config.metrics.listen;
    // The metrics port speaks TLS with the gRPC port's certificate (and client CA).
    let metrics_tls = hsat_proto::tls::server_config(&TlsFiles::from_config(&config.security))?;
    let mode = if args.new_job {
        StartMode::NewJob
    } else {
        StartMode::Auto
    };
    // Before anything of the job is read or written: one coordinator per job.
    let _lock = crate::lock::acquire(
        &config.infra.out_dir.join("coordinator"),
        config.cluster.lock_wait,
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CoordinatorError::Runtime)?;
    runtime.block_on(async {
        let listen_error = |source| CoordinatorError::Listen {
            address: args.listen.clone(),
            source,
        };
        // Two handles on one socket: the start-up server answers health checks on
        // one while the job loads, the job's server takes over on the other.
        let socket = std::net::TcpListener::bind(&args.listen).map_err(listen_error)?;
        socket.set_nonblocking(true).map_err(listen_error)?;
        let starting_socket = socket.try_clone().map_err(listen_error)?;
        let listener = tokio::net::TcpListener::from_std(socket).map_err(listen_error)?;
        let address = listener.local_addr().map_err(CoordinatorError::Stdout)?;
        println!("{name}: listening on {address}");
        let _endpoint = match metrics_listen {
            Some(address) => {
                let endpoint = serve_metrics(address, &metrics, metrics_tls).await?;
                println!("{name}: metrics on {}", endpoint.url());
                Some(endpoint)
            }
            None => None,
        };
        std::io::stdout()
            .flush()
            .map_err(CoordinatorError::Stdout)?;
        if !server.auth.is_enabled() {
            warn_insecure(&address.to_string());
        }
        let starting = crate::service::serve_starting(
            tokio::net::TcpListener::from_std(starting_socket).map_err(listen_error)?,
            &server,
            &metrics,
        )
        .await;
        tracing::info!(
            dataset = ?config.data.source,
            "loading the job (indexing the dataset, reading the ledger); health is NOT_SERVING until it is ready"
        );
        let loaded = tokio::task::spawn_blocking(move || {
            let job = load_job(config)?;
            let start = durable::prepare(&job, mode)?;
            Ok::<_, CoordinatorError>((job, start))
        })
        .await
        .map_err(|err| CoordinatorError::Server(format!("loading the job panicked: {err}")))?;
        starting.stop().await;
        let (job, start) = loaded?;
        serve_job_with(
            job,
            start,
            settings,
            server,
            listener,
            metrics,
            shutdown_signal(),
        )
        .await
    })
}

/// Serves `metrics` at `http://address/metrics` (`https://` with `tls`, the
/// gRPC port's [`hsat_proto::tls::server_config`]) on the current runtime until
/// the returned server is dropped.
pub async fn serve_metrics(
    address: std::net::SocketAddr,
    metrics: &Arc<CoordinatorMetrics>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> Result<MetricsServer, CoordinatorError> {
    let listener = hsat_metrics::http::bind(&address.to_string())
        .await
        .map_err(CoordinatorError::Metrics)?;
    let exposition: Arc<dyn hsat_metrics::Exposition> = Arc::clone(metrics) as _;
    Ok(MetricsServer::spawn_with_tls(listener, exposition, tls))
}

/// The server options of `config`'s `[security]` section: every call must carry
/// `token`, or (`None`) no authentication at all; TLS when it names a certificate.
/// Refused calls are counted in `metrics` (`hsat_auth_failures_total{reason}`).
pub fn server_options(
    config: &Config,
    token: Option<Token>,
    metrics: &Arc<CoordinatorMetrics>,
) -> Result<ServerOptions, CoordinatorError> {
    let auth = match token {
        Some(token) => ServerAuth::new(token),
        None => ServerAuth::insecure(),
    };
    let count = metrics.auth_failure_hook();
    let auth = auth.with_failure_hook(Arc::new(move |failure| count(failure.label())));
    Ok(ServerOptions {
        auth: Arc::new(auth),
        limits: Limits::from_config(&config.security),
        tls: hsat_proto::tls::server_tls(&TlsFiles::from_config(&config.security))?,
    })
}

/// A client's TLS from `config`'s `[security]` (`tls_ca`, and `tls_cert` +
/// `tls_key` for mutual TLS); `None`: plain HTTP/2.
pub fn client_tls(config: &Config) -> Result<Option<ClientTlsConfig>, CoordinatorError> {
    Ok(hsat_proto::tls::client_tls(&TlsFiles::from_config(
        &config.security,
    ))?)
}

/// Says what serving without authentication exposes.
pub fn warn_insecure(address: &str) {
    tracing::warn!(
        %address,
        "authentication is OFF (--insecure): anyone who can reach this port can register as a worker \
         and receive the data plan, act for any worker (leave, report steps, fail the job with a forged \
         checksum) and read the job's status; run it only on an isolated network"
    );
}

/// Reads the job token a client (`hsat worker`, `hsat status`) sends: `flag`, then
/// `HSAT_TOKEN`, `HSAT_TOKEN_FILE`, then `security.token_file`; `None` when none
/// is configured (a coordinator started with `--insecure` needs none).
pub fn client_token(
    flag: Option<&Path>,
    config: &Config,
) -> Result<Option<Token>, CoordinatorError> {
    Ok(resolve_token(
        flag,
        |key| std::env::var(key).ok(),
        config.security.token_file.as_deref(),
    )?)
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
