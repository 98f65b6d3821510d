//! `hsat bench sync`: gradient synchronisation of hsat's ResNet-50 encoder between two
//! local worker processes with [`GradientSync`], against PyTorch DDP (Gloo) on the same
//! parameter shapes (`bench/ddp_sync_reference.py`), alternating round by round.
//!
//! This process is only the driver: it hosts the c10d store of the hsat pair, starts two
//! hsat rank processes (this binary again, with the hidden `--as-rank`) and two Python
//! ranks, and speaks a line protocol with all four over stdin/stdout. Every rank times
//! its own sync after a barrier; a round's time is the slower rank's.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hsat_worker::collective::{Backend, GradientSync, ProcessGroup, Store};
use hsat_worker::model::Encoder;
use tch::{Device, Kind, Tensor};

const WORLD: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(120);

/// Options of `hsat bench sync`.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Timed rounds per implementation (after two warm-up rounds each).
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Bucket size in MiB for both implementations (DDP's default: 25).
    #[arg(long, default_value_t = 25)]
    bucket_mb: usize,
    /// Intra-op threads per rank process (two ranks share the machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Python interpreter with torch 2.13 (default: $HSAT_PYTHON, else setup's venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Internal: run as this rank of the hsat pair.
    #[arg(long, hide = true)]
    as_rank: Option<usize>,
    /// Internal: port of the driver's store.
    #[arg(long, hide = true)]
    store_port: Option<u16>,
}

/// Runs the benchmark (or, with `--as-rank`, one hsat rank of it).
pub fn sync(args: SyncArgs) -> anyhow::Result<()> {
    if let (Some(rank), Some(port)) = (args.as_rank, args.store_port) {
        return hsat_rank(rank, port, &args);
    }
    let encoder = resnet50()?;
    let shapes: Vec<Vec<i64>> = encoder.iter().map(Tensor::size).collect();
    let numel: i64 = shapes.iter().map(|s| s.iter().product::<i64>()).sum();
    println!(
        "hsat bench sync: ResNet-50 encoder gradients ({} tensors, {:.2}M parameters, {:.1} MB fp32), 2 local processes, gloo over loopback, {} MiB buckets, {} thread(s) per rank, {} rounds",
        shapes.len(),
        numel as f64 / 1e6,
        numel as f64 * 4.0 / 1e6,
        args.bucket_mb,
        args.threads,
        args.rounds
    );
    let dir = tempfile::tempdir()?;
    let shapes_file = dir.path().join("shapes.json");
    std::fs::write(&shapes_file, shapes_json(&shapes))?;

    let store = Store::host("127.0.0.1", 0, WORLD, TIMEOUT)?;
    let exe = std::env::current_exe()?;
    let mut ours = Vec::new();
    for rank in 0..WORLD {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "sync", "--as-rank", &rank.to_string()])
            .args(["--store-port", &store.port().to_string()])
            .args(["--bucket-mb", &args.bucket_mb.to_string()])
            .args(["--threads", &args.threads.to_string()]);
        ours.push(Rank::start(cmd, "hsat rank")?);
    }
    let python = args
        .python
        .clone()
        .unwrap_or_else(crate::bench::default_python);
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../bench/ddp_sync_reference.py"
    ));
    let ddp_port = free_port()?;
    let mut ddp = Vec::new();
    for rank in 0..WORLD {
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .args(["--rank", &rank.to_string(), "--world-size", "2"])
            .args(["--port", &ddp_port.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .args(["--bucket-mb", &args.bucket_mb.to_string()])
            .arg("--shapes")
            .arg(&shapes_file);
        ddp.push(Rank::start(cmd, "DDP reference rank").with_context(|| {
            format!(
                "starting {} with {}; run `bash scripts/setup.sh` or pass --python",
                script.display(),
                python.display()
            )
        })?);
    }
    let ready_ours = ready_all(&mut ours)?;
    let ready_ddp = ready_all(&mut ddp)?;
    println!("hsat: {ready_ours}; DDP: {ready_ddp}");

    let (mut ours_times, mut ddp_times) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
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
    let (o, d) = (median(&mut ours_times), median(&mut ddp_times));
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "", "median s", "min s", "max s"
    );
    print_row("hsat GradientSync::average", &ours_times, o);
    print_row("PyTorch DDP (gloo)", &ddp_times, d);
    println!("ratio hsat/DDP: {:.2}x (target <= 1.10x)", o / d);
    Ok(())
}

