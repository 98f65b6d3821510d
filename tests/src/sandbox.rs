//! A cluster of real `hsat` processes on localhost: one coordinator on an
//! OS-chosen port and N workers, each with its output (both streams) captured.
//!
//! A scenario starts it with [`Sandbox::start`], then kills (`-9`), stops
//! (SIGTERM), restarts or adds workers, kills and restarts the coordinator (on the
//! same port and out_dir, [`Sandbox::restart_coordinator`]), waits for committed steps or for the job's
//! end (each with a deadline), and checks the ledger. Every wait that runs past its
//! deadline panics with the captured output of every process, and dropping the
//! sandbox kills whatever still runs, so a failed scenario leaves no stray process.
//!
//! Authentication is on, as by default: the sandbox writes a random job token
//! beside the config ([`Sandbox::token_file`], mode 0600) and passes
//! `--token-file` to the coordinator and to every worker (unless a worker's own
//! flags name another).
//!
//! ```no_run
//! # use std::time::Duration;
//! # use hsat_tests::sandbox::{Sandbox, SandboxSpec};
//! # let config = std::path::PathBuf::from("job.toml");
//! let mut sandbox = Sandbox::start(SandboxSpec::new(&config, 3).coordinator_args(&["--lease-ms", "3000"]));
//! sandbox.wait_for_commits(1, Duration::from_secs(120));
//! sandbox.kill_worker(1);
//! let end = sandbox.wait_for_end(Duration::from_secs(240));
//! assert!(end.coordinator.success(), "{}", sandbox.logs());
//! sandbox.assert_ledger_complete(&[2, 3]);
//! ```

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hsat_core::config::{self, ConfigSources};

use crate::hsat_binary;
use crate::ledger::{Ledger, ledger_path};

/// How often the waits look again.
const POLL: Duration = Duration::from_millis(50);

/// What to start: the job's config file, the workers the coordinator waits for and
/// the workers started with it, and extra flags.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The job's TOML config (coordinator and workers use the same file).
    pub config: PathBuf,
    /// `hsat coordinator --workers`: workers to wait for before training starts.
    pub expected_workers: usize,
    /// Workers started with the coordinator, named `w0`, `w1`, ...
    pub start_workers: usize,
    /// Extra `hsat coordinator` flags (`--lease-ms 3000`).
    pub coordinator_args: Vec<String>,
    /// Extra flags of every worker.
    pub worker_args: Vec<String>,
    /// How long the coordinator may take to print its address.
    pub startup_deadline: Duration,
    /// Wait until the coordinator serves its job (its dataset indexed, its ledger
    /// read: health SERVING), not only until it listens (default true).
    pub wait_ready: bool,
}

impl SandboxSpec {
    /// A coordinator that waits for `workers` workers, and those workers.
    pub fn new(config: impl Into<PathBuf>, workers: usize) -> Self {
        SandboxSpec {
            config: config.into(),
            expected_workers: workers,
            start_workers: workers,
            coordinator_args: Vec::new(),
            // A worker that cannot reach the coordinator should fail the test
            // quickly, not after the default two minutes.
            worker_args: vec!["--connect-timeout".into(), "20".into()],
            startup_deadline: Duration::from_secs(60),
            wait_ready: true,
        }
    }

    /// Returns from [`Sandbox::start`] as soon as the coordinator listens, before
    /// its job is ready (health NOT_SERVING while it indexes).
    pub fn listening_only(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// Starts `count` workers with the coordinator (the rest are added later).
    pub fn start_workers(mut self, count: usize) -> Self {
        self.start_workers = count;
        self
    }

    /// Adds flags to the coordinator's command line.
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_args
            .extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Adds flags to every worker's command line.
    pub fn worker_args(mut self, args: &[&str]) -> Self {
        self.worker_args
            .extend(args.iter().map(|a| (*a).to_owned()));
        self
    }
}

/// One process of the sandbox and its captured output.
struct Process {
    name: String,
    /// The worker's own extra flags (kept for a restart).
    extra: Vec<String>,
    child: Child,
    exit: Option<ExitStatus>,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Process {
    fn spawn(name: &str, mut command: Command, extra: Vec<String>) -> Process {
        // Plain text logs, so tests can match `key=value` fields.
        command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(capture(stdout, Arc::clone(&output)));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(capture(stderr, Arc::clone(&output)));
        }
        Process {
            name: name.to_owned(),
            extra,
            child,
            exit: None,
            output,
            readers,
        }
    }

