//! The cost of the distributed step's options in one run: two local rank processes
//! train the same step with `training.loss_scope` local or global and
//! `training.sync_bn` off or on, round by round in turn, and each variant's median is
//! reported against local scope without sync BN (the reference's DDP semantics
//! without `SyncBatchNorm`). Global scope adds one embedding all-gather per PGD
//! iteration and per training forward pass; sync BN adds one all-gather per
//! batch-norm layer in each training forward pass and one all-reduce per layer in the
//! backward pass.
//!
//! This process is only the driver: it hosts the store, starts the ranks
//! (`<rank_program> bench sync --step --as-rank R ...`, which call [`step_rank`]) and
//! speaks the same line protocol as [`super::sync`] (`round <variant>` -> seconds).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hsat_core::config::{AttackKind, Backbone, Config, LossScope};
use tch::{Device, Kind, Tensor};

use super::sync::{Rank, ready_all, round_all_with};
use super::{BenchError, median};
use crate::collective::{Backend, GradientSync, ProcessGroup, Store};
use crate::train::distributed::{RankCollectives, train_rank_shard};
use crate::train::trainer::{ShardStep, Trainer};

const WORLD: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(300);

/// The variants, in the order they are reported; the first is the reference.
pub const VARIANTS: [(LossScope, bool); 4] = [
    (LossScope::Local, false),
    (LossScope::Local, true),
    (LossScope::Global, false),
    (LossScope::Global, true),
];

/// What to time.
#[derive(Debug, Clone)]
pub struct StepBenchOptions {
    /// Backbone by config name (`resnet18`, `resnet50`, `small_cnn`).
    pub backbone: String,
    /// Image side.
    pub image_size: usize,
    /// Patients of the whole step (split between the two ranks).
    pub patients: usize,
    /// PGD iterations.
    pub attack_iters: usize,
    /// Timed rounds per variant (after one warm-up round each).
    pub rounds: usize,
    /// Intra-op threads per rank process.
    pub threads: usize,
    /// The executable whose `bench sync --step --as-rank R ...` runs [`step_rank`].
    pub rank_program: PathBuf,
}

/// Seconds per round of one variant, sorted, and their median.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantTimes {
    /// `training.loss_scope`.
    pub loss_scope: LossScope,
    /// `training.sync_bn`.
    pub sync_bn: bool,
    /// Seconds per step (the slower rank's), sorted.
    pub seconds: Vec<f64>,
    /// Their median.
    pub median: f64,
}

/// Runs the benchmark as the driver; one entry per [`VARIANTS`] entry.
pub fn bench_distributed_step(options: &StepBenchOptions) -> Result<Vec<VariantTimes>, BenchError> {
    let store = Store::host("127.0.0.1", 0, WORLD, TIMEOUT)?;
    let mut ranks = Vec::new();
    for rank in 0..WORLD {
        let mut cmd = Command::new(&options.rank_program);
        cmd.args(["bench", "sync", "--step", "--as-rank", &rank.to_string()])
            .args(["--store-port", &store.port().to_string()])
            .args(["--threads", &options.threads.to_string()])
            .args(["--backbone", &options.backbone])
            .args(["--image-size", &options.image_size.to_string()])
            .args(["--patients", &options.patients.to_string()])
            .args(["--attack-iters", &options.attack_iters.to_string()]);
        ranks.push(
            Rank::start(cmd, "hsat rank").map_err(BenchError::io(format!(
                "starting a hsat rank ({})",
                options.rank_program.display()
            )))?,
        );
    }
    ready_all(&mut ranks)?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..=options.rounds {
        // Rotate the order so no variant always follows the same one.
        for k in 0..VARIANTS.len() {
            let variant = (k + round) % VARIANTS.len();
            let seconds = round_all_with(&mut ranks, &format!("round {variant}"))?;
            // Round 0 warms up every variant.
            if round > 0 {
                times[variant].push(seconds);
            }
        }
    }
    for rank in &mut ranks {
        rank.quit();
    }
    Ok(VARIANTS
        .iter()
        .zip(times)
        .map(|(&(loss_scope, sync_bn), mut seconds)| {
            let median = median(&mut seconds);
            VariantTimes {
                loss_scope,
                sync_bn,
                seconds,
                median,
            }
        })
        .collect())
}

