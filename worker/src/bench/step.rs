//! One full HSAT step of this engine against the PyTorch reference step
//! (`bench/reference_step.py`, which back-propagates into the parameters during the
//! attack as the paper's code does), alternating in one run on the same machine.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use hsat_core::config::{Backbone, LossType};
use tch::{Device, Kind, Tensor};

use super::{BenchError, median, script};
use crate::model::Encoder;
use crate::train::attack::Pgd;
use crate::train::loss::HierarchicalLoss;
use crate::train::optim::AdamW;
use crate::train::step::{OuterObjective, StepInputs, train_step};

/// What to time.
#[derive(Debug, Clone)]
pub struct StepBenchOptions {
    /// Backbones to time, by config name (`resnet18`, ...).
    pub backbones: Vec<String>,
    /// Image side per backbone, in the same order.
    pub image_sizes: Vec<usize>,
    /// Timed steps per implementation (after one warm-up step each).
    pub rounds: usize,
    /// Intra-op threads for both implementations.
    pub threads: usize,
    /// PGD iterations.
    pub iters: usize,
    /// Python interpreter with torch 2.13.
    pub python: PathBuf,
}

/// The medians for one backbone.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTiming {
    /// The backbone's config name.
    pub backbone: String,
    /// Image side in pixels.
    pub image_size: usize,
    /// Median seconds of this engine's step.
    pub hsat_seconds: f64,
    /// Median seconds of the PyTorch reference step.
    pub torch_seconds: f64,
}

/// What the benchmark reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum StepBenchEvent {
    /// The options are consistent; timing starts.
    Started,
    /// One backbone's medians.
    Timing(StepTiming),
}

