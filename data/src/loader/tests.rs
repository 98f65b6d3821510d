//! The loader on a real dataset on disk (written by the generator): the fallback rules,
//! each counted, and batches that do not depend on threads or prefetch depth.

use std::path::Path;
use std::sync::Arc;

use hsat_core::config::HidiscSampling;
use hsat_core::dataset::{DatasetIndex, Split};
use hsat_core::sampler::{
    PatientDraw, SlideDraw, StepPlan, balanced_patients, plan_step, steps_per_epoch,
};

use super::jobs::{DecodeJob, epoch_of, plan_jobs, run_job};
use super::{HostBatch, LoadStats, Loader, LoaderSpec, load_step};
use crate::error::DataError;
use crate::synth::{SynthFormat, SynthSpec, synthesize};

const SIZE: usize = 16;

/// A manifest dataset: 2 classes x 3 patients x 2 slides x 4 patches of 16 px.
fn dataset(dir: &Path) -> DatasetIndex {
    let mut spec = SynthSpec::new(dir.join("data"), SynthFormat::Manifest);
    spec.classes = 2;
    spec.patients_per_class = 3;
    spec.size = SIZE;
    spec.seed = 3;
    synthesize(&spec, &mut |_, _| {}).expect("synthesize");
    DatasetIndex::load_manifest(&dir.join("data/manifest.csv"), None).expect("index")
}

fn spec(threads: usize, prefetch: usize) -> LoaderSpec {
    LoaderSpec {
        seed: 11,
        batch_size: 2,
        sampling: HidiscSampling {
            num_slide_samples: 2,
            num_patch_samples: 2,
            num_transforms: 2,
        },
        image_size: SIZE,
        rand_aug_prob: 0.5,
        dynamic_aug: true,
        num_epochs: 3,
        threads,
        prefetch,
    }
}

