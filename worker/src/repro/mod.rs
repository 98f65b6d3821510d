//! `hsat repro` as one call ([`run_repro`]): the paper's comparison of HSAT with its
//! HiDisc baseline as an experiment with error bars, not a single run.
//!
//! 1. `hsat synth` writes a dataset ([`ReproRequest::dataset`]) into `<out>/data`.
//! 2. For every seed, both methods train from the same config with that
//!    `infra.seed`: HSAT as configured, HiDisc as the same run without the attack
//!    ([`BASELINE_OVERRIDES`]), so the two differ only where the methods do.
//! 3. Every seed's pair is evaluated as `hsat eval` does (white-box attacks at every
//!    budget of `[eval]`, the worst case over them), and the per-sample outcomes are
//!    kept in `<out>/seeds/seed-<S>.json`.
//! 4. [`hsat_core::eval::repro::summarise`] reduces them (mean and sd over seeds,
//!    the difference with a t interval and a cluster bootstrap over seeds and val
//!    patients, the verdict); `report.md`, `report.json` and two plots are written.
//!
//! Nothing is lost on a crash: a training run resumes from its newest checkpoint, a
//! finished one is not trained again, a seed whose outcomes are stored is not
//! evaluated again, and `<out>/plan.json` refuses to mix in the results of another
//! experiment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hsat_core::config::{self, Config, ConfigError, ConfigSources};
use hsat_core::eval::EvalInputError;
use hsat_core::eval::repro::{MethodRun, ReproSummary, SeedRun, summarise};
use hsat_data::plot::{self, PlotError};
use hsat_data::synth::{COMPLETE_MARKER, SynthError, SynthSpec, synthesize};
use serde::{Deserialize, Serialize};
use tch::Device;

mod report;

pub use report::SeedTimes;

use crate::eval::{EvalEvent, EvalRequest, EvalRunError, ModelSpec, run_eval};
use crate::train::run::{RunEvent, RunOptions, TrainRunError, run_training};

/// The baseline's name in the tables.
pub const BASELINE: &str = "HiDisc";
/// The method's name in the tables.
pub const METHOD: &str = "HSAT";

/// What turns the HSAT config into its HiDisc baseline: no inner maximisation,
/// training on the clean views, no HSAT dynamic augmentation
/// (`examples/quickstart_hidisc.toml` is the same change).
pub const BASELINE_OVERRIDES: [&str; 3] = [
    "training.attack.name=none",
    "training.only_adv=false",
    "data.dynamic_aug=false",
];

/// The files [`run_repro`] writes into [`ReproRequest::out`] at the end.
pub const REPORT_FILES: [&str; 4] = [
    "report.md",
    "report.json",
    "repro_accuracy.png",
    "repro_difference.png",
];

/// One experiment.
#[derive(Debug, Clone)]
pub struct ReproRequest {
    /// The HSAT config (file, environment, overrides); `[eval]` sets the
    /// evaluation. `data.*` source keys, `infra.seed` and `infra.out_dir` are set
    /// per run.
    pub sources: ConfigSources,
    /// The dataset to generate; its `out` is replaced by `<out>/data`.
    pub dataset: SynthSpec,
    /// Training seeds (at least one; three or more for a t interval worth reading).
    pub seeds: Vec<u64>,
    /// Folder of everything.
    pub out: PathBuf,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// The clean-accuracy margin of the verdict, in accuracy points (fraction).
    pub clean_margin: f64,
    /// Where training and evaluation run.
    pub device: Device,
}

/// What [`run_repro`] reports as it goes.
#[derive(Debug)]
pub enum ReproEvent<'a> {
    /// The experiment's size, before any work.
    Plan {
        /// Seeds.
        seeds: &'a [u64],
        /// Training runs (two per seed) and evaluations (one per seed) still to do.
        runs_left: usize,
        /// Evaluations still to do.
        evals_left: usize,
    },
    /// `done` of `total` patches of the dataset written.
    Synth {
        /// Patches written.
        done: usize,
        /// Patches.
        total: usize,
    },
    /// The dataset of an earlier invocation is reused.
    DatasetReused(&'a Path),
    /// A training run's event.
    Train {
        /// Its seed.
        seed: u64,
        /// `HiDisc` or `HSAT`.
        method: &'static str,
        /// What happened.
        event: RunEvent<'a>,
    },
    /// An evaluation's event.
    Eval {
        /// Its seed.
        seed: u64,
        /// What happened.
        event: EvalEvent<'a>,
    },
    /// A seed is complete (trained and evaluated, now or earlier).
    SeedDone {
        /// The seed.
        seed: u64,
        /// Its outcomes came from an earlier invocation.
        reused: bool,
        /// Seconds its training and evaluation took when they ran.
        train_seconds: f64,
        /// See `train_seconds`.
        eval_seconds: f64,
    },
}

/// What [`run_repro`] produced.
#[derive(Debug, Clone)]
pub struct ReproOutcome {
    /// The numbers.
    pub summary: ReproSummary,
    /// `report.md`'s text.
    pub report: String,
    /// The files written.
    pub files: Vec<PathBuf>,
}

