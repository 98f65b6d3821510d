//! Splitting a step's patients over the ranks of a generation.
//!
//! The job's `batch_size` is the number of patients of a whole step; each rank
//! trains a contiguous share of the step's slots. The split depends only on the
//! number of patients and the world size, so every rank and the coordinator compute
//! the same shares.

use std::ops::Range;

use super::{PatientDraw, StepPlan};

/// Slots of a step of `num_patients` patients that `rank` of `world_size` trains:
/// contiguous, in rank order; the first `num_patients % world_size` ranks get one
/// more than the others, and ranks beyond `num_patients` get an empty range (they
/// still take part in the all-reduce, with weight 0).
///
/// `world_size` 0 is read as 1; a `rank >= world_size` gets an empty range.
pub fn shard_range(num_patients: usize, world_size: usize, rank: usize) -> Range<usize> {
    let world_size = world_size.max(1);
    if rank >= world_size {
        return num_patients..num_patients;
    }
    let base = num_patients / world_size;
    let extra = num_patients % world_size;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// The patients of `plan` that `rank` of `world_size` trains ([`shard_range`]).
pub fn shard_of(plan: &StepPlan, world_size: usize, rank: usize) -> &[PatientDraw] {
    &plan.patients[shard_range(plan.patients.len(), world_size, rank)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uneven_splits_give_the_first_ranks_one_more() {
        let ranges: Vec<_> = (0..3).map(|rank| shard_range(10, 3, rank)).collect();
        assert_eq!(ranges, vec![0..4, 4..7, 7..10]);
        let ranges: Vec<_> = (0..4).map(|rank| shard_range(2, 4, rank)).collect();
        assert_eq!(ranges, vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(shard_range(5, 0, 0), 0..5);
        assert_eq!(shard_range(5, 2, 2), 5..5);
    }

    proptest! {
        #[test]
        fn shards_tile_the_step(patients in 0usize..300, world in 1usize..64) {
            let mut next = 0;
            for rank in 0..world {
                let range = shard_range(patients, world, rank);
                prop_assert_eq!(range.start, next);
                let len = range.len();
                prop_assert!(len == patients / world || len == patients / world + 1);
                next = range.end;
            }
            prop_assert_eq!(next, patients);
        }
    }
}
