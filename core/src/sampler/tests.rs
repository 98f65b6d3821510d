//! The invariants of `README.md`, as property tests over random datasets (classes
//! 1-5, patients 1-20 with random class sizes, slides 1-4, patches 1-6), plus a few
//! pinned examples.

use std::collections::BTreeMap;
use std::path::PathBuf;

use proptest::prelude::*;

use super::*;
use crate::dataset::{DatasetFormat, IndexNotes, PatientEntry, Slide, assemble};

/// One generated patient: class, in val, patches per slide.
type PatientSpec = (usize, bool, Vec<usize>);

fn index_of(specs: &[PatientSpec]) -> DatasetIndex {
    let entries = specs
        .iter()
        .enumerate()
        .map(|(patient, (class, val, slides))| PatientEntry {
            id: format!("p{patient:02}"),
            class: format!("class{class}"),
            split: if *val { Split::Val } else { Split::Train },
            slides: slides
                .iter()
                .enumerate()
                .map(|(slide, &patches)| Slide {
                    id: format!("s{slide}"),
                    patches: (0..patches)
                        .map(|patch| PathBuf::from(format!("/d/p{patient}/s{slide}/{patch}.tif")))
                        .collect(),
                })
                .collect(),
        })
        .collect();
    assemble(
        DatasetFormat::Manifest,
        PathBuf::from("/d"),
        entries,
        IndexNotes::default(),
    )
}

fn dataset() -> impl Strategy<Value = DatasetIndex> {
    (1usize..=5)
        .prop_flat_map(|classes| {
            proptest::collection::vec(
                (
                    0..classes,
                    proptest::bool::weighted(0.25),
                    proptest::collection::vec(1usize..=6, 1..=4),
                ),
                1..=20,
            )
        })
        .prop_map(|specs| index_of(&specs))
}

fn sampling() -> impl Strategy<Value = HidiscSampling> {
    (1usize..=5, 1usize..=5).prop_map(|(slides, patches)| HidiscSampling {
        num_slide_samples: slides,
        num_patch_samples: patches,
        num_transforms: 2,
    })
}

/// The plans of every step of `epoch`.
fn epoch_plans(
    index: &DatasetIndex,
    balanced: &[usize],
    seed: u64,
    epoch: u64,
    batch_size: usize,
    sampling: &HidiscSampling,
) -> Vec<StepPlan> {
    let per_epoch = steps_per_epoch(balanced.len(), batch_size);
    (epoch * per_epoch..(epoch + 1) * per_epoch)
        .map(|step| plan_step(index, balanced, seed, step, batch_size, sampling))
        .collect()
}

fn sorted(mut values: Vec<usize>) -> Vec<usize> {
    values.sort_unstable();
    values
}

