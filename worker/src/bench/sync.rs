//! Gradient synchronisation of hsat's ResNet-50 encoder between two local worker
//! processes with [`GradientSync`], against PyTorch DDP (Gloo) on the same
//! parameter shapes (`bench/ddp_sync_reference.py`), alternating round by round.
//!
//! This process is only the driver: it hosts the c10d store of the hsat pair, starts
//! two hsat rank processes (`<rank_program> bench sync --as-rank R ...`, which call
//! [`sync_rank`]) and two Python ranks, and speaks a line protocol with all four over
//! stdin/stdout. Every rank times its own sync after a barrier; a round's time is the
//! slower rank's.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{BenchError, median, script};
use crate::collective::{Backend, GradientSync, ProcessGroup, Store};
use crate::model::Encoder;

const WORLD: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(120);

/// What to time.
#[derive(Debug, Clone)]
pub struct SyncBenchOptions {
    /// Timed rounds per implementation (after two warm-up rounds each).
    pub rounds: usize,
    /// Bucket size in MiB for both implementations.
    pub bucket_mb: usize,
    /// Intra-op threads per rank process.
    pub threads: usize,
    /// Python interpreter with torch 2.13.
    pub python: PathBuf,
    /// The executable whose `bench sync --as-rank R --store-port P --bucket-mb B
    /// --threads T` runs [`sync_rank`] (`hsat`).
    pub rank_program: PathBuf,
}

/// What the benchmark reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncBenchEvent {
    /// The encoder's gradients are sized; the ranks are about to start.
    Started {
        /// Parameter tensors.
        tensors: usize,
        /// Parameters (fp32 elements).
        parameters: i64,
    },
    /// Every rank is ready; each side as its rank 0 described itself
    /// (`<parameters> parameters in <buckets> buckets`).
    Ready {
        /// The hsat pair.
        hsat: String,
        /// The DDP pair.
        ddp: String,
    },
}

/// Seconds per round of both implementations, each sorted ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncTimes {
    /// hsat's `GradientSync::average`.
    pub hsat: Vec<f64>,
    /// PyTorch DDP's gradient sync.
    pub ddp: Vec<f64>,
    /// Median of `hsat`.
    pub hsat_median: f64,
    /// Median of `ddp`.
    pub ddp_median: f64,
}

/// Runs the benchmark as the driver.
pub fn bench_sync(
    options: &SyncBenchOptions,
    mut on_event: impl FnMut(&SyncBenchEvent),
) -> Result<SyncTimes, BenchError> {
    let encoder = resnet50()?;
    let shapes: Vec<Vec<i64>> = encoder.iter().map(Tensor::size).collect();
    on_event(&SyncBenchEvent::Started {
        tensors: shapes.len(),
        parameters: shapes.iter().map(|s| s.iter().product::<i64>()).sum(),
    });
    let dir = tempfile::tempdir().map_err(BenchError::io("creating a scratch directory"))?;
    let shapes_file = dir.path().join("shapes.json");
    std::fs::write(&shapes_file, shapes_json(&shapes))
        .map_err(BenchError::io(format!("writing {}", shapes_file.display())))?;

    let store = Store::host("127.0.0.1", 0, WORLD, TIMEOUT)?;
    let mut ours = Vec::new();
    for rank in 0..WORLD {
        let mut cmd = Command::new(&options.rank_program);
        cmd.args(["bench", "sync", "--as-rank", &rank.to_string()])
            .args(["--store-port", &store.port().to_string()])
            .args(["--bucket-mb", &options.bucket_mb.to_string()])
            .args(["--threads", &options.threads.to_string()]);
        ours.push(
            Rank::start(cmd, "hsat rank").map_err(BenchError::io(format!(
                "starting a hsat rank ({})",
                options.rank_program.display()
            )))?,
        );
    }
    let script = script("ddp_sync_reference.py");
    let ddp_port = free_port()?;
    let mut ddp = Vec::new();
    for rank in 0..WORLD {
        let mut cmd = Command::new(&options.python);
        cmd.arg(&script)
            .args(["--rank", &rank.to_string(), "--world-size", "2"])
            .args(["--port", &ddp_port.to_string()])
            .args(["--threads", &options.threads.to_string()])
            .args(["--bucket-mb", &options.bucket_mb.to_string()])
            .arg("--shapes")
            .arg(&shapes_file);
        ddp.push(Rank::start(cmd, "DDP reference rank").map_err(|source| {
            BenchError::StartReference {
                script: script.clone(),
                python: options.python.clone(),
                source,
            }
        })?);
    }
    let hsat = ready_all(&mut ours)?;
    let ddp_ready = ready_all(&mut ddp)?;
    on_event(&SyncBenchEvent::Ready {
        hsat,
        ddp: ddp_ready,
    });

    let (mut ours_times, mut ddp_times) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        // Alternate which implementation goes first, and let the other's threads settle.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for hsat_turn in order {
            if hsat_turn {
                ours_times.push(round_all(&mut ours)?);
            } else {
                ddp_times.push(round_all(&mut ddp)?);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for rank in ours.iter_mut().chain(ddp.iter_mut()) {
        rank.quit();
    }
    let (hsat_median, ddp_median) = (median(&mut ours_times), median(&mut ddp_times));
    Ok(SyncTimes {
        hsat: ours_times,
        ddp: ddp_times,
        hsat_median,
        ddp_median,
    })
}

/// The parameters of hsat's ResNet-50 encoder with the config's default head.
fn resnet50() -> Result<Vec<Tensor>, BenchError> {
    let mut model = hsat_core::config::Config::default().model;
    model.backbone = hsat_core::config::Backbone::ResNet50;
    model.init_checkpoint = None;
    let encoder = Encoder::from_config(&model, Device::Cpu)?;
    Ok(encoder.parameters().into_iter().map(|(_, t)| t).collect())
}

fn shapes_json(shapes: &[Vec<i64>]) -> String {
    let items: Vec<String> = shapes
        .iter()
        .map(|s| {
            let dims: Vec<String> = s.iter().map(i64::to_string).collect();
            format!("[{}]", dims.join(","))
        })
        .collect();
    format!("[{}]", items.join(","))
}

fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(BenchError::io("finding a free port for the DDP pair"))?;
    let port = listener
        .local_addr()
        .map_err(BenchError::io("finding a free port for the DDP pair"))?
        .port();
    Ok(port)
}

