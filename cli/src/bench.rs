//! `hsat bench step`: one full HSAT step of this engine against the PyTorch reference
//! step (`bench/reference_step.py`, which back-propagates into the parameters during
//! the attack as the paper's code does), alternating in one run on the same machine.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hsat_core::config::{Backbone, LossType, OptimizerConfig};
use hsat_worker::model::Encoder;
use hsat_worker::train::attack::Pgd;
use hsat_worker::train::loss::HierarchicalLoss;
use hsat_worker::train::optim::AdamW;
use hsat_worker::train::step::{OuterObjective, StepPlan, train_step};
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

fn default_python() -> PathBuf {
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
        let optimizer = AdamW::new(
            model.parameters(),
            &OptimizerConfig {
                learn_rate: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
        )?;
        let loss = HierarchicalLoss {
            lambda_patient: 1.0,
            lambda_slide: 1.0,
            lambda_patch: 1.0,
            temperature: 0.07,
            base_temperature: 0.07,
        };
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
            StepPlan {
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
