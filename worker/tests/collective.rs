//! Collectives with real processes: each test re-executes this test binary
//! (`--exact <test> --nocapture`) once per extra rank; the parent process is rank 0 and
//! hosts the store. A child learns its role from `HSAT_COLLECTIVE_ROLE`
//! (`test:rank:world:port:prefix`). Gloo over loopback, a few MB at most: seconds.
#![allow(clippy::unwrap_used)]

use std::process::Child;
use std::time::Duration;

use anyhow::ensure;
use hsat_core::config::Backbone;
use hsat_worker::collective::{
    Backend, CollectiveError, GradientSync, ProcessGroup, Store, broadcast_state,
};
use hsat_worker::model::Encoder;
use tch::{Device, Kind, Tensor};

mod support;
use support::ranks::{Ranks, Role, wait_child};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Ranks of these tests: role in `HSAT_COLLECTIVE_ROLE`.
const RANKS: Ranks = Ranks {
    role_env: "HSAT_COLLECTIVE_ROLE",
    timeout: TIMEOUT,
    child_limit: Duration::from_secs(60),
};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

// ---------------------------------------------------------------------------------
// (a) all_reduce_sum, broadcast and weighted GradientSync on 2 and 3 ranks

fn collectives_body(pg: &ProcessGroup) -> anyhow::Result<()> {
    let (rank, world) = (pg.rank() as f64, pg.world_size());
    let ranks: Vec<f64> = (0..world).map(|r| r as f64).collect();

    // all_reduce_sum: rank r holds (r + 1) * base; the sum is (sum of r+1) * base.
    let base = [
        Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]),
        Tensor::from_slice(&[1.5f64, -2.0]),
    ];
    let mut tensors: Vec<Tensor> = base.iter().map(|t| t * (rank + 1.0)).collect();
    pg.all_reduce_sum(&mut tensors)?;
    let factor: f64 = ranks.iter().map(|r| r + 1.0).sum();
    for (got, b) in tensors.iter().zip(&base) {
        ensure!(got.equal(&(b * factor)), "all_reduce_sum: got {got}");
    }

    // broadcast from the last rank.
    let root = world - 1;
    let mut tensors = vec![
        Tensor::full([3], rank, (Kind::Float, Device::Cpu)),
        Tensor::full([2, 2], 10 + pg.rank() as i64, (Kind::Int64, Device::Cpu)),
    ];
    pg.broadcast(&mut tensors, root)?;
    ensure!(tensors[0].equal(&Tensor::full([3], root as f64, (Kind::Float, Device::Cpu))));
    ensure!(tensors[1].equal(&Tensor::full(
        [2, 2],
        10 + root as i64,
        (Kind::Int64, Device::Cpu)
    )));

    // GradientSync with uneven weights (rank r has weight r + 1), tiny buckets so that
    // several are in flight, and a parameter whose gradient is missing on rank 0.
    let params = [
        Tensor::zeros([5], (Kind::Float, Device::Cpu)).set_requires_grad(true),
        Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
        Tensor::zeros([4], (Kind::Float, Device::Cpu)).set_requires_grad(true),
    ];
    let grad_of = |r: f64, i: usize| -> Tensor {
        let numel = params[i].numel() as i64;
        (Tensor::arange(numel, (Kind::Float, Device::Cpu)) * (r + 1.0) + i as f64 - r * 3.0)
            .view(params[i].size().as_slice())
    };
    let skip_on_rank0 = 2;
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (i, p) in params.iter().enumerate() {
        if pg.rank() == 0 && i == skip_on_rank0 {
            continue;
        }
        loss += (p * grad_of(rank, i)).sum(Kind::Float);
    }
    loss.backward();
    ensure!(!params[skip_on_rank0].grad().defined() || pg.rank() != 0);
    let weights: Vec<f64> = ranks.iter().map(|r| r + 1.0).collect();
    let total: f64 = weights.iter().sum();
    let mut sync = GradientSync::new(16);
    let stats = sync.average(pg, &params, weights[pg.rank()], total)?;
    ensure!(
        stats.buckets >= 3,
        "expected several buckets, got {stats:?}"
    );
    for (i, p) in params.iter().enumerate() {
        let mut expected = Tensor::zeros(p.size().as_slice(), (Kind::Float, Device::Cpu));
        for (r, w) in ranks.iter().zip(&weights) {
            if !(*r == 0.0 && i == skip_on_rank0) {
                expected += grad_of(*r, i) * (w / total);
            }
        }
        let diff = max_abs_diff(&p.grad(), &expected);
        ensure!(diff <= 1e-6, "param {i}: weighted mean off by {diff}");
    }
    // A second step reuses the buffers and gives the same answer for the same grads.
    let before: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
    let storage: Vec<usize> = params
        .iter()
        .map(|p| p.grad().data_ptr() as usize)
        .collect();
    for (i, p) in params.iter().enumerate() {
        p.grad().copy_(&grad_of(rank, i));
        if pg.rank() == 0 && i == skip_on_rank0 {
            let _ = p.grad().zero_();
        }
    }
    sync.average(pg, &params, weights[pg.rank()], total)?;
    for ((p, b), ptr) in params.iter().zip(&before).zip(&storage) {
        ensure!(max_abs_diff(&p.grad(), b) <= 1e-6, "second step differs");
        ensure!(
            p.grad().data_ptr() as usize == *ptr,
            "gradient moved: not a bucket view"
        );
    }
    // The optimiser's in-place zeroing (detach_ + zero_) works on bucket gradients.
    for p in &params {
        let _ = p.grad().f_detach_()?.f_zero_()?;
    }
    // Gradients set to none (PyTorch's default zero_grad) are copied in again.
    let fresh: Vec<Tensor> = params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = p.detach().set_requires_grad(true);
            if !(pg.rank() == 0 && i == skip_on_rank0) {
                (&p * grad_of(rank, i)).sum(Kind::Float).backward();
            }
            p
        })
        .collect();
    sync.average(pg, &fresh, weights[pg.rank()], total)?;
    for (p, b) in fresh.iter().zip(&before) {
        ensure!(max_abs_diff(&p.grad(), b) <= 1e-6, "fresh gradients differ");
    }
    pg.barrier()?;
    Ok(())
}