/// One hsat rank of the benchmark (the `--as-rank` process): same protocol as the
/// Python reference (`ready <parameters> <buckets>`, then one line of seconds per
/// `round` read on stdin, until `quit`).
pub fn sync_rank(
    rank: usize,
    store_port: u16,
    bucket_mb: usize,
    threads: usize,
) -> Result<(), BenchError> {
    tch::set_num_threads(threads as i32);
    tch::manual_seed(rank as i64);
    let params = resnet50()?;
    // Fixed gradients (what `sum_p (p * c_p).sum()` gives the Python side).
    for p in &params {
        let c = Tensor::f_randn(p.size(), (Kind::Float, Device::Cpu))?;
        (p * c).f_sum(Kind::Float)?.f_backward()?;
    }
    let store = Store::connect("127.0.0.1", store_port, WORLD, TIMEOUT)?;
    let pg = ProcessGroup::new(&store, "bench", rank, WORLD, Backend::Gloo, TIMEOUT)?;
    let mut sync = GradientSync::new(bucket_mb << 20);
    let mut one_round = || -> Result<(f64, usize), BenchError> {
        pg.barrier()?;
        let start = Instant::now();
        let stats = sync.average(&pg, &params, 1.0, WORLD as f64)?;
        Ok((start.elapsed().as_secs_f64(), stats.buckets))
    };
    one_round()?;
    let (_, buckets) = one_round()?;
    let numel: i64 = params.iter().map(Tensor::numel).map(|n| n as i64).sum();
    let mut out = std::io::stdout().lock();
    let io = BenchError::io;
    writeln!(out, "ready {numel} {buckets}")
        .and_then(|()| out.flush())
        .map_err(io("writing to the driver"))?;
    for line in std::io::stdin().lock().lines() {
        match line.map_err(io("reading from the driver"))?.trim() {
            "quit" => break,
            "round" => {
                let (seconds, _) = one_round()?;
                writeln!(out, "{seconds:.6}")
                    .and_then(|()| out.flush())
                    .map_err(io("writing to the driver"))?;
            }
            other => return Err(BenchError::Reference(format!("unknown command {other:?}"))),
        }
    }
    Ok(())
}

/// A rank process driven over stdin/stdout.
pub(super) struct Rank {
    what: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Rank {
    pub(super) fn start(mut cmd: Command, what: &'static str) -> std::io::Result<Self> {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        // Both are piped just above: take() cannot come back empty.
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("the rank has no stdin/stdout"));
        };
        Ok(Rank {
            what,
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    pub(super) fn read_line(&mut self) -> Result<String, BenchError> {
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .map_err(BenchError::io(format!("reading from a {}", self.what)))?;
        if read == 0 {
            let status = self
                .child
                .wait()
                .map_err(BenchError::io(format!("waiting for a {}", self.what)))?;
            return Err(BenchError::Reference(format!(
                "a {} exited ({status}); see its messages above",
                self.what
            )));
        }
        Ok(line.trim().to_owned())
    }

    pub(super) fn send(&mut self, line: &str) -> Result<(), BenchError> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(BenchError::io(format!("writing to a {}", self.what)))
    }

    pub(super) fn quit(&mut self) {
        let _ = self.send("quit");
        let _ = self.child.wait();
    }
}

/// Waits for `ready <parameters> <buckets>` from every rank; describes rank 0's.
pub(super) fn ready_all(ranks: &mut [Rank]) -> Result<String, BenchError> {
    let mut first = None;
    for rank in ranks.iter_mut() {
        let line = rank.read_line()?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() != 3 || parts[0] != "ready" {
            return Err(BenchError::Reference(format!(
                "{} said {line:?}, expected `ready <parameters> <buckets>`",
                rank.what
            )));
        }
        first.get_or_insert_with(|| format!("{} parameters in {} buckets", parts[1], parts[2]));
    }
    first.ok_or_else(|| BenchError::Reference("no ranks".into()))
}

/// One round on every rank of a pair; the slower rank's seconds.
fn round_all(ranks: &mut [Rank]) -> Result<f64, BenchError> {
    round_all_with(ranks, "round")
}

/// Sends `command` to every rank; the slower rank's seconds.
pub(super) fn round_all_with(ranks: &mut [Rank], command: &str) -> Result<f64, BenchError> {
    for rank in ranks.iter_mut() {
        rank.send(command)?;
    }
    let mut slowest = 0.0f64;
    for rank in ranks.iter_mut() {
        let line = rank.read_line()?;
        let seconds: f64 = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                BenchError::Reference(format!("{} said {line:?}, expected seconds", rank.what))
            })?;
        slowest = slowest.max(seconds);
    }
    Ok(slowest)
}