/// A plan of two train patients, both slides each, patches 0 and 1 of every slide.
fn two_patient_plan(index: &DatasetIndex) -> StepPlan {
    let patients: Vec<usize> = index
        .patients_in(Split::Train)
        .into_iter()
        .take(2)
        .collect();
    StepPlan {
        step: 4,
        epoch: 1,
        patients: patients
            .iter()
            .enumerate()
            .map(|(slot, &patient)| PatientDraw {
                patient,
                label: index.patients[patient].class,
                slot,
                slides: (0..2)
                    .map(|slide| SlideDraw {
                        slide,
                        patches: vec![0, 1],
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Floats of one patient row (all its slides, patches and views).
fn row(batch: &HostBatch, r: usize) -> &[f32] {
    let len: usize = batch.shape[1..].iter().product();
    &batch.pixels[r * len..(r + 1) * len]
}

/// Floats of one slide of one row.
fn slide(batch: &HostBatch, r: usize, s: usize) -> &[f32] {
    let len: usize = batch.shape[2..].iter().product();
    &row(batch, r)[s * len..(s + 1) * len]
}

fn remove(path: &Path) {
    std::fs::remove_file(path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
}

#[test]
fn planning_makes_one_job_per_patch_with_the_planned_file_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let plan = two_patient_plan(&index);
    let jobs = plan_jobs(&index, &spec(1, 1), &plan, 1);
    assert_eq!(jobs.len(), 2 * 2 * 2);
    for job in &jobs {
        let draw = &plan.patients[job.row];
        let slide = &index.patients[draw.patient].slides[draw.slides[job.slide_pos].slide];
        let planned = draw.slides[job.slide_pos].patches[job.patch_pos];
        assert_eq!(job.candidates[0], slide.patches[planned]);
        assert_eq!(
            job.candidates.len(),
            slide.patches.len(),
            "every patch of the slide"
        );
        assert_eq!(job.view_seeds.len(), 2);
        assert_ne!(job.view_seeds[0], job.view_seeds[1]);
    }
}

#[test]
fn a_patients_jobs_do_not_depend_on_its_row_in_a_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let plan = two_patient_plan(&index);
    let whole = plan_jobs(&index, &spec(1, 1), &plan, 1);
    // The second patient alone, as a rank holding only it would get it.
    let shard = StepPlan {
        patients: vec![plan.patients[1].clone()],
        ..plan.clone()
    };
    let alone = plan_jobs(&index, &spec(1, 1), &shard, 1);
    let second: Vec<DecodeJob> = whole.into_iter().filter(|j| j.row == 1).collect();
    assert_eq!(second.len(), alone.len());
    for (a, b) in second.iter().zip(&alone) {
        assert_eq!(
            (a.candidates.clone(), a.view_seeds.clone()),
            (b.candidates.clone(), b.view_seeds.clone())
        );
    }
}

#[test]
fn a_batch_is_identical_with_1_2_and_4_threads_and_any_prefetch_depth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Arc::new(dataset(dir.path()));
    let balanced = Arc::new(balanced_patients(&index, Split::Train, 11, true));
    let per_epoch = steps_per_epoch(balanced.len(), 2);
    let reference: Vec<HostBatch> = (0..4)
        .map(|step| {
            let plan = plan_step(&index, &balanced, 11, step, 2, &spec(1, 1).sampling);
            load_step(&index, &spec(1, 1), per_epoch, &plan).expect("load")
        })
        .collect();
    assert_eq!(reference[0].shape, [2, 2, 2, 2, 3, SIZE, SIZE]);
    for (threads, prefetch) in [(1, 1), (2, 1), (4, 1), (1, 4), (2, 3), (4, 8)] {
        let mut loader = Loader::start(
            Arc::clone(&index),
            Arc::clone(&balanced),
            spec(threads, prefetch),
            0,
        )
        .expect("start");
        for expected in &reference {
            let got = loader.next_batch(expected.step).expect("batch");
            assert!(
                got == *expected,
                "step {} differs with {threads} threads and prefetch {prefetch}",
                expected.step
            );
        }
    }
}

#[test]
fn a_loader_fed_plans_yields_them_in_order_and_refuses_a_skipped_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Arc::new(dataset(dir.path()));
    let plan = two_patient_plan(&index);
    let (plans, plans_rx) = crossbeam_channel::bounded(2);
    let mut loader =
        Loader::start_with_plans(Arc::clone(&index), spec(2, 2), 3, plans_rx).expect("start");
    plans.send(plan.clone()).expect("send");
    let expected = load_step(&index, &spec(2, 2), 3, &plan).expect("load");
    assert_eq!(expected.epoch, epoch_of(plan.step, 3));
    assert_eq!(loader.next_batch(plan.step).expect("batch"), expected);
    plans
        .send(StepPlan {
            step: plan.step + 1,
            ..plan.clone()
        })
        .expect("send");
    match loader.next_batch(plan.step + 2) {
        Err(DataError::OutOfOrder { held, asked }) => {
            assert_eq!((held, asked), (plan.step + 1, plan.step + 2));
        }
        other => panic!("expected OutOfOrder, got {other:?}"),
    }
    // Closing the plan channel is what ends a plan-fed loader (before it is dropped).
    drop(plans);
}

#[test]
fn a_missing_patch_is_replaced_by_the_next_candidate_of_its_slide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let plan = two_patient_plan(&index);
    let jobs = plan_jobs(&index, &spec(1, 1), &plan, 1);
    let target = &jobs[0];
    remove(&target.candidates[0]);

    let batch = load_step(&index, &spec(1, 1), 3, &plan).expect("load");
    assert_eq!(batch.stats.replaced_patches, 1);
    assert_eq!(batch.stats.replaced_slides, 0);
    assert!(batch.stats.dropped_patients.is_empty());
    assert!(
        batch.stats.messages[0].contains(&target.candidates[0].display().to_string()),
        "{:?}",
        batch.stats.messages
    );
    // The patch's views are the next candidate's file with the planned views' seeds.
    let fallback = run_job(&DecodeJob {
        candidates: target.candidates[1..].to_vec(),
        ..target.clone()
    });
    let views = fallback.views.expect("fallback readable");
    assert_eq!(&batch.pixels[..views.len()], &views[..]);
    assert_eq!(batch.shape[0], 2);
}

#[test]
fn an_unreadable_slide_is_filled_with_another_drawn_slide_of_the_patient() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let plan = two_patient_plan(&index);
    let draw = &plan.patients[0];
    for file in &index.patients[draw.patient].slides[0].patches {
        remove(file);
    }
    let batch = load_step(&index, &spec(1, 1), 3, &plan).expect("load");
    assert_eq!(batch.stats.replaced_slides, 1);
    assert!(batch.stats.dropped_patients.is_empty());
    assert_eq!(slide(&batch, 0, 0), slide(&batch, 0, 1));
    // The other patient is untouched.
    let untouched = load_step(
        &index,
        &spec(1, 1),
        3,
        &StepPlan {
            patients: vec![plan.patients[1].clone()],
            ..plan.clone()
        },
    )
    .expect("load");
    assert_eq!(row(&batch, 1), row(&untouched, 0));
}

#[test]
fn a_patient_without_readable_slides_is_left_out_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let plan = two_patient_plan(&index);
    let gone = &index.patients[plan.patients[0].patient];
    for slide in &gone.slides {
        for file in &slide.patches {
            remove(file);
        }
    }
    let batch = load_step(&index, &spec(1, 1), 3, &plan).expect("load");
    assert_eq!(batch.stats.dropped_patients, vec![gone.id.clone()]);
    assert_eq!(batch.shape[0], 1);
    let kept = &index.patients[plan.patients[1].patient];
    assert_eq!(batch.patient_ids, vec![kept.id.clone()]);
    assert_eq!(batch.labels, vec![kept.class as u32]);
    assert_eq!(batch.pixels.len(), batch.shape.iter().product::<usize>());
}

#[test]
fn a_step_where_nothing_is_readable_fails_naming_the_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let plan = two_patient_plan(&index);
    for draw in &plan.patients {
        for slide in &index.patients[draw.patient].slides {
            for file in &slide.patches {
                remove(file);
            }
        }
    }
    match load_step(&index, &spec(1, 1), 3, &plan) {
        Err(DataError::NothingReadable { step, first }) => {
            assert_eq!(step, plan.step);
            assert!(first.contains(".png"), "{first}");
        }
        other => panic!("expected NothingReadable, got {other:?}"),
    }
}

#[test]
fn an_empty_shard_is_an_empty_batch_not_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dataset(dir.path());
    let plan = StepPlan {
        step: 0,
        epoch: 0,
        patients: Vec::new(),
    };
    let batch = load_step(&index, &spec(1, 1), 3, &plan).expect("load");
    assert_eq!(batch.shape[0], 0);
    assert!(batch.pixels.is_empty());
    assert_eq!(batch.stats, LoadStats::default());
}
