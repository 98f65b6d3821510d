//! The control plane's authentication with real processes: while a 2-worker job
//! trains, a stranger calls the coordinator as any gRPC client could (a client
//! compiled here from the same `.proto`, metadata set by hand) and every call that
//! lacks the right credentials, is too large, malformed, forged or out of its
//! generation is refused with the intended code and reason; the job still finishes
//! with a complete ledger, and no token appears in any log.
//!
//! A replay of an accepted report with the worker's own session (what an
//! eavesdropper on an unencrypted network could send) is checked over gRPC in
//! `coordinator/tests/harness.rs`, where the simulated workers' sessions are at hand.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use hsat_core::config::{self, ConfigSources};
use hsat_core::dataset::DatasetIndex;
use hsat_tests::{Sandbox, SandboxSpec, SmallJob, synth_opensrh, write_small_job_config};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Status};

#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
mod pb {
    tonic::include_proto!("hsat.v1");
}

use pb::admin_client::AdminClient;
use pb::coordinator_client::CoordinatorClient;

/// What a call carries.
#[derive(Clone, Default)]
struct Credentials {
    /// The whole `authorization` value.
    authorization: Option<String>,
    session: Option<String>,
}

impl Credentials {
    fn bearer(token: &str) -> Self {
        Self {
            authorization: Some(format!("Bearer {token}")),
            session: None,
        }
    }

    fn with_session(mut self, session: &str) -> Self {
        self.session = Some(session.to_owned());
        self
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(value.as_str()).unwrap(),
            );
        }
        if let Some(value) = &self.session {
            request.metadata_mut().insert(
                "x-hsat-session",
                MetadataValue::try_from(value.as_str()).unwrap(),
            );
        }
        request
    }
}

