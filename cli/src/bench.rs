//! `hsat bench step`: one full HSAT step of this engine against the PyTorch reference
//! step (`bench/reference_step.py`, which back-propagates into the parameters during
//! the attack as the paper's code does), alternating in one run on the same machine.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hsat_core::config::{Backbone, LossType};
use hsat_worker::model::Encoder;
use hsat_worker::train::attack::Pgd;
use hsat_worker::train::loss::HierarchicalLoss;
use hsat_worker::train::optim::AdamW;
use hsat_worker::train::step::{OuterObjective, StepInputs, train_step};
use tch::{Device, Kind, Tensor};

/// Options of `hsat bench step`.
#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// Backbones to time (comma separated); each with its image size from --image-size.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["resnet18".to_string(), "resnet50".to_string()])]
    backbone: Vec<String>,
    /// Image side per backbone, in the same order (the targets: 64 and 96).
    #[arg(long, value_delimiter = ',', default_values_t = vec![64usize, 96])]
    image_size: Vec<usize>,
    /// Timed steps per implementation (after one warm-up step each).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Intra-op threads for both implementations.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// PGD iterations.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Python interpreter with torch 2.13 (default: $HSAT_PYTHON, else setup's venv).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// Runs the benchmark and prints one line per backbone.
pub fn step(args: StepArgs) -> anyhow::Result<()> {
    if args.backbone.len() != args.image_size.len() {
        bail!(
            "give one --image-size per --backbone ({} backbones, {} sizes)",
            args.backbone.len(),
            args.image_size.len()
        );
    }
    tch::set_num_threads(args.threads as i32);
    let python = args.python.clone().unwrap_or_else(default_python);
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../bench/reference_step.py"
    ));
    println!(
        "hsat bench step: full HSAT step (PGD-{}, batch 2x2x2x2 views, eps 8/255), {} threads, {} rounds",
        args.iters, args.threads, args.rounds
    );
    println!(
        "{:<10} {:>6} {:>12} {:>12} {:>8}",
        "backbone", "px", "hsat (s)", "torch (s)", "speedup"
    );
    for (name, &size) in args.backbone.iter().zip(&args.image_size) {
        let backbone: Backbone = name
            .parse()
            .map_err(|e| anyhow::anyhow!("--backbone {name}: {e}"))?;
        let mut reference =
            Reference::start(&python, &script, name, size, args.threads, args.iters)?;
        let mut ours = OurStep::new(backbone, size, args.iters)?;
        ours.run()?; // warm-up
        let (mut ours_times, mut ref_times) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            ours_times.push(ours.run()?);
            // Let the other runtime's OpenMP threads stop spinning before timing this one.
            std::thread::sleep(Duration::from_millis(200));
            ref_times.push(reference.step()?);
            std::thread::sleep(Duration::from_millis(200));
        }
        reference.quit();
        let (o, r) = (median(&mut ours_times), median(&mut ref_times));
        println!(
            "{:<10} {:>6} {:>12.4} {:>12.4} {:>7.2}x",
            name,
            size,
            o,
            r,
            r / o
        );
    }
    Ok(())
}

pub(crate) fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("HSAT_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("HSAT_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            base.join("hsat")
        });
    cache.join("venv-torch-2.13.0/bin/python")
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// This engine's step on a fixed random batch.
struct OurStep {
    model: Encoder,
    optimizer: AdamW,
    loss: HierarchicalLoss,
    images: Tensor,
    pgd: Pgd,
}

impl OurStep {
    fn new(backbone: Backbone, size: usize, iters: usize) -> anyhow::Result<Self> {
        tch::manual_seed(0);
        let model = Encoder::new(backbone, &[], 128, Device::Cpu)?;
        // The paper's optimiser and loss settings, as the config defaults hold them.
        let defaults = hsat_core::config::Config::default().training;
        let optimizer = AdamW::new(model.parameters(), &defaults.optimizer)?;
        let loss = HierarchicalLoss::from(&defaults.objective);
        let s = size as i64;
        let images = Tensor::f_rand([2, 2, 2, 2, 3, s, s], (Kind::Float, Device::Cpu))?;
        let pgd = Pgd {
            eps: 8.0 / 255.0,
            alpha: 2.0 / 255.0,
            iters,
            loss_type: LossType::P_S_PT,
        };
        Ok(OurStep {
            model,
            optimizer,
            loss,
            images,
            pgd,
        })
    }

