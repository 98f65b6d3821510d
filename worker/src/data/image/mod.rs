//! Decoding, base processing and augmentation of patches (being written).