proptest! {
    #[test]
    fn every_balanced_entry_once_per_epoch(
        index in dataset(),
        seed in any::<u64>(),
        balance in any::<bool>(),
        batch_size in 1usize..=7,
        epoch in 0u64..4,
        sampling in sampling(),
    ) {
        let balanced = balanced_patients(&index, Split::Train, seed, balance);
        let plans = epoch_plans(&index, &balanced, seed, epoch, batch_size, &sampling);
        let mut seen = Vec::new();
        for plan in &plans {
            prop_assert_eq!(plan.epoch, epoch);
            for (slot, draw) in plan.patients.iter().enumerate() {
                prop_assert_eq!(draw.slot, slot);
                seen.push(draw.patient);
            }
        }
        // In slot order, the steps of the epoch spell out the epoch's order.
        prop_assert_eq!(&seen, &epoch_order(&balanced, seed, epoch));
        prop_assert_eq!(sorted(seen), sorted(balanced.clone()));
    }

    #[test]
    fn balancing_equalises_classes(index in dataset(), seed in any::<u64>()) {
        let members = index.patients_in(Split::Train);
        let unbalanced = balanced_patients(&index, Split::Train, seed, false);
        prop_assert_eq!(&unbalanced, &members);

        let balanced = balanced_patients(&index, Split::Train, seed, true);
        let mut per_class: BTreeMap<usize, usize> = BTreeMap::new();
        let mut class_sizes: BTreeMap<usize, usize> = BTreeMap::new();
        for &patient in &members {
            *class_sizes.entry(index.patients[patient].class).or_default() += 1;
        }
        for &patient in &balanced {
            prop_assert_eq!(index.patients[patient].split, Split::Train);
            *per_class.entry(index.patients[patient].class).or_default() += 1;
        }
        let largest = class_sizes.values().copied().max().unwrap_or(0);
        prop_assert_eq!(per_class.len(), class_sizes.len());
        prop_assert!(per_class.values().all(|&n| n == largest), "{per_class:?}");
        // Every patient at least once, replicas spread evenly within a class.
        for &patient in &members {
            let copies = balanced.iter().filter(|&&p| p == patient).count();
            let size = class_sizes[&index.patients[patient].class];
            prop_assert!(copies == largest / size || copies == largest.div_ceil(size));
        }
    }

    #[test]
    fn plans_are_deterministic(
        index in dataset(),
        seed in any::<u64>(),
        step in 0u64..1000,
        batch_size in 1usize..=7,
        sampling in sampling(),
    ) {
        let balanced = balanced_patients(&index, Split::Train, seed, true);
        prop_assert_eq!(&balanced, &balanced_patients(&index, Split::Train, seed, true));
        let plan = plan_step(&index, &balanced, seed, step, batch_size, &sampling);
        // Recomputed from scratch, as another worker or a resumed job would.
        let again = plan_step(&index, &balanced.clone(), seed, step, batch_size, &sampling);
        prop_assert_eq!(plan, again);
    }

    #[test]
    fn plan_shapes_are_batch_by_slides_by_patches(
        index in dataset(),
        seed in any::<u64>(),
        batch_size in 1usize..=7,
        sampling in sampling(),
    ) {
        let balanced = balanced_patients(&index, Split::Train, seed, true);
        let plans = epoch_plans(&index, &balanced, seed, 1, batch_size, &sampling);
        let last = plans.len().saturating_sub(1);
        for (position, plan) in plans.iter().enumerate() {
            let expected = if position < last {
                batch_size
            } else {
                balanced.len() - last * batch_size
            };
            prop_assert_eq!(plan.patients.len(), expected);
            for draw in &plan.patients {
                let patient = &index.patients[draw.patient];
                prop_assert_eq!(draw.label, patient.class);
                prop_assert_eq!(draw.slides.len(), sampling.num_slide_samples);
                let slides: Vec<usize> = draw.slides.iter().map(|d| d.slide).collect();
                check_tiling(&slides, patient.slides.len(), sampling.num_slide_samples)?;
                for slide_draw in &draw.slides {
                    let available = patient.slides[slide_draw.slide].patches.len();
                    prop_assert_eq!(slide_draw.patches.len(), sampling.num_patch_samples);
                    check_tiling(&slide_draw.patches, available, sampling.num_patch_samples)?;
                }
            }
        }
    }

    #[test]
    fn choose_tiled_uses_indices_evenly(
        seed in any::<u64>(),
        available in 1usize..=10,
        wanted in 0usize..=30,
    ) {
        let chosen = choose_tiled(seed, available, wanted);
        prop_assert_eq!(chosen.len(), wanted);
        check_tiling(&chosen, available, wanted)?;
        prop_assert_eq!(&chosen, &choose_tiled(seed, available, wanted));
    }

    #[test]
    fn epoch_order_is_a_permutation(
        balanced in proptest::collection::vec(0usize..20, 0..40),
        seed in any::<u64>(),
        epoch in any::<u64>(),
    ) {
        let order = epoch_order(&balanced, seed, epoch);
        prop_assert_eq!(sorted(order), sorted(balanced));
    }
}

/// `chosen` are `wanted` indices < `available`, each used floor or ceil of
/// `wanted / available` times, the first `min(available, wanted)` distinct.
fn check_tiling(chosen: &[usize], available: usize, wanted: usize) -> Result<(), TestCaseError> {
    prop_assert!(
        chosen.iter().all(|&i| i < available),
        "{chosen:?} of {available}"
    );
    let (low, high) = (wanted / available, wanted.div_ceil(available));
    for index in 0..available {
        let uses = chosen.iter().filter(|&&i| i == index).count();
        prop_assert!(
            uses == low || uses == high,
            "{index} used {uses} times in {chosen:?}"
        );
    }
    let prefix = sorted(chosen[..available.min(wanted)].to_vec());
    prop_assert!(
        prefix.windows(2).all(|pair| pair[0] != pair[1]),
        "{chosen:?}"
    );
    Ok(())
}