#[test]
fn all_reduce_broadcast_and_weighted_average_on_2_and_3_ranks() {
    const NAME: &str = "all_reduce_broadcast_and_weighted_average_on_2_and_3_ranks";
    RANKS.run(NAME, 2, "w2", collectives_body);
    RANKS.run(NAME, 3, "w3", collectives_body);
}

// ---------------------------------------------------------------------------------
// (b) synchronised gradients of a tiny model over uneven shards = weighted mean

const SHARDS: [i64; 3] = [1, 6, 3];

/// A two-layer MLP with fixed (seeded) weights; the same on every rank.
fn tiny_model() -> Vec<Tensor> {
    tch::manual_seed(11);
    let w1 = Tensor::randn([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b1 = Tensor::randn([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w2 = Tensor::randn([2, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    vec![w1, b1, w2]
}

fn dataset() -> (Tensor, Tensor) {
    tch::manual_seed(5);
    let n: i64 = SHARDS.iter().sum();
    let x = Tensor::randn([n, 3], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([n, 2], (Kind::Float, Device::Cpu));
    (x, y)
}

/// Mean over the examples [start, start + len) of the squared error.
fn shard_loss(params: &[Tensor], x: &Tensor, y: &Tensor, start: i64, len: i64) -> Tensor {
    let (x, y) = (x.narrow(0, start, len), y.narrow(0, start, len));
    let hidden = (x.matmul(&params[0].tr()) + &params[1]).tanh();
    let out = hidden.matmul(&params[2].tr());
    (out - y)
        .square()
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float)
}

fn grads_of_shard(x: &Tensor, y: &Tensor, start: i64, len: i64) -> Vec<Tensor> {
    let params = tiny_model();
    shard_loss(&params, x, y, start, len).backward();
    params.iter().map(|p| p.grad().copy()).collect()
}

fn shard_start(rank: usize) -> i64 {
    SHARDS[..rank].iter().sum()
}

fn tiny_model_body(pg: &ProcessGroup) -> anyhow::Result<()> {
    let (x, y) = dataset();
    let total: i64 = SHARDS.iter().sum();
    let rank = pg.rank();
    let params = tiny_model();
    shard_loss(&params, &x, &y, shard_start(rank), SHARDS[rank]).backward();
    GradientSync::default().average(pg, &params, SHARDS[rank] as f64, total as f64)?;

    // In one process: the weighted mean of the per-shard gradients...
    let mut expected: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
    for (r, &len) in SHARDS.iter().enumerate() {
        for (e, g) in expected
            .iter_mut()
            .zip(grads_of_shard(&x, &y, shard_start(r), len))
        {
            *e += g * (len as f64 / total as f64);
        }
    }
    // ...which is also the full-batch gradient.
    let full = grads_of_shard(&x, &y, 0, total);
    for (i, p) in params.iter().enumerate() {
        let diff = max_abs_diff(&p.grad(), &expected[i]);
        ensure!(
            diff <= 1e-6,
            "rank {rank} param {i}: off the weighted mean by {diff}"
        );
        let diff = max_abs_diff(&p.grad(), &full[i]);
        ensure!(
            diff <= 1e-6,
            "rank {rank} param {i}: off the full-batch gradient by {diff}"
        );
    }
    Ok(())
}

#[test]
fn synced_gradient_over_uneven_shards_is_the_weighted_mean() {
    const NAME: &str = "synced_gradient_over_uneven_shards_is_the_weighted_mean";
    RANKS.run(NAME, SHARDS.len(), "tiny", tiny_model_body);
}

// ---------------------------------------------------------------------------------
// (c) broadcast_state makes every rank bitwise identical to root

const ROOT: usize = 1;

/// An encoder and optimiser-like moments initialised from `seed`, plus an int64 buffer
/// and a double tensor, so that buckets of several kinds are exercised.
fn state_from_seed(seed: i64) -> Vec<Tensor> {
    tch::manual_seed(seed);
    let encoder = Encoder::new(Backbone::SmallCnn, &[8], 4, Device::Cpu).unwrap();
    let mut tensors: Vec<Tensor> = encoder.state().into_iter().map(|(_, t)| t).collect();
    tensors.push(Tensor::randn([7, 3], (Kind::Float, Device::Cpu)));
    tensors.push(Tensor::randint(1000, [5], (Kind::Int64, Device::Cpu)));
    tensors.push(Tensor::randn([3], (Kind::Double, Device::Cpu)));
    tensors
}

fn broadcast_body(pg: &ProcessGroup) -> anyhow::Result<()> {
    let mine = state_from_seed(100 + pg.rank() as i64);
    broadcast_state(pg, &mine, ROOT, 256)?;
    let roots = state_from_seed(100 + ROOT as i64);
    ensure!(mine.len() == roots.len());
    for (i, (a, b)) in mine.iter().zip(&roots).enumerate() {
        ensure!(a.kind() == b.kind(), "tensor {i} changed kind");
        // `equal` compares every element exactly; NaN-free inputs, so bitwise.
        ensure!(
            a.equal(b),
            "rank {} tensor {i} differs from root's",
            pg.rank()
        );
    }
    Ok(())
}

#[test]
fn broadcast_state_makes_all_ranks_bitwise_identical() {
    const NAME: &str = "broadcast_state_makes_all_ranks_bitwise_identical";
    RANKS.run(NAME, 3, "bcast", broadcast_body);
}

// ---------------------------------------------------------------------------------
// (d) a peer killed with SIGKILL mid all-reduce; (e) a hung peer

/// Child: joins, takes part in one all-reduce, then never enters the next one (it
/// sleeps until the parent kills it), or, with the prefix `again`, completes one.
fn faulty_child(role: &Role) {
    let store = Store::connect("127.0.0.1", role.port, role.world, TIMEOUT).unwrap();
    warm_up(&store, &role.prefix, role.rank);
    let timeout = Duration::from_secs(3);
    let pg = ProcessGroup::new(
        &store,
        &role.prefix,
        role.rank,
        role.world,
        Backend::Gloo,
        timeout,
    )
    .unwrap();
    let mut t = vec![Tensor::ones([1000], (Kind::Float, Device::Cpu))];
    pg.all_reduce_sum(&mut t).unwrap();
    if role.prefix.starts_with("again") {
        return;
    }
    std::thread::sleep(Duration::from_secs(60));
}

/// A first group with a generous timeout, so that the short-timeout group under test
/// forms between two processes that are both already up.
fn warm_up(store: &Store, prefix: &str, rank: usize) {
    let pg = ProcessGroup::new(
        store,
        &format!("{prefix}-warm"),
        rank,
        2,
        Backend::Gloo,
        TIMEOUT,
    )
    .unwrap();
    pg.barrier().unwrap();
}

fn start_faulty_pair(
    test: &str,
    store: &Store,
    prefix: &str,
    timeout: Duration,
) -> (ProcessGroup, Child) {
    let role = Role {
        rank: 1,
        world: 2,
        port: store.port(),
        prefix: prefix.to_owned(),
    };
    let child = RANKS.spawn_rank(test, &role);
    warm_up(store, prefix, 0);
    let pg = ProcessGroup::new(store, prefix, 0, 2, Backend::Gloo, timeout).unwrap();
    let mut t = vec![Tensor::ones([1000], (Kind::Float, Device::Cpu))];
    pg.all_reduce_sum(&mut t).unwrap();
    assert!(t[0].equal(&Tensor::full([1000], 2.0, (Kind::Float, Device::Cpu))));
    (pg, child)
}

/// After a failure: drop the group, regroup with a fresh child under a new prefix on
/// the same store, and check one all-reduce.
fn regroup(test: &str, store: &Store, prefix: &str) {
    let (pg, mut child) = start_faulty_pair(test, store, prefix, Duration::from_secs(10));
    wait_child(&mut child, Duration::from_secs(60)).unwrap();
    drop(pg);
}

#[test]
fn killed_peer_surfaces_as_error_and_survivor_regroups() {
    const NAME: &str = "killed_peer_surfaces_as_error_and_survivor_regroups";
    if let Some(role) = RANKS.child_role(NAME) {
        return faulty_child(&role);
    }
    // A long timeout: the error must come from the closed connection, not the clock.
    let store = Store::host("127.0.0.1", 0, 2, Duration::from_secs(60)).unwrap();
    let (pg, mut child) = start_faulty_pair(NAME, &store, "gen0", Duration::from_secs(60));
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    });
    // 40 MB: the peer dies while this all-reduce waits for it.
    let mut big = vec![Tensor::ones([10_000_000], (Kind::Float, Device::Cpu))];
    let err = pg.all_reduce_sum(&mut big).unwrap_err();
    killer.join().unwrap();
    eprintln!("survivor saw: {err}");
    assert!(matches!(err, CollectiveError::PeerLost { .. }), "{err:?}");
    assert!(err.needs_regroup());
    let text = err.to_string();
    assert!(
        text.contains("gen0") && text.contains("new prefix"),
        "{text}"
    );
    drop(pg); // must neither hang nor abort the process
    regroup(NAME, &store, "again1");
}

#[test]
fn hung_peer_times_out_and_survivor_regroups() {
    const NAME: &str = "hung_peer_times_out_and_survivor_regroups";
    if let Some(role) = RANKS.child_role(NAME) {
        return faulty_child(&role);
    }
    let store = Store::host("127.0.0.1", 0, 2, Duration::from_secs(60)).unwrap();
    let (pg, mut child) = start_faulty_pair(NAME, &store, "gen0", Duration::from_secs(1));
    // The child is alive but never enters this all-reduce.
    let mut t = vec![Tensor::ones([1000], (Kind::Float, Device::Cpu))];
    let err = pg.all_reduce_sum(&mut t).unwrap_err();
    eprintln!("survivor saw: {err}");
    assert!(matches!(err, CollectiveError::Timeout { .. }), "{err:?}");
    drop(pg);
    child.kill().unwrap();
    child.wait().unwrap();
    regroup(NAME, &store, "again1");
}

#[test]
fn nccl_without_the_feature_is_a_clear_error() {
    if Backend::Nccl.is_available() {
        return;
    }
    let store = Store::host("127.0.0.1", 0, 1, TIMEOUT).unwrap();
    let err = ProcessGroup::new(&store, "g", 0, 1, Backend::Nccl, TIMEOUT).unwrap_err();
    assert!(matches!(err, CollectiveError::NcclNotCompiled), "{err:?}");
    assert!(err.to_string().contains("--features nccl"));
}

#[test]
fn unreachable_store_names_the_address() {
    // Port 1 on loopback: nothing listens there.
    let err = Store::connect("127.0.0.1", 1, 2, Duration::from_millis(500)).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, CollectiveError::StoreConnect { .. }),
        "{err:?}"
    );
    assert!(
        text.contains("127.0.0.1:1") && text.contains("rank 0"),
        "{text}"
    );
}

/// With the `nccl` feature on a machine without a GPU, constructing the NCCL group
/// fails with libtorch's message instead of crashing (CI builds this feature).
#[cfg(feature = "nccl")]
#[test]
fn nccl_without_a_gpu_is_an_error_not_a_crash() {
    if tch::Cuda::is_available() {
        return;
    }
    let store = Store::host("127.0.0.1", 0, 1, TIMEOUT).unwrap();
    let err = ProcessGroup::new(&store, "g", 0, 1, Backend::Nccl, TIMEOUT).unwrap_err();
    eprintln!("nccl on a cpu machine: {err}");
    assert!(err.to_string().to_lowercase().contains("gpu"), "{err}");
}