fn print_row(name: &str, sorted: &[f64], median: f64) {
    println!(
        "{:<28} {:>10.4} {:>10.4} {:>10.4}",
        name,
        median,
        sorted.first().copied().unwrap_or(f64::NAN),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
}

/// The parameters of hsat's ResNet-50 encoder with the config's default head.
fn resnet50() -> anyhow::Result<Vec<Tensor>> {
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

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// One hsat rank: same protocol as the Python reference (`ready`, then one line of
/// seconds per `round`).
fn hsat_rank(rank: usize, port: u16, args: &SyncArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads as i32);
    tch::manual_seed(rank as i64);
    let params = resnet50()?;
    // Fixed gradients (what `sum_p (p * c_p).sum()` gives the Python side).
    for p in &params {
        let c = Tensor::f_randn(p.size(), (Kind::Float, Device::Cpu))?;
        (p * c).f_sum(Kind::Float)?.f_backward()?;
    }
    let store = Store::connect("127.0.0.1", port, WORLD, TIMEOUT)?;
    let pg = ProcessGroup::new(&store, "bench", rank, WORLD, Backend::Gloo, TIMEOUT)?;
    let mut sync = GradientSync::new(args.bucket_mb << 20);
    let mut one_round = || -> anyhow::Result<(f64, usize)> {
        pg.barrier()?;
        let start = Instant::now();
        let stats = sync.average(&pg, &params, 1.0, WORLD as f64)?;
        Ok((start.elapsed().as_secs_f64(), stats.buckets))
    };
    one_round()?;
    let (_, buckets) = one_round()?;
    let numel: i64 = params.iter().map(Tensor::numel).map(|n| n as i64).sum();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {numel} {buckets}")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "quit" => break,
            "round" => {
                let (seconds, _) = one_round()?;
                writeln!(out, "{seconds:.6}")?;
                out.flush()?;
            }
            other => bail!("unknown command {other:?}"),
        }
    }
    Ok(())
}

/// A rank process driven over stdin/stdout.
struct Rank {
    what: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Rank {
    fn start(mut cmd: Command, what: &'static str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting a {what}"))?;
        let stdin = child.stdin.take().context("rank stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("rank stdout")?);
        Ok(Rank {
            what,
            child,
            stdin,
            stdout,
        })
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("a {} exited ({status}); see its messages above", self.what);
        }
        Ok(line.trim().to_owned())
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn quit(&mut self) {
        let _ = self.send("quit");
        let _ = self.child.wait();
    }
}

/// Waits for `ready <parameters> <buckets>` from every rank; describes rank 0's.
fn ready_all(ranks: &mut [Rank]) -> anyhow::Result<String> {
    let mut first = None;
    for rank in ranks.iter_mut() {
        let line = rank.read_line()?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            parts.len() == 3 && parts[0] == "ready",
            "{} said {line:?}, expected `ready <parameters> <buckets>`",
            rank.what
        );
        first.get_or_insert_with(|| format!("{} parameters in {} buckets", parts[1], parts[2]));
    }
    first.context("no ranks")
}

/// One round on every rank of a pair; the slower rank's seconds.
fn round_all(ranks: &mut [Rank]) -> anyhow::Result<f64> {
    for rank in ranks.iter_mut() {
        rank.send("round")?;
    }
    let mut slowest = 0.0f64;
    for rank in ranks.iter_mut() {
        let line = rank.read_line()?;
        let seconds: f64 = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{} said {line:?}, expected seconds", rank.what))?;
        slowest = slowest.max(seconds);
    }
    Ok(slowest)
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}
