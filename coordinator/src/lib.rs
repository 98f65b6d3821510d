//! hsat-coordinator: owns a distributed job (membership, the data plan, the step
//! ledger, checkpoints) and hands hierarchical batches to workers over gRPC.
//!
//! Not built yet: the single-worker engine in `hsat-worker` runs without it. The
//! distributed-training issue fills this crate (scheduler state machine, leases, the
//! gRPC service); it must never depend on libtorch.
