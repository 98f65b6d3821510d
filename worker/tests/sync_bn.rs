//! Synchronised batch norm and the global loss scope with real processes: each test
//! re-executes this test binary (`--exact <test> --nocapture`) once per extra rank;
//! the parent process is rank 0 and hosts the store. A child learns its role from
//! `HSAT_SYNC_BN_ROLE` (`test:rank:world:port:prefix`). Gloo over loopback.
//!
//! - Parity of [`BatchNormSync`] with PyTorch's `SyncBatchNorm` on 2 and 3 ranks
//!   (unequal shards, one empty): outputs, input gradients, weight/bias gradients and
//!   running statistics. The fixtures come from `scripts/fixtures/syncbn_fixtures.py`;
//!   regenerate them with
//!
//!   ```text
//!   bash scripts/setup.sh
//!   ~/.cache/hsat/venv-torch-2.13.0/bin/python scripts/fixtures/syncbn_fixtures.py
//!   ```
//!
//! - With `training.sync_bn` and `training.loss_scope = "global"`, three distributed
//!   steps (PGD on, clean and adversarial passes) on 1, 2 and 3 ranks leave the same
//!   parameters and batch-norm statistics as three single-process steps on the whole
//!   batch. The test feeds each rank its rows of one batch, as the loader does (the
//!   sampler and the augmentations draw per patient slot, and the PGD start is drawn
//!   for the whole step, so the data of a step does not depend on the world size).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use hsat_core::config::{AttackKind, Backbone, Config, LossScope};
use hsat_worker::collective::{BatchNormSync, GradientSync, ProcessGroup};
use hsat_worker::train::distributed::{RankCollectives, train_rank_shard};
use hsat_worker::train::step::StepScope;
use hsat_worker::train::trainer::{ShardStep, Trainer};
use tch::{Device, Kind, Tensor};

mod support;
use support::ranks::Ranks;

/// Ranks of these tests: role in `HSAT_SYNC_BN_ROLE`.
const RANKS: Ranks = Ranks {
    role_env: "HSAT_SYNC_BN_ROLE",
    timeout: Duration::from_secs(60),
    child_limit: Duration::from_secs(120),
};

/// Largest absolute difference; two empty tensors of the same shape agree.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    ensure!(
        a.size() == b.size(),
        "shapes differ: {:?} vs {:?}",
        a.size(),
        b.size()
    );
    if a.numel() == 0 {
        return Ok(0.0);
    }
    Ok((a - b).abs().max().double_value(&[]))
}

// ---------------------------------------------------------------------------------
// SyncBatchNorm parity with PyTorch

/// Output tolerance of the parity test (the brief's bound; the differences are the
/// float32 summation order of the statistics, ~1e-7).
const TOLERANCE: f64 = 1e-5;

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/syncbn.safetensors")
}

