//! hsat-proto: the wire protocol between coordinator and workers (package `hsat.v1`),
//! generated code, and the one place where wire messages become domain types.
//!
//! Not built yet: it arrives with the distributed-training issue, which defines the
//! services; nothing else may see generated types.
