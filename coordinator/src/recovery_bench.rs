//! The recovery benchmark (`hsat bench recovery`): how long a real job stands still
//! after a process dies. It runs a small job with real processes (an `hsat
//! coordinator` and N `hsat worker`s on a scratch `hsat synth` dataset, small_cnn at
//! 32 px) and, trial after trial, `kill -9`s one worker (then starts a replacement)
//! or the coordinator (restarted at once on the same address and `out_dir`), and
//! measures the time from the kill to the next step committed by a later
//! generation, read from the ledger the coordinator appends to. Prints the median,
//! the spread and the targets.
//!
//! The steps themselves take a fraction of a second here, so the figures are the
//! control plane's: failure detection, regrouping, rendezvous, state broadcast and
//! one step.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct RecoveryBenchOptions {
    /// The `hsat` executable (its `synth`, `coordinator` and `worker` subcommands).
    pub program: PathBuf,
    /// Workers of the job (the figure is for 3).
    pub workers: usize,
    /// Trials of each kind.
    pub trials: usize,
    /// Give up a trial whose job has not committed again after this long.
    pub trial_limit: Duration,
    /// Scratch directory (dataset, config, job); kept for inspection on failure.
    pub scratch: PathBuf,
}

/// Which process a trial kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    /// One worker (a replacement is started after the measurement).
    Worker,
    /// The coordinator (restarted at once on the same address and `out_dir`).
    Coordinator,
}

impl Victim {
    /// How the report names it.
    pub fn describe(self) -> &'static str {
        match self {
            Victim::Worker => "kill -9 of one worker",
            Victim::Coordinator => "kill -9 of the coordinator (restarted at once)",
        }
    }
}

/// What the benchmark reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryEvent {
    /// The scratch dataset and the job are being set up.
    Preparing {
        /// Where.
        scratch: PathBuf,
    },
    /// The job runs with every worker; trials start.
    Running {
        /// Steps committed so far.
        committed: usize,
    },
    /// One trial's result.
    Trial {
        /// What was killed.
        victim: Victim,
        /// 1-based trial number.
        trial: usize,
        /// Kill to next committed step.
        seconds: f64,
    },
}

/// Every trial's seconds, per victim.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RecoveryReport {
    /// Worker-loss trials.
    pub worker: Vec<f64>,
    /// Coordinator-loss trials.
    pub coordinator: Vec<f64>,
}

/// Median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Why the benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryBenchError {
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// A file-system or process call failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The error.
        source: std::io::Error,
    },
    /// A process misbehaved or the job stalled; the message holds its output.
    #[error("{0}")]
    Job(String),
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> RecoveryBenchError {
    let action = action.into();
    move |source| RecoveryBenchError::Io { action, source }
}

/// Runs the trials (worker losses first, then coordinator losses) and returns
/// every measurement; `on_event` sees each as it happens.
///
/// # Errors
///
/// [`RecoveryBenchError::Options`] for fewer than 2 workers or no trials;
/// [`RecoveryBenchError::Job`] when a process exits unexpectedly or the job does
/// not commit within `trial_limit` (with every process's output);
/// [`RecoveryBenchError::Io`] for scratch files and process starts.
pub fn bench_recovery(
    options: &RecoveryBenchOptions,
    on_event: &mut dyn FnMut(RecoveryEvent),
) -> Result<RecoveryReport, RecoveryBenchError> {
    if options.workers < 2 {
        return Err(RecoveryBenchError::Options(
            "--workers must be at least 2: a job that loses its only worker has nobody to continue"
                .into(),
        ));
    }
    if options.trials == 0 {
        return Err(RecoveryBenchError::Options(
            "--trials must be at least 1".into(),
        ));
    }
    on_event(RecoveryEvent::Preparing {
        scratch: options.scratch.clone(),
    });
    let mut job = Job::prepare(options)?;
    job.start_coordinator()?;
    for k in 0..options.workers {
        job.start_worker(k)?;
    }
    let committed = job.wait_for_full_generation(None)?;
    on_event(RecoveryEvent::Running { committed });
    let mut report = RecoveryReport::default();
    for trial in 1..=options.trials {
        let k = (trial - 1) % options.workers;
        let seconds = job.measure(Victim::Worker, k)?;
        report.worker.push(seconds);
        on_event(RecoveryEvent::Trial {
            victim: Victim::Worker,
            trial,
            seconds,
        });
        job.start_worker(k)?;
        job.wait_for_full_generation(None)?;
    }
    for trial in 1..=options.trials {
        let seconds = job.measure(Victim::Coordinator, 0)?;
        report.coordinator.push(seconds);
        on_event(RecoveryEvent::Trial {
            victim: Victim::Coordinator,
            trial,
            seconds,
        });
        job.wait_for_full_generation(None)?;
    }
    Ok(report)
}