/// The config of one variant.
fn variant_config(options: &StepBenchOptions, variant: usize) -> Result<Config, BenchError> {
    let (loss_scope, sync_bn) = VARIANTS[variant];
    let mut config = Config::default();
    config.model.backbone = options
        .backbone
        .parse::<Backbone>()
        .map_err(|e| BenchError::Reference(e.to_string()))?;
    config.model.init_checkpoint = None;
    config.training.attack.kind = AttackKind::Pgd;
    config.training.attack.iters = options.attack_iters;
    config.training.attack.warmup_epochs = 0;
    config.training.only_adv = false;
    config.training.loss_scope = loss_scope;
    config.training.sync_bn = sync_bn;
    config.infra.threads = options.threads;
    Ok(config)
}

/// One rank of the benchmark (the `--as-rank` process): `ready 0 0`, then one line of
/// seconds per `round <variant>` read on stdin, until `quit`.
pub fn step_rank(
    rank: usize,
    store_port: u16,
    options: &StepBenchOptions,
) -> Result<(), BenchError> {
    tch::set_num_threads(options.threads as i32);
    let store = Store::connect("127.0.0.1", store_port, WORLD, TIMEOUT)?;
    let pg = ProcessGroup::new(&store, "bench-step", rank, WORLD, Backend::Gloo, TIMEOUT)?;
    let mut trainers = (0..VARIANTS.len())
        .map(|v| variant_config(options, v).and_then(|c| Ok(Trainer::new(c, Device::Cpu)?)))
        .collect::<Result<Vec<_>, _>>()?;
    let batch_norm = RankCollectives::batch_norm_for(&pg, true)?;
    let mut gradients: Vec<GradientSync> = (0..VARIANTS.len())
        .map(|_| GradientSync::default())
        .collect();
    let patients = options.patients as i64;
    let first_row = patients * rank as i64 / WORLD as i64;
    let rows = patients * (rank as i64 + 1) / WORLD as i64 - first_row;
    let side = options.image_size as i64;
    tch::manual_seed(17);
    let whole = Tensor::f_rand(
        [patients, 2, 2, 2, 3, side, side],
        (Kind::Float, Device::Cpu),
    )?;
    let images = whole.f_narrow(0, first_row, rows)?;
    let mut step = 0u64;
    let mut one_round = |variant: usize| -> Result<f64, BenchError> {
        pg.barrier()?;
        let start = Instant::now();
        let trainer = &mut trainers[variant];
        train_rank_shard(
            trainer,
            RankCollectives {
                group: &pg,
                gradients: &mut gradients[variant],
                batch_norm: VARIANTS[variant].1.then(|| batch_norm.clone()).flatten(),
                bucket_bytes: crate::collective::DEFAULT_BUCKET_BYTES,
            },
            ShardStep {
                step,
                epoch: 0,
                total_steps: 1_000_000,
                images: &images,
                global_patients: patients,
                first_row,
            },
        )
        .map_err(|e| BenchError::Reference(format!("a distributed step failed: {e}")))?;
        step += 1;
        Ok(start.elapsed().as_secs_f64())
    };
    let mut out = std::io::stdout().lock();
    let io = BenchError::io;
    writeln!(out, "ready 0 0")
        .and_then(|()| out.flush())
        .map_err(io("writing to the driver"))?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(io("reading from the driver"))?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<usize>)) {
            (Some("quit"), _) => break,
            (Some("round"), Some(Ok(variant))) if variant < VARIANTS.len() => {
                let seconds = one_round(variant)?;
                writeln!(out, "{seconds:.6}")
                    .and_then(|()| out.flush())
                    .map_err(io("writing to the driver"))?;
            }
            _ => return Err(BenchError::Reference(format!("unknown command {line:?}"))),
        }
    }
    Ok(())
}