/// Why an experiment stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReproError {
    /// The config cannot be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No seed.
    #[error("hsat repro needs at least one seed (--seeds 3 gives a t interval)")]
    NoSeeds,
    /// No bootstrap resamples.
    #[error("hsat repro needs at least one bootstrap resample (--resamples 2000 is the default)")]
    NoResamples,
    /// The out folder holds another experiment.
    #[error(
        "{} holds another experiment ({what} differ from this one's): use another --out, or delete it to start over",
        path.display()
    )]
    OtherExperiment {
        /// Its plan file.
        path: PathBuf,
        /// Which parts of the plan differ.
        what: String,
    },
    /// The dataset could not be written.
    #[error(transparent)]
    Synth(#[from] SynthError),
    /// A training run failed.
    #[error("training {method} with seed {seed}: {source}")]
    Train {
        /// The method.
        method: &'static str,
        /// The seed.
        seed: u64,
        /// Why.
        source: Box<TrainRunError>,
    },
    /// An evaluation failed.
    #[error("evaluating seed {seed}: {source}")]
    Eval {
        /// The seed.
        seed: u64,
        /// Why.
        source: Box<EvalRunError>,
    },
    /// The outcomes do not fit together.
    #[error(transparent)]
    Summary(#[from] EvalInputError),
    /// A plot failed.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored file is not what this version writes.
    #[error("{}: {source}; delete it to compute it again", path.display())]
    Stored {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// What identifies an experiment (`<out>/plan.json`): everything its stored runs
/// depend on. Bootstrap settings are not in it; they only change the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Plan {
    config_file: Option<String>,
    config_text: Option<String>,
    environment: BTreeMap<String, String>,
    overrides: Vec<String>,
    dataset: String,
    seeds: Vec<u64>,
}

/// One seed's stored result (`<out>/seeds/seed-<S>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SeedFile {
    run: SeedRun,
    train_seconds: f64,
    eval_seconds: f64,
}

/// Runs (or completes) the experiment of `request` and writes its report.
///
/// # Errors
///
/// [`ReproError`]: a bad config, an out folder of another experiment, or a failed
/// dataset, training run, evaluation or file.
pub fn run_repro(
    request: &ReproRequest,
    on_event: &mut dyn FnMut(ReproEvent<'_>),
) -> Result<ReproOutcome, ReproError> {
    if request.seeds.is_empty() {
        return Err(ReproError::NoSeeds);
    }
    if request.resamples == 0 {
        return Err(ReproError::NoResamples);
    }
    let out = &request.out;
    let data_dir = out.join("data");
    let mut dataset = request.dataset.clone();
    dataset.out = data_dir.clone();
    // Validate both configs before anything is written.
    let method_config = |seed: u64, baseline: bool| -> Result<Config, ConfigError> {
        let method = if baseline { BASELINE } else { METHOD };
        let mut sources = request.sources.clone();
        sources.overrides.extend([
            format!("data.source={}", dataset.format.name()),
            format!("data.db_root={}", data_dir.display()),
            format!("infra.seed={seed}"),
            format!(
                "infra.out_dir={}",
                out.join("train")
                    .join(format!("{method}-seed{seed}"))
                    .display()
            ),
        ]);
        if baseline {
            sources
                .overrides
                .extend(BASELINE_OVERRIDES.map(str::to_owned));
        }
        config::load(&sources)
    };
    method_config(request.seeds[0], true)?;
    method_config(request.seeds[0], false)?;
    // Bad sizes are refused before plan.json records them (a corrected rerun would
    // otherwise be refused as another experiment).
    dataset.validate()?;

    write_plan(request, &dataset)?;
    let seed_path = |seed: u64| out.join("seeds").join(format!("seed-{seed}.json"));
    let stored: Vec<Option<SeedFile>> = request
        .seeds
        .iter()
        .map(|&seed| read_seed(&seed_path(seed)))
        .collect::<Result<_, _>>()?;
    let evals_left = stored.iter().filter(|s| s.is_none()).count();
    on_event(ReproEvent::Plan {
        seeds: &request.seeds,
        runs_left: 2 * evals_left,
        evals_left,
    });

    if evals_left > 0 {
        if data_dir.join(COMPLETE_MARKER).is_file() {
            on_event(ReproEvent::DatasetReused(&data_dir));
        } else {
            synthesize(&dataset, &mut |done, total| {
                on_event(ReproEvent::Synth { done, total });
            })?;
        }
    }

    let mut runs = Vec::with_capacity(request.seeds.len());
    let mut times = Vec::with_capacity(request.seeds.len());
    for (&seed, stored) in request.seeds.iter().zip(stored) {
        let (file, reused) = match stored {
            Some(file) => (file, true),
            None => {
                let file = train_and_evaluate(request, seed, &method_config, on_event)?;
                write_atomically(&seed_path(seed), &to_json(&file))?;
                (file, false)
            }
        };
        on_event(ReproEvent::SeedDone {
            seed,
            reused,
            train_seconds: file.train_seconds,
            eval_seconds: file.eval_seconds,
        });
        times.push(SeedTimes {
            seed,
            train_seconds: file.train_seconds,
            eval_seconds: file.eval_seconds,
        });
        runs.push(file.run);
    }

    let summary = summarise(&runs, request.resamples, 0x5eed, request.clean_margin)?;
    let settings = method_config(request.seeds[0], false)?;
    let report = report::markdown(&summary, &dataset, &settings, &runs, &times);
    let files: Vec<PathBuf> = REPORT_FILES.iter().map(|f| out.join(f)).collect();
    write_atomically(&files[0], &report)?;
    write_atomically(&files[1], &to_json(&summary))?;
    plot::repro_accuracy(&summary, &files[2])?;
    plot::repro_difference(&summary, &files[3])?;
    Ok(ReproOutcome {
        summary,
        report,
        files,
    })
}

/// Trains both methods with `seed` (resuming or skipping runs already there) and
/// evaluates the pair: the seed's stored result.
fn train_and_evaluate(
    request: &ReproRequest,
    seed: u64,
    method_config: &dyn Fn(u64, bool) -> Result<Config, ConfigError>,
    on_event: &mut dyn FnMut(ReproEvent<'_>),
) -> Result<SeedFile, ReproError> {
    let out = &request.out;
    let started = Instant::now();
    let mut models = Vec::with_capacity(2);
    for (method, baseline) in [(BASELINE, true), (METHOD, false)] {
        let cfg = method_config(seed, baseline)?;
        let out_dir = PathBuf::from(&cfg.infra.out_dir);
        run_training(cfg, request.device, RunOptions::default(), &mut |event| {
            on_event(ReproEvent::Train {
                seed,
                method,
                event,
            });
        })
        .map_err(|source| ReproError::Train {
            method,
            seed,
            source: Box::new(source),
        })?;
        models.push(ModelSpec {
            name: method.to_owned(),
            path: out_dir,
        });
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let eval = EvalRequest {
        // The method's config: its `[eval]` section, and its seed for the
        // attacks' random starts.
        config: method_config(seed, false)?,
        models,
        out: out.join("eval").join(format!("seed-{seed}")),
        transfer: false,
        device: request.device,
    };
    let report = run_eval(&eval, &mut |event| {
        on_event(ReproEvent::Eval { seed, event })
    })
    .map_err(|source| ReproError::Eval {
        seed,
        source: Box::new(source),
    })?;
    let run = SeedRun {
        seed,
        samples: report.samples,
        methods: report
            .models
            .into_iter()
            .map(|model| MethodRun {
                name: model.name,
                steps: model.step,
                outcomes: model.outcomes,
            })
            .collect(),
    };
    Ok(SeedFile {
        run,
        train_seconds,
        eval_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes `<out>/plan.json`, or checks that the one there is this experiment's.
fn write_plan(request: &ReproRequest, dataset: &SynthSpec) -> Result<(), ReproError> {
    let file = request.sources.file.as_ref();
    let config_text = match file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| ReproError::Io {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let plan = Plan {
        config_file: file.map(|p| p.display().to_string()),
        config_text,
        environment: request
            .sources
            .env
            .iter()
            .filter(|(name, _)| name.to_ascii_uppercase().starts_with("HSAT__"))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        overrides: request.sources.overrides.clone(),
        // The sizes, not where the data lives: `--out ./runs/repro` is the same
        // experiment as `--out runs/repro`.
        dataset: format!(
            "{:?}",
            SynthSpec {
                out: PathBuf::new(),
                ..dataset.clone()
            }
        ),
        seeds: request.seeds.clone(),
    };
    let path = request.out.join("plan.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let stored: Plan =
                serde_json::from_str(&text).map_err(|source| ReproError::Stored {
                    path: path.clone(),
                    source,
                })?;
            let mut differ = Vec::new();
            // The file's text, not its path: `-c ./x.toml` is `-c x.toml`.
            if stored.config_text != plan.config_text {
                differ.push("the config file");
            }
            if stored.environment != plan.environment {
                differ.push("the HSAT__ environment variables");
            }
            if stored.overrides != plan.overrides {
                differ.push("the --set overrides");
            }
            if stored.dataset != plan.dataset {
                differ.push("the dataset sizes");
            }
            if stored.seeds != plan.seeds {
                differ.push("the seeds");
            }
            if differ.is_empty() {
                Ok(())
            } else {
                Err(ReproError::OtherExperiment {
                    path,
                    what: differ.join(", "),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomically(&path, &to_json(&plan))
        }
        Err(source) => Err(ReproError::Io { path, source }),
    }
}

/// A stored seed, or `None` when there is none (a torn file cannot exist: files are
/// synced and renamed into place).
fn read_seed(path: &Path) -> Result<Option<SeedFile>, ReproError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| ReproError::Stored {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ReproError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Plain data of strings and numbers: serialising cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// Writes `text` to `<path>.tmp`, syncs it and renames it into place (then syncs the
/// folder), so a crash or a power loss leaves the old file or the new one, never half
/// of one.
fn write_atomically(path: &Path, text: &str) -> Result<(), ReproError> {
    use std::io::Write as _;
    let io = |source| ReproError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}