/// A child process with its output captured.
struct Process {
    name: String,
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Process {
    fn spawn(name: String, mut command: Command) -> Result<Self, RecoveryBenchError> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting {name}")))?;
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let streams: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ];
        for mut stream in streams.into_iter().flatten() {
            let output = Arc::clone(&output);
            readers.push(std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut text) = output.lock() {
                        text.push_str(&String::from_utf8_lossy(&buffer[..n]));
                    }
                }
            }));
        }
        Ok(Self {
            name,
            child,
            output,
            readers,
        })
    }

    fn output(&self) -> String {
        self.output.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

struct Job {
    program: PathBuf,
    config: PathBuf,
    ledger: PathBuf,
    listen: String,
    /// The job token the coordinator and workers share.
    token_file: PathBuf,
    workers: usize,
    limit: Duration,
    coordinator: Option<Process>,
    worker_processes: Vec<Option<Process>>,
    /// Processes killed so far, for the failure report.
    retired: Vec<Process>,
}

/// One commit record of the ledger, as far as the benchmark needs it.
#[derive(Debug, Clone, Copy)]
struct Commit {
    generation: u64,
    world: usize,
}

impl Job {
    fn prepare(options: &RecoveryBenchOptions) -> Result<Self, RecoveryBenchError> {
        let scratch = &options.scratch;
        fs::create_dir_all(scratch).map_err(io(format!("creating {}", scratch.display())))?;
        let data = scratch.join("data");
        if !data.exists() {
            let output = Command::new(&options.program)
                .arg("synth")
                .arg("--out")
                .arg(&data)
                .args([
                    "--format",
                    "opensrh",
                    "--classes",
                    "2",
                    "--patients-per-class",
                    "6",
                ])
                .args([
                    "--slides",
                    "2",
                    "--patches",
                    "4",
                    "--size",
                    "32",
                    "--seed",
                    "5",
                ])
                .output()
                .map_err(io("running hsat synth"))?;
            if !output.status.success() {
                return Err(RecoveryBenchError::Job(format!(
                    "hsat synth failed:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                )));
            }
        }
        // A fresh job each run: the out_dir of an earlier run would be resumed.
        let out_dir = scratch.join("run");
        if out_dir.exists() {
            fs::remove_dir_all(&out_dir).map_err(io(format!("removing {}", out_dir.display())))?;
        }
        let config = scratch.join("job.toml");
        let text = format!(
            "[infra]\nseed = 3\nout_dir = \"{out}\"\nthreads = 1\nlog_every = 1000\n\
             [data]\nsource = \"opensrh\"\ndb_root = \"{data}\"\nimage_size = 32\n\
             [data.loader]\nthreads = 1\n\
             [data.hidisc]\nnum_slide_samples = 2\nnum_patch_samples = 2\nnum_transforms = 2\n\
             [model]\nbackbone = \"small_cnn\"\nnum_embedding_out = 8\n\
             [training]\nbatch_size = {batch}\nnum_epochs = 100000\nonly_adv = true\nsave_checkpoint_interval = 20\n\
             [training.attack]\nname = \"pgd\"\niters = 1\n",
            out = out_dir.display(),
            data = data.display(),
            batch = options.workers * 2,
        );
        fs::write(&config, text).map_err(io(format!("writing {}", config.display())))?;
        let token_file = scratch.join("token");
        let token = hsat_proto::auth::Token::generate()
            .map_err(|err| RecoveryBenchError::Job(err.to_string()))?;
        hsat_proto::auth::write_token_file(&token_file, &token)
            .map_err(|err| RecoveryBenchError::Job(err.to_string()))?;
        // A fixed port, so that the restarted coordinator is where the workers look.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io("choosing a free port"))?
            .port();
        Ok(Job {
            program: options.program.clone(),
            config,
            ledger: out_dir.join("coordinator").join("ledger.jsonl"),
            listen: format!("127.0.0.1:{port}"),
            token_file,
            workers: options.workers,
            limit: options.trial_limit,
            coordinator: None,
            worker_processes: (0..options.workers).map(|_| None).collect(),
            retired: Vec::new(),
        })
    }

    fn start_coordinator(&mut self) -> Result<(), RecoveryBenchError> {
        let mut command = Command::new(&self.program);
        command
            .args(["coordinator", "--config"])
            .arg(&self.config)
            .args(["--listen", &self.listen, "--workers"])
            .arg(self.workers.to_string())
            .arg("--token-file")
            .arg(&self.token_file)
            .env("RUST_LOG", "warn");
        self.coordinator = Some(Process::spawn("coordinator".into(), command)?);
        Ok(())
    }

    fn start_worker(&mut self, k: usize) -> Result<(), RecoveryBenchError> {
        let mut command = Command::new(&self.program);
        command
            .args(["worker", "--coordinator", &self.listen, "--config"])
            .arg(&self.config)
            .args(["--name", &format!("bench-{k}")])
            .arg("--token-file")
            .arg(&self.token_file)
            .env("RUST_LOG", "warn");
        let process = Process::spawn(format!("worker {k}"), command)?;
        if let Some(old) = self.worker_processes[k].replace(process) {
            self.retired.push(old);
        }
        Ok(())
    }

    fn commits(&self) -> Vec<Commit> {
        let Ok(text) = fs::read_to_string(&self.ledger) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|record| {
                let kind = record.get("kind").and_then(|k| k.as_str());
                kind.is_none_or(|k| k == "commit") && record.get("ranks").is_some()
            })
            .map(|record| Commit {
                generation: record
                    .get("generation")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                world: record
                    .get("ranks")
                    .and_then(|r| r.as_array())
                    .map_or(0, Vec::len),
            })
            .collect()
    }

    /// Waits until a step committed by every worker, after `after` commits (or
    /// any), and returns the number of commits.
    fn wait_for_full_generation(
        &mut self,
        after: Option<usize>,
    ) -> Result<usize, RecoveryBenchError> {
        let deadline = Instant::now() + self.limit;
        loop {
            let commits = self.commits();
            let skip = after.unwrap_or(0);
            if commits.iter().skip(skip).any(|c| c.world == self.workers) {
                return Ok(commits.len());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(self.stalled("no step committed by every worker"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the victim and returns the seconds until a later generation commits.
    fn measure(&mut self, victim: Victim, k: usize) -> Result<f64, RecoveryBenchError> {
        let before = self.commits();
        let generation = before.iter().map(|c| c.generation).max().unwrap_or(0);
        let killed = Instant::now();
        match victim {
            Victim::Worker => {
                if let Some(mut process) = self.worker_processes[k].take() {
                    process.kill();
                    self.retired.push(process);
                }
            }
            Victim::Coordinator => {
                if let Some(mut process) = self.coordinator.take() {
                    process.kill();
                    self.retired.push(process);
                }
                self.start_coordinator()?;
            }
        }
        let deadline = killed + self.limit;
        loop {
            let commits = self.commits();
            if commits
                .iter()
                .skip(before.len())
                .any(|c| c.generation > generation)
            {
                return Ok(killed.elapsed().as_secs_f64());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(self.stalled(&format!(
                    "no step committed within {:?} after the {}",
                    self.limit,
                    victim.describe()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn check_alive(&mut self) -> Result<(), RecoveryBenchError> {
        let mut exited = Vec::new();
        if let Some(process) = self.coordinator.as_mut()
            && let Some(status) = process.exited()
        {
            exited.push(format!("{} exited ({status})", process.name));
        }
        for process in self.worker_processes.iter_mut().flatten() {
            if let Some(status) = process.exited() {
                exited.push(format!("{} exited ({status})", process.name));
            }
        }
        if exited.is_empty() {
            Ok(())
        } else {
            Err(self.stalled(&exited.join("; ")))
        }
    }

    fn stalled(&self, why: &str) -> RecoveryBenchError {
        let mut text = format!(
            "{why}; ledger {}; output of every process:\n",
            self.ledger.display()
        );
        let all = self
            .coordinator
            .iter()
            .chain(self.worker_processes.iter().flatten())
            .chain(self.retired.iter());
        for process in all {
            let output = process.output();
            let tail: Vec<&str> = output.lines().rev().take(15).collect();
            text.push_str(&format!("--- {} (last lines)\n", process.name));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        RecoveryBenchError::Job(text)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for process in self
            .coordinator
            .iter_mut()
            .chain(self.worker_processes.iter_mut().flatten())
        {
            process.kill();
        }
    }
}

/// `<scratch>` default: a fresh directory under the system's temporary directory.
pub fn default_scratch() -> PathBuf {
    std::env::temp_dir().join(format!("hsat-bench-recovery-{}", std::process::id()))
}

/// Deletes the scratch directory (after a successful run).
pub fn remove_scratch(scratch: &Path) {
    let _ = fs::remove_dir_all(scratch);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn options_are_checked_before_anything_runs() {
        let options = RecoveryBenchOptions {
            program: PathBuf::from("/nonexistent/hsat"),
            workers: 1,
            trials: 3,
            trial_limit: Duration::from_secs(1),
            scratch: PathBuf::from("/nonexistent/scratch"),
        };
        let err = bench_recovery(&options, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, RecoveryBenchError::Options(m) if m.contains("--workers")),
            "{err}"
        );
        let options = RecoveryBenchOptions {
            workers: 3,
            trials: 0,
            ..options
        };
        let err = bench_recovery(&options, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, RecoveryBenchError::Options(m) if m.contains("--trials")),
            "{err}"
        );
    }
}