fn fixtures() -> HashMap<String, Tensor> {
    let path = fixture_path();
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with scripts/fixtures/syncbn_fixtures.py",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

fn parity_body(pg: &ProcessGroup) -> anyhow::Result<()> {
    let fx = fixtures();
    let (rank, world) = (pg.rank(), pg.world_size());
    let get = |name: &str| -> anyhow::Result<Tensor> {
        let key = format!("w{world}.{name}");
        fx.get(&key)
            .map(Tensor::copy)
            .with_context(|| format!("fixture lacks {key}"))
    };
    let sizes: Vec<i64> = Vec::<i64>::try_from(get("sizes")?)?;
    let start: i64 = sizes[..rank].iter().sum();
    let rows = sizes[rank];
    let x = get("x")?
        .narrow(0, start, rows)
        .copy()
        .set_requires_grad(true);
    let g = get("g")?.narrow(0, start, rows);
    let weight = get("weight")?.set_requires_grad(true);
    let bias = get("bias")?.set_requires_grad(true);
    let running_mean = get("running_mean0")?;
    let running_var = get("running_var0")?;
    let sync = BatchNormSync::new(pg)?;
    let out = sync.forward(&x, &weight, &bias, &running_mean, &running_var, 0.1, 1e-5)?;
    (&out * &g).sum(Kind::Float).backward();
    let checks = [
        ("out", out.detach()),
        ("grad_x", x.grad()),
        ("grad_weight", weight.grad()),
        ("grad_bias", bias.grad()),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ];
    let mut worst = 0.0f64;
    for (name, got) in checks {
        let want = get(&format!("r{rank}.{name}"))?;
        ensure!(got.defined(), "rank {rank} of {world}: {name} is undefined");
        let diff = max_abs_diff(&got, &want)?;
        worst = worst.max(diff);
        ensure!(
            diff <= TOLERANCE,
            "rank {rank} of {world} (shard of {rows} rows): {name} differs from PyTorch's SyncBatchNorm by {diff:e}"
        );
    }
    eprintln!("rank {rank} of {world} ({rows} rows): largest difference from PyTorch {worst:e}");
    Ok(())
}

#[test]
fn sync_batch_norm_matches_pytorch_on_2_and_3_ranks_with_an_empty_shard() {
    const TEST: &str = "sync_batch_norm_matches_pytorch_on_2_and_3_ranks_with_an_empty_shard";
    RANKS.run(TEST, 2, "parity-2", parity_body);
    RANKS.run(TEST, 3, "parity-3", parity_body);
}

// ---------------------------------------------------------------------------------
// A peer lost between forward and backward: a collective error, not a torch error

fn lost_peer_body(pg: &ProcessGroup) -> anyhow::Result<()> {
    let x = Tensor::randn([3, 2, 2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let weight = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let bias = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (mean, var) = (
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        Tensor::ones([2], (Kind::Float, Device::Cpu)),
    );
    let sync = BatchNormSync::new(pg)?;
    let out = sync.forward(&x, &weight, &bias, &mean, &var, 0.1, 1e-5)?;
    if pg.rank() == 1 {
        // Gone before the backward pass's all-reduce.
        std::process::exit(0);
    }
    let backward = out.sum(Kind::Float).f_backward();
    ensure!(
        backward.is_err(),
        "the backward pass succeeded without its peer"
    );
    let failure = sync
        .take_backward_failure()
        .context("the failed all-reduce was not recorded")?;
    ensure!(
        failure.needs_regroup()
            && matches!(
                failure,
                hsat_worker::collective::CollectiveError::PeerLost { .. }
                    | hsat_worker::collective::CollectiveError::Timeout { .. }
            ),
        "expected a lost peer, got {failure:?}"
    );
    ensure!(
        failure.to_string().contains("sync_batch_norm backward"),
        "the error names the operation: {failure}"
    );
    ensure!(
        sync.take_backward_failure().is_none(),
        "taking the failure clears it"
    );
    Ok(())
}

#[test]
fn a_peer_lost_before_the_backward_pass_is_a_collective_error() {
    const TEST: &str = "a_peer_lost_before_the_backward_pass_is_a_collective_error";
    RANKS.run(TEST, 2, "lost-2", lost_peer_body);
}

// ---------------------------------------------------------------------------------
// Global loss + sync BN: a distributed step equals the whole-batch step

/// Patients of each step, and how each world size splits them (one rank empty with
/// 3 ranks, as when a step has fewer patients than workers would leave one).
const PATIENTS: i64 = 4;
const STEPS: u64 = 3;

fn shard_sizes(world: usize) -> Vec<i64> {
    match world {
        1 => vec![4],
        2 => vec![3, 1],
        3 => vec![2, 0, 2],
        _ => unreachable!("the test runs 1, 2 or 3 ranks"),
    }
}

fn equivalence_config() -> Config {
    let mut config = Config::default();
    config.model.backbone = Backbone::SmallCnn;
    config.model.mlp_hidden = vec![16];
    config.model.num_embedding_out = 8;
    config.training.only_adv = false;
    config.training.attack.kind = AttackKind::Pgd;
    config.training.attack.iters = 2;
    config.training.attack.warmup_epochs = 0;
    config.training.sync_bn = true;
    config.training.loss_scope = LossScope::Global;
    config.infra.threads = 1;
    config.infra.seed = 11;
    config
}

/// The step's whole batch `[4 patients, 1 slide, 2 patches, 2 views, 3, 16, 16]`.
fn step_images(step: u64) -> Tensor {
    tch::manual_seed(1000 + step as i64);
    Tensor::rand([PATIENTS, 1, 2, 2, 3, 16, 16], (Kind::Float, Device::Cpu))
}

/// Trains `STEPS` steps as one rank of `pg`; returns the total losses.
fn train_as_rank(trainer: &mut Trainer, pg: &ProcessGroup) -> anyhow::Result<Vec<f64>> {
    let sizes = shard_sizes(pg.world_size());
    let first_row: i64 = sizes[..pg.rank()].iter().sum();
    let rows = sizes[pg.rank()];
    let mut gradients = GradientSync::default();
    let batch_norm = RankCollectives::batch_norm_for(pg, trainer.config().training.sync_bn)?;
    ensure!(
        batch_norm.is_some() == (pg.world_size() > 1),
        "sync BN is installed exactly when there is more than one rank"
    );
    let mut totals = Vec::new();
    for step in 0..STEPS {
        let images = step_images(step).narrow(0, first_row, rows);
        let (losses, _) = train_rank_shard(
            trainer,
            RankCollectives {
                group: pg,
                gradients: &mut gradients,
                batch_norm: batch_norm.clone(),
                bucket_bytes: 1 << 20,
            },
            ShardStep {
                step,
                epoch: 0,
                total_steps: STEPS,
                images: &images,
                global_patients: PATIENTS,
                first_row,
            },
        )?;
        // A global loss is the whole step's on every rank, the empty one too.
        totals.push(
            losses
                .context("a global loss reports the step's loss")?
                .total,
        );
    }
    Ok(totals)
}

fn equivalence_body(pg: &ProcessGroup) -> anyhow::Result<()> {
    let config = equivalence_config();
    let mut trainer = Trainer::new(config.clone(), Device::Cpu)?;
    let totals = train_as_rank(&mut trainer, pg)?;
    if pg.rank() != 0 {
        return Ok(());
    }
    // The single-process reference on the whole batch, from the same initial weights.
    let mut reference = Trainer::new(config, Device::Cpu)?;
    let mut reference_totals = Vec::new();
    for step in 0..STEPS {
        let images = step_images(step);
        let (losses, _) = reference.train_shard(
            ShardStep {
                step,
                epoch: 0,
                total_steps: STEPS,
                images: &images,
                global_patients: PATIENTS,
                first_row: 0,
            },
            StepScope::whole_batch(),
            &mut |_| Ok(()),
        )?;
        reference_totals.push(losses.context("a whole batch has losses")?.total);
    }
    let world = pg.world_size();
    for (step, (got, want)) in totals.iter().zip(&reference_totals).enumerate() {
        ensure!(
            (got - want).abs() <= 1e-5,
            "{world} ranks, step {step}: loss {got} but the whole-batch step has {want}"
        );
    }
    let mut worst = (0.0f64, String::new());
    for ((name, got), (_, want)) in trainer
        .model()
        .state()
        .into_iter()
        .zip(reference.model().state())
    {
        let got = got.to_kind(Kind::Double);
        let want = want.to_kind(Kind::Double);
        let diff = max_abs_diff(&got, &want)?;
        if diff > worst.0 {
            worst = (diff, name);
        }
    }
    eprintln!(
        "{world} ranks: largest difference from the whole-batch run after {STEPS} steps: {:e} ({})",
        worst.0, worst.1
    );
    ensure!(
        worst.0 <= 1e-5,
        "{world} ranks: {} differs from the whole-batch run by {:e} after {STEPS} steps",
        worst.1,
        worst.0
    );
    Ok(())
}

#[test]
fn global_loss_with_sync_bn_equals_the_whole_batch_step_on_1_2_and_3_ranks() {
    const TEST: &str = "global_loss_with_sync_bn_equals_the_whole_batch_step_on_1_2_and_3_ranks";
    RANKS.run(TEST, 1, "equal-1", equivalence_body);
    RANKS.run(TEST, 2, "equal-2", equivalence_body);
    RANKS.run(TEST, 3, "equal-3", equivalence_body);
}
