//! Training: the loss, the attack, the optimiser, one step, and the loop.
//!
//! - [`loss`]: hierarchical SupCon (method.md §4).
//! - [`attack`]: PGD with input gradients only (method.md §5).
//! - [`optim`]: AdamW as PyTorch computes it.
//! - [`step`]: one min-max step in the three outer modes.
//! - [`trainer`]: the single-worker loop with schedules and checkpoints.
//! - [`distributed`]: one rank's share of a distributed step (sync BN, the loss
//!   scope, the gradient sum).
//! - [`run`]: `hsat run` in one process: batch source, resuming from checkpoints
//!   (`--resume`, `--new-job`), the loop, data-wait summary.

pub mod attack;
pub mod distributed;
pub mod loss;
pub mod optim;
pub mod run;
pub mod step;
pub mod trainer;
