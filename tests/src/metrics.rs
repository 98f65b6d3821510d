//! Scraping a running job as an operator's monitoring would: where each process
//! says it serves its metrics, one scrape parsed, the metric table of
//! the README's metric tables, and a real Prometheus server (Debian's `prometheus`
//! package) scraping the job.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hsat_metrics::exposition::Scrape;

/// The address in the last line of `output` that contains `who` and
/// `metrics on http://ADDR/metrics` (what each hsat process prints).
pub fn metrics_address(output: &str, who: &str) -> Option<SocketAddr> {
    output
        .lines()
        .filter(|line| line.contains(who))
        .filter_map(|line| {
            let rest = line.split("metrics on http://").nth(1)?;
            rest.trim().trim_end_matches("/metrics").parse().ok()
        })
        .next_back()
}

/// `GET /metrics` in the classic text format, parsed; with the raw text.
pub fn scrape(address: SocketAddr) -> (Scrape, String) {
    let (status, content_type, body) = hsat_metrics::http::get(address, "/metrics", None)
        .unwrap_or_else(|e| panic!("cannot scrape {address}: {e}"));
    assert_eq!(status, 200, "scraping {address}: {body}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let parsed = Scrape::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    (parsed, body)
}

/// The metric tables of the README (section "Metrics"): metric name (labels
/// stripped) -> type.
pub fn documented_metrics() -> BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut metrics = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| `name{labels}` | type | meaning |` -> ["", name, type, meaning, ""].
        let [_, name, kind, _meaning, ..] = cells.as_slice() else {
            continue;
        };
        let Some(name) = name
            .strip_prefix("`hsat_")
            .and_then(|n| n.strip_suffix('`'))
        else {
            continue;
        };
        let name = format!("hsat_{}", name.split('{').next().unwrap_or(name));
        metrics.insert(name, (*kind).to_owned());
    }
    metrics
}

/// Process ids whose parent is `parent` (the worker processes of `hsat run`).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // `pid (comm) state ppid ...`; comm may hold spaces.
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Sends `signal` (`STOP`, `CONT`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(status.success(), "kill -s {signal} {pid} failed");
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A Prometheus server scraping every second the targets listed in a file (set
/// with [`Prometheus::set_targets`]), with its config and storage in `dir`;
/// killed when dropped.
pub struct Prometheus {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
    targets: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` (Debian's package; `scripts/setup.sh` installs it) with
    /// no targets yet; panics with a clear message when it is not installed.
    pub fn start(dir: &Path) -> Prometheus {
        let config = dir.join("prometheus.yml");
        let targets = dir.join("targets.json");
        std::fs::write(&targets, "[]")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", targets.display()));
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: hsat\n    file_sd_configs:\n      \
                 - files: ['{}']\n        refresh_interval: 1s\n",
                targets.display()
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let address: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start prometheus ({e}): install Debian's `prometheus` package \
                     (scripts/setup.sh does) so that `prometheus` is on PATH"
                )
            });
        Prometheus {
            child,
            address,
            log,
            targets,
        }
    }

    /// Scrape `targets` from now on.
    pub fn set_targets(&self, targets: &[SocketAddr]) {
        let listed: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        // Written aside and renamed: Prometheus never reads a half-written file.
        let staging = self.targets.with_extension("json.tmp");
        std::fs::write(
            &staging,
            format!("[{{\"targets\": [{}]}}]", listed.join(", ")),
        )
        .and_then(|()| std::fs::rename(&staging, &self.targets))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.targets.display()));
    }

    /// Each target's URL, health and last scrape error (for failure messages).
    pub fn targets_status(&self) -> String {
        let Ok((_, _, body)) = hsat_metrics::http::get(self.address, "/api/v1/targets", None)
        else {
            return "unknown (no answer)".into();
        };
        let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        value["data"]["activeTargets"]
            .as_array()
            .map(|targets| {
                targets
                    .iter()
                    .map(|t| format!("{} {} {}", t["scrapeUrl"], t["health"], t["lastError"]))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or(body)
    }

    /// Waits until the server answers queries.
    pub fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.query("up").is_none() {
            assert!(
                Instant::now() < deadline,
                "prometheus did not start within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The instant-query result of `query` (`data.result` of `/api/v1/query`),
    /// `None` while the server does not answer yet.
    pub fn query(&self, query: &str) -> Option<Vec<serde_json::Value>> {
        let path = format!("/api/v1/query?query={}", encode_query(query));
        let (status, _, body) = hsat_metrics::http::get(self.address, &path, None).ok()?;
        if status != 200 {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(&body).ok()?;
        value["data"]["result"].as_array().cloned()
    }

    /// Queries until `accept` holds for the result, or panics after `limit` with
    /// the last result and the server's log.
    pub fn wait_for(
        &self,
        query: &str,
        limit: Duration,
        mut accept: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(result) = self.query(query) {
                if accept(&result) {
                    return result;
                }
                last = Some(result);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "prometheus did not answer {query:?} as expected within {limit:?}; last answer {last:?}\n\
             targets: {}\n{}",
            self.targets_status(),
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one instant-query result (`"value": [time, "text"]`).
pub fn sample_value(result: &serde_json::Value) -> Option<f64> {
    result["value"][1].as_str()?.parse().ok()
}

fn encode_query(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
