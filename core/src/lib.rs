//! hsat-core: the pure domain layer of hsat.
//!
//! Everything in this crate is plain data and pure functions: no tokio, no tonic, no
//! tch. The coordinator, the workers and the `hsat` command all build on it, so a
//! decision made here (a validated config value, the learning rate of step `k`, the
//! attack budget of epoch `e`) is the same on every machine of a job.
//!
//! Layout:
//!
//! - [`checkpoint`]: what makes a checkpoint directory complete (its manifest of
//!   sizes and SHA-256 digests, written last), verification, and retention.
//! - [`config`]: layered configuration (built-in defaults < TOML file < `HSAT__...`
//!   environment variables < `--set key=value`), parsed into raw structs that mirror
//!   the reference implementation's YAML, then validated into typed config.
//! - [`rng`]: seeded randomness (splitmix64) and seed derivation from a job seed and
//!   the coordinates of a draw, so every machine draws the same numbers.
//! - [`dataset`]: the dataset index (OpenSRH metadata or a CSV manifest): patients,
//!   slides and patch paths in a content-fixed order, with a fingerprint, and the
//!   validation report of `hsat data check`.
//! - [`sampler`]: the hierarchical sampler: the balanced patient list, each epoch's
//!   order, and the patients, slides and patches of any global step, as pure
//!   functions of (seed, epoch, step).
//! - [`schedule`]: the training schedules as pure functions of the step or epoch:
//!   learning-rate warm-up and cosine decay, attack epsilon warm-up, dynamic
//!   augmentation strength and the clean/adversarial loss weight.
//! - [`losses`]: loss values as plain numbers, shared by engine, reports and ledger.
//! - [`telemetry`]: what a training step measured besides its losses (attack gain,
//!   eps and lr in effect, phase durations), for metrics and `metrics.jsonl`.
//! - [`exit`]: the exit codes of the long-running commands (0, 1, 2, 75, 78) and
//!   the trait that maps each layer's errors to them.
//! - [`eval`]: the evaluation protocol's math: kNN class scores against the train
//!   bank, slide and patient aggregation, and the metrics of the paper's tables.

pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod eval;
pub mod exit;
pub mod losses;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod telemetry;
