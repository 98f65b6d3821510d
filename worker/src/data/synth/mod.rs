//! `hsat synth`: writes synthetic datasets to disk (being written).
