//! The loader's one error type. Image decoding ([`crate::image::ImageError`]) and the
//! generator ([`crate::synth::SynthError`]) keep their own: a bad patch is not a loader
//! failure (it falls back to another patch), only the loss of a whole step is.

/// What can stop the loader from producing a step.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The training split is empty, so no step can be planned.
    #[error("the training split has no patients: check the split file or manifest")]
    NoPatients,

    /// The operating system refused a loader thread.
    #[error("cannot start the loader's {thread} thread: {source}")]
    ThreadSpawn {
        /// Which thread (`planner`, `decode-3`, ...).
        thread: String,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The loader's threads ended (the plan channel was closed, or a thread died).
    #[error("the loader threads stopped unexpectedly")]
    Stopped,

    /// A step was asked for out of order.
    #[error(
        "the loader holds step {held} but step {asked} was asked for: plans must be fed in the order they are trained"
    )]
    OutOfOrder {
        /// The step the loader has ready next.
        held: u64,
        /// The step the caller asked for.
        asked: u64,
    },

    /// Augmentation returned a patch of the wrong size (a bug, not bad data).
    #[error("augmentation produced {got} values for a patch, expected {expected}")]
    ViewSize {
        /// Values produced.
        got: usize,
        /// `views x 3 x size x size`.
        expected: usize,
    },

    /// No patient of a step had a readable slide.
    #[error("step {step}: no patient yielded a readable patch ({first}); run `hsat data check`")]
    NothingReadable {
        /// The step.
        step: u64,
        /// The first failure met, for the log.
        first: String,
    },
}

/// Result alias of the data crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