    fn output(&self) -> String {
        lock(&self.output).clone()
    }

    /// The exit status once the process has ended; its output is then complete.
    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            let status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.name))?;
            self.exit = Some(status);
            // The pipes close with the process: the readers end after the last line.
            for reader in self.readers.drain(..) {
                let _ = reader.join();
            }
        }
        self.exit
    }

    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// `kill -9`, and waits for the process to be gone.
    fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.try_exit()
            .unwrap_or_else(|| panic!("{} survived kill -9", self.name))
    }

    /// Sends SIGTERM (what Kubernetes sends) and returns at once.
    fn terminate(&mut self) {
        assert!(
            self.try_exit().is_none(),
            "{} already exited: nothing to stop",
            self.name
        );
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-s", "TERM", &pid])
            .status()
            .unwrap_or_else(|e| panic!("cannot run `kill -s TERM {pid}`: {e}"));
        assert!(
            status.success(),
            "`kill -s TERM {pid}` ({}) failed",
            self.name
        );
    }
}

fn lock(output: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    // A reader thread that panicked leaves a string that is still valid text.
    output
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Appends every line of `stream` to `output` until the stream closes.
fn capture(stream: impl Read + Send + 'static, output: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            lock(&output).push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    })
}

/// How the job ended: the coordinator's exit status and every worker process's
/// (a restarted worker appears once per process, in start order).
#[derive(Debug, Clone)]
pub struct JobEnd {
    /// The coordinator's exit status.
    pub coordinator: ExitStatus,
    /// `(name, exit status)` of every worker process the sandbox started.
    pub workers: Vec<(String, ExitStatus)>,
}

impl JobEnd {
    /// The exit status of the last process named `name`.
    pub fn worker(&self, name: &str) -> ExitStatus {
        self.workers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, status)| *status)
            .unwrap_or_else(|| panic!("no worker named {name} was started"))
    }
}

/// A running cluster; see the module docs.
pub struct Sandbox {
    config: PathBuf,
    out_dir: PathBuf,
    address: String,
    /// The job token file every process gets.
    token_file: PathBuf,
    worker_args: Vec<String>,
    /// `--workers` and the extra flags of the coordinator (kept for a restart).
    expected_workers: usize,
    coordinator_args: Vec<String>,
    startup_deadline: Duration,
    wait_ready: bool,
    coordinator: Process,
    /// Coordinator processes replaced by a restart (their output stays readable).
    old_coordinators: Vec<Process>,
    /// The current process of each worker slot (`w{k}` is slot `k`).
    workers: Vec<Process>,
    /// Workers replaced by a restart (their output stays readable).
    retired: Vec<Process>,
}

impl Sandbox {
    /// Starts `hsat coordinator --listen 127.0.0.1:0` and waits until it prints its
    /// address, then starts `spec.start_workers` workers. Panics with the
    /// coordinator's output if it exits or stays silent past the startup deadline.
    pub fn start(spec: SandboxSpec) -> Sandbox {
        let cfg = config::load(&ConfigSources {
            file: Some(spec.config.clone()),
            env: Default::default(),
            overrides: Vec::new(),
        })
        .unwrap_or_else(|e| {
            panic!(
                "the sandbox's config {} is invalid: {e}",
                spec.config.display()
            )
        });
        let token_file = write_token_beside(&spec.config);
        let mut coordinator_args = spec.coordinator_args.clone();
        coordinator_args.extend(["--token-file".to_owned(), token_file.display().to_string()]);
        let (coordinator, address) = start_coordinator(
            &spec.config,
            "127.0.0.1:0",
            spec.expected_workers,
            &coordinator_args,
            spec.startup_deadline,
            spec.wait_ready,
        );
        let mut sandbox = Sandbox {
            config: spec.config,
            out_dir: cfg.infra.out_dir.clone(),
            address,
            token_file,
            worker_args: spec.worker_args,
            expected_workers: spec.expected_workers,
            coordinator_args,
            startup_deadline: spec.startup_deadline,
            wait_ready: spec.wait_ready,
            coordinator,
            old_coordinators: Vec::new(),
            workers: Vec::new(),
            retired: Vec::new(),
        };
        for _ in 0..spec.start_workers {
            sandbox.add_worker();
        }
        sandbox
    }