/// A fixed dataset with enough choice for seeds to matter: 3 classes of 3, 4 and 5
/// patients, 3 slides of 5 patches each.
fn fixed_index() -> DatasetIndex {
    let specs: Vec<PatientSpec> = [3, 4, 5]
        .iter()
        .enumerate()
        .flat_map(|(class, &size)| (0..size).map(move |_| (class, false, vec![5, 5, 5])))
        .collect();
    index_of(&specs)
}

fn paper_sampling() -> HidiscSampling {
    HidiscSampling {
        num_slide_samples: 2,
        num_patch_samples: 2,
        num_transforms: 2,
    }
}

#[test]
fn different_seeds_give_different_plans() {
    let index = fixed_index();
    let sampling = paper_sampling();
    let plans = |seed: u64| {
        let balanced = balanced_patients(&index, Split::Train, seed, true);
        (0..3)
            .map(|step| plan_step(&index, &balanced, seed, step, 4, &sampling))
            .collect::<Vec<_>>()
    };
    let identical = (0..100u64)
        .filter(|&seed| plans(seed) == plans(seed + 1))
        .count();
    assert_eq!(identical, 0);
    // Different epochs of one seed are ordered differently too.
    let balanced = balanced_patients(&index, Split::Train, 1, true);
    assert_ne!(epoch_order(&balanced, 1, 0), epoch_order(&balanced, 1, 1));
}

#[test]
fn steps_per_epoch_rounds_up() {
    assert_eq!(steps_per_epoch(0, 4), 0);
    assert_eq!(steps_per_epoch(1, 4), 1);
    assert_eq!(steps_per_epoch(8, 4), 2);
    assert_eq!(steps_per_epoch(9, 4), 3);
    assert_eq!(steps_per_epoch(15, 10), 2);
}

#[test]
fn balanced_list_of_the_fixed_dataset() {
    let index = fixed_index();
    // Classes of 3, 4 and 5 patients: 5 entries each.
    let balanced = balanced_patients(&index, Split::Train, 1000, true);
    assert_eq!(balanced.len(), 15);
    // Classes are concatenated in sorted order.
    let labels: Vec<usize> = balanced.iter().map(|&p| index.patients[p].class).collect();
    assert_eq!(labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    // The largest class is a permutation of its patients.
    assert_eq!(sorted(balanced[10..].to_vec()), [7, 8, 9, 10, 11]);
    assert_eq!(
        balanced_patients(&index, Split::Val, 1000, true),
        Vec::<usize>::new()
    );
}

#[test]
fn an_empty_split_plans_empty_steps() {
    let index = fixed_index();
    let plan = plan_step(&index, &[], 1, 5, 4, &paper_sampling());
    assert_eq!(plan.patients, []);
    assert_eq!((plan.step, plan.epoch), (5, 0));
}

#[test]
fn steps_continue_across_epochs() {
    let index = fixed_index();
    let balanced = balanced_patients(&index, Split::Train, 3, true);
    // 15 entries, batch 4: 4 steps per epoch, the last of 3 patients.
    let sampling = paper_sampling();
    let plan = |step| plan_step(&index, &balanced, 3, step, 4, &sampling);
    assert_eq!((plan(3).epoch, plan(3).patients.len()), (0, 3));
    assert_eq!((plan(4).epoch, plan(4).patients.len()), (1, 4));
    assert_eq!(plan(4).patients[0].patient, epoch_order(&balanced, 3, 1)[0]);
    assert_eq!(plan(4_000_003).epoch, 1_000_000);
}

#[test]
fn a_slide_drawn_twice_draws_its_patches_anew() {
    // One slide of 6 patches, 4 slide draws of 3 patches: the draws of the same slide
    // are not all the same.
    let index = index_of(&[(0, false, vec![6])]);
    let sampling = HidiscSampling {
        num_slide_samples: 4,
        num_patch_samples: 3,
        num_transforms: 2,
    };
    let balanced = balanced_patients(&index, Split::Train, 9, true);
    let plan = plan_step(&index, &balanced, 9, 0, 1, &sampling);
    let draws = &plan.patients[0].slides;
    assert!(draws.iter().all(|draw| draw.slide == 0));
    assert!(
        draws.iter().any(|draw| draw.patches != draws[0].patches),
        "{draws:?}"
    );
}