    fn run(&mut self) -> anyhow::Result<f64> {
        let started = Instant::now();
        let delta0 = self.pgd.random_start(&self.images)?;
        train_step(
            &self.model,
            &self.loss,
            &mut self.optimizer,
            StepInputs {
                images: &self.images,
                attack: Some((self.pgd, delta0)),
                objective: OuterObjective::OnlyAdv,
                lr: 1e-3,
            },
        )?;
        Ok(started.elapsed().as_secs_f64())
    }
}

/// The PyTorch reference, driven over stdin/stdout one step at a time.
struct Reference {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Reference {
    fn start(
        python: &PathBuf,
        script: &PathBuf,
        backbone: &str,
        size: usize,
        threads: usize,
        iters: usize,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(python)
            .arg(script)
            .args(["--backbone", backbone, "--image-size", &size.to_string()])
            .args(["--threads", &threads.to_string(), "--iters", &iters.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the PyTorch reference {} with {}; run `bash scripts/setup.sh` or pass --python", script.display(), python.display()))?;
        let stdin = child.stdin.take().context("reference stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("reference stdout")?);
        let mut reference = Reference {
            child,
            stdin,
            stdout,
        };
        let line = reference.read_line()?;
        if line != "ready" {
            bail!("the PyTorch reference said {line:?} instead of \"ready\"");
        }
        Ok(reference)
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the PyTorch reference exited early (see its error above)");
        }
        Ok(line.trim().to_owned())
    }

    fn step(&mut self) -> anyhow::Result<f64> {
        writeln!(self.stdin, "step")?;
        self.stdin.flush()?;
        let line = self.read_line()?;
        line.parse()
            .with_context(|| format!("the PyTorch reference printed {line:?}, not a time"))
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// Options of `hsat bench data`.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Patch side of the generated dataset, in pixels.
    #[arg(long, default_value_t = 300)]
    size: usize,
    /// Timed passes over the files per implementation.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Patches per slide of the generated dataset (3 classes x 3 patients x 2 slides).
    #[arg(long, default_value_t = 8)]
    patches: usize,
    /// Optimiser steps of the training run that measures data wait (0 skips it).
    #[arg(long, default_value_t = 6)]
    train_steps: usize,
    /// Python interpreter with torch 2.13 (default: $HSAT_PYTHON, else setup's venv).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// Runs the data benchmark.
pub fn data(args: DataArgs) -> anyhow::Result<()> {
    use hsat_core::rng::{SplitMix64, derive_seed};
    use hsat_data::image::{AugmentConfig, augment, base_process, decode_file};
    use hsat_data::synth::{SynthFormat, SynthSpec, synthesize};

    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let root = dir.path().join("srh");
    let spec = SynthSpec {
        out: root.clone(),
        format: SynthFormat::OpenSrh,
        classes: 3,
        patients_per_class: 3,
        val_patients_per_class: 1,
        slides_per_patient: 2,
        patches_per_slide: args.patches,
        size: args.size,
        seed: 0,
        stain_spread: 1.0,
    };
    synthesize(&spec, &mut |_, _| {})?;
    let mut files = Vec::new();
    collect_files(&root.join("studies"), "tif", &mut files)?;
    files.sort();
    println!(
        "hsat bench data: {} OpenSRH-style patches of {}x{} px, decode + base processing + full augmentation (p = 0.3), one thread each",
        files.len(),
        args.size,
        args.size
    );

    let cfg = AugmentConfig {
        rand_aug_prob: 0.3,
        dynamic: false,
        strength: 1.0,
        out_size: args.size,
    };
    let ours = |round: u64| -> anyhow::Result<f64> {
        let started = Instant::now();
        for (i, path) in files.iter().enumerate() {
            let base = base_process(&decode_file(path)?);
            let mut rng = SplitMix64::new(derive_seed(round, &[i as u64]));
            let view = augment(&base, &cfg, &mut rng);
            anyhow::ensure!(
                view.width == args.size,
                "augmentation returned {} px",
                view.width
            );
        }
        Ok(files.len() as f64 / started.elapsed().as_secs_f64())
    };
    let python = args.python.clone().unwrap_or_else(default_python);
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../bench/augment_reference.py"
    ));
    let theirs = || -> anyhow::Result<f64> {
        let out = Command::new(&python)
            .arg(&script)
            .args(["--size", &args.size.to_string()])
            .args(&files)
            .env("OMP_NUM_THREADS", "1")
            .output()
            .with_context(|| {
                format!(
                    "starting {} with {}; run `bash scripts/setup.sh` or pass --python",
                    script.display(),
                    python.display()
                )
            })?;
        anyhow::ensure!(
            out.status.success(),
            "the torchvision reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let (n, secs) = text
            .trim()
            .split_once('/')
            .context("unexpected reference output")?;
        Ok(n.parse::<f64>()? / secs.parse::<f64>()?)
    };
    let (mut ours_rates, mut their_rates) = (Vec::new(), Vec::new());
    ours(u64::MAX)?; // warm-up: page cache, allocator
    for round in 0..args.rounds {
        ours_rates.push(ours(round as u64)?);
        their_rates.push(theirs()?);
    }
    let (o, t) = (median(&mut ours_rates), median(&mut their_rates));
    println!("{:<28} {:>12}", "pipeline", "patches/s/core");
    println!("{:<28} {:>12.1}", "hsat (Rust)", o);
    println!("{:<28} {:>12.1}", "torchvision 0.28", t);
    println!("speedup per core: {:.2}x", o / t);

    if args.train_steps > 0 {
        data_wait(&root, args.size, args.train_steps)?;
    }
    Ok(())
}

/// Trains ResNet-18 with PGD-5 from the generated files and reports the share of time
/// the training loop waited for the loader (after the first step, which includes
/// start-up).
fn data_wait(root: &std::path::Path, size: usize, steps: usize) -> anyhow::Result<()> {
    use std::sync::Arc;

    use hsat_core::config::{AttackKind, Config, DataSource};
    use hsat_core::dataset::{DatasetIndex, Split};
    use hsat_core::sampler::balanced_patients;
    use hsat_data::loader::LoaderSpec;
    use hsat_worker::data::FileSource;
    use hsat_worker::train::trainer::Trainer;

    let train_size = size.min(96);
    let mut cfg = Config::default();
    cfg.data.source = DataSource::OpenSrh;
    cfg.data.db_root = root.to_path_buf();
    cfg.data.image_size = train_size;
    cfg.model.backbone = Backbone::ResNet18;
    cfg.training.batch_size = 3;
    cfg.training.attack.kind = AttackKind::Pgd;
    cfg.training.only_adv = true;
    cfg.training.save_checkpoint_interval = 0;
    let scratch = tempfile::tempdir()?;
    cfg.infra.out_dir = scratch.path().to_path_buf();
    let index = DatasetIndex::load(&cfg.data)?;
    let balanced = balanced_patients(&index, Split::Train, cfg.infra.seed, true);
    let steps_per_epoch =
        hsat_core::sampler::steps_per_epoch(balanced.len(), cfg.training.batch_size) as usize;
    cfg.training.num_epochs = steps.div_ceil(steps_per_epoch).max(1);
    let spec = LoaderSpec {
        seed: cfg.infra.seed,
        batch_size: cfg.training.batch_size,
        sampling: cfg.data.hidisc,
        image_size: train_size,
        rand_aug_prob: cfg.data.rand_aug_prob,
        dynamic_aug: true,
        num_epochs: cfg.training.num_epochs,
        threads: hsat_core::config::available_cores(),
        prefetch: 2,
    };
    let mut source = FileSource::start(Arc::new(index), Arc::new(balanced), spec, 0)?;
    let mut trainer = Trainer::new(cfg, Device::Cpu)?;
    let (mut busy, mut waiting, mut counted) = (0.0, 0.0, 0);
    trainer.fit(&mut source, |r| {
        if r.step > 0 {
            busy += r.step_seconds;
            waiting += r.data_seconds;
            counted += 1;
        }
    })?;
    println!(
        "training run (ResNet-18, PGD-5, 3 patients x 2 x 2 x 2 views at {train_size} px, {counted} steps after the first): waited for data {:.2}% of step time ({:.3} s of {:.2} s)",
        100.0 * waiting / (busy + waiting),
        waiting,
        busy + waiting
    );
    Ok(())
}

fn collect_files(dir: &std::path::Path, ext: &str, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, ext, out)?;
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}
