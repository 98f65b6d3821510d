//! Real-process ranks for the collective tests: a test re-executes its own test
//! binary (`--exact <test> --nocapture`) once per extra rank; the parent process is
//! rank 0 and hosts the store. A child learns its role from an environment variable
//! (`test:rank:world:port:prefix`) each test file names. Gloo over loopback.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use hsat_worker::collective::{Backend, ProcessGroup, Store};

/// What a child process is asked to be.
#[derive(Debug, Clone)]
pub struct Role {
    pub rank: usize,
    pub world: usize,
    pub port: u16,
    pub prefix: String,
}

/// One rank's side of a test.
pub type Body = fn(&ProcessGroup) -> anyhow::Result<()>;

/// How a test file starts its ranks.
#[derive(Debug, Clone, Copy)]
pub struct Ranks {
    /// The environment variable that carries a child's role.
    pub role_env: &'static str,
    /// The store's and the process groups' timeout.
    pub timeout: Duration,
    /// How long the parent waits for each child before killing it.
    pub child_limit: Duration,
}

impl Ranks {
    /// The role of this process if it is a child spawned for `test`.
    pub fn child_role(&self, test: &str) -> Option<Role> {
        let value = std::env::var(self.role_env).ok()?;
        let parts: Vec<&str> = value.split(':').collect();
        if parts.len() != 5 || parts[0] != test {
            return None;
        }
        Some(Role {
            rank: parts[1].parse().ok()?,
            world: parts[2].parse().ok()?,
            port: parts[3].parse().ok()?,
            prefix: parts[4].to_owned(),
        })
    }

    /// Starts this test binary as the child `role` of `test`.
    pub fn spawn_rank(&self, test: &str, role: &Role) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(
                self.role_env,
                format!(
                    "{test}:{}:{}:{}:{}",
                    role.rank, role.world, role.port, role.prefix
                ),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    /// Runs `body` on `world` ranks: this process is rank 0, the others are
    /// children. In a child of `test` runs the child's side when its role is for
    /// `prefix` (a test may call this several times with different prefixes) and
    /// returns otherwise.
    pub fn run(&self, test: &str, world: usize, prefix: &str, body: Body) {
        if let Some(role) = self.child_role(test) {
            if role.prefix == prefix {
                self.run_child(&role, body);
            }
            return;
        }
        let store = Store::host("127.0.0.1", 0, world, self.timeout).unwrap();
        let mut children: Vec<Child> = (1..world)
            .map(|rank| {
                let role = Role {
                    rank,
                    world,
                    port: store.port(),
                    prefix: prefix.to_owned(),
                };
                self.spawn_rank(test, &role)
            })
            .collect();
        let pg = ProcessGroup::new(&store, prefix, 0, world, Backend::Gloo, self.timeout).unwrap();
        let outcome = body(&pg);
        for child in &mut children {
            wait_child(child, self.child_limit).unwrap();
        }
        outcome.unwrap();
    }

    /// The child side of [`Ranks::run`].
    fn run_child(&self, role: &Role, body: Body) {
        tch::set_num_threads(1);
        let store = Store::connect("127.0.0.1", role.port, role.world, self.timeout).unwrap();
        let pg = ProcessGroup::new(
            &store,
            &role.prefix,
            role.rank,
            role.world,
            Backend::Gloo,
            self.timeout,
        )
        .unwrap();
        body(&pg).unwrap();
    }
}

/// Waits for a child; kills it and fails after `limit` so that a bug never hangs CI.
pub fn wait_child(child: &mut Child, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(status.success(), "child rank failed: {status}");
            return Ok(());
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            bail!("child rank still running after {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