    /// The coordinator's address, `127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The job token file (the coordinator's `--token-file`).
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// The job token itself.
    pub fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.token_file.display()))
            .trim()
            .to_owned()
    }

    /// The job's config file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The job's `infra.out_dir`.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Starts one more worker, `w{k}`, and returns its slot `k`.
    pub fn add_worker(&mut self) -> usize {
        self.add_worker_with(&[])
    }

    /// Starts one more worker with extra flags of its own (`--set key=value`) and
    /// returns its slot `k` (its name is `w{k}`).
    pub fn add_worker_with(&mut self, extra: &[&str]) -> usize {
        let k = self.workers.len();
        let extra = extra.iter().map(|a| (*a).to_owned()).collect();
        let process = self.spawn_worker(&format!("w{k}"), extra);
        self.workers.push(process);
        k
    }

    /// Starts one more worker that reaches the coordinator at `address` instead of
    /// its listening address (through a [`crate::proxy::FaultProxy`], say), with extra
    /// flags of its own; returns its slot `k`. A restart keeps the address.
    pub fn add_worker_through(&mut self, address: &str, extra: &[&str]) -> usize {
        let mut all = vec!["--coordinator", address];
        all.extend_from_slice(extra);
        self.add_worker_with(&all)
    }

    fn spawn_worker(&self, name: &str, extra: Vec<String>) -> Process {
        let mut command = Command::new(hsat_binary());
        command.arg("worker");
        // A worker added through another address names it among its own flags.
        if !extra.iter().any(|arg| arg == "--coordinator") {
            command.args(["--coordinator", &self.address]);
        }
        command
            .arg("--config")
            .arg(&self.config)
            .args(["--name", name])
            .args(&self.worker_args);
        if !extra.iter().any(|arg| arg == "--token-file") {
            command.arg("--token-file").arg(&self.token_file);
        }
        command.args(&extra);
        Process::spawn(name, command, extra)
    }

    fn worker_mut(&mut self, k: usize) -> &mut Process {
        let count = self.workers.len();
        self.workers
            .get_mut(k)
            .unwrap_or_else(|| panic!("no worker w{k}: the sandbox has {count}"))
    }

    /// `kill -9` worker `k` (no goodbye: the lease or a peer's failed collective
    /// must notice) and waits until it is gone.
    pub fn kill_worker(&mut self, k: usize) -> ExitStatus {
        self.worker_mut(k).kill()
    }

    /// Sends SIGTERM to worker `k` (it should leave after its current step); returns
    /// at once, see [`Sandbox::wait_for_worker_exit`].
    pub fn stop_worker(&mut self, k: usize) {
        self.worker_mut(k).terminate();
    }

    /// Starts worker `k` again: a fresh process under the same name and flags. The
    /// old process must have exited (kill or stop it first); its output stays in
    /// [`Sandbox::logs`].
    pub fn restart_worker(&mut self, k: usize) {
        let (name, extra, running) = {
            let old = self.worker_mut(k);
            (
                old.name.clone(),
                old.extra.clone(),
                old.try_exit().is_none(),
            )
        };
        assert!(
            !running,
            "{name} still runs: kill or stop it before restarting it"
        );
        let fresh = self.spawn_worker(&name, extra);
        let old = std::mem::replace(&mut self.workers[k], fresh);
        self.retired.push(old);
    }

    /// `kill -9` the coordinator and waits until it is gone.
    pub fn kill_coordinator(&mut self) -> ExitStatus {
        self.coordinator.kill()
    }

    /// Starts the coordinator again, on the same address, config, out_dir and flags
    /// (`extra` appended), after it exited (kill or stop it first); waits until it
    /// listens. The workers keep the address and find it again.
    pub fn restart_coordinator(&mut self, extra: &[&str]) {
        assert!(
            self.coordinator.try_exit().is_some(),
            "the coordinator still runs: kill or stop it before restarting it"
        );
        let mut args = self.coordinator_args.clone();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let (fresh, address) = start_coordinator(
            &self.config,
            &self.address,
            self.expected_workers,
            &args,
            self.startup_deadline,
            self.wait_ready,
        );
        assert_eq!(address, self.address, "the restarted coordinator moved");
        let old = std::mem::replace(&mut self.coordinator, fresh);
        self.old_coordinators.push(old);
    }

    /// Sends SIGTERM to the coordinator (it drains and stops the workers).
    pub fn stop_coordinator(&mut self) {
        self.coordinator.terminate();
    }

    /// Waits for worker `k` to exit and returns its status; panics with every
    /// process's output if it still runs after `limit`.
    pub fn wait_for_worker_exit(&mut self, k: usize, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        match self.worker_mut(k).wait_until(deadline) {
            Some(status) => status,
            None => self.fail(&format!("worker w{k} still runs after {limit:?}")),
        }
    }

    /// Process id of worker `k`'s current process.
    pub fn worker_pid(&self, k: usize) -> u32 {
        self.workers
            .get(k)
            .unwrap_or_else(|| panic!("no worker w{k}"))
            .child
            .id()
    }

    /// Worker `k`'s captured output (its current process).
    pub fn worker_output(&self, k: usize) -> String {
        self.workers
            .get(k)
            .unwrap_or_else(|| panic!("no worker w{k}"))
            .output()
    }

    /// The coordinator's captured output.
    pub fn coordinator_output(&self) -> String {
        self.coordinator.output()
    }

    /// Process ids of the coordinator and every worker process the sandbox
    /// started, exited or not (to check that none outlives the sandbox).
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.coordinator)
            .chain(&self.old_coordinators)
            .chain(&self.retired)
            .chain(&self.workers)
            .map(|p| p.child.id())
            .collect()
    }

    /// Every process's output, coordinator first, each under a header with its
    /// name and state; for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        let processes = self
            .old_coordinators
            .iter()
            .chain(std::iter::once(&self.coordinator))
            .chain(&self.retired)
            .chain(&self.workers);
        for process in processes {
            let state = match process.exit {
                Some(status) => format!("exited: {status}"),
                None => "running".to_owned(),
            };
            text.push_str(&format!(
                "----- {} ({state}) -----\n{}\n",
                process.name,
                process.output()
            ));
        }
        text
    }

    /// Kills every process still running and panics with `why` and every
    /// process's output.
    fn fail(&mut self, why: &str) -> ! {
        self.kill_all();
        panic!("{why}\n{}", self.logs());
    }

    fn kill_all(&mut self) {
        for process in self.workers.iter_mut().chain(&mut self.retired) {
            process.kill();
        }
        self.coordinator.kill();
    }

    /// The ledger as it stands now.
    pub fn ledger(&self) -> Ledger {
        Ledger::read(&self.out_dir)
            .unwrap_or_else(|e| panic!("unreadable ledger: {e}\n{}", self.logs()))
    }

    /// The ledger's path, `<out_dir>/coordinator/ledger.jsonl`.
    pub fn ledger_path(&self) -> PathBuf {
        ledger_path(&self.out_dir)
    }

    /// Waits until at least `steps` steps stand committed in the ledger; panics with
    /// every process's output if that takes longer than `limit` or the
    /// coordinator exits first.
    pub fn wait_for_commits(&mut self, steps: usize, limit: Duration) -> Ledger {
        self.wait_for_ledger(&format!("{steps} committed steps"), limit, |ledger| {
            ledger.committed().len() >= steps
        })
    }

    /// Waits until `done` holds for the ledger (`what` names it for the failure
    /// message); panics with every process's output if that takes longer than
    /// `limit` or the coordinator exits first.
    pub fn wait_for_ledger(
        &mut self,
        what: &str,
        limit: Duration,
        done: impl Fn(&Ledger) -> bool,
    ) -> Ledger {
        let deadline = Instant::now() + limit;
        loop {
            let ledger = self.ledger();
            if done(&ledger) {
                return ledger;
            }
            if let Some(status) = self.coordinator.try_exit() {
                // It may have written the awaited lines just before it exited.
                let ledger = self.ledger();
                if done(&ledger) {
                    return ledger;
                }
                self.fail(&format!(
                    "the coordinator exited ({status}) before the ledger showed {what}"
                ));
            }
            if Instant::now() >= deadline {
                self.fail(&format!("the ledger did not show {what} within {limit:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the coordinator to exit, then for every worker still running
    /// (the coordinator stops them at the end); panics with every process's
    /// output when any runs past `limit`.
    pub fn wait_for_end(&mut self, limit: Duration) -> JobEnd {
        let deadline = Instant::now() + limit;
        let Some(coordinator) = self.coordinator.wait_until(deadline) else {
            self.fail(&format!("the job did not end within {limit:?}"));
        };
        let mut workers = Vec::new();
        for k in 0..self.retired.len() + self.workers.len() {
            let process = if k < self.retired.len() {
                &mut self.retired[k]
            } else {
                &mut self.workers[k - self.retired.len()]
            };
            match process.wait_until(deadline) {
                Some(status) => workers.push((process.name.clone(), status)),
                None => {
                    let name = process.name.clone();
                    self.fail(&format!(
                        "the coordinator exited ({coordinator}) but {name} still runs after {limit:?}"
                    ));
                }
            }
        }
        JobEnd {
            coordinator,
            workers,
        }
    }

    /// Asserts the ledger shows a complete job (see [`Ledger::check_complete`])
    /// trained by world sizes in `world_sizes`; panics with the violation, the
    /// ledger and every process's output.
    pub fn assert_ledger_complete(&self, world_sizes: &[usize]) {
        if let Err(violation) = self.ledger().check_complete(&self.config, world_sizes) {
            let text = std::fs::read_to_string(self.ledger_path()).unwrap_or_default();
            panic!(
                "the ledger is not complete: {violation}\n----- ledger -----\n{text}\n{}",
                self.logs()
            );
        }
    }
}

impl Drop for Sandbox {
    /// Kills every process still running, so a failed scenario leaves none behind.
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Writes a random job token (32 bytes from the OS, hex) to `sandbox.token` beside
/// `config`, readable by its owner only.
fn write_token_beside(config: &Path) -> PathBuf {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = config
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("sandbox.token");
    std::fs::write(&path, format!("{token}\n")).expect("write the sandbox's token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the sandbox's token");
    }
    path
}

/// Starts `hsat coordinator` listening on `listen` and waits until it prints its
/// address (and, with `wait_ready`, until it logs that it serves its job); panics
/// with its output if it exits or stays silent past `deadline`.
fn start_coordinator(
    config: &Path,
    listen: &str,
    expected_workers: usize,
    args: &[String],
    deadline: Duration,
    wait_ready: bool,
) -> (Process, String) {
    let mut command = Command::new(hsat_binary());
    command
        .args(["coordinator", "--config"])
        .arg(config)
        .args(["--listen", listen, "--workers"])
        .arg(expected_workers.to_string())
        .args(args);
    let mut coordinator = Process::spawn("coordinator", command, Vec::new());
    let until = Instant::now() + deadline;
    loop {
        let output = coordinator.output();
        if let Some(address) = listening_address(&output)
            && (!wait_ready || output.contains(READY))
        {
            return (coordinator, address);
        }
        if let Some(status) = coordinator.try_exit() {
            panic!(
                "the coordinator exited ({status}) before listening:\n{}",
                coordinator.output()
            );
        }
        if Instant::now() >= until {
            coordinator.kill();
            panic!(
                "the coordinator printed no `listening on ADDR` (or, waiting for it, no {READY:?}) within {deadline:?}:\n{}",
                coordinator.output()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// What the coordinator logs once its job is ready (health SERVING).
const READY: &str = "coordinator ready: serving the job";

/// The address in a `<name>: listening on ADDR` line.
fn listening_address(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|line| line.split("listening on ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
}