/// Times every backbone; `on_event` gets each one's medians as soon as they are
/// measured.
pub fn bench_step(
    options: &StepBenchOptions,
    mut on_event: impl FnMut(&StepBenchEvent),
) -> Result<(), BenchError> {
    if options.backbones.len() != options.image_sizes.len() {
        return Err(BenchError::Options(format!(
            "give one --image-size per --backbone ({} backbones, {} sizes)",
            options.backbones.len(),
            options.image_sizes.len()
        )));
    }
    // Parse them all first: a typo fails before minutes of timing.
    let backbones = options
        .backbones
        .iter()
        .map(|name| {
            name.parse::<Backbone>()
                .map_err(|e| BenchError::Options(format!("--backbone {name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    tch::set_num_threads(options.threads as i32);
    let script = script("reference_step.py");
    on_event(&StepBenchEvent::Started);
    for ((name, &backbone), &size) in options
        .backbones
        .iter()
        .zip(&backbones)
        .zip(&options.image_sizes)
    {
        let mut reference = Reference::start(
            &options.python,
            &script,
            name,
            size,
            options.threads,
            options.iters,
        )?;
        let mut ours = OurStep::new(backbone, size, options.iters)?;
        ours.run()?; // warm-up
        let (mut ours_times, mut ref_times) = (Vec::new(), Vec::new());
        for _ in 0..options.rounds {
            ours_times.push(ours.run()?);
            // Let the other runtime's OpenMP threads stop spinning before timing this one.
            std::thread::sleep(Duration::from_millis(200));
            ref_times.push(reference.step()?);
            std::thread::sleep(Duration::from_millis(200));
        }
        reference.quit();
        on_event(&StepBenchEvent::Timing(StepTiming {
            backbone: name.clone(),
            image_size: size,
            hsat_seconds: median(&mut ours_times),
            torch_seconds: median(&mut ref_times),
        }));
    }
    Ok(())
}

/// This engine's step on a fixed random batch (also the step `hsat bench
/// checkpoint` checkpoints).
pub(super) struct OurStep {
    pub(super) model: Encoder,
    pub(super) optimizer: AdamW,
    loss: HierarchicalLoss,
    images: Tensor,
    pgd: Pgd,
}

impl OurStep {
    pub(super) fn new(backbone: Backbone, size: usize, iters: usize) -> Result<Self, BenchError> {
        tch::manual_seed(0);
        let model = Encoder::new(backbone, &[], 128, Device::Cpu)?;
        // The paper's optimiser and loss settings, as the config defaults hold them.
        let defaults = hsat_core::config::Config::default().training;
        let optimizer = AdamW::new(model.parameters(), &defaults.optimizer)?;
        let loss = HierarchicalLoss::from(&defaults.objective);
        let s = size as i64;
        let images = Tensor::f_rand([2, 2, 2, 2, 3, s, s], (Kind::Float, Device::Cpu))?;
        let pgd = Pgd {
            variant: crate::train::attack::PgdVariant::Pgd,
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

    /// One step; its wall time in seconds.
    pub(super) fn run(&mut self) -> Result<f64, BenchError> {
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
        python: &Path,
        script: &Path,
        backbone: &str,
        size: usize,
        threads: usize,
        iters: usize,
    ) -> Result<Self, BenchError> {
        let mut child = Command::new(python)
            .arg(script)
            .args(["--backbone", backbone, "--image-size", &size.to_string()])
            .args([
                "--threads",
                &threads.to_string(),
                "--iters",
                &iters.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| BenchError::StartReference {
                script: script.to_path_buf(),
                python: python.to_path_buf(),
                source,
            })?;
        // Both are piped just above: take() cannot come back empty.
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(BenchError::Reference(
                "the PyTorch reference has no stdin/stdout".into(),
            ));
        };
        let mut reference = Reference {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let line = reference.read_line()?;
        if line != "ready" {
            return Err(BenchError::Reference(format!(
                "the PyTorch reference said {line:?} instead of \"ready\""
            )));
        }
        Ok(reference)
    }

    fn read_line(&mut self) -> Result<String, BenchError> {
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .map_err(BenchError::io("reading from the PyTorch reference"))?;
        if read == 0 {
            return Err(BenchError::Reference(
                "the PyTorch reference exited early (see its error above)".into(),
            ));
        }
        Ok(line.trim().to_owned())
    }

    fn step(&mut self) -> Result<f64, BenchError> {
        writeln!(self.stdin, "step")
            .and_then(|()| self.stdin.flush())
            .map_err(BenchError::io("writing to the PyTorch reference"))?;
        let line = self.read_line()?;
        line.parse().map_err(|_| {
            BenchError::Reference(format!(
                "the PyTorch reference printed {line:?}, not a time"
            ))
        })
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(backbones: &[&str], sizes: &[usize]) -> StepBenchOptions {
        StepBenchOptions {
            backbones: backbones.iter().map(|b| (*b).to_owned()).collect(),
            image_sizes: sizes.to_vec(),
            rounds: 1,
            threads: 1,
            iters: 1,
            // Never reached: both refusals come before any process starts.
            python: PathBuf::from("/nonexistent/python"),
        }
    }

    #[test]
    fn a_size_per_backbone_is_required_before_anything_runs() {
        let mut events = Vec::new();
        let err = bench_step(&options(&["resnet18", "resnet50"], &[64]), |e| {
            events.push(e.clone());
        })
        .unwrap_err();
        assert_eq!(events, []);
        assert!(
            matches!(&err, BenchError::Options(m) if m == "give one --image-size per --backbone (2 backbones, 1 sizes)"),
            "{err:?}"
        );
    }

    #[test]
    fn an_unknown_backbone_is_named_before_the_reference_starts() {
        let mut events = Vec::new();
        let err = bench_step(&options(&["resnet18", "resnet7"], &[64, 64]), |e| {
            events.push(e.clone());
        })
        .unwrap_err();
        assert_eq!(events, []);
        assert!(
            matches!(&err, BenchError::Options(m) if m.starts_with("--backbone resnet7: ")),
            "{err:?}"
        );
    }
}
