//! Datasets on disk before any work starts: `hsat data check` (the index and every
//! patch decoded, [`check_dataset`]) and the quick start-up check of training and
//! evaluation ([`open_dataset`]: the index and the existence of every file).
//!
//! The checks themselves are pure (`hsat_core::dataset::check`); this module adds
//! what needs this crate: the decoder that probes each patch.

use std::path::Path;

use hsat_core::config::DataConfig;
use hsat_core::dataset::check::{self, CheckReport};
use hsat_core::dataset::{DatasetError, DatasetIndex};

use crate::image::decode_file;

/// Why a dataset cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DatasetCheckError {
    /// The metadata, split file or manifest could not be read into an index.
    #[error("cannot index the dataset")]
    Index(#[source] DatasetError),
    /// The quick check found errors (missing files, empty splits, ...).
    #[error("the dataset has errors; `hsat data check` gives the full report:\n{report}")]
    Broken {
        /// The rendered report: the summary table, then each problem with advice.
        report: String,
    },
}

/// What `hsat data check` reports as it goes.
#[derive(Debug)]
pub enum CheckEvent<'a> {
    /// The dataset was indexed; decoding every patch starts now.
    Indexed(&'a DatasetIndex),
    /// `done` of `total` patches probed (called once with `done = 0` first).
    Progress {
        /// Patches probed so far.
        done: usize,
        /// Patches in the index.
        total: usize,
    },
}

/// `hsat data check`: indexes the dataset of `cfg`, then checks its structure and
/// decodes every patch file. A dataset with errors is not a failure of the check: the
/// returned report lists them ([`CheckReport::is_ok`] says whether training can use it).
///
/// # Errors
///
/// [`DatasetCheckError::Index`] when the index itself cannot be read.
pub fn check_dataset(
    cfg: &DataConfig,
    on_event: &mut dyn FnMut(CheckEvent<'_>),
) -> Result<CheckReport, DatasetCheckError> {
    let index = DatasetIndex::load(cfg).map_err(DatasetCheckError::Index)?;
    on_event(CheckEvent::Indexed(&index));
    let mut probe = |path: &Path| decode_file(path).map(|_| ()).map_err(|e| e.to_string());
    Ok(check::check(&index, &mut probe, &mut |done, total| {
        on_event(CheckEvent::Progress { done, total })
    }))
}

/// Indexes the dataset of `cfg` and runs the quick check (structure and file
/// existence, no decoding): what training and evaluation do before any work starts.
///
/// # Errors
///
/// [`DatasetCheckError::Index`] when the index cannot be read,
/// [`DatasetCheckError::Broken`] (with the rendered report) when the check finds errors.
pub fn open_dataset(cfg: &DataConfig) -> Result<DatasetIndex, DatasetCheckError> {
    let index = DatasetIndex::load(cfg).map_err(DatasetCheckError::Index)?;
    let report = check::quick_check(&index);
    if !report.is_ok() {
        return Err(DatasetCheckError::Broken {
            report: report.render(),
        });
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthFormat, SynthSpec, synthesize};
    use hsat_core::config::{ConfigSources, load};

    fn synth_config(root: &Path) -> DataConfig {
        let spec = SynthSpec {
            out: root.to_path_buf(),
            format: SynthFormat::OpenSrh,
            classes: 2,
            patients_per_class: 2,
            val_patients_per_class: 1,
            slides_per_patient: 1,
            patches_per_slide: 2,
            size: 16,
            seed: 3,
            stain_spread: 1.0,
        };
        synthesize(&spec, &mut |_, _| {}).expect("synth");
        let sources = ConfigSources {
            overrides: vec![
                "data.source=opensrh".to_owned(),
                format!("data.db_root={}", root.display()),
            ],
            ..ConfigSources::default()
        };
        load(&sources).expect("config").data
    }

    #[test]
    fn a_missing_patch_fails_the_quick_check_with_the_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = synth_config(dir.path());
        let index = open_dataset(&cfg).expect("a fresh dataset opens");
        let victim = index.patients[0].slides[0].patches[0].clone();
        std::fs::remove_file(&victim).expect("remove a patch");

        match open_dataset(&cfg) {
            Err(DatasetCheckError::Broken { report }) => {
                assert!(report.contains("missing patch files"), "{report}");
                assert!(report.contains(&victim.display().to_string()), "{report}");
            }
            other => panic!("expected the quick check to refuse, got {other:?}"),
        }
    }

    #[test]
    fn check_dataset_reports_an_unreadable_patch_and_counts_every_patch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = synth_config(dir.path());
        let index = open_dataset(&cfg).expect("a fresh dataset opens");
        let victim = index.patients[0].slides[0].patches[0].clone();
        std::fs::write(&victim, b"not a tiff").expect("truncate a patch");

        let (mut indexed, mut last) = (None, None);
        let report = check_dataset(&cfg, &mut |event| match event {
            CheckEvent::Indexed(index) => indexed = Some(index.num_patches()),
            CheckEvent::Progress { done, total } => last = Some((done, total)),
        })
        .expect("the index loads");
        assert_eq!(indexed, Some(index.num_patches()));
        assert_eq!(last, Some((index.num_patches(), index.num_patches())));
        assert!(!report.is_ok());
        let text = report.render();
        assert!(text.contains("unreadable patch images"), "{text}");
        assert!(text.contains(&victim.display().to_string()), "{text}");
    }

    #[test]
    fn an_absent_dataset_is_an_index_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = ConfigSources {
            overrides: vec![
                "data.source=opensrh".to_owned(),
                format!("data.db_root={}", dir.path().join("nothing").display()),
            ],
            ..ConfigSources::default()
        };
        let cfg = load(&sources).expect("config").data;
        let err = open_dataset(&cfg).expect_err("no dataset there");
        assert!(matches!(err, DatasetCheckError::Index(_)), "{err:?}");
    }
}