/// Asserts `result` failed with `code` and a message containing `reason`.
fn assert_refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, Status>,
    code: Code,
    reason: &str,
) {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, the call succeeded: {value:?}"),
        Err(status) => assert!(
            status.code() == code && status.message().contains(reason),
            "{what}: expected {code:?} with {reason:?}, got {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

fn registration(config_path: &Path, name: &str) -> pb::RegisterRequest {
    let cfg = config::load(&ConfigSources {
        file: Some(config_path.to_path_buf()),
        env: Default::default(),
        overrides: Vec::new(),
    })
    .unwrap();
    pb::RegisterRequest {
        worker_name: name.to_owned(),
        config_json: cfg.to_json_value().to_string(),
        dataset_fingerprint: DatasetIndex::load(&cfg.data).unwrap().fingerprint,
        advertise_host: "127.0.0.1".into(),
        hsat_version: env!("CARGO_PKG_VERSION").into(),
    }
}

#[test]
fn unauthenticated_forged_oversized_malformed_and_stale_calls_are_refused_while_the_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_opensrh(dir.path(), 5, 3);
    let config = write_small_job_config(
        dir.path(),
        &SmallJob {
            data,
            batch_size: 2,
            // About 60 steps: the job is still training while every call below is made.
            epochs: 30,
            attack_iters: 3,
        },
    );
    let mut sandbox = Sandbox::start(SandboxSpec::new(&config, 2));
    let token = sandbox.token();
    sandbox.wait_for_commits(1, Duration::from_secs(120));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let address = format!("http://{}", sandbox.address());
    let job = Credentials::bearer(&token);
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(address.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut coordinator = CoordinatorClient::new(channel.clone());
        let mut admin = AdminClient::new(channel.clone());

        // 1. No token, a wrong token, a token without the Bearer scheme: refused
        //    before anything is decoded, status included.
        let none = Credentials::default();
        let wrong = Credentials::bearer(&format!("{}x", &token[..token.len() - 1]));
        let no_scheme = Credentials {
            authorization: Some(token.clone()),
            session: None,
        };
        assert_refused(
            "status without a token",
            admin.get_status(none.request(pb::StatusRequest {})).await,
            Code::Unauthenticated,
            "missing job token",
        );
        assert_refused(
            "status with a wrong token",
            admin.get_status(wrong.request(pb::StatusRequest {})).await,
            Code::Unauthenticated,
            "wrong job token",
        );
        assert_refused(
            "register without the Bearer scheme",
            coordinator
                .register(no_scheme.request(registration(&config, "intruder")))
                .await,
            Code::Unauthenticated,
            "wrong job token",
        );
        assert_refused(
            "leave of worker 1 without a token",
            coordinator
                .leave(none.request(pb::LeaveRequest {
                    worker_id: 1,
                    reason: "bye".into(),
                }))
                .await,
            Code::Unauthenticated,
            "missing job token",
        );
        // Health stays open, and says only whether the coordinator serves.
        let mut health = tonic_health_client(channel.clone());
        let reply = health
            .check(Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, 1, "health check without a token: SERVING");

        // The status with the token names the real workers.
        let status = admin
            .get_status(job.request(pb::StatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<u64> = status.workers.iter().map(|w| w.worker_id).collect();
        assert_eq!(ids.len(), 2, "{status:?}");

        // 2. Oversized: a 5 MiB registration is refused before it is decoded.
        let mut huge = registration(&config, "huge");
        huge.worker_name = "x".repeat(5 << 20);
        assert_refused(
            "a 5 MiB registration",
            coordinator.register(job.request(huge)).await,
            Code::OutOfRange,
            "message length too large",
        );

        // 3. Malformed fields: InvalidArgument naming the field.
        assert_refused(
            "heartbeat of worker 0",
            coordinator
                .heartbeat(job.request(pb::HeartbeatRequest { worker_id: 0 }))
                .await,
            Code::InvalidArgument,
            "worker_id is 0",
        );
        assert_refused(
            "an assignment request wanting a step before its next step",
            coordinator
                .next_assignment(job.request(pb::AssignmentRequest {
                    worker_id: ids[0],
                    generation: 1,
                    next_step: 5,
                    want_step: Some(4),
                    ..Default::default()
                }))
                .await,
            Code::InvalidArgument,
            "want_step 4 is before next_step 5",
        );

        // 4. Forged: the job token acting for a real worker, without its session or
        //    with a made-up one.
        for id in &ids {
            assert_refused(
                "leave of a real worker with the job token only",
                coordinator
                    .leave(job.request(pb::LeaveRequest {
                        worker_id: *id,
                        reason: "forged".into(),
                    }))
                    .await,
                Code::Unauthenticated,
                "missing session token",
            );
            assert_refused(
                "a report for a real worker with a made-up session",
                coordinator
                    .report_step(
                        job.clone()
                            .with_session("0123456789abcdef0123456789abcdef")
                            .request(pb::StepReport {
                                worker_id: *id,
                                generation: status.generation,
                                step: status.step,
                                rank: 0,
                                param_checksum: 0xbad,
                                ..Default::default()
                            }),
                    )
                    .await,
                Code::PermissionDenied,
                "is not worker",
            );
        }

        // 5. A stranger with the job token registers (a worker of its own) and
        //    uses its genuine session for the real workers: refused; for itself, a
        //    report of a generation that is not the current one changes nothing.
        let registered = coordinator
            .register(job.request(registration(&config, "intruder")))
            .await
            .unwrap()
            .into_inner();
        assert!(!registered.session_token.is_empty());
        let mine = job.clone().with_session(&registered.session_token);
        for id in &ids {
            assert_refused(
                "heartbeat of a real worker with another worker's session",
                coordinator
                    .heartbeat(mine.request(pb::HeartbeatRequest { worker_id: *id }))
                    .await,
                Code::PermissionDenied,
                "a worker acts only for itself",
            );
            assert_refused(
                "leave of a real worker with another worker's session",
                coordinator
                    .leave(mine.request(pb::LeaveRequest {
                        worker_id: *id,
                        reason: "forged".into(),
                    }))
                    .await,
                Code::PermissionDenied,
                "a worker acts only for itself",
            );
        }
        for _ in 0..2 {
            assert_refused(
                "a report of a made-up generation (and its replay)",
                coordinator
                    .report_step(mine.request(pb::StepReport {
                        worker_id: registered.worker_id,
                        generation: 999,
                        step: 0,
                        rank: 0,
                        param_checksum: 0xbad,
                        ..Default::default()
                    }))
                    .await,
                Code::Aborted,
                "changed nothing",
            );
        }
        coordinator
            .leave(mine.request(pb::LeaveRequest {
                worker_id: registered.worker_id,
                reason: "done probing".into(),
            }))
            .await
            .unwrap();
        assert_refused(
            "a call after leaving: the session ended with the worker",
            coordinator
                .heartbeat(mine.request(pb::HeartbeatRequest {
                    worker_id: registered.worker_id,
                }))
                .await,
            Code::NotFound,
            "register again",
        );
        // Every probe above ran while the job trained.
        let after = admin
            .get_status(job.request(pb::StatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(
            after.step < after.total_steps,
            "the job ended before the probes did: {after:?}"
        );
    });

    // The job was not disturbed: it finishes, both real workers committed every
    // step, each epoch trained every patient once.
    let end = sandbox.wait_for_end(Duration::from_secs(300));
    let logs = sandbox.logs();
    assert!(end.coordinator.success(), "the job finished:\n{logs}");
    for name in ["w0", "w1"] {
        assert!(end.worker(name).success(), "{name} exited cleanly:\n{logs}");
    }
    sandbox.assert_ledger_complete(&[2]);
    let ledger = sandbox.ledger();
    assert!(
        ledger.commits().all(|c| c
            .ranks
            .iter()
            .all(|r| ["w0", "w1"].contains(&r.worker_name.as_str()))),
        "only the real workers trained:\n{logs}"
    );

    // Refusals are logged with the peer and the reason, rate-limited, never with a
    // token.
    let coordinator_output = sandbox.coordinator_output();
    assert!(
        coordinator_output
            .lines()
            .any(|line| line.contains("refused a control-plane call")
                && line.contains("peer=127.0.0.1")
                && line.contains("reason=missing_token")),
        "the refusal is logged with its peer:\n{coordinator_output}"
    );
    let logged = coordinator_output
        .lines()
        .filter(|line| line.contains("refused a control-plane call"))
        .count();
    // 12 refusals from one address, all within a few seconds.
    assert!(
        (1..=2).contains(&logged),
        "one line per peer per 10 s, however many refusals ({logged} lines):\n{coordinator_output}"
    );
    assert!(!logs.contains(&token), "a log shows the job token");
    assert!(
        !logs.contains(&token[..16]),
        "a log shows part of the job token"
    );
}

/// The standard health protocol, by hand (two messages and one method): what a
/// Kubernetes probe sends.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

struct HealthClient(tonic::client::Grpc<tonic::transport::Channel>);

fn tonic_health_client(channel: tonic::transport::Channel) -> HealthClient {
    HealthClient(tonic::client::Grpc::new(channel))
}

impl HealthClient {
    async fn check(
        &mut self,
        request: Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        self.0
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::default();
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
        self.0.unary(request, path, codec).await
    }
}

/// `hsat coordinator` without a token refuses to start and says how to make one;
/// with `--insecure` it serves anyone and logs what that exposes.
#[test]
fn a_coordinator_without_a_token_refuses_to_start_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_opensrh(dir.path(), 5, 3);
    let config = write_small_job_config(
        dir.path(),
        &SmallJob {
            data,
            batch_size: 2,
            epochs: 1,
            attack_iters: 1,
        },
    );
    let config_arg = config.display().to_string();
    let refused = std::process::Command::new(hsat_tests::hsat_binary())
        .args([
            "coordinator",
            "--config",
            &config_arg,
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("HSAT_TOKEN")
        .env_remove("HSAT_TOKEN_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("no job token")
            && stderr.contains("--insecure"),
        "{stderr}"
    );

    let sandbox = Sandbox::start(
        SandboxSpec::new(&config, 1)
            .start_workers(0)
            .coordinator_args(&["--insecure"]),
    );
    let status = hsat_tests::run_hsat(&["status", "--coordinator", sandbox.address()]);
    assert!(
        status.status.success(),
        "an insecure coordinator answers without a token:\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let output = sandbox.coordinator_output();
    assert!(
        output.contains("authentication is OFF (--insecure)")
            && output.contains("act for any worker"),
        "{output}"
    );
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Writes a CA, a coordinator certificate for 127.0.0.1 and a worker certificate
/// (PEM) to `dir`; returns `(ca, (coordinator cert, key), (worker cert, key))`.
fn test_pki(dir: &Path) -> (String, (String, String), (String, String)) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let leaf = |name: &str, san: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![san.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (
            write(&format!("{name}.crt"), cert.pem()),
            write(&format!("{name}.key"), key.serialize_pem()),
        )
    };
    let coordinator = leaf("coordinator", "127.0.0.1");
    let worker = leaf("worker", "worker");
    (write("ca.crt", ca.pem()), coordinator, worker)
}

/// Mutual TLS with real processes: the coordinator requires client certificates
/// from the job's CA; two workers holding one train the job to the end, and a
/// worker without one never gets a call through.
#[test]
fn a_job_trains_over_mutual_tls_and_a_worker_without_a_certificate_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_opensrh(dir.path(), 5, 3);
    let config = write_small_job_config(
        dir.path(),
        &SmallJob {
            data,
            batch_size: 2,
            epochs: 4,
            attack_iters: 1,
        },
    );
    let (ca, (server_cert, server_key), (worker_cert, worker_key)) = test_pki(dir.path());
    let set = |key: &str, value: &str| format!("security.{key}={value}");
    let coordinator_sets = [
        set("tls_cert", &server_cert),
        set("tls_key", &server_key),
        set("tls_client_ca", &ca),
    ];
    let worker_sets = [
        set("tls_ca", &ca),
        set("tls_cert", &worker_cert),
        set("tls_key", &worker_key),
    ];
    let flags = |sets: &[String]| -> Vec<String> {
        sets.iter()
            .flat_map(|s| ["--set".to_owned(), s.clone()])
            .collect()
    };
    let coordinator_flags = flags(&coordinator_sets);
    let worker_flags = flags(&worker_sets);
    let mut sandbox = Sandbox::start(
        SandboxSpec::new(&config, 2)
            .coordinator_args(&strs(&coordinator_flags))
            .worker_args(&strs(&worker_flags)),
    );
    // The same worker without its certificate (the later --set wins).
    let k = sandbox.add_worker_with(&[
        "--set",
        "security.tls_cert=",
        "--set",
        "security.tls_key=",
        "--rpc-retry-deadline",
        "1",
    ]);
    let exit = sandbox.wait_for_worker_exit(k, Duration::from_secs(60));
    let output = sandbox.worker_output(k);
    assert!(
        !exit.success() && output.contains("transport error"),
        "a worker without a client certificate fails at the TLS layer:\n{output}"
    );
    let end = sandbox.wait_for_end(Duration::from_secs(300));
    let logs = sandbox.logs();
    assert!(
        end.coordinator.success(),
        "the job finished over TLS:\n{logs}"
    );
    for name in ["w0", "w1"] {
        assert!(end.worker(name).success(), "{name} exited cleanly:\n{logs}");
    }
    assert!(
        sandbox.coordinator_output().contains("tls=true"),
        "the coordinator served TLS:\n{logs}"
    );
    sandbox.assert_ledger_complete(&[2]);
}
